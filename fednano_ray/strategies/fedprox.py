"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", arXiv 1812.06127).

Clients minimise their local loss plus ``mu/2 ||θ − θ_global||²``
(:func:`~fednano_ray.strategies.aggregate.proximal_penalty`), which keeps heterogeneous clients
from drifting far from the global model; the server aggregates exactly as FedAvg.
"""

from __future__ import annotations

import math

from fednano_ray.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """FedAvg aggregation with a client-side proximal term.

    Args:
        mu: Proximal coefficient (>= 0). The paper tunes it over {0.001, 0.01, 0.1, 0.5, 1};
            0.01 is a middle-of-the-grid default. ``mu=0`` is FedAvg.

    Raises:
        ValueError: If ``mu`` is negative or not finite.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01, factors: str = "joint") -> None:
        super().__init__(factors=factors)
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"fedprox: mu must be finite and >= 0, got {mu}")
        self.proximal_mu = float(mu)

    @property
    def mu(self) -> float:
        """The proximal coefficient (same as ``proximal_mu``)."""
        return self.proximal_mu
