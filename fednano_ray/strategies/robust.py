"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, and norm clipping.

A minority of clients that send scaled or sign-flipped updates can move a FedAvg mean arbitrarily
far; these rules bound what they can do.

* :func:`coordinate_median` (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", arXiv 1803.01498): each coordinate is the median of the clients'
  values; with an even count, the mean of the two middle values.
* :func:`trimmed_mean` (same paper): each coordinate drops the ``floor(β m)`` largest and smallest
  of the ``m`` values and averages the rest.
* :func:`clipped_mean` (norm bounding, Sun et al. 2019, "Can You Really Backdoor Federated
  Learning?", arXiv 1911.07963): each client's delta ``θ_i − θ_global`` is scaled down to L2 norm
  at most ``C`` (over all keys together) before the example-weighted mean.

All three work on *deltas* from the global state. Heterogeneous ranks (HetLoRA): a client's delta
is taken at its own rank (against the global state truncated to that rank, which is what it
started from) and zero-padded to the largest rank, so a padded entry is a "no change" vote and rank
rows no client holds keep their global value. Median and trimmed mean are unweighted (one vote per
client, as in the paper); clipping keeps FedAvg's ``num_examples`` weights. With one rank and no
clipping active, :func:`clipped_mean` is exactly FedAvg.

The functions are pure (``dict[str, Tensor]`` in and out, float64 inside); the strategies at the
end wrap them for :func:`~fednano_ray.strategies.build_strategy`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fednano_ray.strategies.aggregate import (
    State,
    _check_same_layout,
    _check_weights,
    pad_to_rank,
    rank_dim,
    truncate_to_rank,
)
from fednano_ray.strategies.base import ClientUpdate, Strategy, SumPlan
from fednano_ray.strategies.fedavg import fedavg_sum_plan

__all__ = [
    "Median",
    "NormClip",
    "TrimmedMean",
    "apply_delta",
    "client_deltas",
    "clip_by_norm",
    "clipped_mean",
    "coordinate_median",
    "fit_to_rank",
    "state_norm",
    "sum_states",
    "trimmed_mean",
    "update_delta",
    "update_norm",
]

# --------------------------------------------------------------------------------------------------
# Deltas
# --------------------------------------------------------------------------------------------------


def fit_to_rank(state: Mapping[str, Tensor], r: int) -> State:
    """Truncate or zero-pad every LoRA tensor of ``state`` to rank ``r`` (other keys unchanged).

    Args:
        state: A state dict whose LoRA tensors may have ranks above or below ``r``.
        r: Target rank (>= 0).

    Returns:
        A new dict at rank ``r``.
    """
    out: State = {}
    for key, tensor in state.items():
        dim = rank_dim(key)
        if dim is None or tensor.ndim != 2 or tensor.shape[dim] == r:
            out[key] = tensor
        elif tensor.shape[dim] > r:
            out.update(truncate_to_rank({key: tensor}, r))
        else:
            out.update(pad_to_rank({key: tensor}, r))
    return out


def update_delta(reference: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> State:
    """``θ_i − θ_ref`` key by key, in float64, at the rank of ``state``.

    Each LoRA tensor of ``reference`` is truncated (or zero-padded) to the rank of the matching
    tensor of ``state`` first, so the delta is what the client changed relative to what it received.

    Args:
        reference: The state the client started from (the global state, at any rank).
        state: The client's state (same keys; LoRA tensors at the client's rank).

    Returns:
        One float64 tensor per key of ``state``, with its shape.
    """
    out: State = {}
    for key, tensor in state.items():
        ref = reference[key]
        dim = rank_dim(key)
        if dim is not None and tensor.ndim == 2 and ref.ndim == 2:
            ref = fit_to_rank({key: ref}, int(tensor.shape[dim]))[key]
        out[key] = tensor.detach().to(torch.float64) - ref.detach().to(torch.float64)
    return out


def state_norm(state: Mapping[str, Tensor]) -> float:
    """The L2 norm of all entries of ``state`` together (0.0 for an empty state)."""
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in state.values()))


def update_norm(reference: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> float:
    """``||θ_i − θ_ref||``: the L2 norm of :func:`update_delta` over all keys together."""
    return state_norm(update_delta(reference, state))


def client_deltas(
    global_state: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], rank: int | None
) -> list[State]:
    """Each client's :func:`update_delta` against ``global_state``, zero-padded to ``rank``.

    Args:
        global_state: The global state of the round.
        states: The clients' states, each at its own rank (at most ``rank``).
        rank: The rank to pad the deltas to; None: all states have the global shapes.

    Returns:
        float64 deltas with identical keys and shapes.
    """
    deltas = [update_delta(global_state, s) for s in states]
    return deltas if rank is None else [pad_to_rank(d, rank) for d in deltas]


def apply_delta(
    global_state: Mapping[str, Tensor], delta: Mapping[str, Tensor], rank: int | None
) -> State:
    """``θ_global + delta`` at rank ``rank``, in the dtype of ``global_state``.

    The global state is truncated or zero-padded to ``rank`` first (None: used as it is).
    """
    base = dict(global_state) if rank is None else fit_to_rank(global_state, rank)
    out: State = {}
    for key, value in base.items():
        out[key] = (value.detach().to(torch.float64) + delta[key].to(torch.float64)).to(value.dtype)
    return out


def aggregate_by_sum_plan(
    strategy: Strategy, global_state: State, updates: list[ClientUpdate], rank: int
) -> State:
    """``finish(Σ terms)`` of ``strategy.sum_plan_updates``: the plain (non-secure) aggregation of a
    rule that is a function of sums."""
    terms, finish = strategy.sum_plan_updates(global_state, updates, rank)
    return finish(sum_states(terms))


def sum_states(states: Sequence[Mapping[str, Tensor]]) -> State:
    """Elementwise float64 sum of state dicts with identical keys and shapes.

    Raises:
        ValueError: On no states or a key-set or shape mismatch.
    """
    _check_same_layout(states)
    return {
        key: torch.stack([s[key].detach().to(torch.float64) for s in states]).sum(0)
        for key in states[0]
    }


# --------------------------------------------------------------------------------------------------
# Robust rules on deltas
# --------------------------------------------------------------------------------------------------


def _stacked(deltas: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    return torch.stack([d[key].detach().to(torch.float64) for d in deltas])


def coordinate_median(deltas: Sequence[Mapping[str, Tensor]]) -> State:
    """Coordinate-wise median; with an even number of clients, the mean of the two middle values.

    Args:
        deltas: One state dict per client, identical keys and shapes.

    Returns:
        The median, float64.

    Raises:
        ValueError: On no deltas or a key-set or shape mismatch.
    """
    _check_same_layout(deltas)
    m = len(deltas)
    out: State = {}
    for key in deltas[0]:
        values = _stacked(deltas, key).sort(dim=0).values
        lo, hi = (m - 1) // 2, m // 2
        out[key] = 0.5 * (values[lo] + values[hi])
    return out


def trimmed_mean(deltas: Sequence[Mapping[str, Tensor]], trim_fraction: float) -> State:
    """Coordinate-wise β-trimmed mean: drop the ``floor(β m)`` largest and smallest, average rest.

    Args:
        deltas: One state dict per client, identical keys and shapes.
        trim_fraction: β in [0, 0.5): the fraction trimmed from *each* side. 0 is the plain mean.

    Returns:
        The trimmed mean, float64 (at least one value per coordinate always remains).

    Raises:
        ValueError: On no deltas, a layout mismatch, or β outside [0, 0.5).
    """
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    _check_same_layout(deltas)
    m = len(deltas)
    k = math.floor(trim_fraction * m)
    return {key: _stacked(deltas, key).sort(dim=0).values[k : m - k].mean(0) for key in deltas[0]}


def clip_by_norm(delta: Mapping[str, Tensor], bound: float) -> tuple[State, float]:
    """Scale ``delta`` by ``min(1, bound / ||delta||)`` (the norm over all keys together).

    Args:
        delta: A state dict (a client's update delta).
        bound: The L2 bound C (> 0).

    Returns:
        ``(clipped, norm)``: the clipped delta (float64) and the norm before clipping.

    Raises:
        ValueError: If ``bound`` is not a positive finite number.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"clip bound must be positive and finite, got {bound}")
    norm = state_norm(delta)
    factor = 1.0 if norm <= bound else bound / norm
    return {key: value.detach().to(torch.float64) * factor for key, value in delta.items()}, norm


def clipped_mean(
    deltas: Sequence[Mapping[str, Tensor]], weights: Sequence[float], bound: float
) -> State:
    """``Σ w_i clip(δ_i, C) / Σ w_i``: the weighted mean of norm-clipped deltas.

    Args:
        deltas: One state dict per client, identical keys and shapes.
        weights: One finite, non-negative weight per client (e.g. ``num_examples``), positive sum.
        bound: The clip bound C (> 0).

    Returns:
        The mean, float64.

    Raises:
        ValueError: On no deltas, a layout mismatch, invalid weights or an invalid bound.
    """
    _check_same_layout(deltas)
    _check_weights(weights, len(deltas))
    total = float(sum(weights))
    summed = sum_states(
        [
            {k: v * float(w) for k, v in clip_by_norm(d, bound)[0].items()}
            for d, w in zip(deltas, weights, strict=True)
        ]
    )
    return {key: value / total for key, value in summed.items()}


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------


class _DeltaStrategy(Strategy):
    """A rule on client deltas; ``mu`` keeps FedProx's client-side proximal term if wanted."""

    rank_rule = (
        "delta-space HetLoRA: each delta taken at the client's own rank and zero-padded to the max "
        "rank (padded entries vote 'no change', rows no update holds keep the global value), "
        "truncate to own rank on receipt"
    )

    def __init__(self, mu: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"{self.name}: mu must be finite and >= 0, got {mu}")
        self.proximal_mu = float(mu)

    def _combine(self, deltas: list[State], updates: list[ClientUpdate]) -> State:
        raise NotImplementedError

    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """``θ_global`` plus the combined deltas, at ``rank``."""
        deltas = client_deltas(global_state, [u.state for u in updates], rank)
        return apply_delta(global_state, self._combine(deltas, updates), rank)


class Median(_DeltaStrategy):
    """Coordinate-wise median of the clients' deltas (unweighted).

    Args:
        mu: Client-side proximal coefficient (FedProx's ``mu``; 0: none).
    """

    name = "median"

    def _combine(self, deltas: list[State], updates: list[ClientUpdate]) -> State:
        return coordinate_median(deltas)


class TrimmedMean(_DeltaStrategy):
    """Coordinate-wise β-trimmed mean of the clients' deltas (unweighted).

    Args:
        trim_fraction: β in [0, 0.5), trimmed from each side.
        mu: Client-side proximal coefficient (0: none).

    Raises:
        ValueError: If β is outside [0, 0.5) or ``mu`` is invalid.
    """

    name = "trimmed_mean"

    def __init__(self, trim_fraction: float = 0.1, mu: float = 0.0) -> None:
        super().__init__(mu)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(
                f"trimmed_mean: trim_fraction must be in [0, 0.5), got {trim_fraction}"
            )
        self.trim_fraction = float(trim_fraction)

    def _combine(self, deltas: list[State], updates: list[ClientUpdate]) -> State:
        return trimmed_mean(deltas, self.trim_fraction)

    def describe(self) -> dict[str, str | float | bool]:
        """As :meth:`Strategy.describe`, plus ``trim_fraction``."""
        return {**super().describe(), "trim_fraction": self.trim_fraction}


class NormClip(_DeltaStrategy):
    """Example-weighted mean of the clients' deltas, each clipped to L2 norm ``clip_norm`` first.

    Under secure aggregation the clipping is the client's job (it happens before masking), so it
    bounds honest-but-faulty clients only; the server cannot check it.

    Args:
        clip_norm: The bound C (> 0) on each client's ``||θ_i − θ_global||``.
        mu: Client-side proximal coefficient (0: none).

    Raises:
        ValueError: If ``clip_norm`` is not positive and finite or ``mu`` is invalid.
    """

    name = "clip"

    def __init__(self, clip_norm: float = 1.0, mu: float = 0.0) -> None:
        super().__init__(mu)
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip: clip_norm must be positive and finite, got {clip_norm}")
        self.clip_norm = float(clip_norm)

    def sum_plan_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> SumPlan:
        """Terms ``n_i clip(δ_i)`` and ``n_i``; finish: ``θ_global + Σ n_i clip(δ_i) / Σ n_i``."""
        deltas = client_deltas(global_state, [u.state for u in updates], rank)
        clipped = [
            dataclasses.replace(update, state=clip_by_norm(delta, self.clip_norm)[0])
            for delta, update in zip(deltas, updates, strict=True)
        ]
        terms, weighted_mean = fedavg_sum_plan(clipped, rank, label="clip")
        return terms, lambda sums: apply_delta(global_state, weighted_mean(sums), rank)

    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """``θ_global + Σ n_i clip(δ_i, C) / Σ n_i`` at ``rank``."""
        return aggregate_by_sum_plan(self, global_state, updates, rank)

    def describe(self) -> dict[str, str | float | bool]:
        """As :meth:`Strategy.describe`, plus ``clip_norm``."""
        return {**super().describe(), "clip_norm": self.clip_norm}
