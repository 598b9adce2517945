"""FedDPA-F (Yang et al. 2024, "Dual-Personalizing Adapter for Federated Foundation Models",
NeurIPS 2024, arXiv 2403.19211), the variant that trains the local adapter after federated
training ("-F"), as this project runs it on NanoAdapters:

1. Federated phase: a global adapter trained with FedAvg (this strategy aggregates exactly as
   :class:`~fednano_ray.strategies.fedavg.FedAvg`, so SecAgg's sum plan and product merging
   apply unchanged).
2. Local phase, after the last round: every client trains a local adapter of the same form and
   rank, initialised as a copy of the global one, for ``federation.personalize_steps`` steps on its
   own training shard, with the global adapter frozen and the client's output the mix
   ``(1 - w) E_global(x) + w E_local(x)`` at a constant ``w = federation.feddpa_train_weight``.
3. Inference: the same mix with an instance-wise ``w(x)``, the mean of the ``top_k`` cosine
   similarities (clipped to [0, 1]) between a frozen summary of ``x`` and a bank of at most
   ``federation.feddpa_bank_size`` summaries of the client's training prompts
   (:mod:`fednano_ray.models.dual`). The bank stays on the client; only the global adapter is ever
   exchanged.

The coordinator runs phases 2 and 3 (``Coordinator.personalize``); the strategy only aggregates.
"""

from __future__ import annotations

from fednano_ray.strategies.fedavg import FedAvg

__all__ = ["FedDPAF"]


class FedDPAF(FedAvg):
    """FedAvg for the global adapter of FedDPA-F; ``dual_adapter`` tells the coordinator to run the
    local phase and evaluate every client with its dual adapter.

    Args:
        train_weight: the local adapter's constant weight ``w`` during the local phase, in [0, 1].
        top_k: bank entries averaged into the dynamic weight, >= 1.
        bank_size: most training summaries a client keeps, >= 1.
        factors: as for :class:`FedAvg`.

    Raises:
        ValueError: if an option is out of range.
    """

    name = "feddpa-f"
    dual_adapter = True

    def __init__(
        self,
        *,
        train_weight: float = 0.5,
        top_k: int = 5,
        bank_size: int = 256,
        factors: str = "joint",
    ) -> None:
        super().__init__(factors=factors)
        if not 0.0 <= train_weight <= 1.0:
            raise ValueError(f"{self.name}: train_weight must lie in [0, 1], got {train_weight}")
        if top_k < 1 or bank_size < 1:
            raise ValueError(
                f"{self.name}: top_k and bank_size must be >= 1, got {top_k} and {bank_size}"
            )
        self.train_weight, self.top_k, self.bank_size = (
            float(train_weight),
            int(top_k),
            int(bank_size),
        )

    def describe(self) -> dict[str, str | float | bool]:
        from fednano_ray.models.dual import REPRESENTATION

        return {
            **super().describe(),
            "feddpa_train_weight": self.train_weight,
            "feddpa_top_k": self.top_k,
            "feddpa_bank_size": self.bank_size,
            "feddpa_weighting": "per instance (dynamic) at inference, constant in local training",
            "feddpa_representation": REPRESENTATION,
        }
