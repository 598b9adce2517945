"""Federated runs on a simulated multi-node Ray cluster: run directory, faults, resume,
placement.
"""

import threading
import time

import pytest
import torch
from _chaos import chaos_client
from safetensors.torch import load_file

from fednano_ray.app import train
from fednano_ray.config import load_config
from fednano_ray.federation import rundir


def tiny(*overrides: str):
    return load_config("examples/tiny.yaml", list(overrides))


def _adapters(run, rnd: int):
    return load_file(str(rundir.adapters_path(rundir.round_dir(run, rnd))))


@pytest.fixture(scope="module")
def fedavg_run(ray_cluster, tmp_path_factory):
    """One fedavg run of tiny.yaml (2 rounds, then 3 personalisation steps per client):
    test_other_strategies' fedavg case, the personalisation test, and the reference of the
    secure-aggregation run (personalisation leaves the global adapters as they were). Its adapters
    are adapter.kind=slots (a learned offset per visual slot, a tensor without a rank, beside the
    paper's low-rank residual), so federation, SecAgg, personalisation and serving are tested on a
    second form."""
    run = tmp_path_factory.mktemp("fedavg") / "run"
    return run, train(tiny(*FEDAVG_SLOTS, "federation.personalize_steps=3"), run, progress=False)


FEDAVG_SLOTS = ("federation.strategy=fedavg", "adapter.kind=slots")


def test_run_writes_the_run_directory(tiny_run):
    """A tiny FedNano run writes config.yaml, results.json with the DESIGN §4 summary, and per-round
    checkpoints.
    """
    run, res = tiny_run

    on_disk = rundir.read_results(run)
    s = on_disk["summary"]
    for key in (
        "accuracy_before",
        "accuracy_after",
        "global_test_accuracy",
        "bytes_up",
        "bytes_down",
        "client_storage_fraction",
        "wall_time_s",
    ):
        assert key in s, key
    assert 0 <= s["accuracy_after"] <= 1 and 0 < s["client_storage_fraction"] < 1
    assert rundir.read_config(run) == tiny()
    assert [r["round"] for r in on_disk["rounds"]] == [0, 1]
    for r in on_disk["rounds"]:
        assert r["failures"] == [] and r["completed"] == [0, 1, 2, 3] and r["aggregated"]
        # fednano sends adapters + same-size Fisher up, global adapters (at each client's rank)
        # down.
        assert r["bytes_up"] == 2 * r["bytes_down"] > 0
    # Heterogeneous ranks: the global adapters live at the largest tier rank (4), HetLoRA-style.
    ckpt = _adapters(run, 1)
    assert ckpt["vision.lora_A"].shape == (4, 128) and ckpt["text.lora_B"].shape == (128, 4)
    assert ckpt["vision.lora_B"].abs().sum() > 0  # trained away from the B = 0 init
    assert (
        res["trainer_stats"]["requests"] >= 4 * 2 * 2
    )  # every split step went through the LLM trainer
    # The reported global test accuracy is that of the final global adapters (and "before" that of
    # the pretrained ones): the record names the adapters it scored, and re-scoring both in-process
    # agrees.
    from fednano_ray.actors.coordinator import adapters_fingerprint

    assert on_disk["rounds"][-1]["global_test_adapters"] == adapters_fingerprint(ckpt)
    assert s["global_test_accuracy"] == pytest.approx(_global_test_accuracy(tiny(), ckpt))
    assert s["global_test_accuracy_before"] == pytest.approx(_global_test_accuracy(tiny(), None))


def _global_test_accuracy(cfg, adapters) -> float:
    """Accuracy on the global test split of the tiny model with ``adapters`` (None: B = 0,
    pretrained).
    """
    from fednano_ray.features import cached_features
    from fednano_ray.models.adapter import load_adapter_state
    from fednano_ray.models.build import build_mllm
    from fednano_ray.task import prepare_data
    from fednano_ray.training import LocalServer, evaluate

    mllm = build_mllm(cfg.model)
    data = prepare_data(cfg)
    edge, server_llm = mllm.split(
        cfg.adapter,
        r=max(cfg.tier_rank(t) for t in cfg.tiers),
        autocast_bf16=cfg.model.runtime_precision().autocast_bf16,
    )
    if adapters is not None:
        load_adapter_state(edge.adapters, adapters)
    questions = [
        ([mllm.encode_row(e.question, c) for c in e.choices], e.answer, e.category)
        for e in data.test
    ]
    feats = cached_features(mllm, "", data.test, None)
    return evaluate(edge, LocalServer(server_llm), feats, questions, pad_id=mllm.pad_id)["accuracy"]


