"""The ``python -m fednano_ray`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fednano_ray.data import load_dataset
from fednano_ray.federation import rundir

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
STEP_KEYS = {
    "total_params",
    "client_params",
    "server_params",
    "adapter_params",
    "client_storage_fraction",
    "adapter_fraction",
    "step_bytes_up",
    "step_bytes_down",
}


@pytest.fixture
def cli(tmp_path):
    """Run the CLI in a temp folder with an isolated cache; returns the CompletedProcess."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "FEDNANO_RAY_CACHE": str(tmp_path / "cache"),
    }

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fednano_ray", *args],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def _config_with(tmp_path: Path, edit) -> Path:
    tree = yaml.safe_load(TINY.read_text())
    edit(tree)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_inspect_tiny_json(cli):
    """inspect --json prints one JSON object with consistent accounting figures."""
    # Execute
    proc = cli("inspect", str(TINY), "--json")

    # Assert
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # the whole stdout is one object
    assert isinstance(out, dict)
    assert STEP_KEYS <= set(out)
    assert out["model_kind"] == "tiny"
    assert out["total_params"] > out["client_params"] > out["adapter_params"] > 0
    assert out["server_params"] > 0
    # total is the frozen MLLM; the client also holds the adapters
    assert out["client_params"] == out["client_frozen_params"] + out["adapter_params"]
    assert (
        out["client_frozen_params"] + out["server_params"] - out["shared_params"]
        == out["total_params"]
    )
    assert 0 < out["client_storage_fraction"] < 1
    assert 0 < out["adapter_fraction"] < out["client_storage_fraction"]
    # vision + text, A and B, d=128, at the largest tier's rank (examples/tiny.yaml: ranks 2 and 4)
    assert out["adapter_params"] == 2 * 2 * 128 * 4
    assert [t["adapter_bytes"] for t in out["tiers"]] == [4 * 2 * 2 * 128 * r for r in (2, 4)]
    assert out["step_bytes_up"] > 0 and out["step_bytes_down"] > 0
    row_bytes = out["sequence_length"] * out["hidden_size"] * 4  # fp32 dL/dz' of one row
    assert out["step_bytes_down"] == out["batch_size"] * row_bytes


def test_inspect_llava_7b_json(cli):
    """The built-in llava-1.5-7b architecture is accounted without downloading anything."""
    # Execute
    proc = cli(
        "inspect",
        str(TINY),
        "--set",
        "model.kind=hf",
        "--set",
        "model.name_or_path=llava-hf/llava-1.5-7b-hf",
        "--json",
    )

    # Assert
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert abs(out["total_params"] - 7.06e9) / 7.06e9 < 0.01
    assert 0.05 < out["client_storage_fraction"] < 0.08
    assert out["hidden_size"] == 4096
    assert out["adapter_fraction"] < 1e-4


def test_data_synth_writes_loadable_dataset(cli, tmp_path):
    """data synth writes train/ and test/ that load_dataset reads back."""
    # Prepare
    out_dir = tmp_path / "bench"

    # Execute
    proc = cli(
        "data", "synth", str(out_dir), "--num-train", "20", "--num-test", "10", "--image-size", "32"
    )

    # Assert
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert Path(info["root"]) == out_dir
    ds = load_dataset(out_dir)
    assert len(ds["train"]) == 20
    assert len(ds["test"]) == 10
    assert all(ex.image.is_file() for ex in ds["train"] + ds["test"])


def test_train_unknown_key_fails_before_ray(cli, tmp_path):
    """An unknown key exits 2 naming the key, without ever starting Ray."""
    # Prepare
    path = _config_with(tmp_path, lambda t: t["federation"].update(roundz=3))

    # Execute
    proc = cli("train", str(path), "--run-dir", str(tmp_path / "run"), timeout=30)

    # Assert
    assert proc.returncode == 2
    assert "federation.roundz" in proc.stderr
    assert "unknown key" in proc.stderr
    assert "Started a local Ray" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_train_unknown_set_key_fails(cli, tmp_path):
    """A misspelt --set key is rejected the same way."""
    # Execute
    proc = cli("train", str(TINY), "--set", "train.learning_rate=0.1", timeout=30)

    # Assert
    assert proc.returncode == 2
    assert "train.learning_rate" in proc.stderr
    assert "Started a local Ray" not in proc.stderr


def test_train_gpu_tier_on_cpu_machine(cli, tmp_path):
    """A tier asking for a GPU locally exits 2 naming tiers[0].num_gpus, before Ray starts."""
    # Prepare
    path = _config_with(tmp_path, lambda t: t["tiers"][0].update(num_gpus=1))

    # Execute
    proc = cli("train", str(path), "--run-dir", str(tmp_path / "run"), timeout=30)

    # Assert
    assert proc.returncode == 2
    assert "tiers[0].num_gpus" in proc.stderr
    assert "Started a local Ray" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_resume_refuses_a_config_change_before_ray(cli, tmp_path):
    """--resume with a config that changes what the run computes exits 2 before Ray starts, naming
    each changed key old → new and the flag that forces it; harmless changes (more rounds) are not
    named. --force-config-change without --resume is refused too."""
    from fednano_ray.config import load_config

    # Prepare: a run directory as `fednano-ray train` starts it (its resolved config.yaml)
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_config(run, load_config(TINY))
    stored = rundir.config_path(run).read_text()

    # Execute
    sets = ("--set", "federation.seed=3", "--set", "data.alpha=1.0", "--set", "federation.rounds=5")
    proc = cli("train", str(TINY), "--run-dir", str(run), "--resume", *sets, timeout=30)
    alone = cli("train", str(TINY), "--run-dir", str(tmp_path / "new"), "--force-config-change")

    # Assert
    assert proc.returncode == 2, proc.stderr
    assert "federation.seed: 0 → 3" in proc.stderr and "data.alpha: 0.5 → 1.0" in proc.stderr
    assert "--force-config-change" in proc.stderr and "federation.rounds" not in proc.stderr
    assert "Started a local Ray" not in proc.stderr and "Traceback" not in proc.stderr
    assert rundir.config_path(run).read_text() == stored
    assert alone.returncode == 2
    assert "--force-config-change only applies to --resume" in alone.stderr
    assert not (tmp_path / "new").exists()


def test_serve_refuses_a_fedavg_lora_run_before_ray(cli, tmp_path):
    """A fedavg-lora run's LoRA lives inside the LLM, which serving keeps frozen and shared: exit 2,
    no Ray.
    """
    # Prepare: a run directory as `fednano-ray train` starts it (its resolved config.yaml)
    run = tmp_path / "run"
    run.mkdir()
    rundir.config_path(run).write_text(
        _config_with(tmp_path, lambda t: t["federation"].update(strategy="fedavg-lora")).read_text()
    )

    # Execute
    proc = cli("serve", str(run), timeout=30)

    # Assert
    assert proc.returncode == 2
    assert "fedavg-lora run" in proc.stderr and "cannot be served" in proc.stderr
    assert "Started a local Ray" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_config_lists_every_key_the_config_error_points_to(capsys):
    """An unknown key's error sends the user to `fednano-ray train --help-config`, which exists and
    lists every dotted key with its default and description (no config file needed)."""
    import pytest

    from fednano_ray.cli import main as cli_main
    from fednano_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="--help-config"):
        load_config(None, ["federation.strategyy=fedavg"])
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--help-config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for line in (
        "federation.strategy = 'fednano'",
        "federation.strategy_options = {}",
        "tiers = ",
        "trust.dp = None",
    ):
        assert line in out, line
    assert "fedavgm: FedAvg with server momentum" in out
