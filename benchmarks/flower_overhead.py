"""Framework overhead per client-round: fednano-ray's simulation mode vs. Flower's
``run_simulation``.

The same trivial client (``_flower_side.TrivialClient``: the tiny random-weight model of
examples/tiny.yaml, ONE local split step of batch 4, FedAvg) runs N clients x R rounds
(1) through fednano-ray (``federation.mode=simulation``, an actor pool of ``--concurrency`` client
actors, the frozen LLM half in the LLMTrainer actor) and (2) through Flower's ``run_simulation`` on
its Ray backend (a pool of ``--concurrency`` ClientApp actors, the LLM half in-process), side by
side in one run. The client's own compute (one fit, in-process, one torch thread, no framework) is
timed separately first. Reported per side::

    s per client-round = median round wall x concurrency / clients
                         (the slot time one client-round takes)
    overhead           = s per client-round - client compute
                         (what the framework adds)

A round's wall is, for us, the coordinator's ``wall_time_s`` (sample, dispatch, split steps through
the trainer, collect, aggregate; checkpointing and evaluation excluded: the run has R + 1 rounds
configured and stops after R, so no measured round evaluates); for Flower, from
``FedAvg.configure_train`` to the end of ``aggregate_train`` (federated evaluation is off). Each
side runs ``--repeat`` times, alternating (ours, Flower, ours, ...), so that load from elsewhere on
a shared machine hits both alike; the median pools every run's rounds but its first (round 0 is
warm-up: actor start, model build). The best round (less the 10th-percentile fit) is shown too: on
a busy machine it is the least disturbed figure. Startup (Ray, actors, data) is shown separately
as the whole run's wall time. Note that Flower's in-memory Grid polls for replies every 0.1 s, so
its round walls come in steps of about 0.1 s.

Flower must NOT be installed in our venv (flwr[simulation] pins another ray). It runs in a venv of
its own, as a subprocess (benchmarks/_flower_side.py) that prints one JSON line. Set it up once
(torch pinned to the local CPU wheel; unpinned it pulls a multi-GB CUDA build)::

    python3.11 -m venv /tmp/flwr-venv
    /tmp/flwr-venv/bin/pip install 'flwr[simulation]==1.42.0' torch==2.13.0 \\
        'transformers>=5.16.1,<5.20' 'pydantic>=2.7,<3' safetensors pyyaml numpy pillow tqdm psutil
    /tmp/flwr-venv/bin/pip install --no-deps -e .          # fednano_ray itself, for the same client

or pass ``--setup-venv`` to have this script run exactly those commands. Point elsewhere with
``--flower-python PATH`` or ``FLWR_VENV=DIR``. Usage::

    fednano-ray bench flower_overhead [--clients 10 --rounds 5 --repeat 2 --concurrency 1
        --batch-wait-ms MS]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FLOWER_PINS = [
    "flwr[simulation]==1.42.0",
    "torch==2.13.0",
    "transformers>=5.16.1,<5.20",
    "pydantic>=2.7,<3",
    "safetensors",
    "pyyaml",
    "numpy",
    "pillow",
    "tqdm",
    "psutil",
]


def _side_module():
    """benchmarks/_flower_side.py (its top level imports neither flwr nor ray)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_flower_side", HERE / "_flower_side.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_config(clients: int, rounds: int, concurrency: int, batch_wait_ms: float | None) -> dict:
    """examples/tiny.yaml made trivial: one tier (one rank), one local step, FedAvg, no
    evaluation.
    """
    tree = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    tree["federation"].update(
        num_clients=clients,
        clients_per_round=clients,
        rounds=rounds + 1,
        evaluate_every=rounds + 1,
        strategy="fedavg",
        mode="simulation",
        deadline_s=600,
    )
    tree["tiers"] = [
        {
            "name": "sim",
            "clients": clients,
            "num_cpus": 1,
            "batch_size": 4,
            "local_steps": 1,
            "adapter_rank": 4,
            "pool_size": concurrency,
        }
    ]
    # iid with >= 8 training questions a client: every client has a full batch of 4.
    tree["data"].update(
        partition="iid", synth={**tree["data"]["synth"], "num_train": max(160, 10 * clients)}
    )
    tree["train"].update(trainer_threads=1)
    if batch_wait_ms is not None:
        tree["train"]["batch_wait_ms"] = batch_wait_ms
    from fednano_ray.config import load_config

    return load_config(tree).model_dump(mode="json")


