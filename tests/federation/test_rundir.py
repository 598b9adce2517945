"""The run-directory layout (fednano_ray/federation/rundir.py): names, checkpoint order, atomic
writes, and a checkpoint's round trip. The literal names below are the on-disk format: runs
written before this module must still load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fednano_ray.config import dump_config, load_config
from fednano_ray.federation import rundir

ROOT = Path(__file__).resolve().parents[2]


def _complete(run_dir: Path, rnd: int) -> Path:
    """A checkpoint folder with its state.json (the rest does not matter for finding it)."""
    folder = rundir.round_dir(run_dir, rnd)
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"round": rnd}))
    return folder


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- names --------------------------------------------------------------------------------------


def test_names_are_the_on_disk_format(tmp_path):
    assert rundir.round_name(3) == "round_0003" and rundir.round_name(10000) == "round_10000"
    assert rundir.round_dir(tmp_path, 12) == tmp_path / "checkpoints" / "round_0012"
    folder = rundir.round_dir(tmp_path, 1)
    assert rundir.adapters_path(folder) == folder / "adapters.safetensors"
    assert rundir.client_adapters_path(folder, 3) == folder / "clients" / "client_00003.safetensors"
    assert (
        rundir.client_bank_path(folder, 3) == folder / "clients" / "client_00003.bank.safetensors"
    )
    assert rundir.client_name(123456) == "client_123456"
    assert rundir.config_path(tmp_path) == tmp_path / "config.yaml"
    assert rundir.results_path(tmp_path) == tmp_path / "results.json"
    assert (rundir.STATE, rundir.OPTIMIZER_STATES, rundir.STRATEGY_STATE, rundir.TOKENS) == (
        "state.json",
        "optimizer_states.pt",
        "strategy_state.safetensors",
        "tokens.json",
    )


@pytest.mark.parametrize(
    ("name", "rnd"),
    [
        ("round_0000", 0),
        ("round_0042", 42),
        ("round_9999", 9999),
        ("round_10000", 10000),
        ("round_001", None),  # fewer than 4 digits: not a name round_name writes
        ("round_abcd", None),
        ("round_0001.tmp", None),
        ("x_round_0001", None),
    ],
)
def test_checkpoint_round_parses_only_checkpoint_names(name, rnd):
    assert rundir.checkpoint_round(name) == rnd


# -- finding checkpoints ------------------------------------------------------------------------


def test_checkpoints_are_ordered_by_round_number_not_by_name(tmp_path):
    for rnd in (10000, 2, 9999, 10001):
        _complete(tmp_path, rnd)
    names = [p.name for p in rundir.list_checkpoints(tmp_path)]
    assert names == ["round_0002", "round_9999", "round_10000", "round_10001"]
    assert sorted(names) != names  # what sorting the names gave: round_10000 before round_9999
    assert rundir.latest_checkpoint(tmp_path) == rundir.round_dir(tmp_path, 10001)


def test_incomplete_checkpoints_and_other_entries_are_skipped(tmp_path):
    _complete(tmp_path, 1)
    _complete(tmp_path, 3)
    rundir.round_dir(tmp_path, 4).mkdir()  # killed mid-checkpoint: no state.json yet
    (rundir.round_dir(tmp_path, 4) / "adapters.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "round_abcd").mkdir()
    (tmp_path / "checkpoints" / "round_abcd" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "round_0009").write_text("a file, not a folder")
    assert rundir.list_checkpoints(tmp_path) == [
        rundir.round_dir(tmp_path, 1),
        rundir.round_dir(tmp_path, 3),
    ]
    assert rundir.latest_checkpoint(tmp_path) == rundir.round_dir(tmp_path, 3)


def test_no_checkpoints(tmp_path):
    assert rundir.list_checkpoints(tmp_path / "missing") == []
    assert rundir.latest_checkpoint(tmp_path) is None
    assert rundir.resolve_checkpoint(tmp_path, None) is None  # serving before round 1: pretrained


def test_resolve_checkpoint(tmp_path):
    for rnd in (10000, 2, 9999):
        _complete(tmp_path, rnd)
    rundir.round_dir(tmp_path, 5).mkdir()  # incomplete
    assert rundir.resolve_checkpoint(tmp_path, None) == rundir.round_dir(tmp_path, 10000)
    assert rundir.resolve_checkpoint(tmp_path, "round_0002") == rundir.round_dir(tmp_path, 2)
    have = r"complete ones: \['round_0002', 'round_9999', 'round_10000'\]"
    for name in ("round_0099", "round_0005", "../checkpoints/round_0002", "round_2"):
        with pytest.raises(ValueError, match=rf"checkpoint {re.escape(name)} of .* {have}"):
            rundir.resolve_checkpoint(tmp_path, name)
    with pytest.raises(ValueError, match="complete ones: none"):
        rundir.resolve_checkpoint(tmp_path / "empty", "round_0001")


# -- writing ------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), rundir.atomic_write(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and _files(tmp_path) == ["results.json"]
    with rundir.atomic_write(path) as f:
        f.write(b"new")
    assert path.read_text() == "new" and _files(tmp_path) == ["results.json"]


def _state(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "vision.lora_A": torch.randn(rank, 8, generator=g),
        "vision.lora_B": torch.randn(rank, 8, generator=g).t(),  # not contiguous until saved
        "text.offset": torch.randn(3, generator=g, dtype=torch.float64).to(torch.bfloat16),
    }


def _checkpoint(rnd: int = 7) -> rundir.Checkpoint:
    moments = {
        c: {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
            "param_groups": [],
        }
        for c in (1, 4)
    }
    return rundir.Checkpoint(
        round=rnd,
        global_state=_state(0, rank=4),
        client_states={4: _state(4), 1: _state(1), 12: _state(12)},
        client_banks={1: torch.randn(5, 6, dtype=torch.float64), 4: torch.randn(2, 6)},
        optimizer_states=moments,
        strategy_state={"velocity.vision.lora_A": torch.randn(4, 8)},
        rounds=[{"round": 0, "loss": 1.5}, {"round": 1, "loss": None}],
        summary={"accuracy_after": 0.5, "per_client": {"1": 0.25}},
    )


def _assert_same_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert t.dtype == b[k].dtype and torch.equal(t, b[k]), k


def test_checkpoint_round_trip(tmp_path):
    ckpt = _checkpoint()
    folder = rundir.write_checkpoint(tmp_path, ckpt)

    assert folder == tmp_path / "checkpoints" / "round_0007"
    assert _files(folder) == [
        "adapters.safetensors",
        "clients/client_00001.bank.safetensors",
        "clients/client_00001.safetensors",
        "clients/client_00004.bank.safetensors",
        "clients/client_00004.safetensors",
        "clients/client_00012.safetensors",
        "optimizer_states.pt",
        "state.json",
        "strategy_state.safetensors",
    ]  # and no temporary file left behind
    state = json.loads((folder / "state.json").read_text())
    assert {k: v for k, v in state.items() if k not in ("files", "sha256")} == {
        "round": 7,
        "rounds": ckpt.rounds,
        "summary": ckpt.summary,
        "client_ids": [1, 4, 12],
    }
    # ... and the sha256 of every other file (tests/federation/test_checkpoint_integrity.py)
    assert sorted(state["files"]) == [n for n in _files(folder) if n != "state.json"]
    back = rundir.read_checkpoint(folder)
    assert (back.round, back.rounds, back.summary) == (7, ckpt.rounds, ckpt.summary)
    _assert_same_states(back.global_state, ckpt.global_state)
    assert sorted(back.client_states) == [1, 4, 12]
    for c, s in ckpt.client_states.items():
        _assert_same_states(back.client_states[c], s)
    assert sorted(back.client_banks) == [1, 4]
    for c, bank in ckpt.client_banks.items():  # banks are stored as float32
        assert back.client_banks[c].dtype == torch.float32
        assert torch.equal(back.client_banks[c], bank.float())
    _assert_same_states(back.strategy_state, ckpt.strategy_state)
    assert sorted(back.optimizer_states) == [1, 4]
    for c, m in ckpt.optimizer_states.items():
        got = back.optimizer_states[c]["state"][0]
        assert torch.equal(got["exp_avg"], m["state"][0]["exp_avg"]) and float(got["step"]) == 3.0


def test_a_checkpoint_without_clients_and_moments(tmp_path):
    """Rounds of a strategy without personal state: global adapters and state.json alone."""
    folder = rundir.write_checkpoint(tmp_path, rundir.Checkpoint(round=0, global_state=_state(0)))
    assert _files(folder) == ["adapters.safetensors", "state.json"]
    back = rundir.read_checkpoint(folder)
    assert back.client_states == back.client_banks == back.optimizer_states == {}
    assert back.strategy_state == {}
    assert (back.rounds, back.summary) == ([], {})
    assert rundir.latest_checkpoint(tmp_path) == folder


def test_rewriting_a_checkpoint_replaces_it(tmp_path):
    """The run's last checkpoint is written again once clients personalised (clients/ added)."""
    rundir.write_checkpoint(tmp_path, rundir.Checkpoint(round=1, global_state=_state(0)))
    ckpt = _checkpoint(rnd=1)
    folder = rundir.write_checkpoint(tmp_path, ckpt)
    back = rundir.read_checkpoint(folder)
    _assert_same_states(back.global_state, ckpt.global_state)
    assert sorted(back.client_states) == [1, 4, 12] and back.summary == ckpt.summary
    assert not [p for p in folder.rglob(".*")]  # no temporary files


