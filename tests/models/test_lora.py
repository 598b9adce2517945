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

QA = [("What colour is the square?", "red"), ("How many stars?", "four"), ("Where is the circle?", "left"),
      ("What shape is blue?", "triangle"), ("Is it big?", "yes"), ("What colour is the star?", "green")]


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
    """PEFT LoRA goes on q_proj/v_proj of every decoder layer under llm.<module>.lora_A/B keys; it starts
    as the pretrained model (B = 0); local steps through the in-process LLM change the LoRA weights only
    (encoder, connector, embeddings and the LLM's own weights stay bit-identical) and lower the loss."""
    cfg = _cfg()
    mllm = build_mllm.__wrapped__(cfg.model)  # uncached: LoRA is injected in place
    plain_edge, plain_llm = build_mllm.__wrapped__(cfg.model).split(cfg.adapter, r=4)
    edge, llm, params = mllm.with_llm_lora(cfg.adapter, r=4, seed=0)

    layers = cfg.model.tiny.num_layers
    assert sorted(params) == sorted(
        f"llm.layers.{i}.self_attn.{m}.lora_{ab}" for i in range(layers) for m in ("q_proj", "v_proj") for ab in "AB"
    )
    assert params["llm.layers.0.self_attn.q_proj.lora_A"].shape == (4, 128)  # (r, in), PEFT's layout
    assert params["llm.layers.0.self_attn.q_proj.lora_B"].shape == (128, 4)  # (out, r)
    assert sum(p.numel() for p in params.values()) == lora_param_count(
        build_mllm.__wrapped__(cfg.model).parts.decoder, r=4, target_modules=("q_proj", "v_proj")
    )
    assert not list(edge.adapters.parameters())  # no NanoAdapters: the LLM LoRA is all that trains
    assert {n for n, p in [*edge.named_parameters(), *llm.named_parameters()] if p.requires_grad} == {
        n for n, _ in llm.named_parameters() if ".lora_" in n
    }

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(QA), mllm.num_image_tokens, cfg.model.tiny.vision_hidden_size)).astype(np.float32)
    rows = [mllm.encode_row(q, a) for q, a in QA]
    before = _mean_loss(edge, llm, feats, rows, mllm.pad_id)
    assert before == pytest.approx(_mean_loss(plain_edge, plain_llm, feats, rows, mllm.pad_id), abs=1e-6)

    frozen = {k: v.clone() for k, v in [*edge.state_dict().items(), *llm.state_dict().items()] if ".lora_" not in k}
    start = adapter_state(params)
    state, fisher, metrics = local_fit(
        edge, LocalServer(llm), feats, rows, steps=12, batch_size=3, lr=0.01, pad_id=mllm.pad_id, params=params
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
    """A rank-4 global LoRA state loads into a rank-2 client (HetLoRA truncation, as for NanoAdapters);
    target modules that fit no Linear layer are errors naming adapter.lora_target_modules."""
    cfg = _cfg()
    big = inject_llm_lora(build_mllm.__wrapped__(cfg.model).parts.decoder, r=4, lora_alpha=8, seed=0)
    with torch.no_grad():
        for p in big.values():
            p.normal_()
    small = inject_llm_lora(build_mllm.__wrapped__(cfg.model).parts.decoder, r=2, lora_alpha=8, seed=0)
    load_adapter_state(small, adapter_state(big))
    key = "llm.layers.1.self_attn.v_proj"
    assert torch.equal(small[f"{key}.lora_A"], big[f"{key}.lora_A"][:2])
    assert torch.equal(small[f"{key}.lora_B"], big[f"{key}.lora_B"][:, :2])

    decoder = build_mllm.__wrapped__(cfg.model).parts.decoder
    with pytest.raises(ValueError, match=r"adapter.lora_target_modules \['qkv'\] matches no module.*q_proj"):
        inject_llm_lora(decoder, r=2, lora_alpha=8, target_modules=("qkv",))
    with pytest.raises(ValueError, match="adapter.lora_target_modules: 'layers.0.self_attn' is a LlamaAttention"):
        inject_llm_lora(decoder, r=2, lora_alpha=8, target_modules=("self_attn",))
