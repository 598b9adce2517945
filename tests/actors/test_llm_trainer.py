"""LLMTrainer (no Ray): concurrent split steps merge into one batch, each client gets its own
result.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fednano_ray.actors.llm_trainer import LLMTrainer
from fednano_ray.config import load_config
from fednano_ray.models.build import build_mllm
from fednano_ray.models.prompt import collate

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
QUESTIONS = [
    ("What colour is it?", "red"),
    ("How many stars are there in the picture?", "four"),
    ("Where?", "left"),
    ("Which shape is the largest one on the right?", "circle"),
    ("Is it big?", "yes"),
    ("What is left of the blue triangle?", "square"),
]


# One torch thread: these models are small, and a busy machine punishes oversubscription.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY)


@pytest.fixture(scope="module")
def requests(cfg):
    """Three clients' split-step inputs: 1, 2 and 3 rows, each padded to its own length."""
    mllm = build_mllm(cfg.model)
    edge, server = mllm.split(cfg.adapter, seed=0)
    with torch.no_grad():
        for p in edge.adapters.parameters():  # B = 0 at init: give the adapters an effect
            p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(0)
    out = []
    for lo, hi in ((0, 1), (1, 3), (3, 6)):
        rows = [mllm.encode_row(q, a) for q, a in QUESTIONS[lo:hi]]
        batch = collate(rows, mllm.pad_id)
        pixels = torch.randn(hi - lo, 3, mllm.image_size, mllm.image_size, generator=gen)
        with torch.no_grad():
            z = edge(batch["input_ids"], batch["image_mask"], pixel_values=pixels)
        out.append((z, batch["attention_mask"], batch["labels"]))
    return server, out


@pytest.fixture
def trainer(cfg):
    """A fresh trainer per test: its batching queue lives on the event loop of one asyncio.run.

    Every request here pads to 256 positions, so all of them may share one batch."""
    return LLMTrainer(cfg.model, max_batch_size=64, batch_wait_ms=50, pad_to_multiple=256)


def _run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_requests_have_distinct_shapes(requests):
    """The three requests differ in batch size and sequence length (so merging must pad)."""
    # Execute
    _, reqs = requests

    # Assert
    assert [z.shape[0] for z, _, _ in reqs] == [1, 2, 3]
    assert len({z.shape[1] for z, _, _ in reqs}) == 3


def test_concurrent_requests_merge_into_one_batch(trainer, requests):
    """Three concurrent clients are served by one forward/backward, each with its own loss and
    grad.
    """
    # Prepare
    server, reqs = requests

    async def main():
        return await asyncio.gather(*(trainer.loss_and_grad(z, m, lab) for z, m, lab in reqs))

    # Execute
    results = _run(main())
    stats = trainer.get_stats()

    # Assert
    assert stats["batches"] == 1
    assert stats["max_clients_in_batch"] == 3
    assert stats["requests"] == 3
    assert stats["rows"] == 6
    for (z, mask, labels), (loss, grad) in zip(reqs, results, strict=True):
        alone_loss, alone_grad = server.loss_and_grad(z, mask, labels)
        assert isinstance(loss, float)
        assert grad.shape == z.shape
        assert grad.abs().sum() > 0
        torch.testing.assert_close(torch.tensor(loss), alone_loss[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, alone_grad, rtol=1e-4, atol=1e-6)


def test_wrong_hidden_size_is_rejected(trainer, requests):
    """z' of the wrong width raises a ValueError naming both widths."""
    # Prepare
    _, reqs = requests
    z, mask, labels = reqs[0]
    bad = torch.zeros(z.shape[0], z.shape[1], 64)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"width 64 but the LLM expects 128"):
        _run(trainer.loss_and_grad(bad, mask, labels))
    assert trainer.get_stats()["requests"] == 0


def test_mismatched_shapes_are_rejected(trainer, requests):
    """A mask that does not match z' is refused before it reaches the batch."""
    # Prepare
    _, reqs = requests
    z, mask, labels = reqs[1]

    # Execute / Assert
    with pytest.raises(ValueError, match="bad split-step shapes"):
        _run(trainer.loss_and_grad(z, mask[:, :-1], labels))


