"""FedDPA-F's dual adapter (fednano_ray/models/dual.py): the mix, the dynamic weight, the bank, the
local phase on a real client (no Ray: ClientActor is a plain class) and the bank's round trip."""

import numpy as np
import pytest
import torch

from fednano_ray.config import load_config
from fednano_ray.federation import rundir
from fednano_ray.models.adapter import ADAPTER_FORMS, adapter_state
from fednano_ray.models.build import build_mllm
from fednano_ray.models.dual import DualEdge, DynamicWeight, subsample
from fednano_ray.models.prompt import collate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(
        "examples/tiny.yaml", ["federation.strategy=feddpa-f", "federation.personalize_steps=3"]
    )
    mllm = build_mllm(cfg.model)
    qa = [
        ("What colour is the square?", "red"),
        ("How many stars?", "four"),
        ("Where is it?", "left"),
    ]
    batch = collate([mllm.encode_row(q, a) for q, a in qa], mllm.pad_id)
    width = cfg.model.tiny.vision_hidden_size
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(
        rng.standard_normal((3, mllm.num_image_tokens, width)).astype(np.float32)
    )
    return cfg, mllm, batch, feats


def _randomised(cfg, mllm, kind, seed):
    """A NanoEdge of form ``kind`` whose adapters are random (not the identity)."""
    edge = mllm.split(cfg.adapter.model_copy(update={"kind": kind}), r=4, seed=seed)[0]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in edge.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return edge


def _z(edge, batch, feats):
    with torch.no_grad():
        return edge(batch["input_ids"], batch["image_mask"], features=feats)


@pytest.mark.parametrize("kind", sorted(ADAPTER_FORMS))
def test_the_mix_is_the_global_model_at_w0_and_the_local_model_at_w1(tiny, kind):
    """w=0 gives exactly the global edge's z', w=1 exactly the local edge's, for every form."""
    cfg, mllm, batch, feats = tiny
    g, loc = _randomised(cfg, mllm, kind, 1), _randomised(cfg, mllm, kind, 2)
    dual = DualEdge.around(g)
    dual.load_states(adapter_state(g.adapters), adapter_state(loc.adapters))

    dual.weighting = 0.0
    assert torch.equal(_z(dual, batch, feats), _z(g, batch, feats))
    dual.weighting = 1.0
    assert torch.equal(_z(dual, batch, feats), _z(loc, batch, feats))
    dual.weighting = 0.5
    assert not torch.allclose(_z(dual, batch, feats), _z(g, batch, feats))  # the states differ


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_the_mix_is_the_global_model_when_the_local_adapter_is_the_global_one(tiny, w):
    """With local == global, any weight gives the global edge's z' (up to float rounding)."""
    cfg, mllm, batch, feats = tiny
    g = _randomised(cfg, mllm, "lowrank", 3)
    dual = DualEdge.around(g, weighting=w)
    dual.load_states(adapter_state(g.adapters), adapter_state(g.adapters))
    torch.testing.assert_close(_z(dual, batch, feats), _z(g, batch, feats), rtol=1e-6, atol=1e-6)


def test_the_mix_of_linear_residuals_is_the_mix_of_the_adapter_states(tiny):
    """For the paper's linear form, mixing outputs equals one adapter whose lora_B is the mix
    (same lora_A)."""
    cfg, mllm, batch, feats = tiny
    g, loc = _randomised(cfg, mllm, "lowrank", 4), _randomised(cfg, mllm, "lowrank", 5)
    gs, ls = adapter_state(g.adapters), adapter_state(loc.adapters)
    ls = {k: (gs[k] if k.endswith("lora_A") else v) for k, v in ls.items()}  # shared A, different B
    dual = DualEdge.around(g, weighting=0.25)
    dual.load_states(gs, ls)
    from fednano_ray.models.adapter import load_adapter_state

    load_adapter_state(g.adapters, {k: 0.75 * gs[k] + 0.25 * ls[k] for k in gs})
    torch.testing.assert_close(_z(dual, batch, feats), _z(g, batch, feats), rtol=1e-5, atol=1e-6)


def test_the_dynamic_weight_is_higher_on_the_banks_distribution(tiny):
    """A question like the bank's (same question types, images from the same distribution) gets a
    higher weight than an unrelated one (another question type, shifted images); both lie in
    [0, 1]."""
    cfg, mllm, _, _ = tiny
    dual = DualEdge.around(mllm.split(cfg.adapter, r=4)[0])
    rng = np.random.default_rng(1)
    width = cfg.model.tiny.vision_hidden_size

    def summaries(questions, shift):
        batch = collate([mllm.encode_row(q, None) for q in questions], mllm.pad_id)
        shape = (len(questions), mllm.num_image_tokens, width)
        feats = torch.from_numpy((rng.standard_normal(shape) + shift).astype(np.float32))
        return dual.representation(
            batch["input_ids"], batch["image_mask"], batch["attention_mask"].bool(), feats
        )

    own = [f"What colour is the {s}?" for s in ("square", "circle", "star", "triangle")] * 4
    own += [f"How many {s}s are there?" for s in ("square", "circle", "star", "triangle")] * 4
    weight = DynamicWeight(summaries(own, 0.0), top_k=5)
    near = weight(summaries(["What colour is the circle?", "How many stars are there?"], 0.0))
    far = weight(
        summaries(["Is the left object above the right one?", "Which side holds the cross?"], 3.0)
    )

    assert bool(((near >= 0) & (near <= 1)).all()) and bool(((far >= 0) & (far <= 1)).all())
    assert float(near.min()) > float(far.max()), (near, far)


