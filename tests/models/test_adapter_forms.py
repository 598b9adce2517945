"""Every NanoAdapter form (``adapter.kind``): the identity at init, learns a toy target, keeps
HetLoRA's meaning, merges with Fisher weights, and keeps FedNano's economics on LLaVA-1.5-7B."""

import numpy as np
import pytest
import torch

from fednano_ray.config import load_config
from fednano_ray.models.adapter import ADAPTER_FORMS, adapter_state, load_adapter_state
from fednano_ray.models.build import build_mllm
from fednano_ray.models.prompt import collate

FORMS = sorted(ADAPTER_FORMS)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("examples/tiny.yaml", ["adapter.r=4", "adapter.lora_alpha=8"])
    mllm = build_mllm(cfg.model)
    qa = [
        ("What colour is the square?", "red"),
        ("How many stars?", "four"),
        ("Where is it?", "left"),
    ]
    batch = collate([mllm.encode_row(q, a) for q, a in qa], mllm.pad_id)
    feats = torch.from_numpy(
        np.random.default_rng(0)
        .standard_normal((3, mllm.num_image_tokens, cfg.model.tiny.vision_hidden_size))
        .astype(np.float32)
    )
    return cfg, mllm, batch, feats


def seeded(seed: int):
    """A fixed noise source, so two paths of one DP mechanism can be compared exactly."""
    return lambda: torch.Generator().manual_seed(seed)


def _edge(cfg, mllm, kind, *, r=4, seed=0, **extra):
    adapter = cfg.adapter.model_copy(update={"kind": kind, **extra})
    return mllm.split(adapter, r=r, seed=seed)[0]


def test_every_form_is_listed_in_the_config():
    from fednano_ray.config import AdapterConfig

    assert set(AdapterConfig.model_fields["kind"].annotation.__args__) == set(ADAPTER_FORMS)


@pytest.mark.parametrize("kind", FORMS)
def test_each_form_is_the_identity_at_init(tiny, kind):
    cfg, mllm, batch, feats = tiny
    bare = mllm.split(cfg.adapter.model_copy(update={"modalities": ("vision",)}), r=4)[0]
    bare.adapters.clear()  # no adapters at all: the pretrained model's embeddings
    edge = _edge(cfg, mllm, kind)
    with torch.no_grad():
        want = bare(batch["input_ids"], batch["image_mask"], features=feats)
        got = edge(batch["input_ids"], batch["image_mask"], features=feats)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert edge.trainable_parameters(), kind


@pytest.mark.parametrize("kind", FORMS)
def test_each_form_learns_a_toy_target(tiny, kind):
    """Teacher-student: a randomised adapter of the same form defines z'*; a fresh student fits
    it.
    """
    cfg, mllm, batch, feats = tiny
    teacher = _edge(cfg, mllm, kind, seed=1)
    with torch.no_grad():
        for p in teacher.adapters.parameters():
            p.normal_(0, 0.05)
        target = teacher(batch["input_ids"], batch["image_mask"], features=feats)
    student = _edge(cfg, mllm, kind, seed=2)
    opt = torch.optim.Adam(student.trainable_parameters(), lr=0.01)
    image = batch["image_mask"]
    first = last = None
    for _ in range(150):
        opt.zero_grad()
        err = (student(batch["input_ids"], image, features=feats) - target).pow(2).mean(-1)
        parts = torch.stack([err[image].mean(), err[~image].mean()])  # visual tokens, text tokens
        parts.sum().backward()
        opt.step()
        first = parts.detach() if first is None else first
        last = parts.detach()
    assert bool((first > 0).all()), first
    assert bool((last < 0.1 * first).all()), (
        kind,
        first.tolist(),
        last.tolist(),
    )  # each modality fits its target


@pytest.mark.parametrize("kind", FORMS)
def test_a_truncated_state_computes_its_components_on_every_tier(tiny, kind):
    """A rank-4 global state whose components beyond rank 2 are zero gives a rank-2 and a rank-4
    edge the same z' (HetLoRA truncation keeps its meaning for every form; rank-free tensors stay
    whole)."""
    cfg, mllm, batch, feats = tiny
    big = _edge(cfg, mllm, kind, r=4, seed=3)
    small = _edge(cfg, mllm, kind, r=2, seed=4)
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, t in adapter_state(big.adapters).items():
        v = torch.randn(t.shape, generator=g) * 0.05
        if key.endswith("lora_A"):
            v[2:] = 0
        elif key.endswith("lora_B"):
            v[:, 2:] = 0
        state[key] = v
    load_adapter_state(big.adapters, state)
    load_adapter_state(small.adapters, state)
    with torch.no_grad():
        z_big = big(batch["input_ids"], batch["image_mask"], features=feats)
        z_small = small(batch["input_ids"], batch["image_mask"], features=feats)
        z0 = _edge(cfg, mllm, kind)(batch["input_ids"], batch["image_mask"], features=feats)
    torch.testing.assert_close(z_small, z_big, rtol=1e-5, atol=1e-6)
    assert float((z_big - z0).abs().max()) > 1e-3  # the state does something