def test_faults_become_failures_and_the_rounds_go_on_until_the_quorum_fails(ray_cluster, tmp_path):
    """One 3-round run (deployment mode, quorum 0.5 = 2 of 4) with every kind of fault: round 0, a
    client process dies and a NaN update is rejected; round 1, another dies and a 1000x-scaled
    update is rejected (trust.max_update_norm); both rounds aggregate the others, and the actor
    that died in round 0 is back (Ray restarted it). Round 2: three faults leave one report, the
    quorum fails and the global adapters stay as they were. Every fault is an event (a process
    exit, a bad upload), none a wait: the deadline is tiny.yaml's 120 s, which no honest client
    comes near, so the failure lists do not depend on the machine's speed (a stall past the
    deadline is tests/federation/test_rounds.py's). (One run instead of three: each costs ~40 s
    of this 2-core machine.)"""
    cfg = tiny("federation.mode=deployment", "federation.rounds=3", "trust.max_update_norm=10")
    chaos = {
        (0, 1): "die",
        (0, 0): "nan",
        (1, 2): "die",
        (1, 3): "scale",
        (2, 0): "die",
        (2, 1): "nan",
        (2, 2): "die",
    }
    res = train(cfg, tmp_path / "run", client_class=chaos_client(cfg, chaos), progress=False)

    r0, r1, r2 = rundir.read_results(tmp_path / "run")["rounds"]
    reasons = [{f["client_id"]: f["reason"] for f in r["failures"]} for r in (r0, r1, r2)]
    # Round 0: a dead process, a NaN update
    assert sorted(reasons[0]) == ["0", "1"] and "Actor" in reasons[0]["1"]
    assert reasons[0]["0"].startswith("rejected: state key") and "NaN" in reasons[0]["0"]
    assert r0["completed"] == [2, 3] and r0["aggregated"]
    # Round 1: a dead process, a scaled update; round 0's dead client reports again
    assert sorted(reasons[1]) == ["2", "3"] and "Actor" in reasons[1]["2"]
    assert reasons[1]["3"].startswith("rejected: update norm ||θ − θ_global|| = ")
    assert "exceeds trust.max_update_norm = 10" in reasons[1]["3"]
    assert r1["completed"] == [0, 1] and r1["aggregated"]
    # Round 2: one report of the two the quorum needs
    assert sorted(reasons[2]) == ["0", "1", "2"] and r2["completed"] == [3]
    assert not r2["aggregated"] and "quorum not met" in r2["note"]
    assert res["summary"]["rejected_updates"] == 3 and res["summary"]["failures"] == 7
    ckpt1, ckpt2 = _adapters(tmp_path / "run", 1), _adapters(tmp_path / "run", 2)
    assert all(torch.equal(ckpt2[k], ckpt1[k]) for k in ckpt1)  # the failed quorum changed nothing
    assert all(bool(torch.isfinite(v).all()) for v in ckpt1.values())
    assert max(float(v.abs().max()) for v in ckpt1.values()) < 10  # the 1000x update did not land
    assert ckpt1["vision.lora_B"].abs().sum() > 0  # rounds 0 and 1 did aggregate


