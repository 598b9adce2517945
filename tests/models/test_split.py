"""The split step gives the monolithic model's adapter gradients (DESIGN.md §1 invariant)."""

import pytest
import torch

from fednano_ray.models.adapter import adapter_state, load_adapter_state
from fednano_ray.models.llava import build_tiny_llava, num_image_tokens, parts_from_llava
from fednano_ray.models.prompt import CHATML, collate
from fednano_ray.models.split import IGNORE_INDEX, split_mllm


def _batch(tok, n_img, image_token_id, n=3):
    qs = [
        ("What colour is the square?", "red"),
        ("How many stars?", "four"),
        ("Where is it?", "left"),
    ]
    rows = [CHATML.encode(tok, q, a, n_img, image_token_id) for q, a in qs[:n]]
    return collate(rows, tok.pad_token_id)


def _randomise_adapters(edge):
    """B starts at zero; give both factors values so every gradient path is exercised."""
    with torch.no_grad():
        for p in edge.adapters.parameters():
            p.normal_(0, 0.05)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_llava()


def test_split_grads_match_monolithic_llava(tiny):
    """Adapter grads via edge -> server.loss_and_grad -> edge backward equal LLaVA's own end-to-end
    grads.
    """
    llava, tok = tiny
    parts = parts_from_llava(llava)
    edge, server = split_mllm(parts, r=4, scaling=2.0, seed=0)
    _randomise_adapters(edge)
    n_img = num_image_tokens(llava.config)
    batch = _batch(tok, n_img, llava.config.image_token_index)
    pixels = torch.randn(3, 3, 32, 32)

    # Split path.
    z = edge(batch["input_ids"], batch["image_mask"], pixel_values=pixels)
    losses, grad = server.loss_and_grad(z, batch["attention_mask"], batch["labels"])
    z.backward(grad)
    split_grads = {k: p.grad.clone() for k, p in edge.adapters.named_parameters()}

    # Monolithic path: the same adapters hooked into HF's own LLaVA forward (its merge + loss).
    for p in edge.adapters.parameters():
        p.grad = None
    inner = llava.model
    h1 = inner.language_model.embed_tokens.register_forward_hook(
        lambda m, i, o: edge.adapters["text"](o)
    )
    h2 = inner.multi_modal_projector.register_forward_hook(
        lambda m, i, o: edge.adapters["vision"](o)
    )
    try:
        out = llava(
            input_ids=batch["input_ids"],
            pixel_values=pixels,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
    finally:
        h1.remove()
        h2.remove()
    out.loss.backward()
    assert torch.allclose(losses[0], out.loss, atol=1e-5)
    for k, p in edge.adapters.named_parameters():
        assert p.grad.abs().sum() > 0, k
        torch.testing.assert_close(split_grads[k], p.grad, rtol=1e-4, atol=1e-6)


def test_merged_batch_gives_each_client_its_own_gradient(tiny):
    """Rows of two clients merged into one padded batch get the grads they get alone."""
    llava, tok = tiny
    edge, server = split_mllm(parts_from_llava(llava), r=4, scaling=2.0, seed=0)
    _randomise_adapters(edge)
    n_img = num_image_tokens(llava.config)
    batch = _batch(tok, n_img, llava.config.image_token_index)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        z = edge(batch["input_ids"], batch["image_mask"], pixel_values=pixels)
    groups = torch.tensor([0, 1, 1])
    losses, grad = server.loss_and_grad(z, batch["attention_mask"], batch["labels"], groups)
    for g, rows in ((0, [0]), (1, [1, 2])):
        t = max(
            int(batch["attention_mask"][r].sum()) for r in rows
        )  # alone: padded to its own length
        alone_loss, alone_grad = server.loss_and_grad(
            z[rows, :t], batch["attention_mask"][rows, :t], batch["labels"][rows, :t]
        )
        torch.testing.assert_close(losses[g], alone_loss[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[rows, :t], alone_grad, rtol=1e-4, atol=1e-6)


def test_round_zero_is_the_pretrained_model(tiny):
    """B = 0 at init, so the edge's embeddings equal LLaVA's own merged inputs."""
    llava, tok = tiny
    edge, _ = split_mllm(parts_from_llava(llava), r=4, scaling=2.0)
    batch = _batch(tok, num_image_tokens(llava.config), llava.config.image_token_index, n=1)
    pixels = torch.randn(1, 3, 32, 32)
    z = edge(batch["input_ids"], batch["image_mask"], pixel_values=pixels)
    feats = llava.model.get_image_features(pixel_values=pixels).pooler_output[0]
    ref = llava.model.language_model.embed_tokens(batch["input_ids"])
    ref[batch["image_mask"]] = feats
    torch.testing.assert_close(z, ref)


def test_score_is_sum_of_label_logprobs(tiny):
    """score() equals -CE summed over each row's label tokens."""
    llava, tok = tiny
    edge, server = split_mllm(parts_from_llava(llava), r=4, scaling=2.0)
    batch = _batch(tok, num_image_tokens(llava.config), llava.config.image_token_index)
    with torch.no_grad():
        z = edge(batch["input_ids"], batch["image_mask"], pixel_values=torch.randn(3, 3, 32, 32))
        s = server.score(z, batch["attention_mask"], batch["labels"])
        logits = llava.lm_head(
            llava.model.language_model(
                inputs_embeds=z, attention_mask=batch["attention_mask"]
            ).last_hidden_state
        )
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt = batch["labels"][:, 1:]
    m = tgt != IGNORE_INDEX
    ref = (lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * m).sum(1)
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-5)


def test_heterogeneous_rank_state_truncates():
    """A rank-4 adapter loads the first 4 ranks of a rank-8 global state (HetLoRA)."""
    llava, _ = build_tiny_llava()
    edge8, _ = split_mllm(parts_from_llava(llava), r=8, scaling=2.0, seed=1)
    edge4, _ = split_mllm(parts_from_llava(llava), r=4, scaling=2.0)
    state = adapter_state(edge8.adapters)
    load_adapter_state(edge4.adapters, state)
    torch.testing.assert_close(edge4.adapters["vision"].lora_A, state["vision.lora_A"][:4])
    with pytest.raises(ValueError, match="missing keys"):
        load_adapter_state(edge4.adapters, {"vision.lora_A": state["vision.lora_A"]})


def _low_rank_global_state(
    mllm, adapter_cfg, *, rank: int, used: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A rank-``rank`` global state whose components beyond ``used`` are zero, as aggregating
    clients of rank ``used`` (zero-padded, HetLoRA) produces; the first ``used`` components are
    random."""
    g = torch.Generator().manual_seed(seed)
    d = mllm.parts.hidden_size
    state = {}
    for m in adapter_cfg.modalities:
        a, b = torch.zeros(rank, d), torch.zeros(d, rank)
        a[:used] = torch.randn(used, d, generator=g) * 0.05
        b[:, :used] = torch.randn(d, used, generator=g) * 0.05
        state[f"{m}.lora_A"], state[f"{m}.lora_B"] = a, b
    return state


def test_the_same_global_state_computes_the_same_function_on_every_tier():
    """One scaling (adapter.lora_alpha / adapter.r) on every tier: a rank-8 global state whose
    components beyond rank 4 are zero gives a rank-4 edge and a rank-8 edge the same adapted
    embeddings z' and the same adapter gradients (so the same Fisher scale in merging). Under the
    old per-tier rule lora_alpha / r_tier the rank-4 delta was 2x (and its Fisher 4x)."""
    import numpy as np

    from fednano_ray.config import load_config
    from fednano_ray.models.build import build_mllm
    from fednano_ray.models.prompt import collate
    from fednano_ray.training import LocalServer, local_fit

    cfg = load_config("examples/tiny.yaml", ["adapter.r=8", "adapter.lora_alpha=16"])
    mllm = build_mllm(cfg.model)
    edge4, server_llm = mllm.split(cfg.adapter, r=4, seed=0)
    edge8, _ = mllm.split(cfg.adapter, r=8, seed=1)
    for edge in (edge4, edge8):
        assert all(ad.scaling == 16 / 8 for ad in edge.adapters.values())
    state = _low_rank_global_state(mllm, cfg.adapter, rank=8, used=4)
    load_adapter_state(edge4.adapters, state)  # truncates to rank 4
    load_adapter_state(edge8.adapters, state)

    # The adapter itself: the same delta, and it is the reference-scaling delta computed by hand.
    z = torch.randn(3, 7, mllm.parts.hidden_size)
    with torch.no_grad():
        out4, out8 = edge4.adapters["vision"](z), edge8.adapters["vision"](z)
    low_rank = z @ state["vision.lora_A"][:4].T @ state["vision.lora_B"][:, :4].T
    by_hand = (16 / 8) * low_rank  # lora_alpha / adapter.r
    torch.testing.assert_close(out4, out8, rtol=0, atol=1e-6)
    torch.testing.assert_close(out4 - z, by_hand, rtol=1e-5, atol=1e-6)
    assert float(by_hand.abs().max()) > 1e-3  # a real delta
    old_rule = (16 / 4) * low_rank  # lora_alpha / r_tier: twice the delta on the rank-4 tier
    assert not torch.allclose(out4 - z, old_rule, rtol=1e-3, atol=1e-6)

    # The whole edge: the same z'.
    qa = [
        ("What colour is the square?", "red"),
        ("How many stars?", "four"),
        ("Where is it?", "left"),
    ]
    rows = [mllm.encode_row(q, a) for q, a in qa]
    feats = (
        np.random.default_rng(0)
        .standard_normal((len(rows), mllm.num_image_tokens, cfg.model.tiny.vision_hidden_size))
        .astype(np.float32)
    )
    batch = collate(rows, mllm.pad_id)
    with torch.no_grad():
        z4 = edge4(batch["input_ids"], batch["image_mask"], features=torch.from_numpy(feats))
        z8 = edge8(batch["input_ids"], batch["image_mask"], features=torch.from_numpy(feats))
    torch.testing.assert_close(z4, z8, rtol=0, atol=1e-6)

    # The gradients (and so the Fisher local_fit reports from the start state) are the same too.
    fits = {}
    for r, edge in ((4, edge4), (8, edge8)):
        _, fisher, _, _ = local_fit(
            edge,
            LocalServer(server_llm),
            feats,
            [([r], 0, None) for r in rows],
            steps=1,
            batch_size=3,
            lr=1e-3,
            pad_id=mllm.pad_id,
        )
        fits[r] = fisher
    for k, f4 in fits[4].items():
        f8 = fits[8][k][:4] if k.endswith("lora_A") else fits[8][k][:, :4]
        assert float(f4.abs().max()) > 0, k
        torch.testing.assert_close(f4, f8, rtol=1e-4, atol=1e-12)
