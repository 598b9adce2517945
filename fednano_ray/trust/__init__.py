"""Trust and privacy for federated rounds: update validation, robust aggregation, client-level DP
and secure aggregation.

* :mod:`fednano_ray.trust.validate`: reject malformed, non-finite or outsized updates.
* :mod:`fednano_ray.strategies.robust`: median, trimmed mean and norm clipping (strategies).
* :mod:`fednano_ray.strategies.dp` and :mod:`fednano_ray.trust.dp`: DP-FedAvg and its accountant.
* :mod:`fednano_ray.trust.secagg`: the SecAgg-style protocol on vectors;
  :mod:`fednano_ray.trust.secagg_plan`: its glue with the strategies (what a client masks, how the
  server finishes the sum).

How a round applies ``cfg.trust`` (screening, the plain or SecAgg uplink, the DP accounting) is
the run's :class:`~fednano_ray.federation.method.Method`.
"""

from fednano_ray.trust.validate import REJECTED, screen_updates, validate_update

__all__ = ["REJECTED", "screen_updates", "validate_update"]
