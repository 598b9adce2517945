"""Federated strategies: pure aggregation math and one strategy per paper.

Build one from the config's name with :func:`build_strategy`::

    strategy = build_strategy("fedprox", mu=0.01)
    new_global = strategy.aggregate(global_state, updates, failures)
"""

from __future__ import annotations

from typing import Any

from fednano_ray.strategies.aggregate import (
    fedavg,
    fisher_contribution,
    fisher_from_sums,
    fisher_merge,
    fisher_sums,
    max_rank,
    pad_to_rank,
    proximal_penalty,
    rank_dim,
    truncate_to_rank,
    weighted_average,
)
from fednano_ray.strategies.base import ClientFailure, ClientUpdate, Strategy
from fednano_ray.strategies.centralized import Centralized
from fednano_ray.strategies.dp import DPFedAvg
from fednano_ray.strategies.fedavg import FedAvg
from fednano_ray.strategies.fedavg_lora import FedAvgLoRA
from fednano_ray.strategies.feddpa import FedDPAF
from fednano_ray.strategies.fednano import FedNano
from fednano_ray.strategies.fedprox import FedProx
from fednano_ray.strategies.local import Local
from fednano_ray.strategies.robust import (
    Median,
    NormClip,
    TrimmedMean,
    clipped_mean,
    coordinate_median,
    trimmed_mean,
)

__all__ = [
    "STRATEGIES",
    "Centralized",
    "ClientFailure",
    "ClientUpdate",
    "DPFedAvg",
    "FedAvg",
    "FedAvgLoRA",
    "FedDPAF",
    "FedNano",
    "FedProx",
    "Local",
    "Median",
    "NormClip",
    "Strategy",
    "TrimmedMean",
    "build_strategy",
    "clipped_mean",
    "coordinate_median",
    "fedavg",
    "fisher_contribution",
    "fisher_from_sums",
    "fisher_merge",
    "fisher_sums",
    "max_rank",
    "pad_to_rank",
    "proximal_penalty",
    "rank_dim",
    "trimmed_mean",
    "truncate_to_rank",
    "weighted_average",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgLoRA,
        FedDPAF,
        FedProx,
        FedNano,
        Local,
        Centralized,
        Median,
        TrimmedMean,
        NormClip,
        DPFedAvg,
    )
}


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    """Instantiate the strategy registered under ``name``.

    Args:
        name: One of ``STRATEGIES`` (``fedavg``, ``fedprox``, ``fednano``, ``local``,
            ``centralized``, ``fedavg-lora``, ``feddpa-f``; the robust rules ``median``,
            ``trimmed_mean``, ``clip``; and ``dp_fedavg``).
        **kwargs: Constructor options, e.g. ``mu`` for ``fedprox``, ``eps`` for ``fednano``,
            ``train_weight``, ``top_k``, ``bank_size`` for ``feddpa-f``,
            ``trim_fraction`` for ``trimmed_mean``, ``clip_norm`` for ``clip``.

    Returns:
        The strategy.

    Raises:
        ValueError: If ``name`` is unknown (listing the valid names) or an option does not apply.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; valid names: {', '.join(sorted(STRATEGIES))}"
        ) from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"strategy {name!r}: bad options {sorted(kwargs)}: {err}") from err