def test_the_dynamic_weight_needs_the_prompt_and_a_bank():
    """Errors name what is missing: an empty bank, or a dynamic forward without prompt_mask."""
    with pytest.raises(ValueError, match="non-empty"):
        DynamicWeight(torch.empty(0, 8))
    weight = DynamicWeight(torch.randn(3, 8), top_k=5)
    assert weight.top_k == 3  # at most the bank's rows
    w = weight(torch.randn(4, 8))
    assert w.shape == (4,) and bool(((w >= 0) & (w <= 1)).all())


def test_a_dynamic_forward_without_the_prompt_mask_is_refused(tiny):
    cfg, mllm, batch, feats = tiny
    dual = DualEdge.around(
        mllm.split(cfg.adapter, r=4)[0], weighting=DynamicWeight(torch.randn(4, 256))
    )
    with pytest.raises(ValueError, match="prompt_mask"):
        dual(batch["input_ids"], batch["image_mask"], features=feats)


def test_the_bank_subsample_is_bounded_and_deterministic():
    """At most max_size rows, sorted and distinct, the same for the same seed; all rows when few."""
    keep = subsample(1000, 256, seed=7)
    assert len(keep) == 256 and keep == sorted(set(keep)) and keep == subsample(1000, 256, seed=7)
    assert keep != subsample(1000, 256, seed=8)
    assert subsample(10, 256, seed=7) == list(range(10))


@pytest.fixture(scope="module")
def client(tiny):
    """A real ClientActor (plain class, no Ray) of the edge-large tier with an in-process LLM."""
    from fednano_ray.actors.client import ClientActor
    from fednano_ray.features import cached_features
    from fednano_ray.task import prepare_data
    from fednano_ray.training import LocalServer

    cfg, mllm, _, _ = tiny
    data = prepare_data(cfg)

    def qs(exs):
        return [(e.question, list(e.choices), e.answer, e.category) for e in exs]

    feats = {s: cached_features(mllm, "", getattr(data, s), None) for s in ("train", "test")}
    _, server_llm = mllm.split(cfg.adapter, r=4)
    actor = ClientActor(
        cfg.model,
        cfg.adapter,
        rank=4,
        server=LocalServer(server_llm),
        data={s: (feats[s], qs(getattr(data, s))) for s in ("train", "test")},
    )
    return cfg, data, actor


def test_the_local_phase_moves_the_local_adapter_and_leaves_the_global_one(client):
    """fit_dual trains a copy of the global adapter beside the frozen global one: the global state
    comes back unchanged (in the dual edge too), the local one has moved, the bank is bounded."""
    cfg, data, actor = client
    torch.manual_seed(0)
    global_state = {k: torch.randn_like(v) * 0.05 for k, v in actor.initial_state().items()}
    before = {k: v.clone() for k, v in global_state.items()}
    shard = data.client_train[3]
    assert len(shard) > 8

    out = actor.fit_dual(
        3,
        shard,
        global_state,
        steps=3,
        batch_size=4,
        lr=0.01,
        train_weight=0.5,
        bank_size=8,
        seed=1,
        objective="choice",
    )

    assert all(torch.equal(global_state[k], before[k]) for k in before)
    held = adapter_state(actor._dual.global_edge.adapters)
    assert all(
        torch.equal(held[k], before[k]) for k in before
    )  # frozen while the local one trained
    assert any(not torch.equal(out["state"][k], before[k]) for k in before)
    assert out["state"]["vision.lora_B"].shape == before["vision.lora_B"].shape
    assert out["bank"].shape == (8, 2 * cfg.model.tiny.hidden_size)  # bounded by bank_size
    # Scoring with the dual adapter reports the dynamic weights it used.
    dual = {"local": out["state"], "bank": out["bank"], "top_k": 5}
    res = actor.evaluate(global_state, "train", data.client_test[3], 16, dual=dual)
    assert 0 <= res["dual_weight_mean"] <= 1 and res["n"] == len(data.client_test[3])
    plain = actor.evaluate(global_state, "train", data.client_test[3], 16)
    assert "dual_weight_mean" not in plain


def test_the_dual_state_round_trips_through_save_and_load(tiny, tmp_path):
    """Local adapter and bank, saved as the checkpoint saves them and loaded back, give the
    same z'."""
    from safetensors.torch import load_file, save_file

    cfg, mllm, batch, feats = tiny
    g, loc = _randomised(cfg, mllm, "slots", 6), _randomised(cfg, mllm, "slots", 7)
    gs, ls, bank = adapter_state(g.adapters), adapter_state(loc.adapters), torch.randn(6, 256)
    rundir.client_adapters_path(tmp_path, 1).parent.mkdir()
    save_file(ls, str(rundir.client_adapters_path(tmp_path, 1)))
    rundir.save_bank(rundir.client_bank_path(tmp_path, 1), bank)
    prompt = batch["attention_mask"].bool() & (batch["labels"] == -100)

    def z(local_state, bank_rows):
        dual = DualEdge.around(g, weighting=DynamicWeight(bank_rows, top_k=2))
        dual.load_states(gs, local_state)
        with torch.no_grad():
            return dual(batch["input_ids"], batch["image_mask"], features=feats, prompt_mask=prompt)

    loaded = z(
        load_file(str(rundir.client_adapters_path(tmp_path, 1))),
        rundir.load_bank(rundir.client_bank_path(tmp_path, 1)),
    )
    assert torch.equal(loaded, z(ls, bank))