def test_files_are_byte_compatible_with_the_format_before(tmp_path):
    """The safetensors files are byte for byte what the writers before this module wrote (save_file
    of contiguous tensors), state.json is what they wrote plus the files' sha256 and its own, and a
    checkpoint written that way (without checksums) reads back."""
    ckpt = _checkpoint()
    folder = rundir.write_checkpoint(tmp_path / "new", ckpt)
    old = tmp_path / "old" / "checkpoints" / "round_0007"
    (old / "clients").mkdir(parents=True)

    def save(tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(old / name))

    save(ckpt.global_state, "adapters.safetensors")
    for c, s in ckpt.client_states.items():
        save(s, f"clients/client_{c:05d}.safetensors")
    for c, b in ckpt.client_banks.items():
        save({"bank": b.detach().float()}, f"clients/client_{c:05d}.bank.safetensors")
    save(ckpt.strategy_state, "strategy_state.safetensors")
    state = {"round": 7, "rounds": ckpt.rounds, "summary": ckpt.summary, "client_ids": [1, 4, 12]}
    (old / "state.json").write_text(json.dumps(state))
    for name in _files(old):
        if name != "state.json":
            assert (folder / name).read_bytes() == (old / name).read_bytes(), name
    new_state = json.loads((folder / "state.json").read_text())
    assert {k: v for k, v in new_state.items() if k not in ("files", "sha256")} == state

    torch.save(
        ckpt.optimizer_states, old / "optimizer_states.pt"
    )  # torch.save of a path: loads too
    back = rundir.read_checkpoint(rundir.latest_checkpoint(tmp_path / "old"))
    _assert_same_states(back.client_states[12], ckpt.client_states[12])
    assert sorted(back.client_banks) == [1, 4] and sorted(back.optimizer_states) == [1, 4]
    assert load_file(str(rundir.adapters_path(folder))).keys() == ckpt.global_state.keys()