def test_resume_ends_with_the_same_adapters(tiny_run, tmp_path):
    """A run killed after round 0 and resumed ends with the adapters of an uninterrupted run (same
    seed): the adapters and each client's optimiser moments come back from the checkpoint."""
    full_dir, _ = tiny_run
    cfg = tiny()
    train(cfg, tmp_path / "cut", progress=False, stop_after_round=0)
    assert not rundir.round_dir(tmp_path / "cut", 1).exists()
    # train.optimizer_state=keep: the clients' AdamW moments are part of the checkpoint, one per
    # client.
    moments = rundir.read_checkpoint(rundir.round_dir(tmp_path / "cut", 0)).optimizer_states
    assert sorted(moments) == [0, 1, 2, 3] and all(
        int(s["step"]) == 2 for s in moments[0]["state"].values()
    )
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "cut", progress=False)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)

    assert [r["round"] for r in resumed["rounds"]] == [0, 1]
    # fp32 (tiny.yaml): two runs of one config, and a cut-and-resumed one, agree to the bit (DESIGN:
    # same config and seed, same accuracies), although the LLM trainer batched their split steps
    # differently.
    a, b = _adapters(full_dir, 1), _adapters(tmp_path / "cut", 1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full, cut = (rundir.read_results(d) for d in (full_dir, tmp_path / "cut"))
    for key in (
        "accuracy_before",
        "accuracy_after",
        "global_test_accuracy_before",
        "global_test_accuracy",
        "accuracy_after_per_client",
    ):
        assert full["summary"][key] == cut["summary"][key], key
    assert [r["loss"] for r in full["rounds"]] == [r["loss"] for r in cut["rounds"]]
    runtime = full["runtime"]
    assert runtime["precision"]["name"] == runtime["llm_trainer"]["precision"]["name"] == "fp32"
    assert runtime["hardware"]["cpu_model"] and "bit-identical" in runtime["reproducibility"]


def test_llm_trainer_killed_mid_round_is_restarted_and_the_round_completes(tiny_run, tmp_path):
    """Client 1 kills the LLM trainer actor (ray.kill: SIGKILL) in round 0 with its second split
    step in flight. Ray restarts the trainer, whose __init__ reloads the frozen LLM, and re-sends
    the in-flight calls (max_task_retries=-1): the round completes with every client, results.json
    records the restart, and the run ends with the adapters of an uninterrupted run (same seed)."""
    cfg = tiny()
    train(
        cfg,
        tmp_path / "run",
        client_class=chaos_client(cfg, {(0, 1): "kill_trainer"}),
        progress=False,
    )

    r0, r1 = rundir.read_results(tmp_path / "run")["rounds"]
    assert r0["trainer_restarted"] is True and r1["trainer_restarted"] is False
    for r in (r0, r1):
        assert r["failures"] == [] and r["completed"] == [0, 1, 2, 3] and r["aggregated"], r
    # The restarted trainer is the same frozen LLM, and no split step was lost or applied twice.
    ref, got = _adapters(tiny_run[0], 1), _adapters(tmp_path / "run", 1)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "local", "centralized"])
def test_other_strategies_run(ray_cluster, tmp_path, strategy, request):
    """Every strategy completes a round; local keeps per-client adapters, centralized trains one
    pooled client.

    The tiers have ranks 2 and 4. centralized's pooled client trains at the largest rank (4, the
    rank it is scored at), not at client 0's (2); local scores the global test with every client's
    own adapters, each on an actor of its own tier (a rank-2 state does not fit a rank-4 actor), so
    all 4 states count."""
    if strategy == "fedavg":  # the module's shared fedavg run (2 rounds): its first round
        run, res = request.getfixturevalue("fedavg_run")
    else:
        run = tmp_path / "run"
        res = train(
            tiny(f"federation.strategy={strategy}", "federation.rounds=1"), run, progress=False
        )
    r0 = res["rounds"][0]
    ckpt = rundir.round_dir(run, 0)
    if strategy == "centralized":
        assert r0["clients"] == [0] and r0["completed"] == [0]
        state = load_file(str(rundir.adapters_path(ckpt)))
        assert state["vision.lora_A"].shape == (4, 128) and state["vision.lora_B"].shape == (128, 4)
        # Trained at rank 4: the components beyond client 0's rank 2 moved (a rank-2 update pads
        # them with 0).
        assert (
            state["vision.lora_B"][:, 2:].abs().sum() > 0
            and state["text.lora_B"][:, 2:].abs().sum() > 0
        )
    else:
        assert r0["completed"] == [0, 1, 2, 3]
    if strategy == "local":
        assert len(list((ckpt / rundir.CLIENTS).glob("*.safetensors"))) == 4
        assert load_file(str(rundir.client_adapters_path(ckpt, 0)))["vision.lora_A"].shape == (
            2,
            128,
        )
        assert (
            r0["global_test_states_scored"] == 4
        )  # every client's own adapters, rank-2 tier included
    else:
        assert r0["global_test_states_scored"] == 1
    assert "eval_failures" not in r0, r0.get("eval_failures")
    assert r0["global_test_accuracy"] is not None
    assert res["summary"]["strategy"] == strategy


