"""NanoAdapters: small trainable modules on a client's side of the split (``adapter.kind``).

The paper's form (``lowrank``, :class:`NanoAdapter`) is a low-rank residual on the embeddings
entering the frozen LLM; :class:`AdapterForm` and its subclasses add a non-linear bottleneck,
per-slot visual offsets and LoRA inside the connector. The paper's form:

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
``(r_ref / r_tier)²`` times the Fisher weight in merging): with one scaling, a global state
truncated to a client's rank (HetLoRA) computes on that client exactly the function its first
``r_tier`` components compute on every other tier. ``lora_alpha`` is kept as PEFT's equivalent
numerator at this adapter's own rank, ``scaling * r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
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
        self.lora_alpha = (
            self.scaling * r
        )  # PEFT's equivalent numerator at this rank (scaling = lora_alpha / r)
        self.lora_A = nn.Parameter(torch.empty(r, dim))  # (r, d)
        self.lora_B = nn.Parameter(torch.zeros(dim, r))  # (d, r), zero: starts as identity map
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of lora_A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:  # (..., d) -> (..., d)
        delta = self.dropout(z.to(self.lora_A.dtype)) @ self.lora_A.T @ self.lora_B.T
        return z + (self.scaling * delta).to(z.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, r={self.r}, scaling={self.scaling:g}"


class BottleneckAdapter(NanoAdapter):
    """Non-linear bottleneck residual ``z' = z + scaling * B(gelu(A(dropout(z))))`` (Houlsby-style).

    The same tensors and names as :class:`NanoAdapter`. ``B`` starts at zero (identity at init), and
    since the non-linearity acts on each of the ``r`` hidden units alone, the first ``r'``
    components are a rank-``r'`` bottleneck: HetLoRA truncation keeps its meaning.
    """

    def forward(self, z: Tensor) -> Tensor:
        h = F.gelu(self.dropout(z.to(self.lora_A.dtype)) @ self.lora_A.T)
        return z + (self.scaling * (h @ self.lora_B.T)).to(z.dtype)


class SlotAdapter(NanoAdapter):
    """The paper's low-rank residual on the visual tokens plus a learned offset per visual slot.

    ``v'[:, n] = v[:, n] + scaling * B(A(dropout(v[:, n]))) + offset[n]``. ``offset`` (N, d) starts
    at zero. It can tell the LLM *where* a token came from (grid position) without re-aligning the
    connector; it has no rank (HetLoRA leaves it whole) and is merged like any other tensor.
    """

    def __init__(
        self, dim: int, *, r: int, scaling: float, dropout: float = 0.0, slots: int
    ) -> None:
        super().__init__(dim, r=r, scaling=scaling, dropout=dropout)
        if slots < 1:
            raise ValueError(f"a slot adapter needs at least one visual slot, got {slots}")
        self.slots = slots
        self.offset = nn.Parameter(torch.zeros(slots, dim))  # (N, d)

    def forward(self, v: Tensor) -> Tensor:  # (B, N, d)
        if v.shape[-2] != self.slots:
            raise ValueError(
                f"slot adapter built for {self.slots} visual tokens, got {v.shape[-2]}"
            )
        return super().forward(v) + self.offset.to(v.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={self.slots}"


class ConnectorAdapter(nn.Module):
    """LoRA on the connector's first linear layer, before its non-linearity.

    LLaVA's projector is ``Linear(d_v → h) → GELU → Linear(h → d)``. This adapter adds
    ``scaling * B(A(dropout(f)))`` to the first layer's output, reading the encoder's ``d_v``-wide
    features (1,280 for EfficientNet-Lite0) where the visual tokens still carry what the connector
    has not yet mixed, and the GELU after it makes the change non-linear in the features. ``lora_A``
    is (r, d_v) and ``lora_B`` (h, r), PEFT's shapes; ``B`` starts at zero, so the connector is
    exactly the pretrained one at init.
    """

    acts_on_connector = True

    def __init__(
        self, in_dim: int, out_dim: int, *, r: int, scaling: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"adapter rank r must be >= 1, got {r}")
        self.in_dim, self.out_dim, self.r, self.scaling = in_dim, out_dim, r, float(scaling)
        self.lora_alpha = self.scaling * r
        self.lora_A = nn.Parameter(torch.empty(r, in_dim))
        self.lora_B = nn.Parameter(torch.zeros(out_dim, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def through(self, connector: nn.Module, features: Tensor) -> Tensor:
        """The adapted connector: (B, N, d_v) -> (B, N, d); the connector's weights stay frozen."""
        first, rest = connector_layers(connector)
        x = features.to(self.lora_A.dtype)
        h = first(x) + self.scaling * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T)
        return rest(h)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, r={self.r}, scaling={self.scaling:g}"


