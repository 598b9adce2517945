"""fedavg-lora's client model: PEFT LoRA inside the tiny LLaVA's LLM, trained in-process."""

import numpy as np
import pytest
import torch

from fednano_ray.config import load_config
from fednano_ray.models.adapter import adapter_state, load_adapter_state
from fednano_ray.models.build import build_mllm
from fednano_ray.models.lora import inject_llm_lora, lora_param_count
from fednano_ray.models.prompt import collate
from fednano_ray.models.split import IGNORE_INDEX
from fednano_ray.training import LocalServer, local_fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QA = [
    ("What colour is the square?", "red"),
    ("How many stars?", "four"),
    ("Where is the circle?", "left"),
    ("What shape is blue?", "triangle"),
    ("Is it big?", "yes"),
    ("What colour is the star?", "green"),
]


def _cfg(*overrides: str):
    return load_config("examples/tiny.yaml", ["federation.strategy=fedavg-lora", *overrides])


def _mean_loss(edge, llm, feats, rows, pad_id) -> float:
    """The mean training loss over all rows (forward only: no grads are left behind)."""
    batch = collate(rows, pad_id)
    with torch.no_grad():
        z = edge(batch["input_ids"], batch["image_mask"], features=torch.from_numpy(feats))
    logp = llm.score(z, batch["attention_mask"], batch["labels"]).sum()
    return float(-logp / (batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_llm_lora_trains_only_the_lora_and_lowers_the_loss():
    """PEFT LoRA goes on q_proj/v_proj of every decoder layer under llm.<module>.lora_A/B keys; it
    starts as the pretrained model (B = 0); local steps through the in-process LLM change the LoRA
    weights only (encoder, connector, embeddings and the LLM's own weights stay bit-identical) and
    lower the loss."""
    cfg = _cfg()
    mllm = build_mllm.__wrapped__(cfg.model)  # uncached: LoRA is injected in place
    plain_edge, plain_llm = build_mllm.__wrapped__(cfg.model).split(cfg.adapter, r=4)
    edge, llm, params = mllm.with_llm_lora(cfg.adapter, r=4, seed=0)

    layers = cfg.model.tiny.num_layers
    assert sorted(params) == sorted(
        f"llm.layers.{i}.self_attn.{m}.lora_{ab}"
        for i in range(layers)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    )
    assert params["llm.layers.0.self_attn.q_proj.lora_A"].shape == (
        4,
        128,
    )  # (r, in), PEFT's layout
    assert params["llm.layers.0.self_attn.q_proj.lora_B"].shape == (128, 4)  # (out, r)
    assert sum(p.numel() for p in params.values()) == lora_param_count(
        build_mllm.__wrapped__(cfg.model).parts.decoder, r=4, target_modules=("q_proj", "v_proj")
    )
    assert not list(edge.adapters.parameters())  # no NanoAdapters: the LLM LoRA is all that trains
    assert {
        n for n, p in [*edge.named_parameters(), *llm.named_parameters()] if p.requires_grad
    } == {n for n, _ in llm.named_parameters() if ".lora_" in n}

    rng = np.random.default_rng(0)
    feats = rng.standard_normal(
        (len(QA), mllm.num_image_tokens, cfg.model.tiny.vision_hidden_size)
    ).astype(np.float32)
    rows = [mllm.encode_row(q, a) for q, a in QA]
    before = _mean_loss(edge, llm, feats, rows, mllm.pad_id)
    assert before == pytest.approx(
        _mean_loss(plain_edge, plain_llm, feats, rows, mllm.pad_id), abs=1e-6
    )

    frozen = {
        k: v.clone()
        for k, v in [*edge.state_dict().items(), *llm.state_dict().items()]
        if ".lora_" not in k
    }
    start = adapter_state(params)
    state, fisher, metrics, _ = local_fit(
        edge,
        LocalServer(llm),
        feats,
        [([r], 0, None) for r in rows],
        steps=12,
        batch_size=3,
        lr=0.01,
        pad_id=mllm.pad_id,
        params=params,
    )
    after = _mean_loss(edge, llm, feats, rows, mllm.pad_id)

    assert after < before - 0.1, (before, after)
    assert state.keys() == start.keys() == fisher.keys()
    assert all(not torch.equal(state[k], start[k]) for k in state)  # every LoRA factor moved
    assert all(bool((fisher[k] > 0).any()) for k in fisher)
    for k, v in [*edge.state_dict().items(), *llm.state_dict().items()]:
        if ".lora_" not in k:
            assert torch.equal(v, frozen[k]), k
    assert np.isfinite(metrics["loss"])


def test_llm_lora_heterogeneous_ranks_truncate_and_bad_targets_name_the_key():
    """A rank-4 global LoRA state loads into a rank-2 client (HetLoRA truncation, as for
    NanoAdapters); target modules that fit no Linear layer are errors naming
    adapter.lora_target_modules."""
    cfg = _cfg()
    big = inject_llm_lora(build_mllm.__wrapped__(cfg.model).parts.decoder, r=4, scaling=2.0, seed=0)
    with torch.no_grad():
        for p in big.values():
            p.normal_()
    small = inject_llm_lora(
        build_mllm.__wrapped__(cfg.model).parts.decoder, r=2, scaling=2.0, seed=0
    )
    load_adapter_state(small, adapter_state(big))
    key = "llm.layers.1.self_attn.v_proj"
    assert torch.equal(small[f"{key}.lora_A"], big[f"{key}.lora_A"][:2])
    assert torch.equal(small[f"{key}.lora_B"], big[f"{key}.lora_B"][:, :2])

    decoder = build_mllm.__wrapped__(cfg.model).parts.decoder
    with pytest.raises(
        ValueError, match=r"adapter.lora_target_modules \['qkv'\] matches no module.*q_proj"
    ):
        inject_llm_lora(decoder, r=2, scaling=2.0, target_modules=("qkv",))
    with pytest.raises(
        ValueError, match="adapter.lora_target_modules: 'layers.0.self_attn' is a LlamaAttention"
    ):
        inject_llm_lora(decoder, r=2, scaling=2.0, target_modules=("self_attn",))


def test_llm_lora_has_one_scaling_on_every_tier_rank():
    """fedavg-lora: PEFT scales a layer by lora_alpha / r, so each tier gets lora_alpha =
    adapter.lora_alpha * r_tier / adapter.r and every tier's scaling is adapter.lora_alpha /
    adapter.r. A rank-4 global LoRA state whose components beyond rank 2 are zero then computes the
    same LLM (same loss, same LoRA gradients) on a rank-2 and a rank-4 client; the per-tier rule
    lora_alpha / r_tier would give the rank-2 layer twice the delta."""
    from peft.tuners.lora import LoraLayer

    cfg = _cfg("adapter.r=8", "adapter.lora_alpha=16")
    scaling = 16 / 8
    models = {
        r: build_mllm.__wrapped__(cfg.model).with_llm_lora(cfg.adapter, r=r, seed=r) for r in (2, 4)
    }
    for r, (_, llm, _) in models.items():
        layers = [m for m in llm.decoder.modules() if isinstance(m, LoraLayer)]
        assert layers and all(
            m.scaling["default"] == pytest.approx(scaling, rel=1e-12) for m in layers
        ), r
        assert all(m.r["default"] == r for m in layers)

    g = torch.Generator().manual_seed(0)
    state = {}
    for k, p in models[4][2].items():  # rank 4, components 2..3 zero (aggregated rank-2 clients)
        t = torch.zeros_like(p)
        if k.endswith("lora_A"):
            t[:2] = torch.randn(2, p.shape[1], generator=g) * 0.1
        else:
            t[:, :2] = torch.randn(p.shape[0], 2, generator=g) * 0.1
        state[k] = t
    for _, _, params in models.values():
        load_adapter_state(params, state)

    # One layer by hand: its delta is the reference-scaling delta.
    key = "layers.0.self_attn.q_proj"
    x = torch.randn(5, 128, generator=g)
    a, b = state[f"llm.{key}.lora_A"][:2], state[f"llm.{key}.lora_B"][:, :2]
    by_hand = scaling * (x @ a.T @ b.T)
    assert float(by_hand.abs().max()) > 1e-3
    for r, (_, llm, _) in models.items():
        layer = llm.decoder.get_submodule(key)
        with torch.no_grad():
            delta = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(delta, by_hand, rtol=1e-5, atol=1e-6, msg=f"rank {r}")

    # The whole model: the same loss and, for the shared components, the same gradients (Fisher
    # scale).
    rng = np.random.default_rng(0)
    mllm = build_mllm(cfg.model)
    feats = torch.from_numpy(
        rng.standard_normal((3, mllm.num_image_tokens, cfg.model.tiny.vision_hidden_size)).astype(
            np.float32
        )
    )
    batch = collate([mllm.encode_row(q, a) for q, a in QA[:3]], mllm.pad_id)
    out = {}
    for r, (edge, llm, params) in models.items():
        with torch.no_grad():
            z = edge(batch["input_ids"], batch["image_mask"], features=feats)
        losses, _ = llm.loss_and_grad(z, batch["attention_mask"], batch["labels"])
        out[r] = (float(losses[0]), {k: p.grad.clone() for k, p in params.items()})
    assert out[2][0] == pytest.approx(out[4][0], rel=1e-6)
    for k, g2 in out[2][1].items():
        g4 = out[4][1][k][:2] if k.endswith("lora_A") else out[4][1][k][:, :2]
        assert float(g2.abs().max()) > 0, k
        torch.testing.assert_close(g2, g4, rtol=1e-4, atol=1e-6, msg=k)