def test_personalisation_fine_tunes_every_client_and_serves_it_its_own(fedavg_run):
    """personalize_steps: after the rounds, each client fine-tunes the global adapters on its own
    data (at its own rank); the last checkpoint holds them, the summary scores them beside the
    global ones (held-out and global test), and the serving side loads each client's own, not the
    global ones."""
    # Prepare
    from fednano_ray.models.adapter import adapter_state
    from fednano_ray.serve.ingress import Ingress

    run, res = fedavg_run
    s = res["summary"]
    global_state = _adapters(run, 1)
    ckpt = rundir.round_dir(run, 1)

    # Assert: the record and the summary
    assert (
        s["personalization"]["personalized_clients"] == [0, 1, 2, 3]
        and s["personalization"]["failures"] == []
    )
    assert (
        set(s["accuracy_personalized_per_client"])
        == set(s["accuracy_after_per_client"])
        == {"0", "1", "2", "3"}
    )
    for key in ("accuracy_personalized", "global_test_accuracy_personalized"):
        assert 0 <= s[key] <= 1, key
        lo, hi = s[key + "_ci95"]
        assert lo <= s[key] <= hi, key
    # Assert: each client's own adapters, at its tier's rank, trained away from the global ones
    for c, rank in ((0, 2), (1, 2), (2, 4), (3, 4)):
        own = load_file(str(rundir.client_adapters_path(ckpt, c)))
        assert own["vision.lora_B"].shape == (128, rank)
        assert (
            own["vision.offset"].shape == global_state["vision.offset"].shape
        )  # no rank: whole on every tier
        assert not torch.equal(own["vision.offset"], global_state["vision.offset"])
        assert not torch.equal(own["vision.lora_B"], global_state["vision.lora_B"][:, :rank])
        # Assert: serving loads them for that client
        model = Ingress(run, llm=None).load_client_model(c)
        assert model.personal
        got = adapter_state(model.edge.adapters)
        assert all(torch.equal(got[k], own[k]) for k in own)


def test_tiers_are_placed_on_their_nodes_and_a_lost_node_does_not_stop_the_run(
    ray_cluster, tmp_path
):
    """Clients land on the node advertising their tier's resource; removing a node mid-run fails
    only its clients.

    The lost node's actors wait for a node to restart on, so their calls end at the deadline: 20 s,
    which an honest tiny fit (about 1 s on 2 cores) never nears, so only they fail."""
    cluster, nodes = ray_cluster
    cfg = tiny(
        "federation.mode=deployment",
        "federation.deadline_s=20",
        "tiers.0.resources={edge-small: 1}",
        "tiers.1.resources={edge-large: 1}",
    )
    run = tmp_path / "run"
    out: dict = {}

    def run_it():
        try:
            out["res"] = train(cfg, run, progress=False)
        except Exception as e:  # noqa: BLE001 -- surfaced by the assertion below
            out["error"] = e

    worker = threading.Thread(target=run_it)
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and rundir.latest_checkpoint(run) is None:
        time.sleep(0.2)
    large = nodes["edge-large"]
    cluster.remove_node(large)
    worker.join(timeout=180)
    nodes["edge-large"] = cluster.add_node(
        num_cpus=2, resources={"edge-large": 4}
    )  # restore for other tests
    cluster.wait_for_nodes()

    assert not worker.is_alive(), "the run did not finish after the node was removed"
    assert "error" not in out, f"the run failed: {out.get('error')!r}"
    assert (
        out["res"]["coordinator_node"] == cluster.head_node.node_id
    )  # never on a removable client node
    rounds = out["res"]["rounds"]
    placement = rounds[0]["placement"]
    assert {placement["0"], placement["1"]} == {nodes["edge-small"].node_id}
    assert {placement["2"], placement["3"]} == {large.node_id}
    assert len(rounds) == 2
    assert {f["client_id"] for f in rounds[1]["failures"]} == {
        "2",
        "3",
    }  # only the lost node's clients
    assert all(r["aggregated"] for r in rounds)  # quorum 0.5: the small tier carries the run
    # Their evaluation fails too, within the round's one evaluation deadline, and so does the global
    # test, which the top-rank tier's actor scores (it was on the lost node); the others are scored.
    assert {f["what"] for f in rounds[1]["eval_failures"]} == {
        "client 2",
        "client 3",
        "global test",
    }
    assert set(rounds[1]["accuracy"]) == {"0", "1"} and rounds[1]["global_test_accuracy"] is None