ROUND = {
    "round": 0,
    "clients": [0, 1],
    "completed": [1],
    "failures": [{"client_id": "0", "reason": "timeout"}],
    "loss": 2.5,
    "client_loss": {"1": 2.5},
    "placement": {"1": "node-a"},
    "bytes_down": 8,
    "bytes_up": 16,
    "aggregated": True,
    "wall_time_s": 0.5,
    "avg_accuracy": 0.4,  # an evaluated round's extra
}


def test_results_and_config(tmp_path):
    results = {"config": {"a": 1}, "rounds": [ROUND], "summary": {"ünïcode": "α"}}
    path = rundir.write_results(tmp_path, results)
    assert path == tmp_path / "results.json"
    assert path.read_text() == json.dumps(results, indent=2)  # as the coordinator wrote it before
    assert rundir.read_results(tmp_path) == results
    cfg = load_config(ROOT / "examples" / "tiny.yaml")
    assert rundir.write_config(tmp_path, cfg).read_text() == dump_config(cfg)
    assert rundir.read_config(tmp_path) == cfg
    assert _files(tmp_path) == ["config.yaml", "results.json"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bytes_up": -1}, "rounds.0.bytes_up"),
        ({"completed": "1"}, "rounds.0.completed"),
        ({"failures": [{"client_id": "0"}]}, "rounds.0.failures.0.reason"),
        ({"loss": "low"}, "rounds.0.loss"),
    ],
)
def test_a_malformed_round_is_refused_naming_the_field_and_nothing_is_written(
    tmp_path, change, field
):
    results = {"config": {}, "rounds": [{**ROUND, **change}], "summary": {}}
    with pytest.raises(ValueError, match=re.escape(field)):
        rundir.write_results(tmp_path, results)
    assert not rundir.results_path(tmp_path).exists()
    rundir.results_path(tmp_path).write_text(json.dumps(results))
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(rundir.results_path(tmp_path)))}.*{re.escape(field)}"
    ):
        rundir.load_results(tmp_path)


def test_the_summary_says_whether_the_run_finished(tmp_path):
    results = {"config": {}, "rounds": [ROUND], "summary": {"accuracy_before": 0.3}}
    rundir.write_results(tmp_path, results)
    assert not rundir.load_results(tmp_path).summary.finished
    results["summary"].update(accuracy_after=0.5, wall_time_s=3.0, global_test_n=40)
    rundir.write_results(tmp_path, results)
    loaded = rundir.load_results(tmp_path)
    assert loaded.summary.finished and loaded.summary.accuracy_after == 0.5
    assert loaded.rounds[0].model_extra == {"avg_accuracy": 0.4} and loaded.summary.model_extra == {
        "global_test_n": 40
    }
    with pytest.raises(ValueError, match="not found"):
        rundir.load_results(tmp_path / "nowhere")


def test_committed_results_still_load():
    """Every results.json committed under docs/ reads back (the report reads them)."""
    from fednano_ray.report import load_run

    runs = sorted({p.parent for p in (ROOT / "docs").rglob("results.json")})
    assert runs
    for run in runs:
        assert rundir.read_results(run) == load_run(run).results
        assert rundir.load_results(run).summary.finished
