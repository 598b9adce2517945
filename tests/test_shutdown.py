"""SIGTERM stops ``fednano-ray train`` and ``fednano-ray serve`` cleanly (issue 14, item 7).

Both commands run as real processes, each in a session of its own and without ``--address``, so
each starts a Ray instance of its own (gcs_server, raylet, the dashboard and runtime-env agents,
workers: all in that session). One SIGTERM, as a scheduler, ``docker stop`` or ``kill`` sends it,
must end the command with its own exit status (not Ray's abort) and leave none of those processes
behind; ``train`` must leave a run that ``--resume`` continues: its newest complete checkpoint,
and a results.json that matches it.

Exit status: ``train`` exits 143 (128 + SIGTERM), as a shell reports a command a signal ended,
since the run is interrupted, not finished; ``serve`` exits 0, since being stopped is how a server
ends.

``serve`` serves the run the interrupted ``train`` left: an interrupted run is servable, and no
second training run (or the shared test cluster) has to start for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from fednano_ray.federation import rundir

pytestmark = pytest.mark.timeout(600)

ROUNDS = 50  # far more than run before the signal: it always arrives mid-run
#: How long each command may take to go down after the signal (it takes a few seconds).
EXIT_S = 90
#: How long the processes of its session may outlive it (the command waits for them itself).
GRACE_S = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen, Path, Path]:
    """``python -m fednano_ray ARGS`` in a new session, its own Ray (no RAY_ADDRESS), output to
    files (a full pipe would stall it)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fednano_ray", *args],
            stdout=o,
            stderr=e,
            env=env,
            start_new_session=True,
        )
    return proc, out, err


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _in_session(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(p.pid) == sid and _alive(p):
                found.append(p)
    return found


def _processes(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The command, its descendants and everything else in its session, by pid."""
    root = psutil.Process(proc.pid)
    return {p.pid: p for p in [root, *root.children(recursive=True), *_in_session(proc.pid)]}


def _describe(procs: list[psutil.Process]) -> str:
    names = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {p.name()} ({' '.join(p.cmdline())[:80]})")
    return "; ".join(names)


def _left_behind(proc: subprocess.Popen, before: dict[int, psutil.Process]) -> list[psutil.Process]:
    """What of ``before`` and of the session is still alive after the grace period."""
    end = time.monotonic() + GRACE_S
    while True:
        left = [p for p in before.values() if _alive(p)]
        left += [p for p in _in_session(proc.pid) if p.pid not in before]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.5)


def _kill_all(proc: subprocess.Popen, before: dict[int, psutil.Process]) -> None:
    """Whatever a failed check left of the command's processes: kill it."""
    if proc.poll() is None:
        proc.kill()
    for p in [*before.values(), *_in_session(proc.pid)]:
        with contextlib.suppress(psutil.Error):
            if _alive(p):
                p.kill()
    proc.wait(30)


def _stop(proc: subprocess.Popen) -> tuple[dict[int, psutil.Process], float]:
    """Send ONE SIGTERM; returns the processes there were before it, and seconds to exit."""
    before = _processes(proc)
    names = []
    for p in before.values():
        with contextlib.suppress(psutil.Error):
            names.append(p.name())
    # It runs a Ray instance of its own: the daemons that used to be orphaned are in its session.
    assert "raylet" in names and "gcs_server" in names, names
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"one SIGTERM did not end the command within {EXIT_S} s")
    return before, time.monotonic() - t0


@pytest.fixture(scope="module")
def interrupted_train(tmp_path_factory):
    """``fednano-ray train`` of examples/tiny.yaml stopped by SIGTERM once its first round is
    checkpointed: ``(run_dir, returncode, seconds to exit, stderr, processes left)``."""
    tmp = tmp_path_factory.mktemp("sigterm-train")
    run = tmp / "run"
    args = ["train", "examples/tiny.yaml", "--run-dir", str(run)]
    proc, _, err = _start([*args, "--set", f"federation.rounds={ROUNDS}"], tmp / "train")
    before: dict[int, psutil.Process] = {}
    try:
        end = time.monotonic() + 300
        while rundir.latest_checkpoint(run) is None or not rundir.results_path(run).is_file():
            if proc.poll() is not None:
                pytest.fail(f"train exited with {proc.returncode}:\n{err.read_text()[-3000:]}")
            if time.monotonic() > end:
                pytest.fail(f"no checkpoint in 300 s:\n{err.read_text()[-3000:]}")
            time.sleep(0.5)
        before, seconds = _stop(proc)
        left = _left_behind(proc, before)
        return run, proc.returncode, seconds, err.read_text(), _describe(left)
    finally:
        _kill_all(proc, before)


def test_sigterm_stops_train_with_a_resumable_run_and_no_processes_left(interrupted_train):
    run, returncode, seconds, stderr, left = interrupted_train
    assert not left, f"left behind after {GRACE_S} s: {left}"
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]  # not Ray's abort (-6)
    assert "SIGTERM received" not in stderr  # Ray's C++ handler (it aborts) never ran
    assert f"interrupted ({signal.SIGTERM.name})" in stderr
    assert f"--run-dir {run} --resume" in stderr and f"federation.rounds={ROUNDS}" in stderr
    # What --resume reads: a complete checkpoint that checks out, no incomplete one after it, and
    # a results.json that parses and has exactly that checkpoint's rounds.
    newest, state, skipped = rundir.newest_valid_checkpoint(run)
    assert newest is not None and not skipped and newest == rundir.latest_checkpoint(run)
    last = rundir.checkpoint_round(newest.name)
    assert last < ROUNDS - 1  # it stopped mid-run
    assert sorted(p.name for p in (run / rundir.CHECKPOINTS).iterdir()) == [
        rundir.round_name(r) for r in range(last + 1)
    ]
    results = rundir.load_results(run)
    assert [r.round for r in results.rounds] == list(range(last + 1))
    assert rundir.read_results(run)["rounds"] == state["rounds"]
    assert not results.summary.finished
    assert str(newest) in stderr
    assert seconds < EXIT_S


