"""Accounting of NanoEdge vs. the full MLLM: hand-checkable counts, tied weights, meta builds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fednano_ray.accounting import account, count, inspect_config, step_activation_bytes
from fednano_ray.config import load_config
from fednano_ray.models.llava import build_tiny_llava, parts_from_llava
from fednano_ray.models.split import MLLMParts


def _kw(**over):
    kw = {
        "adapter_rank": 4,
        "lora_alpha": 8.0,
        "modalities": ("vision", "text"),
        "num_image_tokens": 16,
        "text_tokens": 40,
        "batch_size": 2,
        "clients_per_round": 3,
        "strategy": "fednano",
    }
    kw.update(over)
    return kw


@pytest.fixture(scope="module")
def tiny_parts() -> MLLMParts:
    model, _ = build_tiny_llava()
    return parts_from_llava(model)


def _tied_tiny_parts() -> MLLMParts:
    model, _ = build_tiny_llava()
    parts = parts_from_llava(model)
    parts.lm_head.weight = parts.embed_tokens.weight  # tie, as SmolLM2 does
    return parts


# ---------------------------------------------------------------------------------------- count


def test_count_dedupes_tied_parameters_and_modules():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count(emb) == (40, 160)
    assert count([emb, head]) == (40, 160)  # one tensor, counted once
    assert count([emb, emb]) == (40, 160)
    assert count(nn.ModuleList([emb, head]), dtype=torch.float16) == (40, 80)
    assert count([emb, head], dtype=2) == (40, 80)


def test_count_buffers_bytes_only_and_persistent_only():
    # weight, bias (params); running_mean, running_var (f32), num_batches_tracked (i64) buffers
    bn = nn.BatchNorm1d(4)
    assert count(bn) == (8, 8 * 4 + 8 * 4 + 8)
    # The override sizes floating tensors only; the int64 counter keeps 8 bytes.
    assert count(bn, dtype=torch.float16) == (8, 8 * 2 + 8 * 2 + 8)
    bn.register_buffer("scratch", torch.zeros(100), persistent=False)
    assert count(bn) == (8, 8 * 4 + 8 * 4 + 8)


def test_count_works_on_meta():
    with torch.device("meta"):
        lin = nn.Linear(1000, 1000)
    assert count(lin) == (1000 * 1000 + 1000, (1000 * 1000 + 1000) * 4)


# ----------------------------------------------------------------------------------- tiny LLaVA


def test_tiny_llava_hand_counts(tiny_parts):
    r, d, vocab, d_v = 4, 128, 260, 64
    out = account(tiny_parts, **_kw())
    json.dumps(out)  # JSON-able
    assert out["hidden_size"] == d
    assert out["adapter_params"] == 2 * 2 * r * d  # lora_A (r×d) + lora_B (d×r), two modalities
    assert out["adapter_bytes"] == out["adapter_params"] * 4
    assert out["parts"]["embed_tokens"] == vocab * d
    assert out["parts"]["lm_head"] == vocab * d
    assert out["parts"]["connector"] == d_v * d + d + d * d + d
    assert not out["tied_embeddings"] and out["shared_params"] == 0

    everything = [tiny_parts.encoder, tiny_parts.connector, tiny_parts.decoder, tiny_parts.lm_head]
    assert out["total_params"] == count(everything)[0]
    assert out["total_bytes"] == count(everything)[1]
    assert out["client_params"] == sum(
        out["parts"][k] for k in ("encoder", "connector", "embed_tokens", "adapters")
    )
    assert out["server_params"] == out["parts"]["decoder"] + out["parts"]["lm_head"]
    assert (
        out["client_params"] - out["adapter_params"] + out["server_params"] - out["shared_params"]
        == out["total_params"]
    )
    assert (
        out["client_bytes"]
        == count([tiny_parts.encoder, tiny_parts.connector, tiny_parts.embed_tokens])[1]
        + out["adapter_bytes"]
    )
    assert out["client_storage_fraction"] == pytest.approx(out["client_bytes"] / out["total_bytes"])
    assert out["client_storage_saving"] == pytest.approx(1 - out["client_storage_fraction"])
    assert out["adapter_fraction"] == pytest.approx(out["adapter_params"] / out["total_params"])


def test_tied_embeddings_counted_once_in_total(tiny_parts):
    untied = account(tiny_parts, **_kw())
    tied_parts = _tied_tiny_parts()
    out = account(tied_parts, **_kw())
    emb = 260 * 128
    assert out["tied_embeddings"]
    assert out["shared_params"] == emb
    # lm_head is no longer a separate matrix, but the server still needs it as its output layer
    assert out["total_params"] == untied["total_params"] - emb
    assert out["server_params"] == untied["server_params"]
    assert (
        out["client_params"] - out["adapter_params"] + out["server_params"] - out["shared_params"]
        == out["total_params"]
    )


def test_traffic_formulas_by_hand(tiny_parts):
    # One step: B=2, T=3+5=8, d=128. Up: z' 2·8·128·4 + mask 16·1 + labels 16·4; down: 2·8·128·4.
    assert step_activation_bytes(2, 8, 128) == (8192 + 16 + 64, 8192)
    out = account(tiny_parts, **_kw(num_image_tokens=3, text_tokens=5, local_steps=10))
    assert out["sequence_length"] == 8
    assert (out["step_bytes_up"], out["step_bytes_down"]) == (8272, 8192)
    assert out["round_activation_bytes_up"] == 8272 * 10 * 3

    adapter_bytes = 2 * 2 * 4 * 128 * 4
    fednano = account(tiny_parts, **_kw(strategy="fednano"))
    assert fednano["round_bytes_down"] == adapter_bytes * 3
    assert fednano["round_bytes_up"] == 2 * adapter_bytes * 3  # adapters + same-size Fisher
    fedavg = account(tiny_parts, **_kw(strategy="fedavg", modalities=("text",)))
    assert fedavg["round_bytes_up"] == fedavg["round_bytes_down"] == adapter_bytes // 2 * 3


def test_fedavg_lora_clients_store_the_whole_mllm_and_send_no_activations(tiny_parts):
    """fedavg-lora: the client holds every part plus its LLM LoRA (r·(in+out) per q_proj/v_proj,
    fp32), exchanges the LoRA each round and sends nothing per step."""
    split = account(tiny_parts, **_kw(strategy="fedavg"))
    out = account(tiny_parts, **_kw(strategy="fedavg-lora", local_steps=10))
    lora = 2 * 2 * 4 * (128 + 128)  # 2 layers x (q_proj, v_proj) x r (in + out)
    assert out["adapter_kind"] == "llm_lora" and out["lora_target_modules"] == ["q_proj", "v_proj"]
    assert (
        out["adapter_params"] == out["parts"]["adapters"] == lora
        and out["adapter_bytes"] == 4 * lora
    )
    assert (
        out["total_bytes"] == split["total_bytes"] and out["total_params"] == split["total_params"]
    )
    assert out["client_bytes"] == out["total_bytes"] + out["adapter_bytes"]
    assert out["client_storage_fraction"] == pytest.approx(1 + 4 * lora / out["total_bytes"])
    assert out["server_params"] == out["server_bytes"] == out["shared_params"] == 0
    assert (
        out["client_params"] - out["adapter_params"] + out["server_params"] - out["shared_params"]
        == out["total_params"]
    )
    assert out["round_bytes_up"] == out["round_bytes_down"] == 4 * lora * 3
    assert out["step_bytes_up"] == out["step_bytes_down"] == 0
    assert out["round_activation_bytes_up"] == out["round_activation_bytes_down"] == 0
    with pytest.raises(ValueError, match="adapter.lora_target_modules"):
        account(tiny_parts, **_kw(strategy="fedavg-lora"), lora_target_modules=("c_attn",))


def test_feddpa_f_clients_also_store_a_local_adapter_and_the_bank(tiny_parts):
    """feddpa-f: client storage adds the second (local) adapter and at most bank_size fp32
    summaries of width 2d; parameters, round traffic and split steps are FedAvg's."""
    fedavg = account(tiny_parts, **_kw(strategy="fedavg"))
    out = account(tiny_parts, **_kw(strategy="feddpa-f"), bank_size=10)
    assert out["client_dual_bytes"] == out["adapter_bytes"] + 10 * 2 * 128 * 4
    assert out["client_bytes"] == fedavg["client_bytes"] + out["client_dual_bytes"]
    assert fedavg["client_dual_bytes"] == 0
    for key in ("client_params", "adapter_params", "round_bytes_up", "step_bytes_up"):
        assert out[key] == fedavg[key], key
    cfg = load_config(
        {
            "model": {"kind": "tiny"},
            "federation": {
                "strategy": "feddpa-f",
                "personalize_steps": 2,
                "strategy_options": {"bank_size": 10},
            },
        }
    )
    inspected = inspect_config(cfg)
    assert inspected["client_dual_bytes"] == inspected["adapter_bytes"] + 10 * 256 * 4


