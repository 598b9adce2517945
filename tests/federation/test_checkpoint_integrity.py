"""Checkpoints are crash-safe and verified (fednano_ray/federation/rundir.py): every file is written
atomically, state.json (written last) holds the sha256 of every other file and of itself, a corrupt
checkpoint is found before anything of it is used, and both ``--resume`` and serving fall back to
the newest checkpoint that checks out (a pinned one is never replaced, and is the only one read).
``--resume`` also refuses a config that changes what the run computes, unless forced."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from fednano_ray.config import ConfigError, load_config
from fednano_ray.federation import rundir

TINY = "examples/tiny.yaml"


def _checkpoint(rnd: int = 7) -> rundir.Checkpoint:
    """A checkpoint with every kind of file: clients, banks, moments and strategy state."""
    g = torch.Generator().manual_seed(rnd)

    def state(rank: int) -> dict[str, torch.Tensor]:
        return {
            "vision.lora_A": torch.randn(rank, 8, generator=g),
            "vision.lora_B": torch.randn(8, rank, generator=g),
        }

    return rundir.Checkpoint(
        round=rnd,
        global_state=state(4),
        client_states={1: state(2), 4: state(4)},
        client_banks={1: torch.randn(3, 6, generator=g)},
        optimizer_states={1: {"state": {0: {"exp_avg": torch.randn(4)}}, "param_groups": []}},
        strategy_state={"velocity.vision.lora_A": torch.randn(4, 8, generator=g)},
        rounds=[{"round": rnd, "loss": 1.5}],
        summary={"accuracy_before": 0.25},
    )


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _flip(path: Path, at: int = -1) -> None:
    """Flip one byte (the last: tensor data, so the file still parses)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- writes: temporary file, fsync, rename; state.json last ---------------------------------------


def test_every_checkpoint_and_results_file_is_written_through_a_synced_temporary(
    tmp_path, monkeypatch
):
    """Each file of a checkpoint (adapters, clients/*.safetensors, banks, optimizer_states.pt,
    strategy state, state.json), results.json and config.yaml reaches its name only by a rename of
    a temporary file in the same folder that was fsync'd first; the folder is fsync'd before
    state.json's rename, which comes last."""
    events: list[tuple[str, str, str | None]] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), None))
        return real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    folder = rundir.write_checkpoint(tmp_path, _checkpoint())
    rundir.write_results(tmp_path, {"config": {}, "rounds": [], "summary": {}})
    rundir.write_config(tmp_path, load_config(TINY))
    monkeypatch.undo()

    renames = {dst: (i, src) for i, (kind, src, dst) in enumerate(events) if kind == "replace"}
    written = [folder / n for n in _files(folder)] + [
        tmp_path / "results.json",
        tmp_path / "config.yaml",
    ]
    assert len(written) == 9  # 7 in the checkpoint
    for path in written:
        i, src = renames[str(path)]
        tmp = Path(src)
        assert tmp.parent == path.parent and tmp.name.startswith(f".{path.name}."), path
        assert tmp.name.endswith(".tmp")
        assert ("fsync", src, None) in events[:i], f"{path} renamed before its temporary was synced"
    state_at = renames[str(folder / "state.json")][0]
    ckpt_renames = [i for dst, (i, _) in renames.items() if Path(dst).parent.is_relative_to(folder)]
    assert max(ckpt_renames) == state_at  # state.json last
    folder_synced = [i for i, e in enumerate(events) if e[:2] == ("fsync", str(folder))]
    assert any(i < state_at for i in folder_synced) and any(i > state_at for i in folder_synced)
    assert not list(tmp_path.rglob("*.tmp"))


# -- checksums ------------------------------------------------------------------------------------


def test_state_json_holds_the_sha256_of_every_file(tmp_path):
    folder = rundir.write_checkpoint(tmp_path, _checkpoint())
    state = json.loads((folder / "state.json").read_text())
    assert state["files"] == {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in _files(folder)
        if name != "state.json"
    }
    assert len(state["sha256"]) == 64  # its own, over the other keys
    assert rundir.verify_checkpoint(folder) == state


