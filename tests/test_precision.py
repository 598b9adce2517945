"""model.precision: auto picks bf16 only where the hardware runs it natively, and every path obeys
it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fednano_ray.config import ConfigError, load_config
from fednano_ray.precision import hardware_info, native_bf16, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"

AVX2_EPYC = frozenset(
    {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}
)  # the 2026-12-01 machine: no avx512
AVX512_NO_BF16 = AVX2_EPYC | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
SAPPHIRE_RAPIDS = AVX512_NO_BF16 | {"avx512_bf16", "amx_bf16", "amx_tile"}
ZEN4 = AVX512_NO_BF16 | {"avx512_bf16"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AVX2_EPYC, "fp32"), (AVX512_NO_BF16, "fp32"), (ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16")],
    ids=["avx2", "avx512-without-bf16", "avx512_bf16", "amx"],
)
def test_auto_picks_bf16_only_on_native_cpus(flags, expected):
    """auto resolves to bf16 on CPUs with avx512_bf16 or amx_bf16 and to fp32 on the rest."""
    # Execute
    p = resolve_precision("auto", flags=flags, cuda=False)

    # Assert
    assert p.name == expected
    assert p.autocast_bf16 is (expected == "bf16")
    assert p.requested == "auto"
    assert ("native" in p.reason) is (expected == "bf16")


def test_auto_on_cuda_follows_the_gpu():
    """On a CUDA device auto asks the GPU, whatever the host CPU lacks."""
    # Execute
    with_bf16 = resolve_precision("auto", flags=AVX2_EPYC, cuda=True, cuda_bf16=True)
    without = resolve_precision("auto", flags=SAPPHIRE_RAPIDS, cuda=True, cuda_bf16=False)

    # Assert
    assert with_bf16.name == "bf16"
    assert without.name == "fp32"


def test_explicit_settings_are_honoured_and_explained():
    """fp32 and bf16 are taken as asked; forcing bf16 where it is emulated says so."""
    # Execute
    fp32 = resolve_precision("fp32", flags=SAPPHIRE_RAPIDS, cuda=False)
    bf16 = resolve_precision("bf16", flags=AVX2_EPYC, cuda=False)

    # Assert
    assert (fp32.name, fp32.dtype) == ("fp32", "float32")
    assert (bf16.name, bf16.dtype) == ("bf16", "bfloat16")
    assert "emulated" in bf16.reason


def test_onednn_isa_cap_disables_native_bf16(monkeypatch):
    """A oneDNN capped below AVX512_BF16 emulates bf16 even on a bf16 CPU, so auto must not pick
    it.
    """
    # Prepare
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")

    # Execute
    native, why = native_bf16(cuda=False)

    # Assert
    assert native is False
    assert "ONEDNN_MAX_CPU_ISA" in why


def test_unknown_precision_is_a_clear_error():
    """A typo names the key and the choices, from the config and from the resolver."""
    # Execute / Assert
    with pytest.raises(ValueError, match="model.precision"):
        resolve_precision("fp16")
    with pytest.raises(ConfigError, match="precision"):
        load_config(TINY, ["model.precision=fp16"])


def test_old_autocast_key_points_to_precision(tmp_path):
    """A config still using model.autocast_bf16 is told what replaced it."""
    # Prepare
    tree = yaml.safe_load(TINY.read_text())
    tree["model"].pop("precision", None)
    tree["model"]["autocast_bf16"] = True
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(tree))

    # Execute / Assert
    with pytest.raises(ConfigError, match="model.precision"):
        load_config(path)


def test_default_is_auto_and_resolves_on_this_machine():
    """The default is auto, and it resolves to what this machine's own flags say."""
    # Execute
    cfg = load_config(TINY, ["model.precision=auto"])
    p = cfg.model.runtime_precision()

    # Assert
    assert p.name == ("bf16" if native_bf16()[0] else "fp32")
    info = hardware_info()
    assert info["cpu_model"] and info["cpu_count"] >= 1


def test_server_llm_runs_in_the_resolved_precision(monkeypatch):
    """The LLM trainer builds its ServerLLM from model.precision (fp32 here: no autocast)."""
    # Prepare
    from fednano_ray.actors.llm_trainer import LLMTrainer

    cfg = load_config(TINY)

    # Execute
    trainer = LLMTrainer(cfg.model, max_batch_size=4, batch_wait_ms=0)
    forced = LLMTrainer(
        load_config(TINY, ["model.precision=bf16"]).model, max_batch_size=4, batch_wait_ms=0
    )

    # Assert
    assert trainer.server.autocast_bf16 is False
    assert forced.server.autocast_bf16 is True


def test_inspect_records_precision_and_hardware():
    """fednano-ray inspect says which precision this machine would run and on what CPU."""
    # Prepare
    from fednano_ray.accounting import inspect_config

    # Execute
    out = inspect_config(load_config(TINY, ["model.precision=auto"]))

    # Assert
    assert out["precision"]["requested"] == "auto"
    assert out["precision"]["name"] == ("bf16" if native_bf16()[0] else "fp32")
    assert out["hardware"]["cpu_model"] == out["precision"]["hardware"] or "gpu" in out["hardware"]
