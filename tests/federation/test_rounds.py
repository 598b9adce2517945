"""The round logic without Ray: plain ClientActor objects, one in-process frozen LLM, the
in-process transport. Quorum, screening, SecAgg with a dropout, resume and personalisation are
checked here as the coordinator actor runs them (tests/actors run the same code over Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fednano_ray.actors.client import ClientActor
from fednano_ray.config import load_config
from fednano_ray.federation import rundir
from fednano_ray.federation.setup import in_process
from fednano_ray.federation.transport import InProcess

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(*overrides: str):
    return load_config("examples/tiny.yaml", ["federation.rounds=2", *overrides])


def _run(fed, rounds: int | None = None):
    fed.begin()
    for rnd in range(fed.next_round, rounds if rounds is not None else fed.cfg.federation.rounds):
        fed.run_round(rnd)
    return fed


class Faulty(InProcess):
    """A test-only transport that fails chosen calls, as a crashed actor would."""

    def __init__(self, fail: set[tuple[str, int]]):
        super().__init__()
        self.fail = fail

    def submit(self, actor, method, *args, **kwargs):
        client = (
            args[1]
            if method.startswith("secagg")
            else args[0]
            if method.startswith("fit")
            else None
        )
        if (method, client) in self.fail:
            return super().submit(self, "_crash", method, client)
        return super().submit(actor, method, *args, **kwargs)

    @staticmethod
    def _crash(method, client):
        raise RuntimeError(f"injected: {method} of client {client} crashed")


class Stalled(InProcess):
    """A test-only transport on which chosen fits never finish (a hung actor), by event, not by
    wall time: the other calls are done when submitted, the stalled ones never are, so the round's
    deadline is what ends the wait whatever the machine's speed. Restarts are recorded."""

    def __init__(self, stall: set[tuple[str, int]]):
        super().__init__()
        self.stall, self.restarted = stall, []

    def submit(self, actor, method, *args, **kwargs):
        if any(method == m and args and args[0] == c for m, c in self.stall):
            self.calls.append((method, args))
            return _Hung(actor)
        return super().submit(actor, method, *args, **kwargs)

    def wait(self, pending, timeout):
        done = [p for p in pending if not isinstance(p, _Hung)]
        return done[:1], [p for p in pending if p is not (done[0] if done else None)]

    def restart(self, actor):
        self.restarted.append(actor)


class _Hung:
    def __init__(self, actor):
        self.actor = actor


class NaNClient(ClientActor):
    """Client 1 returns a NaN tensor (a broken client; screening must reject it)."""

    def fit(self, client_id, *args, **kwargs):
        out = super().fit(client_id, *args, **kwargs)
        if client_id == 1 and "state" in out:
            key = min(out["state"])
            out["state"][key] = torch.full_like(out["state"][key], math.nan)
        return out


def test_a_run_in_process_writes_the_run_directory_and_moves_the_adapters(tmp_path):
    fed = _run(in_process(tiny(), tmp_path))
    results = fed.finish(0.0)
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    for r in results["rounds"]:
        assert r["completed"] == [0, 1, 2, 3] and r["failures"] == [] and r["aggregated"]
        assert r["bytes_up"] == 2 * r["bytes_down"] > 0  # fednano: adapters + Fisher up
    assert [p.name for p in rundir.list_checkpoints(tmp_path)] == ["round_0000", "round_0001"]
    assert (
        rundir.read_results(tmp_path)["summary"]["accuracy_after"]
        == results["summary"]["accuracy_after"]
    )
    moved = sum(
        float((fed.global_state[k] - fed.initial_state[k]).abs().sum()) for k in fed.global_state
    )
    assert moved > 0