def client_compute(cfg_json: str, reps: int) -> list[float]:
    """Seconds of ``reps`` trivial-client fits, in-process (no Ray, no Flower), one torch thread."""
    import torch

    side = _side_module()
    before = torch.get_num_threads()
    client = side.TrivialClient(side.load_cfg(cfg_json))
    n = len(client.shards)
    for c in range(min(n, 3)):  # warm-up: autograd, tokenizer rows
        client.fit(c, client.initial)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        client.fit(i % n, client.initial, seed=i)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return times


def run_ours(cfg_json: str, rounds: int, concurrency: int) -> dict:
    import ray

    from fednano_ray.app import train
    from fednano_ray.config import load_config

    cfg = load_config(json.loads(cfg_json))
    t0 = time.perf_counter()
    # A Ray of our own, in a temp dir of its own: it neither joins nor replaces (as the default for
    # ray.init()) a cluster already running on this machine. K client actors at 1 CPU + the trainer
    # at 0.5.
    ray.init(
        address="local",
        num_cpus=concurrency + 1,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, Path(tmp) / "run", progress=False, stop_after_round=rounds - 1)
    run_wall = time.perf_counter() - t0
    ray.shutdown()
    rs = res["rounds"]
    return {
        "framework": "fednano-ray",
        "ray": ray.__version__,
        "clients": cfg.federation.num_clients,
        "rounds": len(rs),
        "concurrency": concurrency,
        "round_walls_s": [r["wall_time_s"] for r in rs],
        "replies": [len(r["completed"]) for r in rs],
        "failures": sum(len(r["failures"]) for r in rs),
        "run_wall_s": round(run_wall, 2),
    }