def test_cli_joins_an_existing_cluster_with_address(ray_cluster, tmp_path):
    """`fednano-ray train CONFIG --address ADDR` runs on an already-running cluster and prints the
    table.
    """
    import os
    import subprocess
    import sys

    cluster, _ = ray_cluster
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fednano_ray",
            "train",
            "examples/tiny.yaml",
            "--address",
            cluster.address,
            "--run-dir",
            str(run),
            "--set",
            "federation.rounds=1",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "average" in proc.stdout and "global test accuracy" in proc.stdout
    assert "Started a local Ray instance" not in proc.stderr  # it joined, it did not start its own
    assert rundir.read_results(run)["summary"]["rounds"] == 1
    # Serving tokens are created at training time, printed once, and stored only as hashes.
    printed = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if ": fnr_" in line]
    assert len(printed) == 4 and len(set(printed)) == 4
    stored = (run / rundir.TOKENS).read_text()
    assert all(tok not in stored for tok in printed)


def test_secure_aggregation_masks_on_the_clients_and_matches_the_plain_run(fedavg_run, tmp_path):
    """trust.secure_aggregation: the client actors run SecAgg's client side (own keys, own masked
    sum-plan terms); the coordinator relays keys and encrypted shares, receives only masked uint64
    vectors and unmasks the sum. Two rounds end with the adapters of a plain run (same seed), up
    to fixed-point rounding."""
    res = train(
        tiny(*FEDAVG_SLOTS, "trust.secure_aggregation=true"), tmp_path / "sec", progress=False
    )
    plain = fedavg_run[0]

    for r in rundir.read_results(tmp_path / "sec")["rounds"]:
        sa = r["secure_aggregation"]
        assert r["aggregated"] and r["failures"] == [] and r["completed"] == [0, 1, 2, 3], r
        assert sa["masked_by"] == "clients" and sa["summed"] == ["0", "1", "2", "3"]
        assert sa["dropped_before_upload"] == [] and sa["dropped_before_unmask"] == []
        # What came up: exactly four masked Z_2^64 vectors of the padded plan (n θ at rank 4, and
        # n).
        assert sa["vector_length"] == sum(v.numel() for v in _adapters(plain, 0).values()) + 1
        assert r["bytes_up"] == sa["masked_bytes_up"] == 4 * 8 * sa["vector_length"]
    assert res["summary"]["secure_aggregation"] is True
    a, b = _adapters(tmp_path / "sec", 1), _adapters(plain, 1)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_secure_aggregation_recovers_clients_that_die_after_key_sharing(ray_cluster, tmp_path):
    """Round 0: client 1 dies while training (after sharing keys): its pairwise masks are rebuilt
    from the others' shares and the sum is of clients 0, 2, 3. Round 1: client 2 uploads its masked
    input and dies before unmasking: its self-mask is rebuilt and its term stays in the sum. The
    adapters equal a plain run in which client 1 fails in round 0, run in process (the same round
    code without Ray, cut after round 0 and resumed). Both runs use adapter.kind=connector (LoRA
    inside the connector, whose vision tensors are (r, d_v) and (h, r)): SecAgg's padded plan,
    HetLoRA ranks, fault handling and resume hold for a form unlike the paper's."""
    from _chaos import failing_transport

    from fednano_ray.federation.setup import in_process

    chaos = {(0, 1): "die", (1, 2): "die_after_mask"}
    cfg = ("federation.mode=deployment", "federation.strategy=fedavg", "adapter.kind=connector")
    sec = tiny(*cfg, "trust.secure_aggregation=true")
    res = train(sec, tmp_path / "sec", client_class=chaos_client(sec, chaos), progress=False)
    # The plain reference, in process, is cut after round 0 and resumed: resume holds for this form
    # too.
    plain = tiny(*cfg)
    cut = in_process(plain, tmp_path / "plain", transport=failing_transport(plain, {(0, 1)}))
    cut.begin()
    cut.run_round(0)
    ref = in_process(plain, tmp_path / "plain")
    assert ref.restore() and ref.rounds[0]["completed"] == [0, 2, 3]
    ref.run_round(1)

    r0, r1 = res["rounds"]
    assert r0["aggregated"] and r0["completed"] == [0, 2, 3]
    assert [f["client_id"] for f in r0["failures"]] == ["1"] and "Actor" in r0["failures"][0][
        "reason"
    ]
    assert r0["secure_aggregation"]["dropped_before_upload"] == ["1"]
    assert r0["secure_aggregation"]["summed"] == ["0", "2", "3"]
    assert r1["aggregated"] and r1["completed"] == [0, 1, 2, 3] and r1["failures"] == []
    assert r1["secure_aggregation"]["dropped_before_unmask"] == ["2"]
    assert r1["secure_aggregation"]["summed"] == ["0", "1", "2", "3"]
    a, b = _adapters(tmp_path / "sec", 1), _adapters(tmp_path / "plain", 1)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert (
        b["vision.lora_A"].shape == (4, tiny().model.tiny.vision_hidden_size)
        and float(b["vision.lora_B"].abs().max()) > 0
    )  # the connector's LoRA


