"""FedNano (Zhang et al. 2025, "FedNano: Toward Lightweight Federated Tuning for Pretrained
Multimodal Large Language Models", arXiv 2506.14824): Fisher merging of NanoAdapters.

Each coordinate of the global state is the mean of the clients' values weighted by ``n_i`` times
the client's diagonal Fisher there, ``θ = Σ n_i (F_i + eps) θ_i / Σ n_i (F_i + eps)``: a client
whose loss is sensitive to a coordinate decides it (Fisher merging, Matena & Raffel 2022).

The Fisher is the client's own report, so two guards keep one client from taking over: each
client's Fisher is divided by its mean per tensor (a Fisher scaled by 1e9 weighs what the honest
one does), and no client's share of any coordinate's weight exceeds ``max_share`` (the coordinate-
wise clipped Fisher share of :func:`~fednano_ray.strategies.aggregate.capped_fisher_merge`). The
example counts ``n_i`` are the coordinator's own shard sizes, never the client's claim.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from fednano_ray.strategies.aggregate import (
    State,
    capped_fisher_merge,
    fedavg,
    fisher_from_sums,
    normalize_fisher,
    pad_to_rank,
)
from fednano_ray.strategies.base import ClientUpdate, Strategy, SumPlan
from fednano_ray.strategies.fedavg import fedavg_sum_plan

__all__ = ["FedNano"]

logger = logging.getLogger(__name__)


class FedNano(Strategy):
    """Fisher merging, falling back to FedAvg for a round in which any update lacks a Fisher.

    Heterogeneous ranks: each client's Fisher-weighted terms are zero-padded *after* weighting, i.e.
    padded coordinates get Fisher 0 and no epsilon, so a client of smaller rank contributes nothing
    to the extra rank rows (they are merged from the clients that hold them), and rows no update
    holds keep their global value.

    Args:
        eps: Added to every (mean-normalised) Fisher entry (>= 0). Where Fisher is far above
            ``eps`` it does not matter; where all clients' Fisher is 0 the result is FedAvg.
        max_share: The largest share of any coordinate's weight one client may hold, in (0, 1]
            (1: plain Fisher merging of the normalised Fisher). Under secure aggregation the
            coordinator sees only sums and cannot apply it (the clients still normalise).

    Raises:
        ValueError: If ``eps`` is negative or not finite, or ``max_share`` is outside (0, 1].
    """

    name = "fednano"
    uses_fisher = True
    rank_rule = (
        "HetLoRA zero-padding with Fisher 0 on padded entries: pad to the max rank (a smaller-rank "
        "client does not dilute the extra rows; rows no update holds keep the global value), "
        "truncate to own rank on receipt"
    )

    def __init__(self, eps: float = 1e-8, max_share: float = 0.5) -> None:
        super().__init__()
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"fednano: eps must be finite and >= 0, got {eps}")
        if not 0 < max_share <= 1:
            raise ValueError(f"fednano: max_share must be in (0, 1], got {max_share}")
        self.eps = float(eps)
        self.max_share = float(max_share)

    def _falls_back_to_fedavg(self, updates: list[ClientUpdate]) -> bool:
        """True, after logging and recording a warning, if any update came without a Fisher."""
        missing = [u.client_id for u in updates if u.fisher is None]
        if not missing:
            return False
        message = (
            f"fednano: no Fisher from client(s) {missing}; aggregated this round with FedAvg "
            "(example-weighted mean, padded zeros dilute)"
        )
        logger.warning(message)
        self.warnings.append(message)
        return True

    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """Fisher-merge the updates at ``rank``; FedAvg if any update has no Fisher."""
        if self._falls_back_to_fedavg(updates):
            return fedavg([(u.state, u.num_examples) for u in updates], rank=rank)
        for u in updates:
            _check_fisher(u)
        results = [
            (u.state, u.num_examples, normalize_fisher(u.fisher))
            for u in updates
            if u.fisher is not None
        ]
        return capped_fisher_merge(
            results,
            self.eps,
            max_share=self.max_share,
            rank=rank,
            fallback=pad_to_rank(global_state, rank),
        )

    def sum_plan_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> SumPlan:
        """Fisher merging from sums, for secure aggregation.

        Fisher merging needs only ``Σ n_i (F_i + eps) θ_i`` and ``Σ n_i (F_i + eps)`` (each ``F_i``
        mean-normalised, as in the plain rule; ``max_share`` needs each client's weight and does
        not apply). To keep
        ``eps`` exact under fixed-point quantisation, each client's term holds four parts, each at
        the client's own rank and then zero-padded (as :func:`~.aggregate.fisher_sums` pads):
        ``n F ⊙ θ``, ``n F``, ``n θ`` and ``n`` (on the coordinates the client holds); ``finish``
        forms ``num = ΣnF⊙θ + eps Σnθ`` and ``den = ΣnF + eps Σn`` and divides, with the global
        state as the fallback. FedAvg terms if any update has no Fisher (as :meth:`aggregate`).
        """
        if self._falls_back_to_fedavg(updates):
            return fedavg_sum_plan(updates, rank)
        terms = []
        for u in updates:
            _check_fisher(u)
            assert u.fisher is not None  # _check_fisher raised otherwise
            n = float(u.num_examples)
            parts: dict[str, State] = {"nF_theta": {}, "nF": {}, "n_theta": {}, "n": {}}
            normalized = normalize_fisher(u.fisher)
            for key, theta in u.state.items():
                theta64 = theta.detach().to(torch.float64)
                fisher64 = normalized[key]
                parts["nF_theta"][key] = n * fisher64 * theta64
                parts["nF"][key] = n * fisher64
                parts["n_theta"][key] = n * theta64
                parts["n"][key] = torch.full_like(theta64, n)
            terms.append(
                {
                    f"{part}|{key}": value
                    for part, state in parts.items()
                    for key, value in pad_to_rank(state, rank).items()
                }
            )
        fallback = pad_to_rank(global_state, rank)
        dtypes = {key: tensor.dtype for key, tensor in updates[0].state.items()}
        eps = self.eps

        def finish(sums: State) -> State:
            def part(name: str) -> State:
                return {key: sums[f"{name}|{key}"] for key in dtypes}

            nf_theta, nf, n_theta, n = part("nF_theta"), part("nF"), part("n_theta"), part("n")
            numerator = {key: nf_theta[key] + eps * n_theta[key] for key in dtypes}
            denominator = {key: (nf[key] + eps * n[key]).clamp_min(0) for key in dtypes}
            merged = fisher_from_sums(numerator, denominator, fallback=fallback)
            return {key: value.to(dtypes[key]) for key, value in merged.items()}

        return terms, finish

    def describe(self) -> dict[str, str | float | bool]:
        """As :meth:`Strategy.describe`, plus ``eps`` and ``max_share``."""
        return {**super().describe(), "eps": self.eps, "max_share": self.max_share}

    def __repr__(self) -> str:
        return f"FedNano(eps={self.eps}, max_share={self.max_share})"


def _check_fisher(update: ClientUpdate) -> None:
    """Raise ValueError naming the client unless its Fisher has its state's keys and shapes."""
    fisher = update.fisher or {}
    if fisher.keys() != update.state.keys():
        missing = sorted(update.state.keys() - fisher.keys())
        extra = sorted(fisher.keys() - update.state.keys())
        raise ValueError(
            f"client {update.client_id!r}: Fisher keys differ from its state keys "
            f"(missing {missing}, unexpected {extra})"
        )
    for key, tensor in update.state.items():
        if fisher[key].shape != tensor.shape:
            raise ValueError(
                f"client {update.client_id!r}, key {key!r}: Fisher shape "
                f"{tuple(fisher[key].shape)} != state shape {tuple(tensor.shape)}"
            )