FILES = [
    "adapters.safetensors",
    "clients/client_00004.safetensors",
    "clients/client_00001.bank.safetensors",
    "optimizer_states.pt",
    "strategy_state.safetensors",
]


@pytest.mark.parametrize("damage", [_flip, _truncate])
@pytest.mark.parametrize("name", FILES)
def test_a_modified_or_truncated_file_is_detected(tmp_path, name, damage):
    """A flipped byte (the file still parses) or a truncation of any file: reading the checkpoint
    fails naming the checkpoint and the file by its relative name, never by an absolute path."""
    folder = rundir.write_checkpoint(tmp_path, _checkpoint())
    damage(folder / name)
    for read in (rundir.read_checkpoint, rundir.verify_checkpoint):
        with pytest.raises(rundir.CorruptCheckpoint) as info:
            read(folder)
        e = info.value
        assert (e.checkpoint, e.file) == ("round_0007", f"round_0007/{name}")
        assert f"round_0007/{name}" in str(e) and str(tmp_path) not in str(e)
    # Serving reads neither the moments nor the strategy state: it does not check them.
    if name in ("optimizer_states.pt", "strategy_state.safetensors"):
        assert rundir.verify_checkpoint(folder, serving=True)["round"] == 7
    else:
        with pytest.raises(rundir.CorruptCheckpoint, match=f"round_0007/{name}"):
            rundir.verify_checkpoint(folder, serving=True)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.replace('"loss": 1.5', '"loss": 0.5'),  # still valid JSON: its own sha256
        lambda s: s[: len(s) // 2],  # truncated
        lambda s: s.replace('"client_ids": [1, 4]', '"client_ids": [1, 4, 9]'),
    ],
    ids=["modified", "truncated", "client-added"],
)
def test_a_modified_or_truncated_state_json_is_detected(tmp_path, edit):
    folder = rundir.write_checkpoint(tmp_path, _checkpoint())
    path = folder / "state.json"
    path.write_text(edit(path.read_text()))
    with pytest.raises(rundir.CorruptCheckpoint, match="round_0007/state.json") as info:
        rundir.read_checkpoint(folder)
    assert str(tmp_path) not in str(info.value)


def test_a_checkpoint_from_before_checksums_still_loads_and_a_truncated_one_is_corrupt(tmp_path):
    """Run directories written before checksums (state.json without them) still resume and
    serve; a truncated file of one is caught because it does not parse."""
    folder = rundir.write_checkpoint(tmp_path, _checkpoint())
    state = json.loads((folder / "state.json").read_text())
    del state["files"], state["sha256"]
    (folder / "state.json").write_text(json.dumps(state))
    back = rundir.read_checkpoint(folder)
    assert sorted(back.client_states) == [1, 4] and sorted(back.client_banks) == [1]
    assert back.optimizer_states and back.strategy_state
    _truncate(folder / "clients" / "client_00004.safetensors")
    with pytest.raises(rundir.CorruptCheckpoint, match="client_00004.safetensors cannot be parsed"):
        rundir.read_checkpoint(folder)