def test_dtype_override_scales_frozen_bytes_not_adapters(tiny_parts):
    f32 = account(tiny_parts, **_kw())
    f16 = account(tiny_parts, **_kw(), dtype_bytes=2)
    # the tiny LLaVA stores only floating-point tensors
    assert f16["total_bytes"] * 2 == f32["total_bytes"]
    assert f16["adapter_bytes"] == f32["adapter_bytes"]
    assert (
        f16["client_bytes"]
        == (f32["client_bytes"] - f32["adapter_bytes"]) // 2 + f32["adapter_bytes"]
    )


def test_inspect_tiny_matches_account():
    cfg = load_config({"model": {"kind": "tiny"}})
    out = inspect_config(cfg)
    json.dumps(out)
    assert out["model_kind"] == "tiny" and out["dtype"] == "float32"
    assert out["num_image_tokens"] == (32 // 8) ** 2
    assert out["batch_size"] == cfg.tiers[0].batch_size
    assert out["clients_per_round"] == cfg.federation.clients_per_round
    assert out["adapter_params"] == 2 * 2 * cfg.adapter.r * 128
    assert out["adapter_scaling"] == cfg.adapter.lora_alpha / cfg.adapter.r == cfg.adapter.scaling


def test_adapter_scaling_is_the_reference_ranks_whatever_the_accounted_rank(tiny_parts):
    """The run accounts adapters at the largest tier rank; the scaling it reports is the one every
    tier uses (adapter.lora_alpha / adapter.r), not lora_alpha / that rank."""
    assert account(tiny_parts, **_kw(adapter_rank=4, lora_alpha=8.0))["adapter_scaling"] == 2.0
    assert (
        account(tiny_parts, **_kw(adapter_rank=4, lora_alpha=16.0, scaling=16.0 / 8))[
            "adapter_scaling"
        ]
        == 2.0
    )


def test_inspect_hf_local_folder_on_meta(tmp_path):
    model, _ = build_tiny_llava()
    model.config.save_pretrained(tmp_path)  # config.json only: no weights are read
    cfg = load_config({"model": {"kind": "hf", "name_or_path": str(tmp_path)}})
    out = inspect_config(cfg)
    real = inspect_config(load_config({"model": {"kind": "tiny"}}))
    keys = ("total_params", "client_params", "server_params", "adapter_params", "total_bytes")
    for key in (*keys, "client_bytes"):
        assert out[key] == real[key], key  # meta build of the same config gives the same counts


def test_inspect_hf_unknown_hub_id_says_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config({"model": {"kind": "hf", "name_or_path": "nobody/not-a-cached-model-xyz"}})
    with pytest.raises(ValueError, match="local folder"):
        inspect_config(cfg)


# ------------------------------------------------------------------------------- nano and 7B


def test_nano_on_meta_counts():
    out = inspect_config(load_config(None))
    smollm2 = 134_515_008  # SmolLM2-135M, embed_tokens included (tied with lm_head)
    # EfficientNet-Lite0 without its 1000-class classifier (4.65M with it)
    efficientnet_features = 3_371_008
    connector = 1280 * 576 + 576 + 576 * 576 + 576
    assert out["tied_embeddings"]
    assert out["total_params"] == smollm2 + efficientnet_features + connector
    assert out["parts"]["encoder"] == efficientnet_features
    assert out["parts"]["connector"] == connector
    assert out["parts"]["embed_tokens"] == out["shared_params"] == 49152 * 576
    assert out["server_params"] == smollm2
    assert out["adapter_params"] == 2 * 2 * 8 * 576
    assert out["num_image_tokens"] == 16  # default grid 4 x 4
    assert 0 < out["client_storage_fraction"] < 1
    assert out["client_storage_fraction"] == pytest.approx(0.2361, abs=5e-4)
    # bytes = fp32 params + batch-norm running statistics (persistent buffers)
    assert out["total_bytes"] > out["total_params"] * 4


def test_nano_fedavg_lora_on_meta_counts():
    """SmolLM2-135M: 30 layers, q_proj 576->576 and v_proj 576->192 (3 KV heads of 64): rank-8 LoRA
    is 30 * 8 * (1152 + 768) = 460,800 parameters, 25x the NanoAdapters, and the client stores
    everything."""
    cfg = load_config(None, ["federation.strategy=fedavg-lora"])
    out = inspect_config(cfg)
    nano = inspect_config(load_config(None))
    assert out["adapter_params"] == 30 * 8 * (1152 + 768) == 25 * nano["adapter_params"]
    assert out["client_bytes"] == out["total_bytes"] + 4 * out["adapter_params"]
    assert out["total_bytes"] == nano["total_bytes"]
    assert out["step_bytes_up"] == out["step_bytes_down"] == out["round_activation_bytes_up"] == 0
    assert [t["adapter_bytes"] for t in out["tiers"]] == [4 * out["adapter_params"]]
    assert out["tiers"][0]["step_bytes_up"] == 0


def test_llava_15_7b_on_meta():
    cfg = load_config({"model": {"kind": "hf", "name_or_path": "llava-hf/llava-1.5-7b-hf"}})
    out = inspect_config(cfg)
    assert out["dtype"] == "float16"
    assert out["total_params"] == pytest.approx(7.06e9, rel=0.01)
    assert out["total_params"] == 7_063_427_072
    assert out["total_bytes"] == 2 * out["total_params"]
    assert not out["tied_embeddings"]
    assert out["parts"]["embed_tokens"] == 32064 * 4096
    assert out["adapter_params"] == 2 * 2 * 8 * 4096
    assert out["client_storage_fraction"] == pytest.approx(0.0646, abs=5e-5)
    assert 1e-5 < out["adapter_fraction"] < 1e-4
    assert out["sequence_length"] == 576 + 40
    assert out["step_bytes_down"] == 8 * 616 * 4096 * 4


# ------------------------------------------------------------------------------- one entry


def test_results_json_and_inspect_give_the_same_accounting(tmp_path):
    """The run (federation.setup.prepare_run, the real weights) and fednano-ray inspect (meta
    device) go through one entry, account_run, so results.json and inspect agree on every figure."""
    from fednano_ray.federation.setup import prepare_run

    cfg = load_config("examples/tiny.yaml")  # two tiers, ranks 2 and 4
    run = prepare_run(cfg).accounting
    shown = inspect_config(cfg)
    assert {k: v for k, v in shown.items() if k not in ("precision", "hardware")} == run
    assert run["adapter_rank"] == 4 and [t["adapter_rank"] for t in run["tiers"]] == [2, 4]
    assert (
        run["tiers"][1]["adapter_bytes"]
        == run["adapter_bytes"]
        == 2 * run["tiers"][0]["adapter_bytes"]
    )


def test_build_mllm_on_meta_reads_no_weights_and_has_the_real_shapes():
    from fednano_ray.models.build import build_mllm

    cfg = load_config({"model": {"kind": "tiny"}}).model
    meta, real = build_mllm(cfg, device="meta"), build_mllm(cfg)
    assert {p.device.type for p in meta.parts.decoder.parameters()} == {"meta"}
    assert [p.shape for p in meta.parts.decoder.parameters()] == [
        p.shape for p in real.parts.decoder.parameters()
    ]
    assert meta.num_image_tokens == real.num_image_tokens and meta.dtype == real.dtype == "float32"
    with pytest.raises(ValueError, match="'meta'"):
        build_mllm(cfg, device="cuda")


def test_an_hf_checkpoint_is_accounted_at_its_published_dtype(tmp_path):
    """A float16 checkpoint loads in float32 here; its bytes are counted at float16 all the same."""
    from fednano_ray.models.build import build_mllm

    model, _ = build_tiny_llava()
    model.config.dtype = "float16"
    model.config.save_pretrained(tmp_path)
    mllm = build_mllm(
        load_config({"model": {"kind": "hf", "name_or_path": str(tmp_path)}}).model, device="meta"
    )
    out = inspect_config(load_config({"model": {"kind": "hf", "name_or_path": str(tmp_path)}}))
    real = inspect_config(load_config({"model": {"kind": "tiny"}}))
    assert mllm.dtype == out["dtype"] == "float16"
    assert (
        out["total_bytes"] * 2 == real["total_bytes"]
        and out["adapter_bytes"] == real["adapter_bytes"]
    )
