"""The split step is exact on the nano architecture (EfficientNet-Lite0 + MLP + SmolLM2 layers)."""

import pytest
import torch
import torch.nn.functional as F

from fednano_ray.models.nano import nano_parts
from fednano_ray.models.split import IGNORE_INDEX, split_mllm

VOCAB = 49152
GRID = 3
N_IMG = GRID * GRID
PREFIX = 4  # text tokens before the visual tokens
ANSWER = 3  # labelled tokens at the end of each row


def _batch(lengths=(22, 19), seed=0):
    """Hand-made right-padded rows: prefix, 9 image slots, question, then a 3-token answer."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    input_ids = torch.full((len(lengths), t), 2, dtype=torch.long)  # pad id 2
    attention = torch.zeros(len(lengths), t, dtype=torch.long)
    image_mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    labels = torch.full((len(lengths), t), IGNORE_INDEX, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=gen)
        attention[i, :n] = 1
        image_mask[i, PREFIX : PREFIX + N_IMG] = True
        labels[i, n - ANSWER : n] = input_ids[i, n - ANSWER : n]
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "image_mask": image_mask,
        "labels": labels,
    }


# One torch thread: these models are small, and a busy machine punishes oversubscription.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    parts, tok = nano_parts(pretrained=False, num_layers=2, grid=GRID)
    assert tok is None
    return parts


def test_split_grads_match_monolithic_nano(nano):
    """Adapter grads via edge -> server.loss_and_grad -> z.backward equal one end-to-end autograd
    graph.
    """
    # Prepare
    parts = nano
    edge, server = split_mllm(parts, r=4, scaling=2.0, seed=0)
    assert not server.autocast_bf16  # fp32 throughout
    with torch.no_grad():
        for p in edge.adapters.parameters():
            p.normal_(0, 0.05)
    batch = _batch()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    # Execute: split path.
    z = edge(batch["input_ids"], batch["image_mask"], pixel_values=pixels)
    losses, grad = server.loss_and_grad(z, batch["attention_mask"], batch["labels"])
    z.backward(grad)
    split_grads = {k: p.grad.clone() for k, p in edge.adapters.named_parameters()}

    # Execute: monolithic path, one autograd graph from the adapters to the loss.
    for p in edge.adapters.parameters():
        p.grad = None
    text = edge.adapters["text"](parts.embed_tokens(batch["input_ids"]))
    visual = edge.adapters["vision"](parts.connector(parts.encoder(pixels)))
    assert visual.shape == (2, N_IMG, parts.hidden_size)
    merged = text.masked_scatter(batch["image_mask"].unsqueeze(-1).expand_as(text), visual)
    hidden = parts.decoder(
        inputs_embeds=merged, attention_mask=batch["attention_mask"]
    ).last_hidden_state
    logits = parts.lm_head(hidden)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    loss.backward()

    # Assert
    assert logits.shape[-1] == VOCAB
    torch.testing.assert_close(losses[0], loss.detach(), rtol=1e-5, atol=1e-5)
    assert set(split_grads) == {"vision.lora_A", "vision.lora_B", "text.lora_A", "text.lora_B"}
    for k, p in edge.adapters.named_parameters():
        assert p.grad.abs().sum() > 0, k
        torch.testing.assert_close(split_grads[k], p.grad, rtol=1e-4, atol=1e-7)


def test_frozen_parts_get_no_grads(nano):
    """Only the adapters train: the split leaves every frozen tensor without a gradient."""
    # Prepare
    edge, server = split_mllm(nano, r=2, scaling=2.0, seed=0)
    batch = _batch(lengths=(16,))
    features = torch.randn(1, N_IMG, 1280)

    # Execute
    z = edge(batch["input_ids"], batch["image_mask"], features=features)
    _, grad = server.loss_and_grad(z, batch["attention_mask"], batch["labels"])
    z.backward(grad)

    # Assert
    assert all(p.grad is None for p in server.parameters())
    assert all(
        p.grad is None
        for m in (edge.encoder, edge.connector, edge.embed_tokens)
        for p in m.parameters()
    )
    assert edge.adapters["text"].lora_B.grad.abs().sum() > 0
