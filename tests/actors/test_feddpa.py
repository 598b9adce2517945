"""FedDPA-F end to end on the simulated Ray cluster: FedAvg rounds, the local phase, the dual
adapter's evaluation, its checkpoint, --resume of the finished run, and serving's loader."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fednano_ray.app import train
from fednano_ray.config import load_config
from fednano_ray.federation import rundir

BANK = 16  # below every tiny.yaml training shard, so the bound is exercised


def test_feddpa_f_trains_scores_checkpoints_resumes_and_serves_the_dual_adapter(
    ray_cluster, tmp_path
):
    """One feddpa-f run (2 FedAvg rounds, 3 local steps per client): the summary scores each
    client's dual adapter beside the global one and records the mean weights; the last checkpoint
    holds each client's local adapter and bounded bank while its global adapters are the last
    round's; a resume of the finished run redoes nothing; serving's loader builds the dual adapter
    that evaluation scored (same accuracy and mean weight on the client's held-out questions)."""
    # Prepare / Execute
    from fednano_ray.actors.coordinator import adapters_fingerprint
    from fednano_ray.features import cached_features
    from fednano_ray.models.build import build_mllm
    from fednano_ray.models.dual import DualEdge
    from fednano_ray.serve.ingress import Ingress
    from fednano_ray.task import prepare_data
    from fednano_ray.training import LocalServer, evaluate

    cfg = load_config(
        "examples/tiny.yaml",
        [
            "federation.strategy=feddpa-f",
            "federation.personalize_steps=3",
            f"federation.strategy_options.bank_size={BANK}",
        ],
    )
    run = tmp_path / "run"
    res = train(cfg, run, progress=False)
    s = res["summary"]

    # Assert: the summary (personalised keys: the dual adapters'; accuracy_after: the global one's)
    assert s["strategy"] == "feddpa-f" and res["strategy"]["feddpa_bank_size"] == BANK
    assert (
        s["personalization"]["personalized_clients"] == [0, 1, 2, 3]
        and s["personalization"]["failures"] == []
    )
    for key in ("accuracy_after", "accuracy_personalized", "global_test_accuracy_personalized"):
        assert 0 <= s[key] <= 1, key
    assert set(s["accuracy_personalized_per_client"]) == {"0", "1", "2", "3"}
    dpa = s["feddpa"]
    assert dpa["train_weight"] == 0.5 and dpa["top_k"] == 5 and "dynamic" in dpa["weighting"]
    for key in ("mean_weight_per_client", "global_test_mean_weight_per_client"):
        assert set(dpa[key]) == {"0", "1", "2", "3"} and all(
            0 <= w <= 1 for w in dpa[key].values()
        ), key
    # Assert: the checkpoint (global adapters untouched by the local phase; local adapters, banks)
    ckpt = rundir.round_dir(run, 1)
    global_state = load_file(str(rundir.adapters_path(ckpt)))
    assert res["rounds"][-1]["global_test_adapters"] == adapters_fingerprint(global_state)
    data = prepare_data(cfg)
    for c, rank in ((0, 2), (1, 2), (2, 4), (3, 4)):
        local = load_file(str(rundir.client_adapters_path(ckpt, c)))
        assert local["vision.lora_B"].shape == (128, rank)
        assert not torch.equal(
            local["vision.lora_B"], global_state["vision.lora_B"][:, :rank]
        )  # it trained
        bank = rundir.load_bank(rundir.client_bank_path(ckpt, c))
        assert (
            bank.shape
            == (min(BANK, len(data.client_train[c])), 2 * 128)
            == (dpa["bank_rows_per_client"][str(c)], 256)
        )
    assert (
        res["accounting"]["client_dual_bytes"]
        == res["accounting"]["adapter_bytes"] + BANK * 256 * 4
    )

    # Execute / Assert: resuming the finished run does not redo the local phase
    mtimes = {p.name: p.stat().st_mtime_ns for p in (ckpt / rundir.CLIENTS).iterdir()}
    again = train(cfg, run, resume=True, progress=False)
    assert (
        again["summary"]["feddpa"] == dpa
        and again["summary"]["personalization"] == s["personalization"]
    )
    assert {p.name: p.stat().st_mtime_ns for p in (ckpt / rundir.CLIENTS).iterdir()} == mtimes

    # Execute / Assert: serving's loader builds client 2's dual adapter; scored in-process on the
    # same held-out questions and features, it reproduces the run's accuracy and mean weight.
    model = Ingress(run, llm=None).load_client_model(2)
    assert model.personal and isinstance(model.edge, DualEdge)
    mllm = build_mllm(cfg.model)
    _, server_llm = mllm.split(cfg.adapter, r=4)
    idx = data.client_test[2]
    feats = cached_features(mllm, "", data.train, None)[idx]
    questions = [
        (
            [mllm.encode_row(data.train[i].question, ch) for ch in data.train[i].choices],
            data.train[i].answer,
            data.train[i].category,
        )
        for i in idx
    ]
    model.edge.weight_log = []
    got = evaluate(
        model.edge,
        LocalServer(server_llm),
        np.asarray(feats),
        questions,
        pad_id=mllm.pad_id,
        batch_size=cfg.train.eval_batch_size,
    )
    assert got["accuracy"] == pytest.approx(s["accuracy_personalized_per_client"]["2"])
    assert float(torch.cat(model.edge.weight_log).mean()) == pytest.approx(
        dpa["mean_weight_per_client"]["2"]
    )
    on_disk = rundir.read_results(run)
    assert on_disk["summary"]["feddpa"] == dpa
    # The request path (an image, the prompt alone) mixes the two adapters' z' with one weight.
    from PIL import Image

    from fednano_ray.serve.ingress import prompt_embeds

    image = Image.open(data.train[idx[0]].image)
    model.edge.weight_log = []
    z = prompt_embeds(mllm, model.edge, image, data.train[idx[0]].question)
    (w,) = model.edge.weight_log[0].tolist()
    g, loc = (
        prompt_embeds(mllm, e, image, data.train[idx[0]].question)
        for e in (model.edge.global_edge, model.edge.local_edge)
    )
    assert 0 <= w <= 1 and not torch.allclose(g, loc)
    torch.testing.assert_close(z, (1 - w) * g + w * loc)