def connector_layers(connector: nn.Module) -> tuple[nn.Linear, Callable[[Tensor], Tensor]]:
    """(first linear layer, the rest) of a LLaVA-style projector.

    Knows ``nn.Sequential`` starting with a Linear (the nano connector) and Hugging Face's
    ``LlavaMultiModalProjector`` (``linear_1``, ``act``, ``linear_2``).

    Raises:
        ValueError: for any other connector, naming what ``adapter.kind: connector`` needs.
    """
    if (
        isinstance(connector, nn.Sequential)
        and len(connector)
        and isinstance(connector[0], nn.Linear)
    ):
        rest = connector[1:]
        return connector[0], rest
    if isinstance(getattr(connector, "linear_1", None), nn.Linear) and hasattr(
        connector, "linear_2"
    ):
        return connector.linear_1, lambda h: connector.linear_2(connector.act(h))
    raise ValueError(
        f"adapter.kind=connector needs a connector whose first layer is a Linear (an nn.Sequential "
        f"or LLaVA's linear_1/act/linear_2 projector); this model's is a "
        f"{type(connector).__name__}. Use adapter.kind=lowrank."
    )


@dataclass(frozen=True)
class AdapterDims:
    """The widths an adapter form needs: the LLM's ``hidden``, the encoder's ``feature`` width, the
    connector's first-layer width ``connector_hidden``, and the visual ``slots`` per image."""

    hidden: int
    feature: int
    connector_hidden: int
    slots: int


class AdapterForm:
    """One form of NanoAdapter, chosen by ``adapter.kind`` (in the spirit of PEFT's
    ``LoraVariant``).

    A form says what module adapts each modality and how many parameters it has (arithmetically, so
    ``inspect`` can count a 7B model on the meta device). Every form is the identity at init, names
    its rank-holding tensors ``lora_A`` (r, ·) and ``lora_B`` (·, r), so HetLoRA padding,
    truncation, validation, Fisher merging, SecAgg, DP and checkpoints treat it like the paper's
    form, and keeps any rank-free tensor (``offset``) whole. The text modality gets the paper's
    low-rank residual unless the form says otherwise.
    """

    name: ClassVar[str] = "lowrank"
    description: ClassVar[str] = (
        "the paper's linear low-rank residual z + s*B(A z) on each modality's embeddings"
    )

    def build(
        self, modality: str, dims: AdapterDims, *, r: int, scaling: float, dropout: float = 0.0
    ) -> nn.Module:
        return NanoAdapter(dims.hidden, r=r, scaling=scaling, dropout=dropout)

    def num_parameters(self, modality: str, dims: AdapterDims, r: int) -> int:
        return 2 * r * dims.hidden


class BottleneckForm(AdapterForm):
    name = "bottleneck"
    description = "a non-linear bottleneck z + s*B(gelu(A z)) on each modality's embeddings"

    def build(self, modality, dims, *, r, scaling, dropout=0.0):
        return BottleneckAdapter(dims.hidden, r=r, scaling=scaling, dropout=dropout)


class _VisionForm(AdapterForm):
    """A form that changes only the vision adapter; the text modality keeps the paper's form."""

    def build(self, modality, dims, *, r, scaling, dropout=0.0):
        if modality != "vision":
            return super().build(modality, dims, r=r, scaling=scaling, dropout=dropout)
        return self.build_vision(dims, r=r, scaling=scaling, dropout=dropout)

    def num_parameters(self, modality, dims, r):
        return (
            self.vision_parameters(dims, r)
            if modality == "vision"
            else super().num_parameters(modality, dims, r)
        )

    def build_vision(
        self, dims: AdapterDims, *, r: int, scaling: float, dropout: float
    ) -> nn.Module:
        raise NotImplementedError

    def vision_parameters(self, dims: AdapterDims, r: int) -> int:
        raise NotImplementedError


class SlotForm(_VisionForm):
    name = "slots"
    description = (
        "the low-rank residual plus a zero-initialised learned offset per visual slot (N x d) "
        "on the visual tokens"
    )

    def build_vision(self, dims, *, r, scaling, dropout):
        return SlotAdapter(dims.hidden, r=r, scaling=scaling, dropout=dropout, slots=dims.slots)

    def vision_parameters(self, dims, r):
        return (
            AdapterForm.num_parameters(self, "vision", dims, r) + dims.slots * dims.hidden
        )  # lowrank + offsets


class ConnectorForm(_VisionForm):
    name = "connector"
    description = (
        "LoRA on the connector's first layer (encoder features, before the GELU) "
        "instead of on the visual tokens"
    )

    def build_vision(self, dims, *, r, scaling, dropout):
        return ConnectorAdapter(
            dims.feature, dims.connector_hidden, r=r, scaling=scaling, dropout=dropout
        )

    def vision_parameters(self, dims, r):
        return r * (dims.feature + dims.connector_hidden)


#: ``adapter.kind`` -> its form.
ADAPTER_FORMS: dict[str, AdapterForm] = {
    f.name: f for f in (AdapterForm(), BottleneckForm(), SlotForm(), ConnectorForm())
}


def adapter_form(kind: str) -> AdapterForm:
    """The form ``adapter.kind`` names; a ValueError lists the known ones."""
    try:
        return ADAPTER_FORMS[kind]
    except KeyError:
        raise ValueError(
            f"unknown adapter.kind {kind!r}; use one of {sorted(ADAPTER_FORMS)}"
        ) from None


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
                raise ValueError(
                    f"adapter {key}: shape {tuple(state[key].shape)} "
                    f"cannot fit {tuple(param.shape)}"
                )
            param.copy_(src.to(param.dtype))
