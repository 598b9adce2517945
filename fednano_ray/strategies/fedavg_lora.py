"""FedAvg-LoRA: the conventional baseline FedNano is measured against (DESIGN.md §1).

Every client holds the whole MLLM and trains PEFT LoRA inside its LLM
(:mod:`fednano_ray.models.lora`); the server averages the LoRA states with FedAvg. Aggregation is
exactly :class:`~fednano_ray.strategies.fedavg.FedAvg`'s (so robust rules, DP-FedAvg and secure
aggregation apply unchanged); the difference lives on the clients, which the coordinator builds
with the full model (``Config.clients_hold_llm``), and in the accounting (the client stores the
whole MLLM, no activations cross the network).
"""

from __future__ import annotations

from fednano_ray.strategies.fedavg import FedAvg

__all__ = ["FedAvgLoRA"]


class FedAvgLoRA(FedAvg):
    """FedAvg aggregation of the clients' LLM LoRA states (keys
    ``llm.<module>.lora_A``/``lora_B``)."""

    name = "fedavg-lora"
