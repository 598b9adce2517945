"""DP-FedAvg: client-level differential privacy (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models", arXiv 1710.06963, Algorithm 1 with the fixed-denominator
estimator).

Each round, every sampled client's delta ``θ_i − θ_global`` is clipped to L2 norm ``C``; the server
sums the clipped deltas, divides by the number of clients *sampled* this round ``m`` (not by the
number that reported, so one client's presence changes the average by at most ``C / m``), and adds
Gaussian noise of standard deviation ``z · C / m`` to every coordinate. Clients are weighted
equally: weighting by ``num_examples`` would let one client's weight, and so its influence, grow
without bound.

The (ε, δ) this buys is computed by :func:`fednano_ray.trust.dp.dp_epsilon` with Google's
``dp-accounting`` library; this module only does the mechanism.

Heterogeneous ranks: deltas are taken at each client's own rank and zero-padded to the largest
rank, as in :mod:`fednano_ray.strategies.robust`; noise is added to every coordinate of the
released state, padded rows included.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fednano_ray.strategies.aggregate import State
from fednano_ray.strategies.base import ClientFailure, ClientUpdate, Strategy, SumPlan
from fednano_ray.strategies.robust import (
    aggregate_by_sum_plan,
    apply_delta,
    client_deltas,
    clip_by_norm,
)

__all__ = ["DPFedAvg", "gaussian_noise", "noisy_mean"]


def gaussian_noise(like: Mapping[str, Tensor], std: float, generator: torch.Generator) -> State:
    """I.i.d. ``N(0, std²)`` float64 noise with the keys and shapes of ``like``, from ``generator``
    (:func:`os_entropy_generator` in a run: see :class:`DPFedAvg`)."""
    return {
        key: torch.randn(tuple(t.shape), dtype=torch.float64, generator=generator) * std
        for key, t in like.items()
    }


def os_entropy_generator() -> torch.Generator:
    """A ``torch.Generator`` seeded with 63 bits from the OS CSPRNG (``secrets``), never stored.

    Nothing in the config, the results or a checkpoint can regenerate its draws, so nobody can
    subtract the noise from a released aggregate. (``torch.Generator`` itself is a Mersenne Twister,
    not a cryptographic RNG; an observer only ever sees noise added to a sum, never its outputs.)
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def noisy_mean(
    clipped_sum: Mapping[str, Tensor],
    num_sampled: int,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> State:
    """``Σ clip(δ_i) / m + N(0, (z C / m)²)``: DP-FedAvg's noisy fixed-denominator average.

    Args:
        clipped_sum: The sum of the clients' clipped deltas.
        num_sampled: ``m``, the number of clients sampled this round (>= 1).
        clip_norm: ``C`` (> 0).
        noise_multiplier: ``z`` (>= 0; 0 adds no noise and gives no privacy).
        generator: The source of the noise.

    Returns:
        The noisy average, float64.

    Raises:
        ValueError: On a non-positive ``num_sampled`` or ``clip_norm``, or a negative ``z``.
    """
    if num_sampled < 1:
        raise ValueError(f"num_sampled must be >= 1, got {num_sampled}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    std = noise_multiplier * clip_norm / num_sampled
    noise = gaussian_noise(clipped_sum, std, generator)
    return {
        key: value.to(torch.float64) / num_sampled + noise[key]
        for key, value in clipped_sum.items()
    }


class DPFedAvg(Strategy):
    """DP-FedAvg: clip each delta to ``clip_norm``, average over the sampled clients, add noise.

    The number of sampled clients is ``len(updates) + len(failures)`` of the round: clients that
    failed or were rejected count in the denominator (they contribute a zero delta).

    Args:
        clip_norm: ``C`` (> 0), the bound on each client's ``||θ_i − θ_global||``.
        noise_multiplier: ``z`` (> 0); the noise std is ``z · C / m``.
        mu: Client-side proximal coefficient (FedProx's ``mu``; 0: none).
        noise_generator: Makes the generator of one release's noise. Default
            :func:`os_entropy_generator`: fresh OS entropy every release, so two runs with the same
            ``federation.seed`` add different noise and the seed (public, in ``config.yaml``)
            reveals nothing. Tests that compare two paths of one mechanism pass a seeded factory;
            the config cannot.

    Raises:
        ValueError: On a non-positive ``clip_norm`` or ``noise_multiplier`` or a negative ``mu``.
    """

    name = "dp_fedavg"
    rank_rule = (
        "delta-space HetLoRA: each clipped delta taken at the client's own rank and zero-padded to "
        "the max rank; noise on every coordinate; truncate to own rank on receipt"
    )

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        mu: float = 0.0,
        *,
        noise_generator: Callable[[], torch.Generator] = os_entropy_generator,
    ) -> None:
        super().__init__()
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"dp_fedavg: clip_norm must be positive and finite, got {clip_norm}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(
                f"dp_fedavg: noise_multiplier must be positive and finite, got {noise_multiplier}"
            )
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"dp_fedavg: mu must be finite and >= 0, got {mu}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.noise_generator = noise_generator
        self.proximal_mu = float(mu)
        self.round = 0
        self._num_sampled = 0

    def begin_round(self, rnd: int) -> None:
        self.round = int(rnd)

    def noise_std(self, num_sampled: int) -> float:
        """The noise std ``z · C / m`` for ``m`` sampled clients."""
        return self.noise_multiplier * self.clip_norm / max(1, num_sampled)

    def aggregate(
        self,
        global_state: dict[str, Tensor],
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
    ) -> State:
        """As :meth:`Strategy.aggregate`; ``failures`` count in the denominator."""
        self._num_sampled = len(updates) + len(failures)
        return super().aggregate(global_state, updates, failures)

    def sum_plan(
        self,
        global_state: dict[str, Tensor],
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
    ) -> SumPlan:
        """As :meth:`Strategy.sum_plan`; ``failures`` count in the denominator."""
        self._num_sampled = len(updates) + len(failures)
        return super().sum_plan(global_state, updates, failures)

    def sum_plan_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> SumPlan:
        """Terms ``clip(δ_i, C)``; finish: ``θ_global + Σ clip(δ_i) / m + N(0, (z C / m)²)``."""
        deltas = client_deltas(global_state, [u.state for u in updates], rank)
        terms = [clip_by_norm(delta, self.clip_norm)[0] for delta in deltas]
        num_sampled = max(self._num_sampled, len(updates))

        def finish(sums: State) -> State:
            mean = noisy_mean(
                sums, num_sampled, self.clip_norm, self.noise_multiplier, self.noise_generator()
            )
            return apply_delta(global_state, mean, rank)

        return terms, finish

    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """The noisy clipped average at ``rank`` (see the class docstring)."""
        return aggregate_by_sum_plan(self, global_state, updates, rank)

    def describe(self) -> dict[str, str | float | bool]:
        """As :meth:`Strategy.describe`, plus the DP parameters."""
        return {
            **super().describe(),
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
        }

    def __repr__(self) -> str:
        return (
            f"DPFedAvg(clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}, "
            f"mu={self.proximal_mu})"
        )
