"""Centralized training: the upper-bound baseline in which all clients' data is pooled.

The coordinator treats this strategy specially: it trains one model on the union of the clients'
training shards (no federation, no client drift) and evaluates it on every client's held-out split.
The pooled client trains on the top tier's actor, at the largest tier rank (the global state's),
with that tier's batch size and ``local_steps × clients_per_round`` steps.
Aggregation is FedAvg, so the same round loop works with the pooled run as its single "client",
where FedAvg of one update is that update.
"""

from __future__ import annotations

from fednano_ray.strategies.fedavg import FedAvg

__all__ = ["Centralized"]


class Centralized(FedAvg):
    """FedAvg aggregation; the coordinator pools all client data into one training run."""

    name = "centralized"
    rank_rule = (
        "pooled: one run at the largest tier rank "
        "(FedAvg zero-padding if several ranks ever arrive)"
    )
