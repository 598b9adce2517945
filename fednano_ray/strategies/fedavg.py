"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv 1602.05629): the global state is the example-weighted mean of the
clients' states, ``sum(n_i θ_i) / sum(n_i)``.
"""

from __future__ import annotations

from torch import Tensor

from fednano_ray.strategies.aggregate import State, fedavg
from fednano_ray.strategies.base import ClientUpdate, Strategy

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Federated averaging weighted by ``num_examples``.

    Heterogeneous ranks: every update is zero-padded to the max rank and the padded zeros count as
    values, so clients of smaller rank pull the extra rank rows towards 0, and rows no update holds
    become 0 (plain HetLoRA zero-padding).
    """

    name = "fedavg"
    rank_rule = (
        "HetLoRA zero-padding: pad updates to the max rank (padded zeros dilute, rows no update "
        "holds become 0), truncate to own rank on receipt"
    )

    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """Example-weighted mean of the updates, padded to ``rank``."""
        return fedavg([(u.state, u.num_examples) for u in updates], rank=rank)
