"""A client's local split-step training and multiple-choice evaluation (no Ray in here).

``server`` is anything with ``loss_and_grad(z, attention_mask, labels) -> (loss, grad)`` and
``score(z, attention_mask, labels) -> (B,)``: the :class:`~fednano_ray.models.split.ServerLLM`
itself in-process, or a handle to the Ray ``LLMTrainer`` actor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fednano_ray.models.adapter import adapter_state
from fednano_ray.models.prompt import collate
from fednano_ray.models.split import NanoEdge
from fednano_ray.strategies.aggregate import proximal_penalty

Row = tuple[list[int], list[int], list[bool]]


class Server(Protocol):
    def loss_and_grad(self, z: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[float, Tensor]: ...

    def score(self, z: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor: ...


class LocalServer:
    """Adapts a ServerLLM to the :class:`Server` protocol (one client, in-process)."""

    def __init__(self, server_llm) -> None:
        self.llm = server_llm

    def loss_and_grad(self, z, attention_mask, labels):
        losses, grad = self.llm.loss_and_grad(z, attention_mask, labels)
        return float(losses[0]), grad

    def score(self, z, attention_mask, labels):
        return self.llm.score(z, attention_mask, labels)


def local_fit(
    edge: NanoEdge,
    server: Server,
    features: np.ndarray,
    rows: Sequence[Row],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    weight_decay: float = 0.0,
    prox_mu: float = 0.0,
    seed: int = 0,
    params: Mapping[str, nn.Parameter] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float]]:
    """Run ``steps`` split steps on one client's data, starting from the current ``params``.

    Each step: the edge computes z' (B, T, d), the server returns loss and dL/dz', the edge
    back-propagates into its adapters (plus FedProx's proximal gradient) and AdamW steps.

    Args:
        params: what is trained, by state key; default the edge's NanoAdapters. ``fedavg-lora``
            passes the LoRA inside an in-process LLM
            (:meth:`fednano_ray.models.build.MLLM.with_llm_lora`): its edge has no trainable part
            and the server's backward fills the LoRA grads.

    Returns:
        (adapter state, diagonal Fisher = mean squared loss gradient over this pass, metrics).
    """
    params = dict(edge.adapters.named_parameters() if params is None else params)
    global_state = adapter_state(params) if prox_mu > 0 else None
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    pos, losses = 0, []
    edge.train()
    for _ in range(steps):
        if pos + batch_size > len(order):  # reshuffle per epoch; shards smaller than a batch use all rows
            order, pos = rng.permutation(len(rows)), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        batch = collate([rows[i] for i in idx], pad_id)
        feats = torch.from_numpy(np.ascontiguousarray(features[idx])).float()
        opt.zero_grad()  # before the server call: an in-process server's backward fills grads
        z = edge(batch["input_ids"], batch["image_mask"], features=feats)
        loss, grad = server.loss_and_grad(z.detach(), batch["attention_mask"], batch["labels"])
        if z.requires_grad:  # an edge with adapters: finish the backward into them
            z.backward(grad)
        for k, p in params.items():  # Fisher from the task-loss gradient only (before the prox term)
            fisher[k] += p.grad.detach() ** 2
        if global_state is not None:
            prox = proximal_penalty({k: p for k, p in params.items()}, global_state, prox_mu)
            prox.backward()
        opt.step()
        losses.append(loss)
    edge.eval()
    fisher = {k: v / max(1, steps) for k, v in fisher.items()}
    metrics = {"loss": float(np.mean(losses)) if losses else float("nan"), "loss_last": losses[-1] if losses else float("nan")}
    return adapter_state(params), fisher, metrics


def choice_rows(encode_row: Callable[[str, str], Row], question: str, choices: Sequence[str]) -> list[Row]:
    return [encode_row(question, c) for c in choices]


@torch.no_grad()
def evaluate(
    edge: NanoEdge,
    server: Server,
    features: np.ndarray,
    questions: Sequence[tuple[list[Row], int, str | None]],
    *,
    pad_id: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Multiple-choice accuracy: each choice scored by the summed log-likelihood of its text.

    Args:
        questions: per question (its choice rows, index of the answer, category).

    Returns:
        ``accuracy``, ``n`` and ``accuracy/<category>`` for every category present.
    """
    flat: list[tuple[int, Row]] = [(q, r) for q, (rows, _, _) in enumerate(questions) for r in rows]
    scores = torch.empty(len(flat))
    edge.eval()
    for i in range(0, len(flat), batch_size):
        chunk = flat[i : i + batch_size]
        batch = collate([r for _, r in chunk], pad_id)
        feats = torch.from_numpy(np.ascontiguousarray(features[[q for q, _ in chunk]])).float()
        z = edge(batch["input_ids"], batch["image_mask"], features=feats)
        scores[i : i + len(chunk)] = server.score(z, batch["attention_mask"], batch["labels"]).float()
    correct: list[bool] = []
    pos = 0
    for rows, answer, _ in questions:
        s = scores[pos : pos + len(rows)]
        pos += len(rows)
        correct.append(int(s.argmax()) == answer)
    out: dict[str, float] = {"accuracy": float(np.mean(correct)) if correct else float("nan"), "n": float(len(correct))}
    cats = sorted({c for _, _, c in questions if c is not None})
    for c in cats:
        sel = [ok for ok, (_, _, qc) in zip(correct, questions, strict=True) if qc == c]
        out[f"accuracy/{c}"] = float(np.mean(sel))
    return out
