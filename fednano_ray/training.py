"""A client's local split-step training and multiple-choice evaluation (no Ray in here).

``server`` is anything with the :class:`Server` protocol: ``loss_and_grad`` (the LM objective),
``choice_loss_and_grad`` (the choice objective) and ``score_packed`` (packed multiple-choice
scoring), in-process (:class:`LocalServer` over a :class:`~fednano_ray.models.split.ServerLLM`) or
through the Ray ``LLMTrainer`` actor.

Objectives (``train.objective``). Evaluation ranks each question's 2-4 choices by their summed
log-likelihood. ``lm`` trains next-token NLL of the right answer over the whole vocabulary, most of
whose early gain is the answer prior of each question type; ``choice`` trains the cross-entropy of
the right answer among the choices' scores, the quantity evaluation ranks, computed from one packed
pass per question (:func:`pack_choices`); ``train.lm_weight`` mixes the answer's NLL back in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fednano_ray.models.adapter import adapter_state
from fednano_ray.models.dual import DualEdge
from fednano_ray.models.prompt import collate
from fednano_ray.models.split import IGNORE_INDEX, NanoEdge
from fednano_ray.strategies.aggregate import proximal_penalty

Row = tuple[list[int], list[int], list[bool]]
#: One multiple-choice example: (each choice's row ``prompt + choice``, index of the answer,
#: category).
Question = tuple[list[Row], int, "str | None"]
OBJECTIVES = ("lm", "choice")
#: Diagonal Fisher estimators (``train.fisher``): ``endpoint`` = the empirical Fisher at the end of
#: local training, mean over a bounded sample of per-example squared gradients of the example's
#: negative log-likelihood (Matena & Raffel 2022); ``trajectory`` = the mean squared mini-batch
#: gradient over the local steps (the earlier estimator, kept as an ablation: its scale depends on
#: the batch size and on how far the client still is from its optimum).
FISHER_ESTIMATORS = ("endpoint", "trajectory")


class Server(Protocol):
    def loss_and_grad(
        self, z: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> tuple[float, Tensor]: ...

    def choice_loss_and_grad(
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
        lm_weight: float,
    ) -> tuple[float, Tensor]: ...

    def score_packed(
        self,
        z: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        segments: Tensor,
        source: Tensor,
        target: Tensor,
        owner: Tensor,
        num_scores: int,
    ) -> Tensor: ...


class LocalServer:
    """Adapts a ServerLLM to the :class:`Server` protocol (one client, in-process)."""

    def __init__(self, server_llm) -> None:
        self.llm = server_llm

    def loss_and_grad(self, z, attention_mask, labels):
        losses, grad = self.llm.loss_and_grad(z, attention_mask, labels)
        return float(losses[0]), grad

    def choice_loss_and_grad(self, *args):
        losses, grad = self.llm.choice_loss_and_grad(*args)
        return float(losses[0]), grad

    def score_packed(self, *args):
        return self.llm.score_packed(*args)


def local_fit(
    edge: NanoEdge | DualEdge,
    server: Server,
    features: np.ndarray,
    questions: Sequence[Question],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    weight_decay: float = 0.0,
    prox_mu: float = 0.0,
    seed: int = 0,
    params: Mapping[str, nn.Parameter] | None = None,
    objective: str = "lm",
    lm_weight: float = 0.0,
    optimizer_state: dict | None = None,
    fisher: str = "trajectory",
    fisher_examples: int = 16,
    fisher_normalize: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float], dict]:
    """Run ``steps`` split steps on one client's data, starting from the current ``params``.

    Each step: the edge computes z' (B, T, d), the server returns loss and dL/dz', the edge
    back-propagates into its adapters (plus FedProx's proximal gradient) and AdamW steps.

    Args:
        questions: the client's training examples, (choice rows, answer index, category) each.
        objective: ``lm`` (next-token NLL of the answer's row) or ``choice`` (cross-entropy of the
            answer among the choices' summed log-likelihoods, plus ``lm_weight`` x the answer's
            NLL).
        params: what is trained, by state key; default the edge's NanoAdapters. ``fedavg-lora``
            passes the LoRA inside an in-process LLM
            (:meth:`fednano_ray.models.build.MLLM.with_llm_lora`): its edge has no trainable part
            and the server's backward fills the LoRA grads.
        optimizer_state: AdamW's state from this client's previous call (None: fresh moments), so
            the moments carry over between rounds instead of restarting every call.
        fisher: the diagonal Fisher estimator (:data:`FISHER_ESTIMATORS`): ``endpoint`` costs
            ``ceil(fisher_examples / batch_size)`` extra split steps (forward and backward, no
            update).
        fisher_examples: ``endpoint`` only: the bounded sample of training examples it averages
            over.
        fisher_normalize: divide each tensor's Fisher by its mean, so that it says which coordinates
            matter to this client relative to its others, and no client outweighs the rest by the
            scale of its gradients alone (batch size, distance to its optimum, loss scale).

    Returns:
        (adapter state, diagonal Fisher, metrics, AdamW state to pass back next time). Frozen
        parameters (``adapter.factors: frozen_a``'s ``lora_A``) are in the state, unchanged, with
        Fisher 0.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if fisher not in FISHER_ESTIMATORS:
        raise ValueError(
            f"unknown Fisher estimator {fisher!r}: use one of {', '.join(FISHER_ESTIMATORS)}"
        )
    params = dict(edge.adapters.named_parameters() if params is None else params)
    global_state = adapter_state(params) if prox_mu > 0 else None
    trained = [p for p in params.values() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
        for group in opt.param_groups:  # this call's settings, the carried moments
            group["lr"], group["weight_decay"] = lr, weight_decay
    fisher_sums = {k: torch.zeros_like(p) for k, p in params.items()}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(questions))
    pos, losses = 0, []
    packed = [pack_choices(rows) for rows, _, _ in questions] if objective == "choice" else None
    edge.train()
    for _ in range(steps):
        if pos + batch_size > len(
            order
        ):  # reshuffle per epoch; shards smaller than a batch use all rows
            order, pos = rng.permutation(len(questions)), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        opt.zero_grad()  # before the server call: an in-process server's backward fills grads
        loss, z, grad, _ = _split_step(
            edge, server, features, questions, idx, packed, pad_id=pad_id, lm_weight=lm_weight
        )
        if z.requires_grad:  # an edge with adapters: finish the backward into them
            z.backward(grad)
        for (
            k,
            p,
        ) in params.items():  # Fisher from the task-loss gradient only (before the prox term)
            if p.grad is not None:
                fisher_sums[k] += p.grad.detach() ** 2
        if global_state is not None:
            prox = proximal_penalty({k: p for k, p in params.items()}, global_state, prox_mu)
            prox.backward()
        opt.step()
        losses.append(loss)
    edge.eval()
    if fisher == "endpoint":
        sample = rng.choice(len(questions), min(fisher_examples, len(questions)), replace=False)
        fisher_est = endpoint_fisher(
            edge,
            server,
            features,
            questions,
            sample,
            params=params,
            batch_size=batch_size,
            pad_id=pad_id,
            objective=objective,
            lm_weight=lm_weight,
        )
    else:
        fisher_est = {k: v / max(1, steps) for k, v in fisher_sums.items()}
    if fisher_normalize:
        fisher_est = normalize_fisher(fisher_est)
    metrics = {
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "loss_last": losses[-1] if losses else float("nan"),
    }
    return adapter_state(params), fisher_est, metrics, opt.state_dict()


def _split_step(edge, server, features, questions, idx, packed, *, pad_id, lm_weight):
    """Edge forward and one server call on the examples ``idx``.

    Returns (loss, z' with its graph into the adapters, dL/dz', per-row factor): ``factor[i] *
    dL/dz'[i]`` is the gradient of example i's OWN loss with respect to its row (rows never interact
    in the LLM, and the server's loss is the mean over questions, or over label tokens for ``lm``).
    """
    feats = torch.from_numpy(np.ascontiguousarray(features[idx])).float()
    if packed is None:
        batch = collate([questions[i][0][questions[i][1]] for i in idx], pad_id)
        prompt = batch["attention_mask"].bool() & (batch["labels"] == IGNORE_INDEX)  # no answer
        z = edge(batch["input_ids"], batch["image_mask"], features=feats, prompt_mask=prompt)
        loss, grad = server.loss_and_grad(z.detach(), batch["attention_mask"], batch["labels"])
        per_row = (
            (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).float()
        )  # labelled tokens of each row
        factor = per_row.sum() / per_row.clamp_min(1)
    else:
        chunk = [questions[i] for i in idx]
        inputs, args, _ = _packed_batch([packed[i] for i in idx], chunk, pad_id)
        prompt = args[2] == 0  # segment 0: the shared prompt
        z = edge(inputs["input_ids"], inputs["image_mask"], features=feats, prompt_mask=prompt)
        counts = torch.tensor([len(rows) for rows, _, _ in chunk])
        answers = torch.tensor([answer for _, answer, _ in chunk])
        loss, grad = server.choice_loss_and_grad(
            z.detach(), *args, counts, answers, float(lm_weight)
        )
        factor = torch.full((len(idx),), float(len(idx)))
    return loss, z, grad, factor


def endpoint_fisher(
    edge: NanoEdge,
    server: Server,
    features: np.ndarray,
    questions: Sequence[Question],
    sample: Sequence[int],
    *,
    params: Mapping[str, nn.Parameter],
    batch_size: int,
    pad_id: int,
    objective: str = "lm",
    lm_weight: float = 0.0,
) -> dict[str, Tensor]:
    """The empirical diagonal Fisher at the current adapters: ``mean_i (d NLL_i / dθ)²`` over
    ``sample``.

    ``NLL_i`` is example i's own loss under ``objective`` (for ``choice``, ``-log p(answer | its
    choices)``, a proper log-likelihood of a categorical over the choices). The server runs one
    forward/backward per ``batch_size`` examples; the per-example gradients are then separated on
    the client, since row i of dL/dz' is (a known factor times) the gradient of example i's loss
    alone. Nothing is stepped.
    """
    trained = {k: p for k, p in params.items() if p.requires_grad}
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    packed = [pack_choices(rows) for rows, _, _ in questions] if objective == "choice" else None
    sample = [int(i) for i in sample]
    for start in range(0, len(sample), batch_size):
        idx = sample[start : start + batch_size]
        for p in params.values():
            p.grad = None
        _, z, grad, factor = _split_step(
            edge, server, features, questions, idx, packed, pad_id=pad_id, lm_weight=lm_weight
        )
        if not z.requires_grad or not trained:
            continue
        keys = list(trained)
        for row in range(len(idx)):
            out = torch.zeros_like(grad)
            out[row] = grad[row] * factor[row]
            grads = torch.autograd.grad(
                z,
                [trained[k] for k in keys],
                grad_outputs=out.to(z.dtype),
                retain_graph=True,
                allow_unused=True,
            )
            for k, g in zip(keys, grads, strict=True):
                if g is not None:
                    fisher[k] += g.detach() ** 2
    n = max(1, len(sample))
    return {k: v / n for k, v in fisher.items()}


def normalize_fisher(fisher: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor's Fisher divided by its own mean (all-zero tensors stay zero): a client's Fisher
    then ranks its coordinates against each other, on the same scale as every other client's."""
    out = {}
    for k, v in fisher.items():
        mean = v.mean()
        out[k] = v / mean if bool(mean > 0) else torch.zeros_like(v)
    return out


def choice_rows(
    encode_row: Callable[[str, str], Row], question: str, choices: Sequence[str]
) -> list[Row]:
    return [encode_row(question, c) for c in choices]


@dataclass
class PackedChoices:
    """One question's choices packed behind their shared prompt (see
    :meth:`ServerLLM.score_packed`).

    Attributes:
        ids, image_mask: the prompt's tokens, then each choice's answer tokens in turn.
        positions: the prompt's 0..P-1, then each choice's again from P (as if it followed the
            prompt alone).
        segments: 0 on the prompt, j on choice j's tokens (1-based).
        picks: per scored token (position whose next-token distribution scores it, token id, choice
            index).
    """

    ids: list[int]
    image_mask: list[bool]
    positions: list[int]
    segments: list[int]
    picks: list[tuple[int, int, int]]


def pack_choices(rows: Sequence[Row]) -> PackedChoices:
    """Pack the rows of one question's choices (``prompt + answer`` each, labels on the answer) into
    one row.

    Raises:
        ValueError: if the rows do not share their prompt or label something other than a suffix.
    """
    first = [next((t for t, lab in enumerate(r[1]) if lab != IGNORE_INDEX), None) for r in rows]
    p = first[0]
    if p is None or p == 0 or any(f != p for f in first):
        raise ValueError("choice rows must label their answers after one shared, unlabelled prompt")
    ids, _, mask = rows[0]
    prompt, prompt_mask = list(ids[:p]), list(mask[:p])
    packed = PackedChoices(list(prompt), list(prompt_mask), list(range(p)), [0] * p, [])
    for j, (r_ids, r_labels, r_mask) in enumerate(rows):
        if list(r_ids[:p]) != prompt or list(r_mask[:p]) != prompt_mask or any(r_mask[p:]):
            raise ValueError(f"choice {j} does not share the prompt of choice 0")
        if list(r_labels[p:]) != list(r_ids[p:]):
            raise ValueError(f"choice {j} labels tokens other than its answer")
        prev = p - 1  # the answer's first token is predicted from the prompt's last position
        for k, tok in enumerate(r_ids[p:]):
            packed.picks.append((prev, tok, j))
            prev = len(packed.ids)
            packed.ids.append(tok)
            packed.image_mask.append(False)
            packed.positions.append(p + k)
            packed.segments.append(j + 1)
    return packed


def _packed_batch(
    chunk: Sequence[PackedChoices],
    questions: Sequence[tuple[list[Row], int, str | None]],
    pad_id: int,
) -> tuple[dict[str, Tensor], tuple[Tensor, ...], int]:
    """Right-pad packed rows into the edge's inputs and :meth:`ServerLLM.score_packed`'s arguments
    (attention mask, positions, segments, source, target, owner), plus the number of scores."""
    n = max(len(q.ids) for q in chunk)
    ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
    image_mask = torch.zeros((len(chunk), n), dtype=torch.bool)
    attention = torch.zeros((len(chunk), n), dtype=torch.long)
    positions = torch.zeros((len(chunk), n), dtype=torch.long)
    segments = torch.full((len(chunk), n), -1, dtype=torch.long)
    source, target, owner = [], [], []
    offset = 0
    for b, q in enumerate(chunk):
        k = len(q.ids)
        ids[b, :k] = torch.tensor(q.ids)
        image_mask[b, :k] = torch.tensor(q.image_mask)
        attention[b, :k] = 1
        positions[b, :k] = torch.tensor(q.positions)
        segments[b, :k] = torch.tensor(q.segments)
        for src, tok, j in q.picks:
            source.append(b * n + src)
            target.append(tok)
            owner.append(offset + j)
        offset += len(questions[b][0])
    args = (
        attention,
        positions,
        segments,
        torch.tensor(source),
        torch.tensor(target),
        torch.tensor(owner),
    )
    return {"input_ids": ids, "image_mask": image_mask}, args, offset


@torch.no_grad()
def evaluate(
    edge: NanoEdge | DualEdge,
    server: Server,
    features: np.ndarray,
    questions: Sequence[tuple[list[Row], int, str | None]],
    *,
    pad_id: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Multiple-choice accuracy: each choice scored by the summed log-likelihood of its text.

    A question's choices share its prompt, so they are scored in one packed row
    (:func:`pack_choices`, :meth:`ServerLLM.score_packed`): the prompt runs once, not once per
    choice, which makes evaluation about (number of choices)x cheaper for short answers.

    Args:
        questions: per question (its choice rows, index of the answer, category).
        batch_size: packed rows (questions) per forward pass.

    Returns:
        ``accuracy``, ``n``, ``correct`` (one "1"/"0" per question, in order) and
        ``accuracy/<category>`` for every category present.
    """
    packed = [pack_choices(rows) for rows, _, _ in questions]
    scores: list[Tensor] = []
    edge.eval()
    for i in range(0, len(packed), batch_size):
        chunk = packed[i : i + batch_size]
        inputs, args, num_scores = _packed_batch(chunk, questions[i : i + batch_size], pad_id)
        feats = torch.from_numpy(np.ascontiguousarray(features[i : i + len(chunk)])).float()
        prompt = args[2] == 0  # segment 0: the shared prompt, not the choices
        z = edge(inputs["input_ids"], inputs["image_mask"], features=feats, prompt_mask=prompt)
        scores.append(server.score_packed(z, *args, num_scores).float())
    flat = torch.cat(scores) if scores else torch.empty(0)
    correct: list[bool] = []
    pos = 0
    for rows, answer, _ in questions:
        s = flat[pos : pos + len(rows)]
        pos += len(rows)
        correct.append(int(s.argmax()) == answer)
    out: dict[str, float | str] = {
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "n": float(len(correct)),
        # per question, in order ("1" right, "0" wrong): paired comparisons of two models on the
        # same questions
        "correct": "".join("1" if ok else "0" for ok in correct),
    }
    cats = sorted({c for _, _, c in questions if c is not None})
    for c in cats:
        sel = [ok for ok, (_, _, qc) in zip(correct, questions, strict=True) if qc == c]
        out[f"accuracy/{c}"] = float(np.mean(sel))
    return out