def test_slot_offsets_and_connector_lora_have_their_shapes(tiny):
    cfg, mllm, _, _ = tiny
    slots = adapter_state(_edge(cfg, mllm, "slots").adapters)
    assert slots["vision.offset"].shape == (mllm.num_image_tokens, mllm.parts.hidden_size)
    assert not slots["vision.offset"].any()
    conn = adapter_state(_edge(cfg, mllm, "connector").adapters)
    first = mllm.parts.connector.linear_1
    assert conn["vision.lora_A"].shape == (4, first.in_features)
    assert conn["vision.lora_B"].shape == (first.out_features, 4)
    assert conn["text.lora_A"].shape == (4, mllm.parts.hidden_size)  # text keeps the paper's form


def test_frozen_a_freezes_every_forms_lora_a_but_not_the_offsets(tiny):
    cfg, mllm, _, _ = tiny
    edge = _edge(cfg, mllm, "slots", factors="frozen_a")
    trained = {n for n, p in edge.adapters.named_parameters() if p.requires_grad}
    assert trained == {"vision.lora_B", "vision.offset", "text.lora_B"}


@pytest.mark.parametrize("kind", FORMS)
def test_fisher_merging_secagg_and_dp_of_mixed_rank_clients_for_each_form(tiny, kind):
    """FedNano's merge pads every client to the largest rank, rank-free tensors included, and the
    merged state loads back into each tier; secure aggregation and DP-FedAvg take every form's
    state."""
    from fednano_ray.strategies.base import ClientUpdate
    from fednano_ray.strategies.fednano import FedNano

    cfg, mllm, _, _ = tiny
    edges = {2: _edge(cfg, mllm, kind, r=2, seed=5), 4: _edge(cfg, mllm, kind, r=4, seed=6)}
    updates = []
    for i, (r, edge) in enumerate(edges.items()):
        state = adapter_state(edge.adapters)
        state = {k: v + 0.01 * (i + 1) for k, v in state.items()}
        # A uniform Fisher (normalised to 1): the weights are the example counts, 1 : 2.
        fisher = {k: torch.full_like(v, 3.0) for k, v in state.items()}
        updates.append(
            ClientUpdate(client_id=str(i), num_examples=10 * (i + 1), state=state, fisher=fisher)
        )
    global_state = adapter_state(edges[4].adapters)
    merged = FedNano(max_share=1.0).aggregate(global_state, updates, [])  # SecAgg has no cap
    assert merged.keys() == global_state.keys()
    for k, v in merged.items():
        assert v.shape == global_state[k].shape and torch.isfinite(v).all(), k
    for edge in edges.values():
        load_adapter_state(edge.adapters, merged)
    # SecAgg's fixed-point sums give the same merge; DP-FedAvg clips and noises every tensor of the
    # form.
    from fednano_ray.strategies import DPFedAvg
    from fednano_ray.trust.secagg_plan import secure_aggregate

    secure, _ = secure_aggregate(FedNano(), global_state, updates)
    for k, v in merged.items():
        torch.testing.assert_close(secure[k], v, rtol=0, atol=1e-5)
    dp = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0, noise_generator=seeded(1))
    dp.begin_round(0)
    noised = dp.aggregate(global_state, updates, [])
    assert noised.keys() == global_state.keys() and all(
        torch.isfinite(v).all() for v in noised.values()
    )
    if (
        kind == "slots"
    ):  # a rank-free tensor: the Fisher-weighted mean of both clients (weights 1 and 2)
        want = (1 * updates[0].state["vision.offset"] + 2 * updates[1].state["vision.offset"]) / 3
        torch.testing.assert_close(merged["vision.offset"], want)


@pytest.mark.parametrize("kind", FORMS)
def test_every_form_keeps_fednanos_economics_on_llava_7b(kind):
    """inspect on the LLaVA-1.5-7B architecture (meta device): adapters stay at most 0.05% of the
    MLLM.
    """
    from fednano_ray.accounting import inspect_config

    out = inspect_config(
        load_config(
            {
                "model": {"kind": "hf", "name_or_path": "llava-hf/llava-1.5-7b-hf"},
                "adapter": {"kind": kind},
            }
        )
    )
    assert out["adapter_form"] == kind
    assert 0 < out["adapter_fraction"] <= 5e-4, out["adapter_fraction"]
    text = 2 * 8 * 4096
    vision = {
        "lowrank": 2 * 8 * 4096,
        "bottleneck": 2 * 8 * 4096,
        "slots": 2 * 8 * 4096 + 576 * 4096,
        "connector": 8 * (1024 + 4096),
    }[kind]
    assert out["adapter_params"] == text + vision


@pytest.mark.parametrize("kind", FORMS)
def test_accounting_counts_what_each_form_builds(tiny, kind):
    from fednano_ray.accounting import adapter_param_count

    cfg, mllm, _, _ = tiny
    edge = _edge(cfg, mllm, kind, r=4)
    built = sum(p.numel() for p in edge.adapters.parameters())
    assert (
        adapter_param_count(
            mllm.parts, 4, cfg.adapter.modalities, kind=kind, num_image_tokens=mllm.num_image_tokens
        )
        == built
    )


def test_forms_that_adapt_the_visual_tokens_need_vision():
    with pytest.raises(ValueError, match="adapter.kind=slots adapts the visual tokens"):
        load_config("examples/tiny.yaml", ["adapter.kind=slots", "adapter.modalities=[text]"])
    with pytest.raises(ValueError, match="leave adapter.kind at lowrank"):
        load_config(
            "examples/tiny.yaml", ["adapter.kind=connector", "federation.strategy=fedavg-lora"]
        )
    with pytest.raises(ValueError, match="adapter.kind"):
        load_config("examples/tiny.yaml", ["adapter.kind=mystery"])