def test_sigterm_stops_serve_with_no_processes_left(interrupted_train, tmp_path):
    trained = interrupted_train[0]
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc, out, err = _start(["serve", str(run), "--port", str(port)], tmp_path / "serve")
    before: dict[int, psutil.Process] = {}
    try:
        end = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{err.read_text()[-3000:]}")
            if time.monotonic() > end:
                pytest.fail(f"no /healthz in 300 s:\n{err.read_text()[-3000:]}")
            # Ready once it printed its URLs (/healthz answers a little before).
            with contextlib.suppress(httpx.HTTPError):
                if (
                    f"{url}/docs" in out.read_text()
                    and httpx.get(f"{url}/healthz", timeout=2).status_code == 200
                ):
                    break
            time.sleep(1)
        before, _ = _stop(proc)
        left = _left_behind(proc, before)
        stderr = err.read_text()
        assert not left, f"left behind after {GRACE_S} s: {_describe(left)}"
        assert proc.returncode == 0, stderr[-3000:]
        assert "shutting down" in stderr and "SIGTERM received" not in stderr
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        _kill_all(proc, before)


def test_an_interrupted_run_is_settled_at_its_newest_checkpoint(interrupted_train, tmp_path):
    """What train does after it stopped the coordinator, on the two states a kill mid-checkpoint
    leaves: a checkpoint folder without state.json, and a results.json a round behind."""
    from fednano_ray.app import settle_interrupted_run

    run = tmp_path / "run"
    shutil.copytree(interrupted_train[0], run)
    newest = rundir.latest_checkpoint(run)
    state = rundir.read_checkpoint_state(newest)
    half = rundir.round_dir(run, rundir.checkpoint_round(newest.name) + 1)
    half.mkdir()
    shutil.copy(rundir.adapters_path(newest), rundir.adapters_path(half))  # no state.json yet
    behind = rundir.read_results(run)
    behind["rounds"] = behind["rounds"][:-1]
    rundir.write_results(run, behind)

    assert settle_interrupted_run(run) == newest
    assert not half.exists()
    assert rundir.read_results(run)["rounds"] == state["rounds"]
    assert rundir.load_results(run).config == behind["config"]  # the rest is kept
