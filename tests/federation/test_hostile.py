"""A hostile participant, in process: a client that lies about its weight, sends malformed
messages, or pushes the aggregate to overflow must fail (or be neutralised) alone, never take over
or stop the run; DP's noise and sample come from OS entropy, not from the public seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fednano_ray.config import load_config
from fednano_ray.federation import rundir
from fednano_ray.federation.setup import in_process
from fednano_ray.federation.transport import InProcess

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(*overrides: str):
    return load_config("examples/tiny.yaml", ["federation.rounds=1", *overrides])


def one_round(cfg, run_dir, transport=None):
    fed = in_process(cfg, run_dir, transport=transport)
    fed.begin()
    fed.run_round(0)
    return fed


class Tamper(InProcess):
    """A test-only transport that rewrites client ``c``'s result of ``method``: the reply a
    hostile client would send instead of the honest one."""

    def __init__(self, method: str, client: int, rewrite):
        super().__init__()
        self.method, self.client, self.rewrite = method, client, rewrite

    def submit(self, actor, method, *args, **kwargs):
        done = super().submit(actor, method, *args, **kwargs)
        client = args[1] if method.startswith("secagg") else args[0]
        if method == self.method and client == self.client and done.error is None:
            done.value = self.rewrite(done.value)
        return done


def inflate(out):
    """Claim 1e30 examples and a Fisher 1e30 times as loud."""
    out["num_examples"] = 10**30
    if out.get("fisher") is not None:
        out["fisher"] = {k: v * 1e30 for k, v in out["fisher"].items()}
    return out


def assert_same_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.isfinite(a[k]).all(), k
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


# -- 2. a client must not set its own weight -------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.strategy=fednano"],
        ["federation.strategy=fedavg"],
        ["federation.strategy=fedprox"],
        ["federation.strategy=fedavgm"],
        ["federation.strategy=fedavg", "trust.aggregator=clip", "trust.clip_norm=1.0"],
    ],
    ids=["fednano", "fedavg", "fedprox", "fedavgm", "clip"],
)
def test_inflated_example_counts_and_fisher_change_nothing(tmp_path, overrides):
    """Client 1 claims 1e30 examples and a 1e30-times Fisher: the round's aggregate is the honest
    one (the weights are the coordinator's shard sizes; each Fisher is mean-normalised)."""
    honest = one_round(tiny(*overrides), tmp_path / "honest")
    hostile = one_round(tiny(*overrides), tmp_path / "hostile", Tamper("fit", 1, inflate))
    assert hostile.rounds[0]["aggregated"] and hostile.rounds[0]["completed"] == [0, 1, 2, 3]
    assert_same_states(hostile.global_state, honest.global_state)


def test_a_client_that_concentrates_its_fisher_holds_at_most_max_share():
    """All of client h's Fisher mass on one coordinate (normalised, it is there 1000 times the
    honest clients' 1): its share of that coordinate is cut to max_share, so the merged value moves
    at most half-way to its 100 (plain Fisher merging would give ~99.7)."""
    from fednano_ray.strategies.base import ClientUpdate
    from fednano_ray.strategies.fednano import FedNano

    size = 1000
    glob = {"w": torch.zeros(size)}
    honest = [
        ClientUpdate(str(i), {"w": torch.zeros(size)}, 10, fisher={"w": torch.ones(size)})
        for i in range(3)
    ]
    spike = torch.zeros(size)
    spike[0] = 1.0
    hostile = ClientUpdate("h", {"w": torch.full((size,), 100.0)}, 10, fisher={"w": spike})
    plain = FedNano(max_share=1.0).aggregate(glob, [*honest, hostile], [])["w"]
    assert float(plain[0]) > 99
    for share in (0.5, 0.4):  # below 1/3 the three honest clients themselves would be cut
        capped = FedNano(max_share=share).aggregate(glob, [*honest, hostile], [])["w"]
        assert float(capped[0]) <= 100 * share + 1e-4
        assert float(capped[1:].abs().max()) < 1e-4  # where h's Fisher is 0 it has no say


def test_a_non_finite_aggregate_is_rejected_and_never_checkpointed(tmp_path):
    """Client 1 sends finite values near float32's limit; with server_lr 100 the step overflows
    to inf. The round is rejected with a note, the global adapters stay, and the checkpoint holds
    the finite state."""

    def huge(out):
        out["state"] = {k: torch.full_like(v, 3e38) for k, v in out["state"].items()}
        return out

    fed = in_process(
        tiny("federation.strategy=fedavg", "federation.server_lr=100"),
        tmp_path,
        transport=Tamper("fit", 1, huge),
    )
    fed.begin()
    before = {k: v.clone() for k, v in fed.global_state.items()}
    record = fed.run_round(0)
    assert record["aggregated"] is False and "not finite" in record["note"]
    assert all(torch.equal(fed.global_state[k], before[k]) for k in before)
    saved = rundir.read_checkpoint(rundir.latest_checkpoint(tmp_path)).global_state
    assert all(torch.isfinite(v).all() for v in saved.values())


# -- 3. a malformed message fails that client, never the run ---------------------------------------


@pytest.mark.parametrize(
    "rewrite, reason",
    [
        (lambda out: {k: v for k, v in out.items() if k != "state"}, "missing ['state']"),
        (lambda out: {**out, "metrics": {"loss": None}}, "metrics.loss is None"),
        (lambda out: {**out, "metrics": {"loss": math.nan}}, "metrics.loss is nan"),
        (lambda out: "not a result", "a str, not a dict"),
    ],
    ids=["no-state", "no-loss", "nan-loss", "not-a-dict"],
)
def test_a_malformed_fit_result_fails_its_client(tmp_path, rewrite, reason):
    fed = one_round(tiny("federation.strategy=fedavg"), tmp_path, Tamper("fit", 1, rewrite))
    r0 = fed.rounds[0]
    assert r0["aggregated"] and r0["completed"] == [0, 2, 3]
    ((failure),) = r0["failures"]
    assert failure["client_id"] == "1" and failure["reason"].startswith("rejected: malformed")
    assert reason in failure["reason"]


SECAGG = ("federation.strategy=fedavg", "trust.secure_aggregation=true")


@pytest.mark.parametrize(
    "method, rewrite, reason",
    [
        # a low-order X25519 point: every honest peer's key agreement with it would fail
        ("secagg_advertise", lambda keys: (b"\0" * 32, b"\0" * 32), "X25519"),
        ("secagg_advertise", lambda keys: "junk", "pair"),
        ("secagg_share_keys", lambda shares: {v: b"x" * 10 for v in shares}, "ciphertexts"),
        ("secagg_share_keys", lambda shares: {}, "not to the other members"),
        ("fit", lambda out: {**out, "masked": out["masked"][:5]}, "masked upload"),
        ("fit", lambda out: {**out, "masked": [1, 2]}, "not a numpy array"),
        ("secagg_unmask", lambda r: {"b": {}, "s": {}}, "unmask answer is malformed"),
    ],
    ids=[
        "low-order-key",
        "junk-keys",
        "short-shares",
        "no-shares",
        "short-masked",
        "list-masked",
        "empty-unmask",
    ],
)
def test_a_malformed_secagg_message_fails_its_sender(tmp_path, method, rewrite, reason):
    """Client 1 sends one malformed protocol message: it is recorded as rejected and the other
    three clients' masked sum is the round's aggregate (before, these crashed the run or failed
    every honest client)."""
    plain = one_round(tiny("federation.strategy=fedavg"), tmp_path / "plain")
    fed = one_round(tiny(*SECAGG), tmp_path / "secure", Tamper(method, 1, rewrite))
    r0 = fed.rounds[0]
    assert r0["aggregated"], r0.get("note")
    info = r0["secure_aggregation"]
    assert all(torch.isfinite(v).all() for v in fed.global_state.values())
    if method == "secagg_unmask":  # its masked input still counts: the plain round's FedAvg
        assert info["dropped_before_unmask"] == ["1"] and r0["failures"] == []
        failure = info["unmask_failures"]["1"]
        for k, v in plain.global_state.items():
            torch.testing.assert_close(fed.global_state[k], v, atol=1e-5, rtol=0)
    else:
        assert info["summed"] == ["0", "2", "3"]
        failure = {f["client_id"]: f["reason"] for f in r0["failures"]}["1"]
    assert failure.startswith("rejected: ") and reason in failure


# -- 1. DP: noise and sample from OS entropy -------------------------------------------------------

DP = (
    "federation.strategy=fedavg",
    "federation.clients_per_round=2",
    "trust.dp.clip_norm=1.0",
    "trust.dp.noise_multiplier=1.0",
)


def test_dp_samples_from_os_entropy_and_publishes_no_client(tmp_path):
    """With DP (secret_sampling, the default) two runs of one config sample differently, and the
    results name no client: counts only, failures keep their reasons."""
    cfg = tiny(*DP)
    a, b = in_process(cfg, tmp_path / "a"), in_process(cfg, tmp_path / "b")
    assert [a.sample(r) for r in range(20)] != [b.sample(r) for r in range(20)]
    fed = one_round(cfg, tmp_path / "run", Tamper("fit", 0, lambda out: "junk"))
    r0 = fed.rounds[0]
    assert r0["clients"] == [] and r0["completed"] == [] and r0["client_loss"] == {}
    assert r0["placement"] == {} and r0["num_sampled"] == 2
    assert all(f["client_id"] == "redacted" for f in r0["failures"])
    summary = fed.finish(0.0)["summary"]
    assert "coordinator is trusted" in summary["dp_trust_assumption"]
    assert "losses" in summary["dp_not_covered"]
    on_disk = rundir.read_results(tmp_path / "run")
    assert on_disk["rounds"][0]["clients"] == []


def test_a_published_dp_sample_is_accounted_without_amplification(tmp_path):
    """secret_sampling=false: the seeded sample is published, and epsilon is computed at sampling
    rate 1 (larger than with the secret sample's amplification)."""
    secret = one_round(tiny(*DP), tmp_path / "secret")
    public = one_round(tiny(*DP, "trust.dp.secret_sampling=false"), tmp_path / "public")
    assert public.rounds[0]["clients"] == public.sample(0) and len(public.sample(0)) == 2
    assert public.method.sampling_rate == 1.0 and secret.method.sampling_rate == 0.5
    assert public.rounds[0]["dp_epsilon"] > secret.rounds[0]["dp_epsilon"]
    assert np.isfinite(public.rounds[0]["dp_epsilon"])
