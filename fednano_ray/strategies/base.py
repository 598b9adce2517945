"""What a strategy sees of a round, and the interface every strategy implements.

A strategy is a small object on the coordinator. It turns the round's client updates into the next
global adapter state with the pure functions of :mod:`fednano_ray.strategies.aggregate`, and tells
clients how to train (``proximal_mu``) and whether there is a global model at all
(``personalize_only``). Failed clients arrive as :class:`ClientFailure` data, never as exceptions
(Flower's ``aggregate_fit(results, failures)``).

Heterogeneous ranks (HetLoRA): :meth:`Strategy.aggregate` pads every update to the largest rank of
the global state and the updates, aggregates, and returns the global state at that rank; each
client truncates it to its own rank on receipt (:func:`~.aggregate.truncate_to_rank`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from fednano_ray.strategies.aggregate import State, max_rank, rank_dim

__all__ = ["NUM_EXAMPLES", "ClientFailure", "ClientUpdate", "Strategy", "SumPlan"]

#: How a strategy aggregates from sums only: one term dict per update (every dict with the same
#: keys and shapes, float64) and the function that turns the elementwise sum of the terms into the
#: new global state. Secure aggregation (:mod:`fednano_ray.trust.secagg`) sums the terms masked.
SumPlan = tuple[list[State], Callable[[State], State]]

#: The key of a SumPlan term holding a client's ``num_examples`` (no adapter key contains ``__``).
NUM_EXAMPLES = "__num_examples__"


@dataclass
class ClientUpdate:
    """One client's result of a round.

    Attributes:
        client_id: Who sent it.
        state: The client's adapter state dict after local training, at the client's own rank.
        num_examples: Examples the client trained on this round (the FedAvg weight), >= 0.
        fisher: Diagonal Fisher estimate with the keys and shapes of ``state`` (mean squared
            gradient over the last local pass), or None if the client did not compute one.
        metrics: Scalars to log (e.g. ``{"loss": 0.42}``).
    """

    client_id: str
    state: dict[str, Tensor]
    num_examples: int
    fisher: dict[str, Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise ValueError(
                f"client {self.client_id!r}: num_examples must be >= 0, got {self.num_examples}"
            )


@dataclass
class ClientFailure:
    """A client that did not deliver an update this round (crash, deadline, bad data).

    Attributes:
        client_id: Who failed.
        reason: A message a person can act on (e.g. ``"deadline 30 s exceeded"``).
    """

    client_id: str
    reason: str


class Strategy(ABC):
    """Base class of federated strategies.

    Subclasses set ``name`` and implement :meth:`aggregate_updates`; :meth:`aggregate` does the
    shared work (empty rounds, validation against the global state, the rank to pad to).

    Attributes:
        name: Registry name, as in the config (``federation.strategy``).
        proximal_mu: FedProx coefficient clients add as ``mu/2 ||θ − θ_global||²`` (0: none).
        personalize_only: True if there is no global model: clients only train their own adapters.
        rank_rule: How heterogeneous ranks are aggregated, for the run's results.
        warnings: Messages from the latest :meth:`aggregate` call (e.g. a fallback taken), for the
            coordinator to record; reset on every call.
    """

    name: ClassVar[str] = "strategy"
    proximal_mu: float = 0.0
    personalize_only: bool = False
    #: True if clients upload a diagonal Fisher with their state (Fisher merging).
    uses_fisher: ClassVar[bool] = False
    #: True if every client ends with a dual (global + local) adapter after the rounds (FedDPA-F).
    dual_adapter: ClassVar[bool] = False
    rank_rule: str = (
        "HetLoRA: zero-pad to the max rank of global and updates, truncate to own rank on receipt"
    )

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def aggregate(
        self,
        global_state: dict[str, Tensor],
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
    ) -> State:
        """The next global state from this round's updates.

        Args:
            global_state: The global adapter state the round started from.
            updates: Updates of the clients that finished, possibly of different ranks.
            failures: Clients that did not finish. They are ignored: aggregation uses the updates
                that arrived (the coordinator decides about quorum before calling this).

        Returns:
            The new global state at the max rank of ``global_state`` and ``updates``, or
            ``global_state`` itself if there are no updates.

        Raises:
            ValueError: If an update's keys differ from the global state's, or a tensor's shape
                differs from the global one outside the rank dim (naming client and key).
        """
        del failures  # Failures are data: nothing to aggregate from them.
        self.warnings = []
        if not updates:
            return global_state
        for update in updates:
            _check_against_global(global_state, update)
        rank = max_rank([global_state, *(u.state for u in updates)])
        return self.aggregate_updates(global_state, list(updates), rank)

    @abstractmethod
    def aggregate_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> State:
        """Aggregate a non-empty, validated list of updates at rank ``rank``.

        Args:
            global_state: The global state the round started from (rank at most ``rank``).
            updates: At least one update, each at its own rank (at most ``rank``).
            rank: The rank to return the state at (0 if no key carries a rank).

        Returns:
            The new global state at rank ``rank``.
        """

    def begin_round(self, rnd: int) -> None:
        """Called by the coordinator before it aggregates round ``rnd`` (default: nothing).

        Strategies with per-round randomness (DP noise) seed it from the round, so a resumed run
        draws what an uninterrupted one would.
        """
        del rnd

    def sum_plan(
        self,
        global_state: dict[str, Tensor],
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
    ) -> SumPlan:
        """The round's aggregation as per-client terms plus a function of their sum.

        ``finish(sum of terms)`` equals :meth:`aggregate` (up to float rounding, and up to fresh
        noise for DP). This is what secure aggregation needs: the server learns only the sum.

        Args:
            global_state, updates, failures: As :meth:`aggregate`; ``updates`` must be non-empty.

        Returns:
            ``(terms, finish)``: see :data:`SumPlan`.

        Raises:
            ValueError: As :meth:`aggregate`, or if ``updates`` is empty.
            NotImplementedError: If the rule is not a function of sums (e.g. a median).
        """
        self.warnings = []
        if not updates:
            raise ValueError(f"{self.name}: nothing to aggregate: got no updates")
        for update in updates:
            _check_against_global(global_state, update)
        rank = max_rank([global_state, *(u.state for u in updates)])
        return self.sum_plan_updates(global_state, list(updates), rank)

    def sum_plan_updates(
        self, global_state: dict[str, Tensor], updates: list[ClientUpdate], rank: int
    ) -> SumPlan:
        """:meth:`sum_plan` for a non-empty, validated list of updates at rank ``rank``.

        Raises:
            NotImplementedError: Unless the strategy overrides it.
        """
        raise NotImplementedError(
            f"strategy {self.name!r} cannot aggregate from sums alone, so it cannot run under "
            "secure aggregation; use trust.aggregator mean or clip"
        )

    def state_dict(self) -> State:
        """What the strategy carries from round to round (e.g. server momentum), checkpointed with
        the round so ``--resume`` continues it exactly; empty for stateless rules (the default)."""
        return {}

    def load_state_dict(self, state: State) -> None:
        """Restore :meth:`state_dict` (default: nothing to restore)."""
        del state

    def describe(self) -> dict[str, str | float | bool]:
        """What this strategy did, for the run's ``results.json``."""
        return {
            "strategy": self.name,
            "proximal_mu": self.proximal_mu,
            "personalize_only": self.personalize_only,
            "rank_rule": self.rank_rule,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(proximal_mu={self.proximal_mu})"


def _check_against_global(global_state: dict[str, Tensor], update: ClientUpdate) -> None:
    """Raise ValueError unless ``update`` has the global keys and shapes, rank dims aside."""
    if update.state.keys() != global_state.keys():
        missing = sorted(global_state.keys() - update.state.keys())
        extra = sorted(update.state.keys() - global_state.keys())
        raise ValueError(
            f"client {update.client_id!r}: keys differ from the global state "
            f"(missing {missing}, unexpected {extra})"
        )
    for key, tensor in update.state.items():
        ref = global_state[key]
        dim = rank_dim(key)
        same = tensor.shape == ref.shape or (
            dim is not None
            and tensor.ndim == ref.ndim == 2
            and tensor.shape[1 - dim] == ref.shape[1 - dim]
        )
        if not same:
            raise ValueError(
                f"client {update.client_id!r}, key {key!r}: shape {tuple(tensor.shape)} does not "
                f"fit the global shape {tuple(ref.shape)}"
                + ("" if dim is None else f" (only dim {dim}, the rank, may differ)")
            )