def test_failed_clients_are_recorded_and_the_quorum_decides(tmp_path):
    """One crashed client of four: recorded, the round aggregates the other three. Three crashed
    (quorum 0.5 needs 2): nothing is aggregated and the global adapters stay as they were."""
    one = _run(in_process(tiny(), tmp_path / "one", transport=Faulty({("fit", 2)})), rounds=1)
    r0 = one.rounds[0]
    assert r0["completed"] == [0, 1, 3] and r0["aggregated"]
    assert r0["failures"] == [
        {"client_id": "2", "reason": "RuntimeError: injected: fit of client 2 crashed"}
    ]

    fed = in_process(
        tiny(), tmp_path / "three", transport=Faulty({("fit", 0), ("fit", 1), ("fit", 3)})
    )
    before = {k: v.clone() for k, v in fed.global_state.items()}
    _run(fed, rounds=1)
    r0 = fed.rounds[0]
    assert r0["aggregated"] is False and r0["completed"] == [2]
    assert r0["note"].startswith("quorum not met: 1 of 4 reported, 2 needed")
    assert all(torch.equal(fed.global_state[k], before[k]) for k in before)


def test_a_stalled_client_misses_the_deadline_and_its_actor_is_restarted(tmp_path):
    """Client 2's fit never finishes: at the deadline it is a failure naming it, the other three
    are aggregated, and the actor it hung on is restarted (its queue is cleared); the next round
    samples it again."""
    transport = Stalled({("fit", 2)})
    fed = in_process(tiny("federation.deadline_s=0.5"), tmp_path, transport=transport)
    _run(fed, rounds=1)
    r0 = fed.rounds[0]
    assert r0["completed"] == [0, 1, 3] and r0["aggregated"]
    assert r0["failures"] == [{"client_id": "2", "reason": "deadline of 0.5 s exceeded"}]
    assert transport.restarted == [fed.placement.actor_for(2)]
    transport.stall.clear()
    fed.run_round(1)
    assert fed.rounds[1]["completed"] == [0, 1, 2, 3] and transport.restarted == [
        fed.placement.actor_for(2)
    ]


def test_a_nan_update_is_rejected_not_aggregated(tmp_path):
    fed = _run(
        in_process(tiny("federation.strategy=fedavg"), tmp_path, client_class=NaNClient), rounds=1
    )
    r0 = fed.rounds[0]
    assert r0["completed"] == [0, 2, 3] and r0["aggregated"]
    assert [f["client_id"] for f in r0["failures"]] == ["1"] and r0["failures"][0][
        "reason"
    ].startswith("rejected:")
    assert all(torch.isfinite(v).all() for v in fed.global_state.values())


def test_secure_aggregation_in_process_matches_the_plain_round_and_survives_a_dropout(tmp_path):
    """The SecAgg uplink (the clients' code, the server's protocol) gives the plain round's FedAvg
    up to quantisation; a client that dies before unmasking is recovered from its shares and its
    masked input still counts."""
    plain = _run(in_process(tiny("federation.strategy=fedavg"), tmp_path / "plain"), rounds=1)
    secure = _run(
        in_process(
            tiny("federation.strategy=fedavg", "trust.secure_aggregation=true"), tmp_path / "secure"
        ),
        rounds=1,
    )
    info = secure.rounds[0]["secure_aggregation"]
    assert info["masked_by"] == "clients" and secure.rounds[0]["aggregated"]
    for k, v in plain.global_state.items():
        torch.testing.assert_close(secure.global_state[k], v, atol=1e-5, rtol=0)
    late = _run(
        in_process(
            tiny("federation.strategy=fedavg", "trust.secure_aggregation=true"),
            tmp_path / "late",
            transport=Faulty({("secagg_unmask", 3)}),
        ),
        rounds=1,
    )
    r0 = late.rounds[0]
    assert r0["aggregated"] and r0["secure_aggregation"]["dropped_before_unmask"] == ["3"]
    for k, v in plain.global_state.items():
        torch.testing.assert_close(late.global_state[k], v, atol=1e-5, rtol=0)


