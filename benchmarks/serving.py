"""Serving benchmark: requests/s and p50/p99 latency over HTTP, HF vs vLLM engine, 1 vs 16 clients.

One run, side by side on the same machine. Ray and Serve start locally (HTTP on 127.0.0.1 only);
a run directory for the nano model is written directly (``examples/quickstart.yaml`` with 16
clients in two tiers of 8; a checkpoint with random global adapters and every client's own
personal adapters at its tier's rank), each client gets a token, and then for each engine (hf,
then vllm) the app is deployed (timed), warmed up (every client's model loaded, a few requests)
and driven closed-loop over real HTTP:

* 1 client sending ``--requests-1`` requests one after another;
* 16 distinct clients (own id, own token, own connection), each sending ``--requests-16``
  requests one after another, all 16 at once.

Every request is ``POST /v1/chat/completions`` with a synthetic VQA image
(:func:`fednano_ray.data.synth.generate`, 224 px PNG, base64 data URI) and its question, greedy,
``--max-new-tokens`` at most. No two measured requests share client and image, so vLLM's prefix
cache only helps with what really repeats (the chat template). Both engines run in fp32 by
default, where they decode the same tokens: the answers of the two engines are compared, so the
work is shown to be equal. The app is deleted between engines.

Usage: ``fednano-ray bench serving [--requests-1 32] [--requests-16 8] [--max-new-tokens 16]
[--dtype float32] [--json OUT]`` or ``python benchmarks/serving.py``. About 3 minutes on 2 cores
(the first run on a machine also aligns the nano connector once, unless it is cached; without
the cached aligned connector the benchmark uses an unaligned one: same cost per request).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
APP = "fednano-bench"
NUM_CLIENTS = 16
ENGINES = ("hf", "vllm")


def _load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the run directory -----------------------------------------------------------------------------


def make_config(connector_steps: int | None):
    """quickstart.yaml with 16 clients (tiers of 8 + 8); an unaligned connector if none is
    cached.
    """
    from fednano_ray.config import load_config
    from fednano_ray.models.nano import connector_cache_path, connector_key, shipped_connector_path

    overrides = ["federation.num_clients=16", "tiers.0.clients=8", "tiers.1.clients=8"]
    cfg = load_config(QUICKSTART, overrides)
    if connector_steps is None:
        steps = cfg.model.connector_steps
        key = connector_key(
            grid=cfg.model.grid, steps=steps, instruct_steps=cfg.model.instruct_steps
        )
        if not (connector_cache_path(key).exists() or shipped_connector_path(key).exists()):
            print(
                f"note: no cached or shipped aligned nano connector ({steps} steps): "
                "serving an unaligned one "
                "(connector_steps=0; the same cost per request, odder answers). Pass "
                f"--connector-steps {steps} to align it first (~5 min, once).",
                flush=True,
            )
            connector_steps = 0
    if connector_steps is not None:
        cfg = load_config(QUICKSTART, [*overrides, f"model.connector_steps={connector_steps}"])
    return cfg


def write_run_dir(run_dir: Path, cfg, *, seed: int = 0, scale: float = 0.02) -> None:
    """config.yaml plus checkpoints/round_0001: random global adapters (max rank) and one personal
    set per client at its tier's rank (lora_B random, so every client's model differs)."""
    import torch

    from fednano_ray.federation import rundir
    from fednano_ray.models.adapter import adapter_state
    from fednano_ray.models.build import build_mllm

    rundir.write_config(run_dir, cfg)
    mllm = build_mllm(cfg.model)
    tiers = cfg.client_tiers()
    gen = torch.Generator().manual_seed(seed)

    def randomised(r: int) -> dict:
        edge, _ = mllm.split(
            cfg.adapter, r=r, seed=int(torch.randint(0, 2**31, (1,), generator=gen))
        )
        state = adapter_state(edge.adapters)
        for k in state:
            if k.endswith("lora_B"):
                state[k] = scale * torch.randn(state[k].shape, generator=gen)
        return state

    global_state = randomised(max(cfg.tier_rank(t) for t in tiers))
    personal = {c: randomised(cfg.tier_rank(tier)) for c, tier in enumerate(tiers)}
    rundir.write_checkpoint(
        run_dir, rundir.Checkpoint(round=1, global_state=global_state, client_states=personal)
    )


def synthetic_requests(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """``n`` (data-URI PNG, question) pairs from the synthetic VQA generator (224 px)."""
    from fednano_ray.data.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(tmp, num_train=n, num_test=1, image_size=224, seed=seed)
        rows = [
            json.loads(x) for x in (root / "train" / "data.jsonl").read_text().splitlines() if x
        ]
        out = []
        for row in rows:
            png = (root / "train" / row["image"]).read_bytes()
            out.append(
                ("data:image/png;base64," + base64.b64encode(png).decode(), str(row["question"]))
            )
    return out


# -- load ------------------------------------------------------------------------------------------


def chat_body(client: int, image: str, question: str, max_new_tokens: int) -> dict:
    content = [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    return {
        "model": str(client),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_new_tokens,
        "temperature": 0,
    }


async def closed_loop(
    url: str, tokens: dict[int, str], jobs: dict[int, list[tuple[str, str]]], max_new_tokens: int
) -> dict:
    """Each client (own connection) sends its jobs one after another; all clients at once.

    Returns:
        wall seconds, latencies (s), completion tokens, answers keyed (client, job index), errors.
    """
    import httpx

    latencies: list[float] = []
    answers: dict[tuple[int, int], str] = {}
    errors: list[str] = []
    n_tokens = 0

    async def client(cid: int, todo: list[tuple[str, str]]) -> None:
        nonlocal n_tokens
        headers = {"Authorization": f"Bearer {tokens[cid]}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as http:
            for j, (image, question) in enumerate(todo):
                body = chat_body(cid, image, question, max_new_tokens)
                t0 = time.perf_counter()
                r = await http.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(f"client {cid}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                out = r.json()
                latencies.append(dt)
                n_tokens += int(out["usage"]["completion_tokens"])
                answers[(cid, j)] = out["choices"][0]["message"]["content"]

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c, todo) for c, todo in jobs.items()))
    return {
        "wall_s": time.perf_counter() - t0,
        "latencies": latencies,
        "tokens": n_tokens,
        "answers": answers,
        "errors": errors,
    }


def summarise(res: dict) -> dict:
    import numpy as np

    lat = np.asarray(res["latencies"]) if res["latencies"] else np.asarray([float("nan")])
    n = len(res["latencies"])
    return {
        "requests": n,
        "errors": len(res["errors"]),
        "wall_s": round(res["wall_s"], 2),
        "requests_per_s": round(n / res["wall_s"], 2),
        "p50_s": round(float(np.percentile(lat, 50)), 3),
        "p99_s": round(float(np.percentile(lat, 99)), 3),
        "completion_tokens": res["tokens"],
        "tokens_per_s": round(res["tokens"] / res["wall_s"], 1),
    }


# -- one engine ------------------------------------------------------------------------------------


def bench_engine(
    engine: str,
    run_dir: Path,
    url: str,
    tokens: dict[int, str],
    pool: list[tuple[str, str]],
    args: argparse.Namespace,
    deploy_options: dict,
) -> dict:
    from ray import serve

    from fednano_ray.serve.app import deploy

    n1, n16 = args.requests_1, args.requests_16
    one = {0: pool[:n1]}
    # Client c's job j uses image n1 + j: (client, image) pairs never repeat, neither across
    # scenarios.
    many = {c: pool[n1 : n1 + n16] for c in range(NUM_CLIENTS)}
    warm_pool = pool[n1 + n16 :]
    out: dict = {"engine": engine}
    print(f"[{engine}] deploying ...", flush=True)
    out["deploy_s"] = round(deploy(run_dir, engine=engine, name=APP, **deploy_options), 1)
    print(f"[{engine}] deployed in {out['deploy_s']} s", flush=True)
    try:
        # Warm-up: every client's model into the ingress's cache, the engine's first batches.
        t0 = time.perf_counter()
        warm = {c: [warm_pool[c % len(warm_pool)]] for c in range(NUM_CLIENTS)}
        res = asyncio.run(closed_loop(url, tokens, warm, args.max_new_tokens))
        res2 = asyncio.run(closed_loop(url, tokens, {0: warm_pool[:2]}, args.max_new_tokens))
        if res["errors"] or res2["errors"]:
            raise RuntimeError(f"warm-up failed: {(res['errors'] + res2['errors'])[:3]}")
        out["warmup_s"] = round(time.perf_counter() - t0, 1)
        for name, jobs in (("1 client", one), ("16 clients", many)):
            res = asyncio.run(closed_loop(url, tokens, jobs, args.max_new_tokens))
            if res["errors"]:
                print(f"[{engine}] {name}: {len(res['errors'])} errors, e.g. {res['errors'][0]}")
            out[name] = summarise(res)
            out[name]["answers"] = res["answers"]
            s = out[name]
            print(
                f"[{engine}] {name}: {s['requests']} requests in {s['wall_s']} s = "
                f"{s['requests_per_s']} req/s, p50 {s['p50_s']} s, p99 {s['p99_s']} s",
                flush=True,
            )
    finally:
        t0 = time.perf_counter()
        serve.delete(APP)
        out["delete_s"] = round(time.perf_counter() - t0, 1)
    return out


def table(results: dict[str, dict]) -> str:
    lines = [
        (
            "| engine | clients | requests | req/s | p50 latency (s) | p99 latency (s) | tokens/s"
            " | deploy (s) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, res in results.items():
        for name in ("1 client", "16 clients"):
            s = res[name]
            label = "1" if name == "1 client" else f"{NUM_CLIENTS} distinct"
            lines.append(
                f"| {engine} | {label} | {s['requests']} | {s['requests_per_s']:.2f} | "
                f"{s['p50_s']:.3f} | {s['p99_s']:.3f} | {s['tokens_per_s']:.1f} | "
                f"{res['deploy_s']:.1f} |"
            )
    if set(ENGINES) <= set(results):  # every column as vLLM / HF (latency < 1: vLLM is faster)
        deploy = results["vllm"]["deploy_s"] / results["hf"]["deploy_s"]
        for name in ("1 client", "16 clients"):
            hf, vl = results["hf"][name], results["vllm"][name]
            label = "1" if name == "1 client" else f"{NUM_CLIENTS} distinct"
            cols = [
                vl[k] / hf[k] if hf[k] else float("nan")
                for k in ("requests_per_s", "p50_s", "p99_s", "tokens_per_s")
            ]
            lines.append(
                f"| vllm/hf | {label} | | {cols[0]:.2f}x | {cols[1]:.2f}x | {cols[2]:.2f}x | "
                f"{cols[3]:.2f}x | {deploy:.2f}x |"
            )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    import ray
    import torch
    from ray import serve

    from fednano_ray.serve import auth
    from fednano_ray.serve.app import export_server_llm
    from fednano_ray.serve.engines import vllm_available

    engines = [e for e in args.engines.split(",") if e]
    if "vllm" in engines and not vllm_available():
        raise SystemExit("vLLM is not installed: pip install -e '.[vllm]' (see pyproject.toml)")
    t_start = time.perf_counter()
    cfg = make_config(args.connector_steps)
    run_dir = Path(tempfile.mkdtemp(prefix="fednano-bench-serving-"))
    t0 = time.perf_counter()
    write_run_dir(run_dir, cfg)
    export_server_llm(run_dir)  # once, here: both deploys then find it exported
    tokens = auth.issue_all(run_dir, NUM_CLIENTS)
    pool = synthetic_requests(args.requests_1 + args.requests_16 + NUM_CLIENTS)
    setup_s = time.perf_counter() - t0
    print(f"run directory {run_dir} ready in {setup_s:.1f} s", flush=True)

    deploy_options = {
        "dtype": args.dtype,
        "ingress_num_cpus": 1.0,  # Ray gives an actor OMP_NUM_THREADS = its CPUs
        "llm_num_cpus": 2.0,  # both engines get both cores' threads
        "max_batch_size": 16,
    }
    res: dict = {
        "model": "nano (EfficientNet-Lite0 + SmolLM2-135M-Instruct)",
        "connector_steps": cfg.model.connector_steps,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "requests_1_client": args.requests_1,
        "requests_per_client_16": args.requests_16,
        "deploy_options": deploy_options,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_avg_start": _load_avg(),
        "setup_s": round(setup_s, 1),
        "engines": {},
    }
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
    try:
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for engine in engines:
            res["engines"][engine] = bench_engine(
                engine, run_dir, url, tokens, pool, args, deploy_options
            )
    finally:
        serve.shutdown()
        ray.shutdown()
        if not args.keep:  # the run directory and Ray's session folder (logs) are kept with --keep
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if set(ENGINES) <= set(res["engines"]):
        same = total = 0
        for name in ("1 client", "16 clients"):
            a, b = (res["engines"][e][name]["answers"] for e in ENGINES)
            total += len(a.keys() & b.keys())
            same += sum(a[k] == b[k] for k in a.keys() & b.keys())
        res["answers_identical"] = f"{same}/{total}"
    for r in res["engines"].values():
        for name in ("1 client", "16 clients"):
            r[name].pop("answers", None)
    res["load_avg_end"] = _load_avg()
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests-1", type=int, default=32, help="requests of the single client")
    ap.add_argument("--requests-16", type=int, default=8, help="requests of each of the 16 clients")
    ap.add_argument(
        "--max-new-tokens", type=int, default=16, help="greedy tokens per answer, at most"
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        help=(
            "LLM dtype of both engines (auto: bfloat16 where native, else float32; float32: exact)"
        ),
    )
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated, measured in this order")
    ap.add_argument(
        "--connector-steps",
        type=int,
        default=None,
        help="nano connector alignment steps (default: quickstart's if cached, else 0 = unaligned)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument(
        "--keep", action="store_true", help="keep the run directory and Ray's logs under /tmp"
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before Ray starts, so the Serve replicas (and vLLM's engine process) inherit them.
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # vLLM's CPU default reserves a core
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB
    res = run(args)
    print()
    print(table(res["engines"]))
    print()
    for engine, r in res["engines"].items():
        print(f"deploy {engine}: {r['deploy_s']} s (warm-up {r['warmup_s']} s)")
    if "answers_identical" in res:
        print(f"answers identical between engines: {res['answers_identical']}")
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
