"""Which floating-point precision the frozen LLM runs in, chosen from the hardware.

bf16 is only worth it where the hardware computes it natively: on a CUDA GPU with bf16 support,
or on a CPU with AVX512_BF16 or AMX. Elsewhere PyTorch *emulates* bf16 matmuls, and they are far
slower than fp32: a 512x576 @ 576x1536 matmul took 703 ms under bf16 autocast against 10 ms in
fp32 on an AVX2-only AMD EPYC (ENVIRONMENT.md), so stage-1 alignment would have taken ~13 h.

``model.precision: auto`` (the default) therefore resolves, in each process that runs the LLM, to
``bf16`` where it is native and ``fp32`` otherwise. ``bf16`` means bf16 *autocast*: weights,
adapters and the connector stay fp32, only the frozen LLM's matmuls run in bf16.

Example:
    >>> resolve_precision("fp32").dtype
    'float32'
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any, Literal

PrecisionSetting = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

#: /proc/cpuinfo flags meaning the CPU multiplies bf16 natively (AVX512_BF16, or AMX's bf16 tiles).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class Precision:
    """A resolved precision.

    Attributes:
        name: ``"bf16"`` or ``"fp32"``.
        requested: the setting it was resolved from (``auto``, ``fp32`` or ``bf16``).
        reason: why, in words (names the CPU flag or GPU that decided it).
        hardware: the CPU model (or GPU name) it was resolved on.
    """

    name: Literal["bf16", "fp32"]
    requested: str
    reason: str
    hardware: str

    @property
    def autocast_bf16(self) -> bool:
        """Run the frozen LLM under bf16 autocast (its weights stay fp32)."""
        return self.name == "bf16"

    @property
    def dtype(self) -> str:
        """The torch dtype name for engines that cast weights (serving): float32 or bfloat16."""
        return "bfloat16" if self.name == "bf16" else "float32"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (lscpu's "Model name"), e.g. ``AMD EPYC`` or
    ``Intel(R) Xeon(R) ...``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware_info() -> dict[str, Any]:
    """What the figures of a run were measured on: CPU model, its vector ISA, cores, GPU if any."""
    import torch

    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_isa": [
            f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags
        ],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def native_bf16(
    *, flags: frozenset[str] | None = None, cuda: bool | None = None, cuda_bf16: bool | None = None
) -> tuple[bool, str]:
    """Whether this machine multiplies bf16 natively, and why (the arguments override detection, for
    tests).

    Args:
        flags: the CPU's flags (default: /proc/cpuinfo).
        cuda: whether the LLM runs on a CUDA GPU (default: ``torch.cuda.is_available()``).
        cuda_bf16: whether that GPU supports bf16 (default: ``torch.cuda.is_bf16_supported()``).

    Returns:
        (native, reason).
    """
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CUDA GPU"
        return bool(cuda_bf16), f"{name} {'supports' if cuda_bf16 else 'does not support'} bf16"
    if flags is None:
        flags = cpu_flags()
        # The flags can say yes while oneDNN is capped below AVX512_BF16 (ONEDNN_MAX_CPU_ISA): ask
        # torch too.
        torch_says = (
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)()
            or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        )
        isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
        if (
            isa_cap
            and isa_cap not in ("ALL", "DEFAULT")
            and "BF16" not in isa_cap
            and "AMX" not in isa_cap
        ):
            return (
                False,
                f"ONEDNN_MAX_CPU_ISA={isa_cap} caps oneDNN below bf16: bf16 would be emulated",
            )
    else:
        torch_says = True
    native = sorted(NATIVE_BF16_CPU_FLAGS & flags)
    if native and torch_says:
        return True, f"the CPU has {', '.join(native)}: bf16 matmuls are native"
    return (
        False,
        (
            "the CPU has neither avx512_bf16 nor amx_bf16: bf16 would be emulated "
            "(~50-70x slower than fp32)"
        ),
    )


def resolve_precision(setting: str = "auto", **detect: Any) -> Precision:
    """Turn ``model.precision`` into what this process runs.

    Args:
        setting: ``auto`` (bf16 only where native, else fp32), ``fp32`` or ``bf16`` (forced; slow
            where bf16 is emulated, but honoured).
        **detect: overrides for :func:`native_bf16` (tests).

    Raises:
        ValueError: for an unknown setting.
    """
    if setting not in PRECISIONS:
        raise ValueError(
            f"unknown precision {setting!r}; use one of {', '.join(PRECISIONS)} (model.precision)"
        )
    import torch

    hw = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and detect.get("cuda", True)
        else cpu_model()
    )
    if setting == "fp32":
        return Precision("fp32", setting, "fp32 requested (model.precision=fp32)", hw)
    native, why = native_bf16(**detect)
    if setting == "bf16":
        return Precision(
            "bf16",
            setting,
            "bf16 requested (model.precision=bf16)" + ("" if native else f"; note: {why}"),
            hw,
        )
    return Precision("bf16" if native else "fp32", setting, f"auto: {why}", hw)
