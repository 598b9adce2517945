"""LLMTrainer: holds the frozen LLM once and serves split steps to every client.

Concurrent split steps from different clients (``loss_and_grad``, the LM objective, and
``choice_loss_and_grad``, the choice objective over packed questions) are merged into one
right-padded batch per objective (dynamic batching: up to ``max_batch_size`` rows, waiting at most
``batch_wait_ms`` for more). Each client's rows form their own group, so each gets exactly the loss
and gradient it would get alone (``ServerLLM.loss_and_grad`` / ``choice_loss_and_grad``). A plain
class: wrap it with ``ray.remote`` where the app is built.

Reproducibility: a row's floating-point result depends on the padded length of its batch (the CPU
attention and matmul kernels reduce in a different order for other lengths; measured on SmolLM2 in
fp32: 1e-9 differences in dL/dz' between 30 and 41 positions) but not on how many other rows share
it (bit-identical for 1 to 56 extra rows, fp32 and bf16). So every request is padded to a multiple
of ``pad_to_multiple`` and merged only with requests of the same padded length: its result is then
the same bits whichever requests happened to arrive with it, and a run repeats exactly.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fednano_ray.models.split import IGNORE_INDEX, ServerLLM


@dataclass
class _Request:
    """One client's split step: ``extra`` is empty for the LM objective, or the choice objective's
    (position_ids, segments, source, target, owner, counts, answers, lm_weight)."""

    z: Tensor
    attention_mask: Tensor
    labels: Tensor | None
    future: asyncio.Future = field(repr=False)
    extra: tuple = ()

    @property
    def kind(self) -> tuple:
        return ("choice", self.extra[-1]) if self.extra else ("lm",)


class LLMTrainer:
    """The server half of the split step, batched across clients.

    Args:
        model_cfg: ``ModelConfig`` of the MLLM (only its decoder and LM head are kept).
        max_batch_size: most rows merged into one forward/backward.
        batch_wait_ms: how long the first request of a batch waits for others.
        num_threads: torch intra-op threads (default: torch's choice).
        pad_to_multiple: requests are padded to a multiple of this length and merged only with
            requests of the same padded length (bit-identical results whatever the batching).
    """

    def __init__(
        self,
        model_cfg,
        *,
        max_batch_size: int = 64,
        batch_wait_ms: float = 5.0,
        num_threads: int | None = None,
        pad_to_multiple: int = 8,
    ) -> None:
        from fednano_ray.models.build import build_mllm

        if num_threads:
            torch.set_num_threads(num_threads)
        parts = build_mllm.__wrapped__(
            model_cfg
        ).parts  # uncached: this process keeps only the server half
        self.precision = (
            model_cfg.runtime_precision()
        )  # resolved on this actor's own node (its CPU or GPU)
        self.server = ServerLLM(
            parts.decoder, parts.lm_head, autocast_bf16=self.precision.autocast_bf16
        )
        self.max_batch_size = max_batch_size
        self.pad_to_multiple = max(1, int(pad_to_multiple))
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1)  # torch runs off the event loop
        self.stats = {
            "batches": 0,
            "rows": 0,
            "requests": 0,
            "max_clients_in_batch": 0,
            "compute_s": 0.0,
        }
        # New each time Ray (re)starts the actor and reruns __init__, which reloads the frozen LLM.
        self._incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

    async def loss_and_grad(
        self, z: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> tuple[float, Tensor]:
        """One client's split step: (mean loss over its label tokens, dL/dz' with its own shape)."""
        if labels.shape != attention_mask.shape:
            raise ValueError(
                f"bad split-step shapes: mask {tuple(attention_mask.shape)}, "
                f"labels {tuple(labels.shape)}"
            )
        vocab = int(self.server.lm_head.weight.shape[0])
        if labels.dtype != torch.long or bool(
            ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any()
        ):
            raise ValueError(
                f"split-step labels must be int64 token ids in [0, {vocab}) or {IGNORE_INDEX} "
                "(ignored)"
            )
        return await self._submit(_Request(z, attention_mask, labels, None))

    async def choice_loss_and_grad(
        self,
        z: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        segments: Tensor,
        source: Tensor,
        target: Tensor,
        owner: Tensor,
        counts: Tensor,
        answers: Tensor,
        lm_weight: float = 0.0,
    ) -> tuple[float, Tensor]:
        """One client's split step of the choice objective over packed questions
        (:meth:`ServerLLM.choice_loss_and_grad`): (mean loss over its questions, dL/dz')."""
        if position_ids.shape != attention_mask.shape or segments.shape != attention_mask.shape:
            raise ValueError("position_ids and segments must have the attention mask's shape")
        if counts.shape[0] != z.shape[0] or answers.shape != counts.shape:
            raise ValueError(
                f"one question per packed row: {z.shape[0]} rows, {counts.shape[0]} counts, "
                f"{answers.shape[0]} answers"
            )
        if not (source.shape == target.shape == owner.shape) or (
            owner.numel() and int(owner.max()) >= int(counts.sum())
        ):
            raise ValueError(
                "source, target and owner must align, and owners must index the questions' scores"
            )
        extra = (position_ids, segments, source, target, owner, counts, answers, float(lm_weight))
        return await self._submit(_Request(z, attention_mask, None, None, extra))

    async def _submit(self, req: _Request) -> tuple[float, Tensor]:
        z, attention_mask = req.z, req.attention_mask
        if z.dim() != 3 or z.shape[:2] != attention_mask.shape:
            raise ValueError(
                f"bad split-step shapes: z {tuple(z.shape)}, mask {tuple(attention_mask.shape)}"
            )
        if z.shape[-1] != self.server.hidden_size:
            raise ValueError(
                f"z' has width {z.shape[-1]} but the LLM expects {self.server.hidden_size}: "
                "client and server models differ"
            )
        # What one client sends must fail that client alone, never the batch it would join.
        if not z.is_floating_point() or not bool(torch.isfinite(z).all()):
            raise ValueError("split-step z' must be a finite floating-point tensor")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("split-step attention_mask must hold only 0 and 1")
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._batch_loop())
        req.future = asyncio.get_running_loop().create_future()
        await self._queue.put(req)
        return await req.future

    async def score_packed(self, *args) -> Tensor:
        """Summed log-likelihoods of choices packed behind their shared prompt
        (:meth:`ServerLLM.score_packed`)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.server.score_packed, *args)

    def runtime(self) -> dict:
        """The precision this trainer runs the LLM in, and the hardware it resolved it on."""
        from fednano_ray.precision import hardware_info

        return {"precision": self.precision.as_dict(), "hardware": hardware_info()}

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats)

    def incarnation(self) -> str:
        """Which start of this actor is serving: it changes when Ray restarts the actor."""
        return self._incarnation

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            rows = batch[0].z.shape[0]
            deadline = time.monotonic() + self.batch_wait_s
            while rows < self.max_batch_size:
                timeout = deadline - time.monotonic()
                try:
                    req = (
                        self._queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                batch.append(req)
                rows += req.z.shape[0]
            by_length: dict[tuple, list[_Request]] = {}
            for r in (
                batch
            ):  # merge only equal padded lengths: results then do not depend on the batching
                by_length.setdefault((r.kind, self.padded_length(r.z.shape[1])), []).append(r)
            for (kind, t), group in sorted(by_length.items()):
                run = self._run if kind == ("lm",) else self._run_choice
                await self._run_group(loop, run, group, t)

    async def _run_group(self, loop, run, group: list[_Request], t: int) -> None:
        """Run one batch; if it fails, run its requests one by one, so a request that breaks the
        batch fails its own client only (the others get exactly their results alone)."""
        try:
            results = await loop.run_in_executor(self._pool, run, group, t)
        except Exception as e:  # noqa: BLE001 - a bad batch fails its requests, never the trainer
            if len(group) > 1:
                for r in group:
                    await self._run_group(loop, run, [r], t)
                return
            if not group[0].future.done():
                group[0].future.set_exception(e)
            return
        for r, res in zip(group, results, strict=True):
            if not r.future.done():
                r.future.set_result(res)

    def padded_length(self, t: int) -> int:
        """The length a request of ``t`` positions is padded to (the next multiple of
        ``pad_to_multiple``)."""
        m = self.pad_to_multiple
        return -(-t // m) * m

    @staticmethod
    def _pad(x: Tensor, t: int, value) -> Tensor:
        return (
            F.pad(x, (0, 0, 0, t - x.shape[1]), value=value)
            if x.dim() == 3
            else F.pad(x, (0, t - x.shape[1]), value=value)
        )

    def _run(self, batch: list[_Request], t: int) -> list[tuple[float, Tensor]]:
        t0 = time.perf_counter()
        z = torch.cat([self._pad(r.z.float(), t, 0.0) for r in batch])
        mask = torch.cat([self._pad(r.attention_mask, t, 0) for r in batch])
        labels = torch.cat([self._pad(r.labels, t, IGNORE_INDEX) for r in batch])
        groups = torch.cat(
            [torch.full((r.z.shape[0],), i, dtype=torch.long) for i, r in enumerate(batch)]
        )
        losses, grad = self.server.loss_and_grad(z, mask, labels, groups, num_groups=len(batch))
        return self._split(batch, losses, grad, t0)

    def _run_choice(self, batch: list[_Request], t: int) -> list[tuple[float, Tensor]]:
        """Packed questions of several clients in one batch: rows padded to ``t``, each request's
        flat token indices re-based to its rows in the merged batch and its scores after the earlier
        ones'."""
        t0 = time.perf_counter()
        z = torch.cat([self._pad(r.z.float(), t, 0.0) for r in batch])
        mask = torch.cat([self._pad(r.attention_mask, t, 0) for r in batch])
        positions = torch.cat([self._pad(r.extra[0], t, 0) for r in batch])
        segments = torch.cat([self._pad(r.extra[1], t, -1) for r in batch])
        source, owner, row, score = [], [], 0, 0
        for r in batch:
            n = r.z.shape[1]
            src = r.extra[2]
            source.append((row + src // n) * t + src % n)
            owner.append(r.extra[4] + score)
            row += r.z.shape[0]
            score += int(r.extra[5].sum())
        target = torch.cat([r.extra[3] for r in batch])
        counts = torch.cat([r.extra[5] for r in batch])
        answers = torch.cat([r.extra[6] for r in batch])
        groups = torch.cat(
            [torch.full((r.z.shape[0],), i, dtype=torch.long) for i, r in enumerate(batch)]
        )
        losses, grad = self.server.choice_loss_and_grad(
            z,
            mask,
            positions,
            segments,
            torch.cat(source),
            target,
            torch.cat(owner),
            counts,
            answers,
            batch[0].extra[7],
            groups,
            num_groups=len(batch),
        )
        return self._split(batch, losses, grad, t0)

    def _split(
        self, batch: list[_Request], losses: Tensor, grad: Tensor, t0: float
    ) -> list[tuple[float, Tensor]]:
        out, start = [], 0
        for i, r in enumerate(batch):
            b, tr = r.z.shape[0], r.z.shape[1]
            out.append((float(losses[i]), grad[start : start + b, :tr].contiguous()))
            start += b
        s = self.stats
        s["batches"] += 1
        s["rows"] += int(grad.shape[0])
        s["requests"] += len(batch)
        s["max_clients_in_batch"] = max(s["max_clients_in_batch"], len(batch))
        s["compute_s"] += time.perf_counter() - t0
        return out