def flower_python(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    return Path(os.environ.get("FLWR_VENV", "/tmp/flwr-venv")) / "bin" / "python"


def setup_venv(python: Path) -> None:
    venv = python.parent.parent
    print(f"creating the Flower venv {venv} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *FLOWER_PINS], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=True
    )


def run_flower(
    python: Path, cfg_json: str, rounds: int, concurrency: int, timeout_s: float
) -> dict:
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": "",  # nothing of our venv leaks in
    }
    proc = subprocess.run(
        [
            str(python),
            str(HERE / "_flower_side.py"),
            "--config-json",
            cfg_json,
            "--rounds",
            str(rounds),
            "--concurrency",
            str(concurrency),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FLOWER_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"the Flower side failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-5000:]}"
        )
    return json.loads(lines[-1].split(" ", 1)[1])


def summarise(runs: list[dict], compute_s: float, compute_best_s: float) -> dict:
    """Pool every run's rounds but its first (warm-up): median (and best) round wall, per
    client-round, overhead.
    """
    walls = [
        w
        for r in runs
        for w in (r["round_walls_s"][1:] if len(r["round_walls_s"]) > 1 else r["round_walls_s"])
    ]
    med = statistics.median(walls)
    first = runs[0]
    per = med * first["concurrency"] / first["clients"]
    best = min(walls) * first["concurrency"] / first["clients"]
    return {
        "framework": first["framework"],
        "ray": first["ray"],
        "flwr": first.get("flwr"),
        "clients": first["clients"],
        "rounds": first["rounds"],
        "concurrency": first["concurrency"],
        "runs": len(runs),
        "round_walls_s": [r["round_walls_s"] for r in runs],
        "replies_ok": all(min(r["replies"]) == first["clients"] for r in runs),
        "run_wall_s": statistics.median(r["run_wall_s"] for r in runs),
        "round_wall_median_s": round(med, 4),
        "s_per_client_round": round(per, 5),
        "overhead_s_per_client_round": round(per - compute_s, 5),
        # The least-disturbed figures (best round less the 10th-percentile fit), for a busy machine.
        "best_s_per_client_round": round(best, 5),
        "best_overhead_s_per_client_round": round(best - compute_best_s, 5),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fednano-ray bench flower_overhead")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of each side, alternating (ours, Flower, ours, ...)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="client actors on each side (our pool_size; Flower's actor pool)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="our LLMTrainer's train.batch_wait_ms (default: the config's, 5 ms)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=50,
        help="fits timed for the client's own compute, before and after",
    )
    p.add_argument(
        "--flower-python",
        help="python of the Flower venv (default $FLWR_VENV/bin/python or /tmp/flwr-venv)",
    )
    p.add_argument(
        "--setup-venv", action="store_true", help="create the Flower venv first if it is missing"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds one Flower run may take")
    a = p.parse_args(argv)
    if a.rounds < 2:
        p.error("--rounds must be at least 2 (round 0 is warm-up)")

    python = flower_python(a.flower_python)
    if not python.exists():
        if not a.setup_venv:
            sys.exit(
                f"no Flower venv at {python.parent.parent}: pass --setup-venv, "
                "or see this benchmark's docstring "
                "(benchmarks/flower_overhead.py) for the pip commands"
            )
        setup_venv(python)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    cfg_json = json.dumps(bench_config(a.clients, a.rounds, a.concurrency, a.batch_wait_ms))
    fits = client_compute(cfg_json, a.reps)
    ours_runs, flower_runs = [], []
    for _ in range(a.repeat):  # alternate, so that load from elsewhere hits both sides alike
        ours_runs.append(run_ours(cfg_json, a.rounds, a.concurrency))
        print(json.dumps(ours_runs[-1]), flush=True)
        time.sleep(2.0)  # let one Ray's processes exit before the next starts
        flower_runs.append(run_flower(python, cfg_json, a.rounds, a.concurrency, a.timeout))
        print(json.dumps(flower_runs[-1]), flush=True)
        time.sleep(2.0)
    fits += client_compute(cfg_json, a.reps)
    c = statistics.median(fits)
    c10 = sorted(fits)[len(fits) // 10]
    ours, flower = summarise(ours_runs, c, c10), summarise(flower_runs, c, c10)

    print(
        f"\n{a.clients} clients x {a.rounds} rounds x {a.repeat} runs a side, "
        f"{a.concurrency} client actor(s) a side; "
        f"client compute {1000 * c:.1f} ms a fit (median of {len(fits)}, "
        f"p10 {1000 * c10:.1f} ms; one split step, batch 4, tiny model)"
    )
    print(
        "| framework | round wall (median) | s per client-round | overhead per client-round | "
        "best round: s / overhead "
        "per client-round | run wall (incl. startup) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in (ours, flower):
        name = (
            f"fednano-ray (ray {r['ray']})"
            if r["framework"] == "fednano-ray"
            else f"Flower {r['flwr']} (ray {r['ray']})"
        )
        print(
            f"| {name} | {r['round_wall_median_s']:.3f} s | "
            f"{1000 * r['s_per_client_round']:.1f} ms | "
            f"{1000 * r['overhead_s_per_client_round']:.1f} ms | "
            f"{1000 * r['best_s_per_client_round']:.1f} / "
            f"{1000 * r['best_overhead_s_per_client_round']:.1f} ms | {r['run_wall_s']:.1f} s |"
        )
    fo = flower["overhead_s_per_client_round"]
    ratio = ours["overhead_s_per_client_round"] / fo if fo > 0 else None
    total_ratio = ours["s_per_client_round"] / flower["s_per_client_round"]
    print(
        f"overhead ratio ours/Flower: {ratio:.2f}x"
        if ratio is not None
        else "overhead ratio: n/a (Flower's is <= 0)",
        f"(per client-round in all, compute included: {total_ratio:.2f}x)",
    )
    if not (ours["replies_ok"] and flower["replies_ok"]):
        print("WARNING: some rounds lost clients; see the JSON lines above")
    print(
        json.dumps(
            {
                "benchmark": "flower_overhead",
                "clients": a.clients,
                "rounds": a.rounds,
                "repeat": a.repeat,
                "concurrency": a.concurrency,
                "batch_wait_ms": json.loads(cfg_json)["train"]["batch_wait_ms"],
                "client_compute_s": round(c, 5),
                "client_compute_p10_s": round(c10, 5),
                "ours_best_overhead_s": ours["best_overhead_s_per_client_round"],
                "flower_best_overhead_s": flower["best_overhead_s_per_client_round"],
                "ours_s_per_client_round": ours["s_per_client_round"],
                "flower_s_per_client_round": flower["s_per_client_round"],
                "ours_overhead_s": ours["overhead_s_per_client_round"],
                "flower_overhead_s": fo,
                "overhead_ratio_ours_over_flower": round(ratio, 3) if ratio is not None else None,
                "total_ratio_ours_over_flower": round(total_ratio, 3),
                "ours_round_walls_s": ours["round_walls_s"],
                "flower_round_walls_s": flower["round_walls_s"],
                "versions": {
                    "ours_ray": ours["ray"],
                    "flwr": flower["flwr"],
                    "flower_ray": flower["ray"],
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