def test_server_lr_scales_the_rounds_move_of_the_global_adapters(tiny_run, tmp_path):
    """federation.server_lr=2: round 0 moves the global adapters twice as far from their init as the
    plain run's round 0 (same seed, fp32: the clients' updates are bit-identical, only the server's
    step differs), on the coordinator's plain aggregation path."""
    from fednano_ray.models.adapter import adapter_state
    from fednano_ray.models.build import build_mllm

    full_dir, _ = tiny_run
    cfg = tiny("federation.server_lr=2")
    train(cfg, tmp_path / "slr", progress=False, stop_after_round=0)
    edge, _ = build_mllm(cfg.model).split(
        cfg.adapter, r=max(cfg.tier_rank(t) for t in cfg.tiers), seed=cfg.federation.seed
    )
    init = adapter_state(edge.adapters)
    plain, stepped = _adapters(full_dir, 0), _adapters(tmp_path / "slr", 0)
    assert sorted(plain) == sorted(stepped) == sorted(init)
    moved = 0.0
    for k in init:
        torch.testing.assert_close(
            stepped[k] - init[k], 2 * (plain[k] - init[k]), rtol=1e-5, atol=1e-6
        )
        moved += float((plain[k] - init[k]).abs().sum())
    assert moved > 0  # round 0 did move the adapters (the comparison is not 0 == 0)
    on_disk = rundir.read_results(tmp_path / "slr")
    assert on_disk["config"]["federation"]["server_lr"] == 2.0


def test_grid_runs_a_real_cell_on_the_cluster_and_reports_it(ray_cluster, tmp_path):
    """`fednano-ray grid SPEC --address ADDR`: one real tiny cell trains on the running cluster (a
    `train` subprocess), its results.json is finished, the report is written, and a second call
    finds the cell finished and runs nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    cluster, _ = ray_cluster
    spec = tmp_path / "grid.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(Path("examples/tiny.yaml").resolve()),
                "seeds": [0],
                "runs_dir": str(tmp_path / "runs"),
                "groups": {"one": {"set": ["federation.rounds=1", "federation.strategy=fedavg"]}},
            }
        )
    )
    cmd = [sys.executable, "-m", "fednano_ray", "grid", str(spec), "--address", cluster.address]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    (cell,) = [p for p in (tmp_path / "runs").iterdir() if (p / rundir.RESULTS).exists()]
    results = rundir.read_results(cell)
    assert results["summary"]["rounds"] == 1 and results["summary"]["strategy"] == "fedavg"
    assert "Started a local Ray instance" not in (cell / rundir.GRID_LOG).read_text()  # it joined
    assert (tmp_path / "runs" / "report" / rundir.REPORT).is_file()
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "1 finished" in again.stdout, again.stdout[-2000:]
