"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv 1602.05629): the global state is the example-weighted mean of the
clients' states, ``sum(n_i θ_i) / sum(n_i)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fednano_ray.strategies.aggregate import State, fedavg, merge_products, pad_to_rank
from fednano_ray.strategies.base import NUM_EXAMPLES, ClientUpdate, Strategy, SumPlan

__all__ = ["FedAvg", "fedavg_sum_plan"]


def fedavg_sum_plan(updates: list[ClientUpdate], rank: int, *, label: str = "fedavg") -> SumPlan:
    """FedAvg as sums: terms ``n_i θ_i`` (zero-padded to ``rank``) and ``n_i``; finish divides.

    ``finish`` returns the dtype of the first update's state, as :func:`fedavg` does. ``label``
    names the strategy in the error for a zero total (the clip rule averages clipped deltas with it
    too).
    """
    dtypes = {key: tensor.dtype for key, tensor in updates[0].state.items()}
    terms = []
    for update in updates:
        n = float(update.num_examples)
        term = {
            key: value.detach().to(torch.float64) * n
            for key, value in pad_to_rank(update.state, rank).items()
        }
        term[NUM_EXAMPLES] = torch.tensor([n], dtype=torch.float64)
        terms.append(term)

    def finish(sums: State) -> State:
        total = float(sums[NUM_EXAMPLES][0])
        if not total > 0:
            raise ValueError(f"{label}: total num_examples must be positive, got {total}")
        return {
            key: (value / total).to(dtypes[key])
            for key, value in sums.items()
            if key != NUM_EXAMPLES
        }

    return terms, finish


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
    product_rank_rule = (
        "product merging: the example-weighted mean of each client's B@A at its own rank, "
        "re-factorised by truncated SVD at the max rank; a smaller-rank client takes the top "
        "singular components"
    )

    def __init__(self, factors: str = "joint") -> None:
        super().__init__()
        if factors not in ("joint", "product"):
            raise ValueError(f"{self.name}: factors must be 'joint' or 'product', got {factors!r}")
        self.factors = factors
        if factors == "product":
            self.rank_rule = self.product_rank_rule

    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """Example-weighted mean of the updates, padded to ``rank`` (or, with ``factors='product'``,
        of each adapter's ``B @ A``, re-factorised at ``rank``: :func:`merge_products`)."""
        if self.factors == "product":
            return merge_products(
                [(u.state, u.num_examples) for u in updates],
                rank=rank,
                reference=pad_to_rank(global_state, rank),
            )
        return fedavg([(u.state, u.num_examples) for u in updates], rank=rank)

    def sum_plan_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> SumPlan:
        """Terms ``n_i θ_i`` and ``n_i``: see :func:`fedavg_sum_plan`."""
        if self.factors == "product":
            raise ValueError(
                "product merging needs each client's B@A, which a secure sum of the factors cannot "
                "give: use adapter.factors=joint or frozen_a with trust.secure_aggregation"
            )
        return fedavg_sum_plan(updates, rank)