def test_the_newest_valid_checkpoint_is_found_in_round_order(tmp_path):
    """Rounds are ordered by number (round_10000 after round_9999; see also test_rundir.py): a
    corrupt round_10000 falls back to round_9999, a corrupt round_9999 does not hide round_10000."""
    for rnd in (9999, 10000, 2):
        rundir.write_checkpoint(tmp_path, rundir.Checkpoint(round=rnd, global_state=_state(rnd)))
    folder, state, skipped = rundir.newest_valid_checkpoint(tmp_path)
    assert folder == rundir.round_dir(tmp_path, 10000) and state["round"] == 10000 and not skipped
    _flip(rundir.adapters_path(rundir.round_dir(tmp_path, 9999)))
    assert rundir.newest_valid_checkpoint(tmp_path)[0] == rundir.round_dir(tmp_path, 10000)
    _flip(rundir.adapters_path(rundir.round_dir(tmp_path, 10000)))
    folder, _, skipped = rundir.newest_valid_checkpoint(tmp_path)
    assert folder == rundir.round_dir(tmp_path, 2)
    assert [e.file for e in skipped] == [
        "round_10000/adapters.safetensors",
        "round_9999/adapters.safetensors",
    ]
    _flip(rundir.adapters_path(rundir.round_dir(tmp_path, 2)))
    assert rundir.newest_valid_checkpoint(tmp_path)[:2] == (None, None)


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {"vision.lora_B": torch.randn(8, 2, generator=torch.Generator().manual_seed(seed))}


# -- --resume falls back, in process ------------------------------------------------------------


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    """A finished 2-round fedavg run in process (no Ray): its run directory and final adapters."""
    from fednano_ray.federation.setup import in_process

    run = tmp_path_factory.mktemp("in-process") / "run"
    fed = in_process(load_config(TINY, ["federation.strategy=fedavg"]), run)
    fed.begin()
    for rnd in range(2):
        fed.run_round(rnd)
    return run, {k: v.clone() for k, v in fed.global_state.items()}, [r["loss"] for r in fed.rounds]


@pytest.mark.usefixtures("one_torch_thread")
def test_restore_falls_back_past_a_corrupt_checkpoint_and_ends_where_the_run_would(
    in_process_run, tmp_path, caplog
):
    """A byte flipped in the last round's adapters: restore warns naming the file, continues at
    round 1 from round 0's checkpoint, and the resumed run ends with the uninterrupted run's
    adapters and losses (round 1 rewritten, valid again). With every checkpoint corrupt, restore
    refuses, naming them."""
    from fednano_ray.federation.setup import in_process

    src, final, losses = in_process_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _flip(rundir.adapters_path(rundir.round_dir(run, 1)))
    fed = in_process(load_config(TINY, ["federation.strategy=fedavg"]), run)
    with caplog.at_level(logging.WARNING, logger="fednano_ray.federation.rounds"):
        assert fed.restore()
    assert fed.next_round == 1 and len(fed.rounds) == 1
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "round_0001/adapters.safetensors" in warned and "round_0000" in warned
    fed.run_round(1)
    for k, v in final.items():
        assert torch.equal(fed.global_state[k], v), k
    assert [r["loss"] for r in fed.rounds] == losses
    assert rundir.verify_checkpoint(rundir.round_dir(run, 1))["round"] == 1

    for rnd in (0, 1):
        _truncate(rundir.adapters_path(rundir.round_dir(run, rnd)))
    with pytest.raises(ValueError, match="no checkpoint of .* checks out.*round_0001.*round_0000"):
        fed.restore()


# -- --resume through the app (Ray), on a copy of the session's tiny run ------------------------


