"""Privacy accounting for DP-FedAvg with Google's ``dp-accounting`` library.

The mechanism (:class:`~fednano_ray.strategies.dp.DPFedAvg`) is, per round, a Gaussian mechanism
with noise multiplier ``z`` on the clipped sum of the sampled clients' deltas, whose sensitivity to
adding or removing one client is ``C``. Clients are sampled with rate ``q = clients_per_round /
num_clients``. Following McMahan et al. (2018) the accountant treats this as a *Poisson*-subsampled
Gaussian under add-or-remove-one-client adjacency, composed over the rounds released so far:
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)``.

Caveat: the coordinator samples a fixed number of clients without replacement, not Poisson. That
is the usual approximation in federated DP; a strict analysis of fixed-size sampling uses
replace-one adjacency (``SampledWithoutReplacementDpEvent``), which the RDP accountant also
supports, at roughly twice the sensitivity. With ``q = 1`` (every client every round) there is no
subsampling and the figure is exact for add-or-remove adjacency.

Two accountants are offered: ``"pld"`` (privacy loss distributions: tight; exact for ``q = 1``)
and ``"rdp"`` (Rényi DP, the moments accountant of the DP-FedAvg paper: an upper bound, looser).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from importlib.metadata import version
from typing import Literal

__all__ = ["accountant_version", "dp_epsilon"]

Accountant = Literal["pld", "rdp"]


@contextmanager
def _quiet_absl():
    """Silence dp-accounting's per-order convergence warnings (orders it then skips) for a call."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dp_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: Accountant = "pld",
) -> float:
    """ε of ``rounds`` rounds of DP-FedAvg at ``delta`` (see the module docstring for the model).

    Args:
        noise_multiplier: ``z`` (> 0): noise std over the clip norm (sum sensitivity).
        sampling_rate: ``q`` in (0, 1]: clients sampled per round over all clients.
        rounds: Rounds released so far (>= 0; 0 gives ε = 0).
        delta: Target δ in (0, 1).
        accountant: ``"pld"`` (tight) or ``"rdp"`` (looser upper bound).

    Returns:
        ε (``math.inf`` if the accountant cannot bound it).

    Raises:
        ValueError: On an argument outside its range, naming it.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds == 0:
        return 0.0
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        rounds,
    )
    if accountant == "pld":
        acc = dp_accounting.pld.PLDAccountant()
    elif accountant == "rdp":
        acc = dp_accounting.rdp.RdpAccountant()
    else:
        raise ValueError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")
    with _quiet_absl():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


def accountant_version() -> str:
    """``dp-accounting==<version>``, for the run's results."""
    return f"dp-accounting=={version('dp-accounting')}"