def test_resume_from_the_checkpoint_continues_exactly(tmp_path):
    """fedavgm (a strategy with state) cut after round 0: a new federation restored from the
    checkpoint ends with the uninterrupted run's adapters and records."""
    cfg = tiny("federation.strategy=fedavgm", "federation.strategy_options.momentum=0.5")
    full = _run(in_process(cfg, tmp_path / "full"))
    _run(in_process(cfg, tmp_path / "cut"), rounds=1)
    resumed = in_process(cfg, tmp_path / "cut")
    assert resumed.restore() and resumed.next_round == 1 and resumed.strategy.velocity
    _run(resumed)
    for k, v in full.global_state.items():
        assert torch.equal(resumed.global_state[k], v), k
    assert [r["loss"] for r in resumed.rounds] == [r["loss"] for r in full.rounds]
    # The checkpointed velocity: round 0's is its move from the init, round 1's its move from round
    # 0; round 0's is not zero, so a resume that lost it would have ended elsewhere.
    g0, g1 = (rundir.read_checkpoint(rundir.round_dir(tmp_path / "full", r)) for r in (0, 1))
    for k, init in full.initial_state.items():
        torch.testing.assert_close(g0.strategy_state[f"velocity.{k}"], g0.global_state[k] - init)
        torch.testing.assert_close(
            g1.strategy_state[f"velocity.{k}"], g1.global_state[k] - g0.global_state[k]
        )
    assert any(float(v.abs().sum()) > 0 for v in g0.strategy_state.values())
    assert full.results()["strategy"]["server_momentum"] == 0.5


def test_personalisation_gives_every_client_its_own_adapters(tmp_path):
    fed = _run(
        in_process(tiny("federation.strategy=fedavg", "federation.personalize_steps=2"), tmp_path),
        rounds=1,
    )
    record = fed.personalize()
    assert record["personalized_clients"] == [0, 1, 2, 3] and record["failures"] == []
    assert sorted(fed.client_states) == [0, 1, 2, 3]
    assert fed.client_states[0]["vision.lora_A"].shape[0] == 2  # at its tier's rank
    assert "accuracy_personalized" in fed.summary
    assert fed.personalize() == {}  # idempotent (as under --resume)
    ckpt = rundir.read_checkpoint(rundir.latest_checkpoint(tmp_path))
    assert sorted(ckpt.client_states) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def full_fedavg(tmp_path_factory):
    """The uninterrupted 2-round fedavg run, in process."""
    return _run(in_process(tiny("federation.strategy=fedavg"), tmp_path_factory.mktemp("full")))


@pytest.mark.parametrize("where", ["fit", "checkpoint"])
def test_a_run_killed_mid_round_or_mid_checkpoint_write_resumes_exactly(
    tmp_path, where, full_fedavg
):
    """A real kill (SIGKILL of the process running the federation) while round 1 trains, or while
    round 1's checkpoint is being written (every file on disk but state.json, which is still its
    temporary file): --resume starts again from round 0's checkpoint, clears the dead writer's
    temporary file, and ends with the uninterrupted run's adapters and losses."""
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    script = Path(__file__).resolve().parent / "_killable.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run), where, "--set", "federation.strategy=fedavg"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # blocks until the run reaches the point (or exits)
        assert line.strip() == f"hanging {where}", (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()

    assert [p.name for p in rundir.list_checkpoints(run)] == ["round_0000"]
    half = rundir.round_dir(run, 1)
    if where == "checkpoint":
        assert rundir.adapters_path(half).exists() and not (half / rundir.STATE).exists()
        assert [p.name.split(".")[1] for p in half.glob(".*.tmp")] == [
            "state"
        ]  # what the kill left
    resumed = in_process(tiny("federation.strategy=fedavg"), run)
    assert resumed.restore() and resumed.next_round == 1
    _run(resumed)
    for k, v in full_fedavg.global_state.items():
        assert torch.equal(resumed.global_state[k], v), k
    assert [r["loss"] for r in resumed.rounds] == [r["loss"] for r in full_fedavg.rounds]
    assert not list(run.rglob("*.tmp"))
