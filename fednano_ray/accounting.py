"""Honest parameter, storage and traffic accounting of NanoEdge vs. the full MLLM
(DESIGN.md §1, §4).

FedNano's headline figure (adapters are ~0.01% of the MLLM) counts only what is exchanged per
round. This module reports it *and* what it leaves out:

- **storage**: what a client holds (encoder + connector + token-embedding table + adapters) against
  the whole MLLM, in parameters and in bytes at the checkpoint's dtype;
- **round traffic**: global adapters down, local adapters (plus a same-size diagonal Fisher for
  ``fednano``) up, times the clients of a round;
- **split-step traffic**: every local step sends ``z'`` (B×T×d float32, plus an int8 attention mask
  and int32 labels) to the server and gets ``dL/dz'`` (B×T×d float32) back. Per round this usually
  dwarfs the adapter traffic.

Counting rules:

- Each tensor counts once, deduplicated by ``id()`` (meta tensors have no ``data_ptr``), so tied
  weights (SmolLM2's ``lm_head`` *is* ``embed_tokens``) are not counted twice.
- ``params`` counts :class:`~torch.nn.Parameter` elements only. ``bytes`` counts parameters plus
  *persistent* buffers (what a checkpoint stores, e.g. batch-norm running statistics);
  non-persistent buffers (rotary ``inv_freq``, CLIP ``position_ids``) are rebuilt at load time and
  not counted.
- A ``dtype`` override applies to floating-point tensors only; integer buffers keep their own size.
- The encoder is the module the client runs: for ``nano`` that is EfficientNet-Lite0's feature
  extractor **without** its 1000-class ImageNet classifier (3.37M parameters, not the 4.65M of the
  classification network); for LLaVA it is the whole CLIP vision tower, as published (LLaVA reads
  the penultimate layer, so strictly the last CLIP layer and post-layernorm are unused; they are
  counted anyway, as the checkpoint ships them).
- ``decoder`` in the breakdown is the LLM body *without* its token-embedding table (the client holds
  that; the split step sends embeddings, not token ids). When ``lm_head`` is tied to
  ``embed_tokens`` the server still needs that matrix as its output layer, so it is counted on both
  sides (``shared_params``;
  ``client_params + server_params - shared_params - adapter_params == total_params``).
  For *generation* the server also embeds the tokens it generates, i.e. it holds the whole LLM.
- Adapters are counted arithmetically (``2·r·d`` per modality for the paper's form: ``lora_A`` r×d
  and ``lora_B`` d×r; each ``adapter.kind`` adds or swaps its own tensors), so
  meta-device parts work, and are sized at float32: they are trained, exchanged and checkpointed in
  fp32 (:func:`fednano_ray.models.adapter.adapter_state`) whatever the frozen model's dtype.
- The above is the FedNano split, which every strategy but ``fedavg-lora`` uses. Round traffic
  follows the formula above for every strategy (``local`` and ``centralized`` exchange no adapters
  in practice; the run's ``results.json`` records what was actually sent).
- ``fedavg-lora`` (the conventional baseline: every client holds the whole MLLM and trains PEFT LoRA
  inside its LLM, :mod:`fednano_ray.models.lora`): the client stores the whole MLLM plus the LoRA
  (``client_storage_fraction`` is slightly *above* 1), the server holds no model part for training
  (``server_params`` 0), the adapters exchanged each round are the LoRA, ``r·(in + out)`` fp32
  parameters per targeted linear layer of the decoder (``adapter_kind`` ``llm_lora``), and no
  activations cross the network (``step_bytes_up``/``step_bytes_down`` 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fednano_ray.federation.method import METHODS
from fednano_ray.models.dual import representation_dim
from fednano_ray.models.split import MLLMParts

FLOAT32_BYTES = 4
MASK_BYTES = 1  # attention mask sent as int8
LABEL_BYTES = 4  # labels sent as int32

_Tensors = dict[int, tuple[torch.Tensor, bool]]  # id -> (tensor, is_parameter)


def _as_modules(module_or_modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    if isinstance(module_or_modules, nn.Module):
        return [module_or_modules]
    return list(module_or_modules)


def _tensors(module_or_modules: nn.Module | Iterable[nn.Module]) -> _Tensors:
    """Unique parameters and persistent buffers of some modules, keyed by ``id()``."""
    out: _Tensors = {}
    for root in _as_modules(module_or_modules):
        for p in root.parameters():
            out.setdefault(id(p), (p, True))
        for mod in root.modules():
            for name, buf in mod._buffers.items():
                if buf is not None and name not in mod._non_persistent_buffers_set:
                    out.setdefault(id(buf), (buf, False))
    return out


def _dtype_size(dtype: torch.dtype | int | None) -> int | None:
    if dtype is None or isinstance(dtype, int):
        return dtype
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _sum(tensors: _Tensors, dtype: torch.dtype | int | None = None) -> tuple[int, int]:
    override = _dtype_size(dtype)
    params = nbytes = 0
    for t, is_param in tensors.values():
        n = t.numel()
        if is_param:
            params += n
        size = (
            override
            if (override is not None and (t.is_floating_point() or t.is_complex()))
            else t.element_size()
        )
        nbytes += n * size
    return params, nbytes


def count(
    module_or_modules: nn.Module | Iterable[nn.Module], *, dtype: torch.dtype | int | None = None
) -> tuple[int, int]:
    """(parameters, bytes) of one module or several, each tensor counted once.

    Args:
        module_or_modules: a module or an iterable of modules (shared tensors across them count
            once).
        dtype: size floating-point tensors as this dtype (a ``torch.dtype`` or a byte count) instead
            of their own (e.g. ``torch.float16`` for a checkpoint published in half precision).

    Returns:
        (number of parameter elements, bytes of parameters + persistent buffers).
    """
    return _sum(_tensors(module_or_modules), dtype)


def adapter_param_count(
    parts: MLLMParts,
    r: int,
    modalities: Sequence[str],
    *,
    kind: str = "lowrank",
    num_image_tokens: int = 0,
) -> int:
    """Parameters of the NanoAdapters of form ``kind`` (``adapter.kind``), counted arithmetically:
    the paper's ``lora_A`` (r×d) + ``lora_B`` (d×r) per modality, plus each form's own tensors
    (:meth:`~fednano_ray.models.adapter.AdapterForm.num_parameters`)."""
    from fednano_ray.models.adapter import adapter_form
    from fednano_ray.models.split import adapter_dims

    form, dims = adapter_form(kind), adapter_dims(parts, num_image_tokens)
    return sum(form.num_parameters(m, dims, r) for m in modalities)


def trained_param_count(
    parts: MLLMParts,
    *,
    r: int,
    strategy: str,
    modalities: Sequence[str],
    lora_target_modules: Sequence[str],
    kind: str = "lowrank",
    num_image_tokens: int = 0,
) -> int:
    """Parameters a client trains and exchanges: its NanoAdapters, or under ``fedavg-lora`` the LoRA
    inside the LLM (:func:`~fednano_ray.models.lora.lora_param_count`).

    Raises:
        ValueError: naming ``adapter.lora_target_modules`` when they fit no linear layer of the LLM.
    """
    if METHODS[strategy].client.holds_llm:
        from fednano_ray.models.lora import lora_param_count

        return lora_param_count(parts.decoder, r=r, target_modules=lora_target_modules)
    return adapter_param_count(parts, r, modalities, kind=kind, num_image_tokens=num_image_tokens)


def step_activation_bytes(
    batch_size: int, sequence_length: int, hidden_size: int, *, strategy: str | None = None
) -> tuple[int, int]:
    """(up, down) bytes of one split step for one client batch.

    Up: ``z'`` (B×T×d float32) + attention mask (B×T int8) + labels (B×T int32).
    Down: ``dL/dz'`` (B×T×d float32). (0, 0) under a ``strategy`` whose clients hold the whole
    MLLM (``fedavg-lora``): they train in-process, nothing crosses the network per step.
    """
    if strategy is not None and METHODS[strategy].client.holds_llm:
        return 0, 0
    bt = batch_size * sequence_length
    up = bt * hidden_size * FLOAT32_BYTES + bt * MASK_BYTES + bt * LABEL_BYTES
    down = bt * hidden_size * FLOAT32_BYTES
    return up, down


def account(
    parts: MLLMParts,
    *,
    adapter_rank: int,
    lora_alpha: float,
    modalities: Sequence[str],
    num_image_tokens: int,
    text_tokens: int,
    batch_size: int,
    clients_per_round: int,
    strategy: str,
    dtype_bytes: int | None = None,
    local_steps: int | None = None,
    lora_target_modules: Sequence[str] = ("q_proj", "v_proj"),
    scaling: float | None = None,
    form: str = "lowrank",
    bank_size: int = 0,
) -> dict[str, Any]:
    """Storage and traffic accounting of a FedNano split of ``parts`` (see the module docstring),
    or of ``fedavg-lora``'s full-model clients.

    Args:
        parts: the MLLM (real, random or meta-device tensors; only shapes are read).
        adapter_rank, lora_alpha, modalities: the NanoAdapters.
        num_image_tokens, text_tokens: sequence length T of one row is their sum.
        batch_size: rows of one client batch (B of the split step).
        clients_per_round: clients exchanging adapters each round.
        strategy: ``fednano`` also uploads a diagonal Fisher the size of the adapters;
            ``fedavg-lora`` trains LoRA on ``lora_target_modules`` of the LLM instead of
            NanoAdapters.
        dtype_bytes: bytes per floating-point weight of the frozen model (None: each tensor's own).
        local_steps: if given, also report per-round activation traffic (steps × clients).
        lora_target_modules: ``fedavg-lora`` only: the decoder's LoRA-adapted linear layers.
        scaling: the adapters' one scaling on every tier, ``adapter.lora_alpha / adapter.r``
            (:attr:`~fednano_ray.config.AdapterConfig.scaling`); default
            ``lora_alpha / adapter_rank``, right only when ``adapter_rank`` is ``adapter.r``.
            Reported as ``adapter_scaling``.
        form: the NanoAdapter form, ``adapter.kind`` (reported as ``adapter_form``).
        bank_size: ``feddpa-f`` only (``federation.feddpa_bank_size``): a client also stores its
            local adapter (a second copy of the adapters) and at most this many fp32 summaries of
            width ``2 d`` (:mod:`fednano_ray.models.dual`), reported as ``client_dual_bytes`` and
            counted in ``client_bytes`` (storage), not in ``client_params`` (model parameters).

    Returns:
        One flat JSON-able dict (plus a ``parts`` breakdown of parameter counts).

    Raises:
        ValueError: under ``fedavg-lora``, when ``lora_target_modules`` fit no linear layer.
    """
    d = parts.hidden_size
    embed = _tensors(parts.embed_tokens)
    lm_head = _tensors(parts.lm_head)
    encoder = _tensors(parts.encoder)
    connector = _tensors(parts.connector)
    decoder = {
        k: v for k, v in _tensors(parts.decoder).items() if k not in embed and k not in lm_head
    }
    tied = bool(set(embed) & set(lm_head))

    whole = {**encoder, **connector, **embed, **decoder, **lm_head}
    full = METHODS[
        strategy
    ].client.holds_llm  # fedavg-lora: the client holds it all, the server nothing
    client_frozen = whole if full else {**encoder, **connector, **embed}
    server = {} if full else {**decoder, **lm_head}
    shared = {k: v for k, v in client_frozen.items() if k in server}

    total_params, total_bytes = _sum(whole, dtype_bytes)
    client_frozen_params, client_frozen_bytes = _sum(client_frozen, dtype_bytes)
    server_params, server_bytes = _sum(server, dtype_bytes)
    shared_params, _ = _sum(shared, dtype_bytes)

    adapter_params = trained_param_count(
        parts,
        r=adapter_rank,
        strategy=strategy,
        modalities=modalities,
        lora_target_modules=lora_target_modules,
        kind=form,
        num_image_tokens=num_image_tokens,
    )
    adapter_bytes = adapter_params * FLOAT32_BYTES
    client_params = client_frozen_params + adapter_params
    client_bytes = client_frozen_bytes + adapter_bytes
    # FedDPA-F: the local adapter and the bank of training summaries stay on the client too.
    bank_bytes = bank_size * representation_dim(d) * FLOAT32_BYTES
    dual_bytes = adapter_bytes + bank_bytes if bank_size else 0
    client_bytes += dual_bytes

    fisher = METHODS[strategy].fisher_upload
    round_down = adapter_bytes * clients_per_round
    round_up = adapter_bytes * (2 if fisher else 1) * clients_per_round

    seq = num_image_tokens + text_tokens
    step_up, step_down = step_activation_bytes(batch_size, seq, d, strategy=strategy)

    out: dict[str, Any] = {
        "hidden_size": d,
        "tied_embeddings": tied,
        "total_params": total_params,
        "client_params": client_params,
        "client_frozen_params": client_frozen_params,
        "server_params": server_params,
        "shared_params": shared_params,
        "adapter_params": adapter_params,
        "total_bytes": total_bytes,
        "client_bytes": client_bytes,
        "server_bytes": server_bytes,
        "adapter_bytes": adapter_bytes,
        "client_dual_bytes": dual_bytes,
        "client_storage_fraction": client_bytes / total_bytes,
        "client_storage_saving": 1.0 - client_bytes / total_bytes,
        "adapter_fraction": adapter_params / total_params,
        "adapter_rank": adapter_rank,
        "lora_alpha": lora_alpha,
        "adapter_scaling": lora_alpha / adapter_rank if scaling is None else scaling,
        "adapter_kind": "llm_lora" if full else "nano_adapter",
        "adapter_form": None if full else form,
        "modalities": [] if full else list(modalities),
        "lora_target_modules": list(lora_target_modules) if full else [],
        "strategy": strategy,
        "fisher_upload": fisher,
        "clients_per_round": clients_per_round,
        "round_bytes_down": round_down,
        "round_bytes_up": round_up,
        "batch_size": batch_size,
        "num_image_tokens": num_image_tokens,
        "text_tokens": text_tokens,
        "sequence_length": seq,
        "step_bytes_up": step_up,
        "step_bytes_down": step_down,
        "parts": {
            "encoder": _sum(encoder)[0],
            "connector": _sum(connector)[0],
            "embed_tokens": _sum(embed)[0],
            "decoder": _sum(decoder)[0],
            "lm_head": _sum(lm_head)[0],
            "adapters": adapter_params,
        },
    }
    if local_steps is not None:
        out["local_steps"] = local_steps
        out["round_activation_bytes_up"] = step_up * local_steps * clients_per_round
        out["round_activation_bytes_down"] = step_down * local_steps * clients_per_round
    return out


# ------------------------------------------------------------------------------------------------
# The run's accounting: one entry for results.json and fednano-ray inspect.
# ------------------------------------------------------------------------------------------------


def account_run(cfg: Any, mllm: Any, *, text_tokens: int = 40) -> dict[str, Any]:
    """The accounting of a run: what ``results.json`` records and ``fednano-ray inspect`` prints.

    The headline figures (:func:`account`) are for the client of the largest tier rank (the one that
    stores and sends the most); ``tiers`` lists every tier's adapters and split-step traffic. Frozen
    bytes are at the checkpoint's dtype (``mllm.dtype``: float16 for llava-1.5-7b, float32 for nano
    and tiny), the same whether ``mllm`` holds the weights or is built on the meta device.

    Args:
        cfg: the run config (:class:`~fednano_ray.config.Config`).
        mllm: its model, :func:`fednano_ray.models.build.build_mllm` (any ``device``).
        text_tokens: text tokens per row assumed for the split-step traffic.

    Raises:
        ValueError: under ``fedavg-lora``, when ``adapter.lora_target_modules`` fit no linear layer.
    """
    parts, n_img, a = mllm.parts, mllm.num_image_tokens, cfg.adapter
    strategy, method = cfg.federation.strategy, cfg.method()
    dtype_bytes = _dtype_size(getattr(torch, mllm.dtype)) if hasattr(torch, mllm.dtype) else None
    tier = cfg.tiers[0]
    out = account(
        parts,
        adapter_rank=max(cfg.tier_rank(t) for t in cfg.tiers),
        lora_alpha=a.lora_alpha,
        modalities=a.modalities,
        num_image_tokens=n_img,
        text_tokens=text_tokens,
        batch_size=tier.batch_size,
        clients_per_round=cfg.federation.clients_per_round,
        strategy=strategy,
        dtype_bytes=dtype_bytes,
        local_steps=tier.local_steps,
        lora_target_modules=a.lora_target_modules,
        scaling=a.scaling,  # one scaling for every tier rank
        form=a.kind,
        bank_size=method.bank_size,
    )
    tiers = []
    for t in cfg.tiers:
        r = cfg.tier_rank(t)
        up, down = step_activation_bytes(
            t.batch_size, out["sequence_length"], out["hidden_size"], strategy=strategy
        )
        trained = trained_param_count(
            parts,
            r=r,
            strategy=strategy,
            modalities=a.modalities,
            lora_target_modules=a.lora_target_modules,
            kind=a.kind,
            num_image_tokens=n_img,
        )
        tiers.append(
            {
                "name": t.name,
                "clients": t.clients,
                "adapter_rank": r,
                "adapter_bytes": trained * FLOAT32_BYTES,
                "batch_size": t.batch_size,
                "local_steps": t.local_steps,
                "step_bytes_up": up,
                "step_bytes_down": down,
            }
        )
    return {
        "model": mllm.name,
        "model_kind": cfg.model.kind,
        "dtype": mllm.dtype,
        "adapter_dtype": "float32",
        **out,
        "tiers": tiers,
    }


def inspect_config(cfg: Any, *, pretrained: bool = False, text_tokens: int = 40) -> dict[str, Any]:
    """``fednano-ray inspect``: :func:`account_run` of the model a config names, plus the precision
    the frozen LLM would compute in on this machine and the machine itself.

    Nothing is downloaded or loaded unless ``pretrained``: the model is built on the meta device
    (``build_mllm(cfg.model, device="meta")``; ``hf`` reads a local folder's ``config.json`` or the
    built-in llava-1.5-7b config for its hub id). ``pretrained`` loads the weights: the same
    figures, much slower.

    Raises:
        ValueError: for an ``hf`` model whose config is not available locally.
    """
    from fednano_ray.models.build import build_mllm
    from fednano_ray.precision import hardware_info

    mllm = build_mllm(cfg.model, device=None if pretrained else "meta")
    return {
        **account_run(cfg, mllm, text_tokens=text_tokens),
        "precision": cfg.model.runtime_precision().as_dict(),
        "hardware": hardware_info(),
    }
