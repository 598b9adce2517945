"""Scale benchmark: 100, 300 and 1,000 virtual clients on one machine (simulation mode).

Virtual clients are multiplexed over a small actor pool per tier; their data lives in the object
store and their adapters arrive with each call, so memory should barely grow with the client count.
Measures wall time per round and the peak extra memory of the whole machine over the idle Ray
baseline, side by side in one run. Usage: ``fednano-ray bench scale [--clients 100 300 1000]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def _memory_sampler(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    while not stop.is_set():
        peak[0] = max(peak[0], psutil.virtual_memory().used)
        time.sleep(0.1)


def run(clients: list[int], rounds: int = 3, per_round: int = 100) -> list[dict]:
    import psutil

    from fednano_ray.app import init_ray, train
    from fednano_ray.config import load_config

    init_ray(num_cpus=4)
    time.sleep(2.0)
    rows = []
    for n in clients:
        cfg = load_config(
            "examples/tiny.yaml",
            [
                f"federation.num_clients={n}",
                f"federation.clients_per_round={min(n, per_round)}",
                f"federation.rounds={rounds}",
                f"federation.evaluate_every={rounds}",
                "federation.deadline_s=600",
                f"tiers.0.clients={n // 2}",
                f"tiers.1.clients={n - n // 2}",
                "tiers.0.pool_size=2",
                "tiers.1.pool_size=2",
                "tiers.0.local_steps=1",
                "tiers.1.local_steps=1",
                "data.partition=iid",
                "data.synth.num_train=4000",
                "data.max_test_examples=40",
            ],
        )
        baseline = psutil.virtual_memory().used
        peak = [baseline]
        stop = threading.Event()
        sampler = threading.Thread(target=_memory_sampler, args=(stop, peak), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = train(cfg, Path(tmp) / "run", progress=False)
        total = time.perf_counter() - t0
        stop.set()
        sampler.join()
        walls = [r["wall_time_s"] for r in res["rounds"]]
        rows.append(
            {
                "clients": n,
                "clients_per_round": min(n, per_round),
                "rounds": rounds,
                "round_wall_s_median": sorted(walls)[len(walls) // 2],
                "run_wall_s": round(total, 1),
                "peak_extra_memory_mib": round((peak[0] - baseline) / 2**20, 1),
                "failures": res["summary"]["failures"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        time.sleep(3.0)  # let the previous run's actors exit before the next baseline
    base = rows[0]["peak_extra_memory_mib"]
    for r in rows:
        r["memory_vs_first"] = round(r["peak_extra_memory_mib"] / base, 2) if base > 0 else None
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fednano-ray bench scale")
    p.add_argument("--clients", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=100)
    args = p.parse_args(argv)
    rows = run(args.clients, args.rounds, args.per_round)
    print("\n| clients | per round | round wall (median) | peak extra memory | vs first |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['clients_per_round']} | {r['round_wall_s_median']:.1f} s | "
            f"{r['peak_extra_memory_mib']:.0f} MiB | {r['memory_vs_first']} |"
        )


if __name__ == "__main__":
    main()
