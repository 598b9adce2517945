"""How the coordinator applies ``cfg.trust`` to a round: which strategy aggregates, which updates
are rejected, how the sum is taken (plain or SecAgg) and what privacy has been spent.

:class:`TrustPolicy` is built once per run from the validated config; the coordinator calls
:meth:`~TrustPolicy.screen` on the updates that arrived, then :meth:`~TrustPolicy.aggregate`
instead of ``strategy.aggregate``, and merges the returned extras into the round record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from fednano_ray.config import Config
from fednano_ray.strategies.base import ClientFailure, ClientUpdate, Strategy
from fednano_ray.trust.validate import screen_updates

__all__ = ["TrustPolicy"]


class TrustPolicy:
    """``cfg.trust`` for one run.

    Args:
        cfg: The validated config (cross-section rules, e.g. DP only with fedavg/fedprox, are
            already enforced by :class:`~fednano_ray.config.Config`).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.trust = cfg.trust
        self.max_rank = max(cfg.tier_rank(t) for t in cfg.tiers)

    def screen(
        self,
        updates: Sequence[ClientUpdate],
        reference: Callable[[ClientUpdate], Mapping[str, Tensor]],
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """Valid updates, and ``ClientFailure(id, "rejected: <reason>")`` for the others.

        Structure, dtype and finiteness are always checked; the norm bound only if
        ``trust.max_update_norm`` is set; the Fisher only where the method uploads one (fednano).
        """
        return screen_updates(
            updates,
            reference,
            max_rank=self.max_rank,
            max_update_norm=self.trust.max_update_norm,
            check_fisher=self.cfg.method().fisher_upload,
        )

    def aggregate(
        self,
        strategy: Strategy,
        rnd: int,
        global_state: dict[str, Tensor],
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
        history: Sequence[Mapping[str, Any]],
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The next global state, and what to add to the round record.

        Args:
            strategy: The run's strategy (:meth:`fednano_ray.federation.method.Method.build_strategy`).
            rnd: The round number (seeds DP noise; binds SecAgg messages to the round).
            global_state, updates, failures: As :meth:`Strategy.aggregate`.
            history: The records of the rounds before this one (to count DP releases on resume).

        This is the plain uplink's aggregation: under ``trust.secure_aggregation`` no update reaches
        the coordinator; its SecAgg uplink (``Federation._secure_uplink``) finishes the masked sum
        and uses :meth:`dp_extras` for the record.

        Returns:
            ``(state, extras)``; ``extras`` may hold ``dp_epsilon`` / ``dp_delta`` /
            ``dp_noise_std`` / ``dp_releases``.

        Raises:
            ValueError: under ``trust.secure_aggregation``: the updates would be in the clear here.
        """
        if self.trust.secure_aggregation:
            raise ValueError(
                "trust.secure_aggregation: the clients mask their own terms and the round finishes "
                "the masked sum (Federation's SecAgg uplink); plain updates must not be aggregated"
            )
        strategy.begin_round(rnd)
        state = strategy.aggregate(global_state, updates, failures)
        return state, self.dp_extras(len(updates) + len(failures), history)

    def dp_extras(self, num_sampled: int, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The round record's DP figures for a release among ``num_sampled`` clients (empty
        without DP)."""
        dp = self.trust.dp
        if dp is None:
            return {}
        releases = 1 + sum(1 for r in history if "dp_epsilon" in r)
        return {
            "dp_epsilon": self.epsilon(releases),
            "dp_delta": dp.delta,
            "dp_noise_std": dp.noise_multiplier * dp.clip_norm / num_sampled,
            "dp_releases": releases,
        }

    def epsilon(self, releases: int) -> float | None:
        """ε after ``releases`` DP rounds at ``trust.dp.delta`` (None without DP)."""
        dp = self.trust.dp
        if dp is None:
            return None
        from fednano_ray.trust.dp import dp_epsilon

        fed = self.cfg.federation
        eps = dp_epsilon(
            dp.noise_multiplier,
            fed.clients_per_round / fed.num_clients,
            releases,
            dp.delta,
            dp.accountant,
        )
        return eps if math.isfinite(eps) else None

    def summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Run-level figures for ``results.json``'s summary (empty without DP or SecAgg)."""
        out: dict[str, Any] = {}
        dp = self.trust.dp
        if dp is not None:
            from fednano_ray.trust.dp import accountant_version

            fed = self.cfg.federation
            releases = sum(1 for r in history if "dp_epsilon" in r)
            out.update(
                dp_epsilon=self.epsilon(releases),
                dp_delta=dp.delta,
                dp_releases=releases,
                dp_sampling_rate=fed.clients_per_round / fed.num_clients,
                dp_accountant=f"{accountant_version()} ({dp.accountant}, Poisson sampling, "
                "add/remove-one-client adjacency)",
            )
        if self.trust.secure_aggregation:
            out["secure_aggregation"] = True
        out["rejected_updates"] = sum(
            1 for r in history for f in r.get("failures", ()) if f["reason"].startswith("rejected:")
        )
        return out
