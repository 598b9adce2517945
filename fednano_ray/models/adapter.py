"""NanoAdapter: a low-rank residual on the embeddings entering the frozen LLM.

FedNano (Zhang et al., 2025, arXiv 2506.14824, §3.2) puts one adapter per modality on the client::

      z ───────────────────────────────┐
      │                                 ▼
      └─► dropout ─► A (d→r) ─► B (r→d) ─► × scaling ─► (+) ─► z'

``B`` starts at zero, so round 0 is exactly the pretrained model. Parameter names follow PEFT
(``lora_A``, ``lora_B``, ``r``, ``lora_alpha``, ``scaling``) so a state dict maps one-to-one onto
PEFT's ``...lora_A.weight`` / ``...lora_B.weight``; shapes are PEFT's: ``lora_A`` is (r, d) and
``lora_B`` is (d, r).

Scaling. The adapter takes its ``scaling`` explicitly; a run uses ONE value for every tier,
``adapter.lora_alpha / adapter.r`` (the config's reference rank, :attr:`AdapterConfig.scaling
<fednano_ray.config.AdapterConfig.scaling>`), whatever a tier's own ``adapter_rank``. PEFT's
per-rank ``lora_alpha / r_tier`` would make the same global components act with ``r_ref / r_tier``
times the gain on a smaller-rank client (and, since gradients scale with the scaling, give it
``(r_ref / r_tier)²`` times the Fisher weight in merging): with one scaling, a global state truncated
to a client's rank (HetLoRA) computes on that client exactly the function its first ``r_tier``
components compute on every other tier. ``lora_alpha`` is kept as PEFT's equivalent numerator at this
adapter's own rank, ``scaling * r``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn


class NanoAdapter(nn.Module):
    """Low-rank residual adapter ``z' = z + scaling * B(A(dropout(z)))``.

    Args:
        dim: Embedding width d of the LLM.
        r: Rank (this tier's).
        scaling: The residual's gain, the same for every rank of a run: ``adapter.lora_alpha /
            adapter.r`` (:attr:`fednano_ray.config.AdapterConfig.scaling`), not ``lora_alpha / r``.
        dropout: Dropout probability on the adapter input.
    """

    def __init__(self, dim: int, *, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"adapter rank r must be >= 1, got {r}")
        self.dim, self.r, self.scaling = dim, r, float(scaling)
        self.lora_alpha = self.scaling * r  # PEFT's equivalent numerator at this rank (scaling = lora_alpha / r)
        self.lora_A = nn.Parameter(torch.empty(r, dim))  # (r, d)
        self.lora_B = nn.Parameter(torch.zeros(dim, r))  # (d, r), zero: starts as identity map
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of lora_A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:  # (..., d) -> (..., d)
        delta = self.dropout(z.to(self.lora_A.dtype)) @ self.lora_A.T @ self.lora_B.T
        return z + (self.scaling * delta).to(z.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, r={self.r}, scaling={self.scaling:g}"


Adapters = nn.ModuleDict | Mapping[str, Tensor]


def _tensors(adapters: Adapters) -> Mapping[str, Tensor]:
    return adapters.state_dict() if isinstance(adapters, nn.Module) else adapters


def adapter_state(adapters: Adapters) -> dict[str, Tensor]:
    """Detached fp32 copy of the adapters' parameters, keyed ``<modality>.lora_A`` etc.

    ``adapters`` is the NanoAdapters' ModuleDict, or the trained parameters by state key
    (``fedavg-lora``'s LoRA inside the LLM, :func:`fednano_ray.models.lora.inject_llm_lora`).
    """
    return {k: v.detach().to(torch.float32).clone() for k, v in _tensors(adapters).items()}


def load_adapter_state(adapters: Adapters, state: dict[str, Tensor]) -> None:
    """Load a (possibly larger-rank) adapter state, truncating to each adapter's own rank.

    Heterogeneous ranks follow HetLoRA (Cho et al., 2024): the server keeps the largest rank; a
    client of rank r takes the first r rows of ``lora_A`` and the first r columns of ``lora_B``.
    ``adapters`` as in :func:`adapter_state`; the tensors are written in place.

    Raises:
        ValueError: if a key is missing or a shape cannot be truncated to this adapter.
    """
    own = _tensors(adapters)
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"adapter state is missing keys {missing} (has {sorted(state)})")
    with torch.no_grad():
        for key, param in own.items():
            src = state[key]
            if key.endswith("lora_A"):
                src = src[: param.shape[0], :]
            elif key.endswith("lora_B"):
                src = src[:, : param.shape[1]]
            if src.shape != param.shape:
                raise ValueError(f"adapter {key}: shape {tuple(state[key].shape)} cannot fit {tuple(param.shape)}")
            param.copy_(src.to(param.dtype))