def _copy(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    return run


def _adapters(run: Path, rnd: int) -> dict[str, torch.Tensor]:
    return rundir.read_checkpoint(rundir.round_dir(run, rnd)).global_state


def test_resume_of_a_run_whose_newest_checkpoint_is_corrupt_falls_back_and_finishes(
    tiny_run, tmp_path, capsys
):
    """A byte flipped in adapters.safetensors of the last round of a finished run: --resume says
    so on stderr, continues from round 0's checkpoint, runs round 1 again and ends with the
    uninterrupted run's adapters and accuracy."""
    from fednano_ray.app import train

    run = _copy(tiny_run, tmp_path)
    _flip(rundir.adapters_path(rundir.round_dir(run, 1)))
    results = train(load_config(TINY), run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "round_0001/adapters.safetensors" in err and "falling back to round_0000" in err
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    a, b = _adapters(tiny_run[0], 1), _adapters(run, 1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert results["summary"]["accuracy_after"] == tiny_run[1]["summary"]["accuracy_after"]


def test_resume_refuses_a_config_that_changes_the_run_unless_forced(tiny_run, tmp_path, capsys):
    """A changed strategy and learning rate are refused, each key named old -> new with the flag
    that forces them, before anything runs; harmless changes (more rounds, the deadline) are not
    named. Forced, the run resumes, warns, and results.json records the override (kept by every
    later rewrite); the run's config.yaml is then the new one, so the next resume passes."""
    from fednano_ray.app import train

    run = _copy(tiny_run, tmp_path)
    before = rundir.results_path(run).read_bytes()
    changed = load_config(
        TINY,
        [
            "federation.strategy=fedavg",
            "train.lr=0.02",
            "federation.rounds=3",
            "federation.deadline_s=60",
        ],
    )
    with pytest.raises(ConfigError) as info:
        train(changed, run, resume=True, progress=False)
    msg = str(info.value)
    assert "federation.strategy: 'fednano' → 'fedavg'" in msg and "train.lr: 0.01 → 0.02" in msg
    assert "--force-config-change" in msg
    assert "federation.rounds" not in msg and "deadline_s" not in msg
    assert rundir.results_path(run).read_bytes() == before  # nothing ran, nothing was written
    assert rundir.read_config(run) == load_config(TINY)

    forced = load_config(TINY, ["train.lr=0.02", "federation.deadline_s=60"])
    results = train(forced, run, resume=True, force_config_change=True, progress=False)
    assert "--force-config-change" in capsys.readouterr().err
    overrides = rundir.read_results(run)["config_overrides"]
    assert results["config_overrides"] == overrides and len(overrides) == 1
    assert overrides[0]["changes"] == {"train.lr": {"old": 0.01, "new": 0.02}}
    assert overrides[0]["resumed_from"] == "round_0001"
    assert overrides[0]["forced_by"] == "--force-config-change"
    assert rundir.read_config(run).train.lr == 0.02
    from fednano_ray.app import check_resume_config

    assert check_resume_config(forced, run) == {}


def test_config_changes_are_split_into_refused_and_harmless():
    old = load_config(TINY)
    new = load_config(
        TINY,
        [
            "federation.rounds=5",
            "federation.evaluate_every=2",
            "serve.port=9000",
            "train.eval_batch_size=8",
            "federation.seed=1",
            "data.alpha=1.0",
            "trust.max_update_norm=3.0",
            "federation.strategy=fedprox",
            "model.tiny.num_layers=3",
        ],
    )
    refused, allowed = rundir.config_changes(old, new)
    assert allowed == [
        "federation.evaluate_every",
        "federation.rounds",
        "serve.port",
        "train.eval_batch_size",
    ]
    assert refused["federation.seed"] == (0, 1) and refused["data.alpha"] == (0.5, 1.0)
    assert refused["federation.strategy"] == ("fednano", "fedprox")
    assert refused["federation.strategy_options.mu"] == (rundir.CONFIG_UNSET, 0.01)
    assert refused["trust.max_update_norm"] == (None, 3.0)
    assert refused["model.tiny.num_layers"] == (2, 3)
    # Fewer rounds than the run was started with, and a tier's rank, change what it computes.
    refused, _ = rundir.config_changes(old, load_config(TINY, ["federation.rounds=1"]))
    assert refused == {"federation.rounds": (2, 1)}
    tree = old.model_dump(mode="json")
    tree["tiers"][1]["adapter_rank"] = 8
    tree["tiers"][0]["num_cpus"] = 0.5  # placement only
    refused, allowed = rundir.config_changes(old, load_config(tree))
    assert refused == {"tiers[1].adapter_rank": (4, 8)} and allowed == ["tiers[0].num_cpus"]


# -- serving -------------------------------------------------------------------------------------


def test_serving_falls_back_to_the_newest_valid_checkpoint(tiny_run, tmp_path, caplog):
    """Unpinned, serving passes over a corrupt newest checkpoint with a warning and serves the one
    before; a file only --resume reads (the optimiser moments) does not make it corrupt for
    serving."""
    from fednano_ray.models.adapter import adapter_state
    from fednano_ray.serve.ingress import Ingress

    run = _copy(tiny_run, tmp_path)
    _flip(rundir.adapters_path(rundir.round_dir(run, 1)))
    ing = Ingress(run, llm=None)
    with caplog.at_level(logging.WARNING, logger="fednano_ray.serve.ingress"):
        model = ing.load_client_model(2)
    assert model.name == "client_00002@round_0000" and not model.personal
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "round_0001/adapters.safetensors" in warned and "serving round_0000" in warned
    served = adapter_state(model.edge.adapters)
    for k, v in _adapters(run, 0).items():
        assert torch.equal(served[k], v), k
    assert ing.stats()["checkpoint"] == "round_0000"

    run = tmp_path / "moments"
    shutil.copytree(tiny_run[0], run)
    moments = rundir.round_dir(run, 1) / rundir.OPTIMIZER_STATES
    assert moments.is_file()
    _flip(moments)
    assert Ingress(run, llm=None).load_client_model(0).name == "client_00000@round_0001"
    assert rundir.newest_valid_checkpoint(run)[0] == rundir.round_dir(run, 0)  # --resume's


def test_a_pinned_corrupt_checkpoint_is_an_error_naming_it_and_the_file(tiny_run, tmp_path):
    """Pinned, a corrupt checkpoint is never replaced by another: the request fails (503) naming
    the checkpoint and the bad file, without an absolute path."""
    from fednano_ray.serve.ingress import Ingress
    from fednano_ray.serve.schemas import HTTPError

    run = _copy(tiny_run, tmp_path)
    _flip(rundir.adapters_path(rundir.round_dir(run, 1)))
    ing = Ingress(run, llm=None)
    ing.reconfigure({"checkpoint": "round_0001"})
    with pytest.raises(HTTPError) as info:
        ing.load_client_model(0)
    e = info.value
    assert e.status == 503 and "round_0001/adapters.safetensors" in e.message
    assert "pinned checkpoint round_0001" in e.message and str(tmp_path) not in e.message
    assert isinstance(e.__cause__, rundir.CorruptCheckpoint)
    ing.reconfigure({"checkpoint": "round_0000"})
    assert ing.load_client_model(0).name == "client_00000@round_0000"
    # Deploying with the corrupt pin is refused before any replica starts, naming the file.
    from fednano_ray.config import ConfigError
    from fednano_ray.serve.app import deploy_config

    with pytest.raises(ConfigError, match=r"round_0001/adapters\.safetensors"):
        deploy_config(run, checkpoint="round_0001")
    assert deploy_config(run, checkpoint="round_0000")["applications"]


def test_a_pinned_older_checkpoint_is_the_only_one_read(tiny_run, tmp_path, monkeypatch):
    """The newest checkpoint is unreadable garbage: a replica pinned to round_0000 (Serve builds it,
    then reconfigures it with the pin) still starts and serves, and reads no file of round_0001."""
    from fednano_ray.serve.ingress import Ingress

    run = _copy(tiny_run, tmp_path)
    newest = rundir.round_dir(run, 1)
    for name in ("state.json", "adapters.safetensors"):
        (newest / name).write_bytes(b"\x00garbage")
    real = Path.read_bytes
    read: list[Path] = []

    def spy(self):
        read.append(Path(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", spy)
    ing = Ingress(run, llm=None)
    ing.reconfigure({"checkpoint": "round_0000"})
    assert ing.load_client_model(1).name == "client_00001@round_0000"
    assert rundir.round_dir(run, 0) / "adapters.safetensors" in read
    assert not [p for p in read if p.is_relative_to(newest)]
