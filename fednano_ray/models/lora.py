"""PEFT LoRA inside the LLM: what a ``fedavg-lora`` client trains (DESIGN.md §1, baselines).

The conventional way to federate an MLLM, the one FedNano exists to avoid: every client holds the
whole model and trains LoRA on the LLM decoder's linear layers (LLaVA's and PEFT's usual
``q_proj``/``v_proj``), and the server averages the LoRA weights with FedAvg. The LoRA layers are
PEFT's own (:func:`peft.inject_adapter_in_model`), injected in place into the decoder of a client's
own copy of the MLLM (:meth:`fednano_ray.models.build.MLLM.with_llm_lora`), so everything else is
reused as is: the frozen encoder, connector and embeddings compute the LLM's input, ``ServerLLM``
computes the loss (its backward now also reaching the LoRA) and the choice scores, and
``local_fit``/``evaluate`` train and score.

State keys. PEFT names a LoRA weight ``layers.3.self_attn.q_proj.lora_A.default.weight``; the
federated state calls it ``llm.layers.3.self_attn.q_proj.lora_A``: the ``llm.`` prefix keeps it
apart from NanoAdapter keys, and ending in ``lora_A``/``lora_B`` with PEFT's shapes (``(r, in)`` and
``(out, r)``) is what the rank layout of :mod:`fednano_ray.strategies.aggregate` and
:func:`~fednano_ray.models.adapter.load_adapter_state` key off, so heterogeneous tier ranks are
zero-padded and truncated exactly as for NanoAdapters (HetLoRA).

Scaling. PEFT scales a LoRA layer by ``lora_alpha / r`` (``LoraLayer.update_layer``, without
``use_rslora``), so a rank-``r_tier`` client given the config's ``lora_alpha`` would act with
``adapter.r / r_tier`` times the gain of the same global components. :func:`inject_llm_lora` takes
the run's one ``scaling`` (``adapter.lora_alpha / adapter.r``) instead and hands PEFT
``lora_alpha = scaling * r``, so every tier's LoRA has the same scaling (as NanoAdapters do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LLM_PREFIX", "inject_llm_lora", "lora_config", "lora_param_count"]

LLM_PREFIX = "llm."
_ADAPTER = "default"  # PEFT's adapter name: one LoRA per model here
_KEY = "adapter.lora_target_modules"


def lora_config(*, r: int, lora_alpha: float, dropout: float, target_modules: Sequence[str]):
    """The ``peft.LoraConfig`` of the LLM's LoRA (PEFT's defaults otherwise: no bias, B = 0
    init)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=list(target_modules)
    )


def _targets(decoder: nn.Module, config) -> list[tuple[str, nn.Linear]]:
    """The decoder's modules ``config`` targets, by PEFT's own matching rule.

    Raises:
        ValueError: naming ``adapter.lora_target_modules`` when nothing matches or a match is not a
            Linear layer (LoRA on the embedding table would train what the client sends, and its
            PEFT weights are not ``lora_A``/``lora_B``).
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    found = [
        (name, m)
        for name, m in decoder.named_modules()
        if name and check_target_module_exists(config, name)
    ]
    if not found:
        names = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in decoder.named_modules()
                if isinstance(m, nn.Linear)
            }
        )
        raise ValueError(
            f"{_KEY} {sorted(config.target_modules)} matches no module of the LLM decoder; "
            f"its Linear layers are named {names}"
        )
    for name, m in found:
        if type(m) is not nn.Linear:
            raise ValueError(
                f"{_KEY}: {name!r} is a {type(m).__name__}, not a Linear layer; LoRA goes on the "
                "decoder's linear layers only (e.g. q_proj, k_proj, v_proj, o_proj)"
            )
    return found


def lora_param_count(decoder: nn.Module, *, r: int, target_modules: Sequence[str]) -> int:
    """Parameters of rank-``r`` LoRA on ``target_modules``: ``r·(in + out)`` per targeted Linear.

    Counted from shapes only (meta-device decoders work), with PEFT's matching rule, so it equals
    what :func:`inject_llm_lora` creates.
    """
    config = lora_config(r=r, lora_alpha=1.0, dropout=0.0, target_modules=target_modules)
    return sum(r * (m.in_features + m.out_features) for _, m in _targets(decoder, config))


def _state_key(name: str) -> str:
    """``layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``llm.layers.0.self_attn.q_proj.lora_A``."""
    short = name.removesuffix(f".{_ADAPTER}.weight")
    if short == name or not short.endswith((".lora_A", ".lora_B")):
        raise ValueError(
            f"unexpected PEFT LoRA parameter {name!r}: only lora_A / lora_B weights are federated"
        )
    return LLM_PREFIX + short


def inject_llm_lora(
    decoder: nn.Module,
    *,
    r: int,
    scaling: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int | None = None,
) -> dict[str, nn.Parameter]:
    """Inject PEFT LoRA into ``decoder`` in place and return its parameters by state key.

    ``scaling`` is the run's one LoRA scaling (``adapter.lora_alpha / adapter.r``), the same at
    every rank: PEFT gets ``lora_alpha = scaling * r``, so its ``lora_alpha / r`` equals
    ``scaling``.

    PEFT freezes every other decoder parameter. ``seed`` makes the ``lora_A`` init identical across
    processes (``lora_B`` starts at zero, so the model is exactly the pretrained one); the global
    random state is left as it was. The decoder keeps its train/eval mode (the new LoRA modules
    take it too).

    Raises:
        ValueError: naming ``adapter.lora_target_modules`` if the targets do not fit the decoder.
    """
    from peft import inject_adapter_in_model

    config = lora_config(
        r=r, lora_alpha=scaling * r, dropout=dropout, target_modules=target_modules
    )
    _targets(decoder, config)  # fail with the config key, not PEFT's message
    training = decoder.training
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        inject_adapter_in_model(config, decoder, adapter_name=_ADAPTER)
    finally:
        torch.random.set_rng_state(gen_state)
    decoder.train(training)
    return {_state_key(name): p for name, p in decoder.named_parameters() if p.requires_grad}