def test_failing_request_does_not_kill_the_trainer(trainer, requests):
    """A request with labels outside the vocabulary is refused before it joins a batch, naming the
    problem; the next request is served normally."""
    # Prepare
    server, reqs = requests
    z, mask, labels = reqs[1]
    bad_labels = labels.clone()
    bad_labels[labels != -100] = 10**6  # out of the vocabulary: cross-entropy would fail the batch

    async def main():
        with pytest.raises(ValueError, match=r"token ids in \[0, \d+\)"):
            await trainer.loss_and_grad(z, mask, bad_labels)
        with pytest.raises(ValueError, match="finite"):
            await trainer.loss_and_grad(torch.full_like(z, float("nan")), mask, labels)
        with pytest.raises(ValueError, match="only 0 and 1"):
            await trainer.loss_and_grad(z, mask * 7, labels)
        return await trainer.loss_and_grad(z, mask, labels)

    # Execute
    loss, grad = _run(main())

    # Assert
    alone_loss, alone_grad = server.loss_and_grad(z, mask, labels)
    torch.testing.assert_close(torch.tensor(loss), alone_loss[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, alone_grad, rtol=1e-4, atol=1e-6)
    assert trainer.get_stats()["batches"] == 1  # only the good batch is counted


class PoisonedTrainer(LLMTrainer):
    """A test-only trainer whose batch breaks whenever it holds a row whose first value is 1234 (a
    request that passes every check and still crashes the forward, as a backend bug would)."""

    def _run(self, batch, t):
        if any(float(r.z[0, 0, 0]) == 1234.0 for r in batch):
            raise RuntimeError("injected: the batch's forward crashed")
        return super()._run(batch, t)


def test_a_request_that_breaks_its_batch_fails_alone(cfg, requests):
    """Three concurrent clients share one batch and one of them breaks it: the trainer reruns the
    requests one by one, so the other two get exactly their results alone and only the culprit
    fails (before, every client in the batch failed)."""
    server, reqs = requests
    trainer = PoisonedTrainer(cfg.model, max_batch_size=64, batch_wait_ms=50, pad_to_multiple=256)
    poisoned = reqs[1][0].clone()
    poisoned[0, 0, 0] = 1234.0

    async def main():
        calls = [
            trainer.loss_and_grad(z if i != 1 else poisoned, m, lab)
            for i, (z, m, lab) in enumerate(reqs)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    out = _run(main())
    assert isinstance(out[1], RuntimeError) and "injected" in str(out[1])
    for i in (0, 2):
        z, mask, labels = reqs[i]
        loss, grad = out[i]
        alone_loss, alone_grad = server.loss_and_grad(z, mask, labels)
        torch.testing.assert_close(torch.tensor(loss), alone_loss[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, alone_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("multiple", [1, 8, 256])
def test_results_are_the_same_bits_whatever_the_batching(cfg, requests, multiple):
    """Each client's loss and dL/dz' are bit-identical sent alone or merged with other clients'
    steps.

    Requests merge only with requests of the same padded length (a multiple of ``pad_to_multiple``):
    with 1 the three lengths never merge, with 256 they all share one batch.
    """
    # Prepare
    _, reqs = requests
    make = lambda: LLMTrainer(
        cfg.model, max_batch_size=64, batch_wait_ms=50, pad_to_multiple=multiple
    )

    async def together(trainer):
        return await asyncio.gather(*(trainer.loss_and_grad(z, m, lab) for z, m, lab in reqs))

    # Execute
    alone = [_run(make().loss_and_grad(z, m, lab)) for z, m, lab in reqs]
    merged_trainer = make()
    merged = _run(together(merged_trainer))
    lengths = {merged_trainer.padded_length(z.shape[1]) for z, _, _ in reqs}

    # Assert
    assert merged_trainer.get_stats()["batches"] == len(lengths)
    assert (len(lengths), multiple) in {(3, 1), (1, 256)} or multiple == 8
    for (loss_a, grad_a), (loss_m, grad_m) in zip(alone, merged, strict=True):
        assert loss_a == loss_m
        assert torch.equal(grad_a, grad_m)


@pytest.fixture(scope="module")
def choice_requests(cfg):
    """Three clients' choice-objective split steps: 1, 2 and 3 packed questions of 2-4 choices each
    (answers of one and two tokens), each client's rows padded to its own length."""
    from fednano_ray.training import _packed_batch, choice_rows, pack_choices

    mllm = build_mllm(cfg.model)
    edge, server = mllm.split(cfg.adapter, seed=0)
    with torch.no_grad():
        for p in edge.adapters.parameters():
            p.normal_(0, 0.05)
    words = ["red", "light blue", "four", "left side", "circle"]
    gen = torch.Generator().manual_seed(0)
    out = []
    for lo, hi in ((0, 1), (1, 3), (3, 6)):
        qs = [
            (choice_rows(mllm.encode_row, QUESTIONS[i][0], words[: 2 + i % 3]), i % 2, None)
            for i in range(lo, hi)
        ]
        inputs, args, _ = _packed_batch([pack_choices(rows) for rows, _, _ in qs], qs, mllm.pad_id)
        pixels = torch.randn(hi - lo, 3, mllm.image_size, mllm.image_size, generator=gen)
        with torch.no_grad():
            z = edge(inputs["input_ids"], inputs["image_mask"], pixel_values=pixels)
        counts = torch.tensor([len(rows) for rows, _, _ in qs])
        answers = torch.tensor([a for _, a, _ in qs])
        out.append((z, *args, counts, answers, 0.5))
    return server, out


@pytest.mark.parametrize("multiple", [1, 256])
def test_choice_steps_merge_and_match_each_client_alone(cfg, choice_requests, multiple):
    """Choice-objective split steps of three clients, merged into one batch (256) or not (1), give
    each client the loss and dL/dz' of ServerLLM.choice_loss_and_grad on its own rows, to the
    bit."""
    server, reqs = choice_requests
    trainer = LLMTrainer(cfg.model, max_batch_size=64, batch_wait_ms=50, pad_to_multiple=multiple)

    async def together():
        return await asyncio.gather(*(trainer.choice_loss_and_grad(*r) for r in reqs))

    merged = _run(together())
    alone = [
        _run(LLMTrainer(cfg.model, pad_to_multiple=multiple).choice_loss_and_grad(*r)) for r in reqs
    ]

    assert trainer.get_stats()["batches"] == (1 if multiple == 256 else 3)
    for (loss_m, grad_m), (loss_a, grad_a), r in zip(merged, alone, reqs, strict=True):
        assert loss_m == loss_a and torch.equal(grad_m, grad_a)
        ref_loss, ref_grad = server.choice_loss_and_grad(*r)  # unpadded, in-process
        assert loss_m == pytest.approx(float(ref_loss[0]), rel=1e-5)
        torch.testing.assert_close(grad_m, ref_grad, rtol=1e-4, atol=1e-6)
        assert grad_m.shape == r[0].shape and float(grad_m.abs().max()) > 0


def test_bad_choice_step_is_an_error(trainer, choice_requests):
    """Counts that do not match the packed rows are refused before any compute."""
    _, reqs = choice_requests
    z, *rest = reqs[1]
    rest[6] = rest[6][:1]  # one count for two rows
    with pytest.raises(ValueError, match="one question per packed row"):
        _run(trainer.choice_loss_and_grad(z, *rest))
