"""FedAvgM (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv 1909.06335): FedAvg with momentum on the server.

The round's example-weighted mean is read as a step ``Δ = mean − θ``; the server keeps a velocity
``v ← β v + Δ`` and moves ``θ ← θ + v``. With ``federation.server_lr`` η the coordinator's server
step makes that ``θ + η v``, the paper's update with pseudo-gradient ``−Δ``. ``β = 0`` is FedAvg.
The velocity is the strategy's state: it is checkpointed with the round, so ``--resume`` continues
it exactly (:meth:`state_dict`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fednano_ray.strategies.aggregate import State, fedavg, pad_to_rank
from fednano_ray.strategies.base import ClientUpdate, SumPlan
from fednano_ray.strategies.fedavg import FedAvg, fedavg_sum_plan

__all__ = ["FedAvgM"]

_PREFIX = "velocity."


class FedAvgM(FedAvg):
    """FedAvg with server momentum ``momentum`` (β in [0, 1)).

    Heterogeneous ranks are padded as in FedAvg; the velocity lives at the global state's rank.

    Raises:
        ValueError: If ``momentum`` is not in [0, 1).
    """

    name = "fedavgm"

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        if not (math.isfinite(momentum) and 0 <= momentum < 1):
            raise ValueError(f"fedavgm: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.velocity: State = {}

    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """``θ + v`` with ``v = β v + (mean − θ)``, the mean FedAvg's."""
        return self._step(
            global_state, fedavg([(u.state, u.num_examples) for u in updates], rank=rank), rank
        )

    def sum_plan_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> SumPlan:
        """FedAvg's terms; ``finish`` takes the mean from their sum and then the momentum step."""
        terms, mean_of = fedavg_sum_plan(updates, rank, label=self.name)
        return terms, lambda sums: self._step(global_state, mean_of(sums), rank)

    def _step(self, global_state: dict[str, Tensor], mean: State, rank: int) -> State:
        start = pad_to_rank(global_state, rank)
        old = pad_to_rank(self.velocity, rank) if self.velocity else {}
        velocity: State = {}
        new: State = {}
        for key, value in mean.items():
            delta = value.to(torch.float32) - start[key].to(torch.float32)
            v = delta if key not in old else self.momentum * old[key] + delta
            velocity[key] = v
            new[key] = (start[key].to(torch.float32) + v).to(value.dtype)
        self.velocity = velocity
        return new

    def state_dict(self) -> State:
        """The velocity, for the round's checkpoint (empty before the first aggregation)."""
        return {_PREFIX + k: v.contiguous() for k, v in self.velocity.items()}

    def load_state_dict(self, state: State) -> None:
        """Restore :meth:`state_dict`'s velocity (``--resume``)."""
        self.velocity = {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}

    def describe(self) -> dict[str, str | float | bool]:
        return {**super().describe(), "server_momentum": self.momentum}
