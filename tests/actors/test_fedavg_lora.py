"""fedavg-lora end to end: full-model clients train PEFT LoRA in their own LLM, FedAvg on the
coordinator.
"""

import pytest
import torch
from safetensors.torch import load_file

from fednano_ray.actors.client import ClientActor
from fednano_ray.actors.coordinator import _seed, adapters_fingerprint
from fednano_ray.app import train
from fednano_ray.config import load_config
from fednano_ray.features import cached_features
from fednano_ray.federation import rundir
from fednano_ray.models.build import build_mllm
from fednano_ray.models.lora import lora_param_count
from fednano_ray.strategies.aggregate import pad_to_rank
from fednano_ray.task import prepare_data

pytestmark = pytest.mark.usefixtures(
    "one_torch_thread"
)  # the in-process client actors below set 1 thread

# Three clients: client 0 in the rank-2 tier, clients 1 and 2 in the rank-4 tier (HetLoRA padding).
THREE = (
    "federation.num_clients=3",
    "federation.clients_per_round=3",
    "tiers.0.clients=1",
    "tiers.1.clients=2",
)


def _cfg(*overrides: str):
    return load_config(
        "examples/tiny.yaml", ["federation.strategy=fedavg-lora", *THREE, *overrides]
    )


def _ckpt(run, rnd: int) -> dict[str, torch.Tensor]:
    return load_file(str(rundir.adapters_path(rundir.round_dir(run, rnd))))


def _client_actor(cfg, rank: int, data) -> ClientActor:
    """A fedavg-lora client actor, built in this process (a plain class) on the run's data."""
    qs = lambda exs: [(e.question, list(e.choices), e.answer, e.category) for e in exs]
    mllm = build_mllm(
        cfg.model
    )  # only encodes features here: the actor builds its own copy for LoRA
    arrays = {
        split: (cached_features(mllm, "", exs, None), qs(exs))
        for split, exs in (("train", data.train), ("test", data.test))
    }
    return ClientActor(
        cfg.model,
        cfg.adapter,
        rank=rank,
        server=None,
        data=arrays,
        seed=cfg.federation.seed,
        llm_lora=True,
    )


def test_fedavg_lora_run_accounts_full_model_clients_and_scores_the_aggregated_lora(
    ray_cluster, tmp_path
):
    """Two rounds of fedavg-lora with 3 clients: no LLM trainer; results.json reports client
    storage = the whole MLLM (+ LoRA), LoRA bytes per round and 0 activation bytes; round 0's global
    LoRA is the example-weighted mean of the clients' LoRA states (redone here by hand); the global
    test accuracy is that of the final aggregated LoRA (fingerprint and in-process re-scoring). The
    same round under secure aggregation lands on the same LoRA, and a run cut after round 0 resumes
    to the same final LoRA (one test: each run costs CPU time this machine shares)."""
    cfg = _cfg()
    run = tmp_path / "run"
    res = train(cfg, run, progress=False)
    on_disk = rundir.read_results(run)
    s, acct = on_disk["summary"], on_disk["accounting"]

    # Accounting: the client holds everything; LoRA on q_proj/v_proj of the 2 layers, fp32.
    decoder = build_mllm.__wrapped__(cfg.model).parts.decoder
    lora_bytes = {
        r: 4 * lora_param_count(decoder, r=r, target_modules=("q_proj", "v_proj")) for r in (2, 4)
    }
    assert lora_bytes == {2: 4 * 2 * 2 * 2 * 256, 4: 4 * 2 * 2 * 4 * 256}
    assert (
        s["strategy"] == "fedavg-lora" and s["adapter_kind"] == acct["adapter_kind"] == "llm_lora"
    )
    assert acct["adapter_bytes"] == lora_bytes[4] and acct["server_params"] == 0
    assert (
        s["client_bytes"] == s["total_bytes"] + lora_bytes[4] and s["client_storage_fraction"] > 1
    )
    assert s["step_bytes_up"] == s["step_bytes_down"] == 0
    assert res["trainer_stats"] == {}  # no shared LLM trainer was started
    for r in on_disk["rounds"]:
        assert r["failures"] == [] and r["completed"] == [0, 1, 2] and r["aggregated"], r
        assert r["bytes_up"] == r["bytes_down"] == lora_bytes[2] + 2 * lora_bytes[4]
        assert r["trainer_restarted"] is False
    assert s["bytes_up"] == s["bytes_down"] == 2 * (lora_bytes[2] + 2 * lora_bytes[4])

    final = _ckpt(run, 1)
    assert final["llm.layers.0.self_attn.q_proj.lora_A"].shape == (4, 128)
    assert final["llm.layers.1.self_attn.v_proj.lora_B"].shape == (128, 4)
    assert all(final[k].abs().sum() > 0 for k in final if k.endswith("lora_B"))  # trained off B = 0

    # Round 0 by hand: each client's local fit from the initial LoRA, then sum(n_i θ_i) / sum(n_i)
    # with the rank-2 client's LoRA zero-padded to rank 4.
    data = prepare_data(cfg)
    actors = {r: _client_actor(cfg, r, data) for r in (2, 4)}
    start = actors[4].initial_state()
    tier = cfg.client_tiers()
    states, weights = [], []
    for c in range(3):
        out = actors[cfg.tier_rank(tier[c])].fit(
            c,
            data.client_train[c],
            start,
            steps=tier[c].local_steps,
            batch_size=tier[c].batch_size,
            lr=cfg.train.lr,
            seed=_seed(cfg.federation.seed, 0, c),
            objective=cfg.train.objective,
        )
        states.append(pad_to_rank(out["state"], 4))
        weights.append(out["num_examples"])
    assert weights == [len(data.client_train[c]) for c in range(3)]
    by_hand = {
        k: sum(n * st[k] for n, st in zip(weights, states, strict=True)) / sum(weights)
        for k in start
    }
    got = _ckpt(run, 0)
    assert got.keys() == by_hand.keys()
    for k, mean in by_hand.items():
        torch.testing.assert_close(got[k], mean, rtol=1e-4, atol=1e-6)

    # The global test split was scored with the final aggregated LoRA, inside the LoRA-adapted LLM.
    assert on_disk["rounds"][-1]["global_test_adapters"] == adapters_fingerprint(final)
    everything = list(range(len(data.test)))
    assert s["global_test_accuracy"] == pytest.approx(
        actors[4].evaluate(final, "test", everything)["accuracy"]
    )
    assert s["global_test_accuracy_before"] == pytest.approx(
        actors[4].evaluate(start, "test", everything)["accuracy"]
    )

    # Secure aggregation goes through the same FedAvg sum plan, masked by the client actors.
    sec = tmp_path / "sec"
    train(_cfg("trust.secure_aggregation=true", "federation.rounds=1"), sec, progress=False)
    r0 = rundir.read_results(sec)["rounds"][0]
    assert r0["aggregated"] and r0["secure_aggregation"]["summed"] == ["0", "1", "2"], r0
    for k, v in _ckpt(sec, 0).items():
        torch.testing.assert_close(v, got[k], rtol=1e-4, atol=1e-6)

    # Resume: the checkpoint holds the global LoRA; a run killed after round 0 ends where this one
    # did.
    cut = tmp_path / "cut"
    train(cfg, cut, progress=False, stop_after_round=0)
    train(cfg, cut, resume=True, progress=False)
    for k, v in _ckpt(cut, 1).items():
        torch.testing.assert_close(v, final[k], rtol=1e-4, atol=1e-5)
