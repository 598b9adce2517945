"""Engine benchmark: vLLM init time (tiny, SmolLM2) and HF vs vLLM greedy tokens/s on SmolLM2.

One run, side by side on the same machine: a batch of ``--batch`` prompt embeddings (SmolLM2
embeddings of real ChatML prompts, ~40 positions, plus a little noise so every run's prompts are
fresh for vLLM's prefix cache) decoded greedily for ``--new-tokens`` tokens with no stop token, so
both engines generate exactly batch × new-tokens tokens. HF decodes the batch as one left-padded
batch; vLLM gets the prompts as concurrent requests (its scheduler batches them). The engines'
tokens are compared (fp32: they should agree).

Usage: ``fednano-ray bench engines [--batch 16] [--new-tokens 32] [--dtype float32] [--json OUT]``
or ``python benchmarks/engines.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import tempfile
import time
from pathlib import Path

QUESTIONS = (
    "What is the capital of France?",
    "Name a colour of the sky.",
    "How many legs does a cat have?",
    "What do bees make?",
    "Which planet is called the red planet?",
    "What is two plus three?",
    "What animal says moo?",
    "What is frozen water called?",
)


def _prompts(folder: Path, n: int, seed: int) -> list:
    """SmolLM2 embeddings of ``n`` ChatML prompts, each nudged by tiny noise (fresh for caches)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        table = f.get_tensor("model.embed_tokens.weight").float()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        text = (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{q} Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = torch.tensor(tok.encode(text, add_special_tokens=False))
        z = table[ids]
        out.append(z + 1e-3 * torch.randn(z.shape, generator=gen))
    return out


def _load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def vllm_init(folder: Path, dtype: str, max_model_len: int) -> tuple[object, float]:
    from fednano_ray.serve.engines import VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine(folder, dtype=dtype, max_model_len=max_model_len)
    return engine, time.perf_counter() - t0


def tiny_init(dtype: str) -> float:
    """Exports the tiny LLaVA's LLM and measures a VLLMEngine's init on it."""
    from fednano_ray.config import load_config
    from fednano_ray.models.build import build_mllm
    from fednano_ray.serve.export import export_llm

    with tempfile.TemporaryDirectory() as tmp:
        folder = export_llm(build_mllm(load_config("examples/tiny.yaml").model), Path(tmp) / "tiny")
        engine, init_s = vllm_init(folder, dtype, 512)
        engine.shutdown()
    return init_s


def run(
    batch: int = 16, new_tokens: int = 32, dtype: str = "float32", with_tiny: bool = True
) -> dict:
    """Runs the benchmark; returns the figures as a dict."""
    import torch

    from fednano_ray.models.pretrained import smollm2_dir
    from fednano_ray.serve.engines import HFEngine, vllm_available

    if not vllm_available():
        raise SystemExit("vLLM is not installed: pip install -e '.[vllm]' (see pyproject.toml)")
    folder = smollm2_dir()
    res: dict = {
        "batch": batch,
        "new_tokens": new_tokens,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_start": _load_avg(),
    }
    if with_tiny:
        res["vllm_init_s_tiny"] = round(tiny_init(dtype), 2)
        print(f"vLLM init, tiny LLaVA LLM: {res['vllm_init_s_tiny']} s", flush=True)

    warm = _prompts(folder, 2, seed=0)
    timed = _prompts(folder, batch, seed=1)
    prompt_len = [int(z.shape[0]) for z in timed]
    res["prompt_len_min_max"] = [min(prompt_len), max(prompt_len)]

    def measure(engine) -> tuple[list[list[int]], float]:
        asyncio.run(engine.generate(warm, max_new_tokens=4, stop_token_ids=[]))
        t0 = time.perf_counter()
        out = asyncio.run(engine.generate(timed, max_new_tokens=new_tokens, stop_token_ids=[]))
        return out, time.perf_counter() - t0

    t0 = time.perf_counter()
    hf = HFEngine(folder, dtype=dtype)
    res["hf_init_s"] = round(time.perf_counter() - t0, 2)
    hf_out, hf_s = measure(hf)
    del hf
    gc.collect()
    n_hf = sum(map(len, hf_out))
    res.update(hf_wall_s=round(hf_s, 2), hf_tokens=n_hf, hf_tokens_per_s=round(n_hf / hf_s, 1))
    print(f"HF:   {n_hf} tokens in {hf_s:.2f} s = {n_hf / hf_s:.1f} tokens/s", flush=True)

    vllm, init_s = vllm_init(folder, dtype, 512)
    res["vllm_init_s_smollm2"] = round(init_s, 2)
    print(f"vLLM init, SmolLM2-135M: {init_s:.1f} s", flush=True)
    try:
        v_out, v_s = measure(vllm)
    finally:
        vllm.shutdown()
    n_v = sum(map(len, v_out))
    res.update(vllm_wall_s=round(v_s, 2), vllm_tokens=n_v, vllm_tokens_per_s=round(n_v / v_s, 1))
    print(f"vLLM: {n_v} tokens in {v_s:.2f} s = {n_v / v_s:.1f} tokens/s", flush=True)
    res["vllm_over_hf"] = round((n_v / v_s) / (n_hf / hf_s), 2)
    res["rows_identical"] = sum(a == b for a, b in zip(hf_out, v_out, strict=True))
    res["load_avg_end"] = _load_avg()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="prompts decoded together")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument(
        "--dtype",
        default="auto",
        help="auto (bfloat16 where native, else float32), float32 (exact) or bfloat16",
    )
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny model's vLLM init time")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = run(args.batch, args.new_tokens, args.dtype, with_tiny=not args.no_tiny)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
