"""Robust aggregation against a minority of attackers: FedAvg, median, trimmed mean and clipping.

One synthetic round (:func:`attack_round`): 8 clients of a rank-4 adapter (d = 32), same example
count; 6 honest clients move the global state by a common direction plus 30% noise, clients 0 and
1 attack, either scaling their honest update by 50 (``scale50``) or flipping and boosting it by 10
(``signflip10``). Each rule (FedAvg; median; trimmed mean, β = 0.25; clipping at 1.5 x the honest
update norm) aggregates the round; its error is the distance to the honest mean over the honest
update norm. Prints, per attack and rule, the mean over seeds and a 95% t-interval, and the CPU.
Pure torch, milliseconds. Usage: ``fednano-ray bench robust [--seeds 3] [--json]``
(or ``python benchmarks/robust.py``). ``tests/trust/test_robust.py`` imports the scenario from here.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fednano_ray.strategies import FedAvg, Median, NormClip, TrimmedMean
from fednano_ray.strategies.base import ClientUpdate, Strategy
from fednano_ray.strategies.robust import state_norm

ATTACKS = ("scale50", "signflip10")
# Rule name -> strategy, given the honest update norm (the clip bound is 1.5 x that norm).
RULES: dict[str, Callable[[float], Strategy]] = {
    "fedavg": lambda honest_norm: FedAvg(),
    "median": lambda honest_norm: Median(),
    "trimmed_mean": lambda honest_norm: TrimmedMean(0.25),
    "clip": lambda honest_norm: NormClip(1.5 * honest_norm),
}
ROBUST = ("median", "trimmed_mean", "clip")

# Two-sided 95% quantiles of Student's t, df = 1..30 (beyond: a Cornish-Fisher expansion).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def attack_round(
    attack: str, seed: int = 0
) -> tuple[dict[str, Tensor], list[ClientUpdate], dict[str, Tensor], float]:
    """8 clients of a rank-4 adapter (d = 32) with the same example count: 6 honest clients move
    the global state by a common direction plus 30% noise; clients 0 and 1 attack.

    Returns:
        ``(global_state, updates, target, honest_norm)``: the target is the global state plus the
        honest clients' mean delta, ``honest_norm`` that delta's L2 norm.
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; one of {', '.join(ATTACKS)}")
    gen = torch.Generator().manual_seed(seed)
    r, d = 4, 32
    glob = {
        "v.lora_A": torch.randn(r, d, generator=gen),
        "v.lora_B": torch.randn(d, r, generator=gen),
    }
    direction = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in glob.items()}
    honest = [
        {
            k: glob[k] + v + 0.3 * torch.randn(v.shape, generator=gen) * 0.01
            for k, v in direction.items()
        }
        for _ in range(6)
    ]
    mean_honest = {k: sum(h[k] - glob[k] for h in honest) / 6 for k in glob}
    if attack == "scale50":
        bad = [{k: glob[k] + 50 * (honest[i][k] - glob[k]) for k in glob} for i in range(2)]
    else:  # sign flip, boosted 10x so it is not a small nudge
        bad = [{k: glob[k] - 10 * (honest[i][k] - glob[k]) for k in glob} for i in range(2)]
    updates = [ClientUpdate(str(i), s, 20) for i, s in enumerate(bad + honest)]
    target = {k: glob[k] + mean_honest[k] for k in glob}
    return glob, updates, target, state_norm(mean_honest)


def distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """The L2 distance between two states with the same keys (all keys together, float64)."""
    return state_norm({k: a[k].double() - b[k].double() for k in a})


def relative_errors(attack: str, seed: int) -> dict[str, float]:
    """Each rule's distance to the honest mean over the honest update norm, on one round."""
    glob, updates, target, honest_norm = attack_round(attack, seed)
    return {
        rule: distance(make(honest_norm).aggregate(glob, updates, []), target) / honest_norm
        for rule, make in RULES.items()
    }


def t_interval(values: list[float]) -> tuple[float, list[float] | None]:
    """Mean and 95% Student-t interval ``mean ± t(0.975, n-1) s / √n`` (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    df = n - 1
    if df <= len(_T975):
        t = _T975[df - 1]
    else:
        z = 1.959964
        t = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    half = t * math.sqrt(sum((v - mean) ** 2 for v in values) / df / n)
    return mean, [mean - half, mean + half]


def run(seeds: int = 3) -> dict:
    """Relative errors of every rule under every attack over seeds ``0 .. seeds-1``."""
    from fednano_ray.precision import hardware_info

    results: dict[str, dict[str, dict]] = {}
    for attack in ATTACKS:
        per_seed = [relative_errors(attack, s) for s in range(seeds)]
        results[attack] = {}
        for rule in RULES:
            values = [e[rule] for e in per_seed]
            mean, ci = t_interval(values)
            results[attack][rule] = {"per_seed": values, "mean": mean, "ci95": ci}
    return {
        "setup": {
            "clients": 8,
            "attackers": 2,
            "rank": 4,
            "d": 32,
            "trim_fraction": 0.25,
            "clip_norm": "1.5 x honest update norm",
            "error": "distance to the honest mean / honest update norm",
        },
        "seeds": list(range(seeds)),
        "hardware": hardware_info(),
        "results": results,
    }


def _cell(r: dict) -> str:
    if r["ci95"] is None:
        return f"{r['mean']:.3f}"
    return f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="fednano-ray bench robust")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    out = run(a.seeds)
    if a.json:
        print(json.dumps(out, indent=2))
        return out
    hw = out["hardware"]
    print(f"CPU: {hw['cpu_model']} ({hw['cpu_count']} cores), torch {hw['torch']}")
    print(f"8 clients, 2 attackers; relative error, mean and 95% interval over {a.seeds} seeds")
    width = max(len(_cell(out["results"][at][rule])) for at in ATTACKS for rule in RULES)
    print((f"{'rule':<14}" + "".join(f"{at:<{width + 2}}" for at in ATTACKS)).rstrip())
    for rule in RULES:
        cells = "".join(f"{_cell(out['results'][at][rule]):<{width + 2}}" for at in ATTACKS)
        print(f"{rule:<14}{cells}".rstrip())
    return out


if __name__ == "__main__":
    main()
