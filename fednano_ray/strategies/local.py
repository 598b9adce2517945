"""Local training: the no-federation baseline. Each client trains only its own adapters from the
shared initial state; nothing is aggregated, so the global state never changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fednano_ray.strategies.aggregate import State
from fednano_ray.strategies.base import ClientFailure, ClientUpdate, Strategy

__all__ = ["Local"]


class Local(Strategy):
    """No aggregation: ``aggregate`` returns the global state unchanged.

    ``personalize_only`` is True: the coordinator keeps each client's own adapters (the only model
    there is) and evaluates those.
    """

    name = "local"
    personalize_only = True
    rank_rule = "none: no aggregation, each client keeps its own rank"

    def aggregate(
        self,
        global_state: dict[str, Tensor],
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
    ) -> State:
        """Return ``global_state`` itself, whatever the updates."""
        del updates, failures
        self.warnings = []
        return global_state

    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """Return ``global_state`` itself (unused: :meth:`aggregate` is overridden)."""
        return global_state
