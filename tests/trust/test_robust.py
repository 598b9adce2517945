"""Robust aggregation: hand-computed values of the pure rules, and a minority attack they
withstand.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fednano_ray.strategies import (
    FedAvg,
    Median,
    NormClip,
    TrimmedMean,
    build_strategy,
    clipped_mean,
    coordinate_median,
    trimmed_mean,
)
from fednano_ray.strategies.base import ClientUpdate
from fednano_ray.strategies.robust import (
    apply_delta,
    client_deltas,
    clip_by_norm,
    state_norm,
)


def _load_robust_benchmark():
    """benchmarks/robust.py (not a package): the attack scenario the README's figures come from."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "robust.py"
    spec = importlib.util.spec_from_file_location("fednano_bench_robust", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_robust_benchmark()
attack_round, distance = bench.attack_round, bench.distance


def t(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": t(list(values))}


# ------------------------------------------------------------------------------------ pure rules


def test_median_odd_and_even_by_hand() -> None:
    """median(1, 5, 3) = 3; median(1, 5, 3, 10) = (3 + 5) / 2 = 4; coordinate by coordinate."""
    assert coordinate_median([w(1, -1), w(5, 0), w(3, 7)])["w"].tolist() == [3.0, 0.0]
    assert coordinate_median([w(1), w(5), w(3), w(10)])["w"].tolist() == [4.0]


def test_trimmed_mean_by_hand() -> None:
    """β = 0.25 of 4 drops 1 per side: mean(2, 3) = 2.5; β = 0.2 of 4 drops none: 26.5;
    β = 0.2 of 5 drops 1 per side: mean(1, 2, 3) = 2."""
    four = [w(1), w(100), w(3), w(2)]
    assert trimmed_mean(four, 0.25)["w"].tolist() == [2.5]
    assert trimmed_mean(four, 0.2)["w"].tolist() == [26.5]
    assert trimmed_mean([w(-50), w(3), w(60), w(1), w(2)], 0.2)["w"].tolist() == [2.0]
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\)"):
        trimmed_mean(four, 0.5)


def test_clip_by_norm_by_hand() -> None:
    """The norm is over all keys: (3, 0) and (4) have norm 5; clipping to 1 scales by 1/5."""
    delta = {"a": t([3.0, 0.0]), "b": t([4.0])}
    clipped, norm = clip_by_norm(delta, 1.0)
    assert norm == 5.0
    assert clipped["a"].tolist() == pytest.approx([0.6, 0.0]) and clipped["b"].tolist() == [0.8]
    unchanged, _ = clip_by_norm(delta, 10.0)
    assert unchanged["a"].tolist() == [3.0, 0.0] and unchanged["b"].tolist() == [4.0]
    assert state_norm(clipped) == pytest.approx(1.0)


def test_clipped_mean_by_hand() -> None:
    """(3, 4) has norm 5 -> clipped to 2.5: (1.5, 2); (0, 1) is kept; weights 1 and 3:
    (1*(1.5, 2) + 3*(0, 1)) / 4 = (0.375, 1.25)."""
    out = clipped_mean([w(3, 4), w(0, 1)], [1, 3], 2.5)
    assert out["w"].tolist() == pytest.approx([0.375, 1.25])


def test_robust_rules_check_layout() -> None:
    with pytest.raises(ValueError, match="keys differ"):
        coordinate_median([w(1), {"v": t([1.0])}])
    with pytest.raises(ValueError, match="nothing to aggregate"):
        trimmed_mean([], 0.1)


# ---------------------------------------------------------------------------------- strategies


def f32(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_median_strategy_with_heterogeneous_ranks_by_hand() -> None:
    """Deltas are taken at each client's rank and zero-padded ("no change" votes).

    Global A = [[1, 1], [2, 2]], B = 0 (rank 2). Client 1 has rank 1: A = [[3, 1]], B = [[1], [1]],
    so its padded deltas are A: [[2, 0], [0, 0]], B: [[1, 0], [1, 0]]. Client 2: A δ = [[0, 0],
    [0, 2]], B δ = all 1. Client 3: A δ = [[4, 0], [0, 0]], B δ = [[3, 0], [0, 0]]. Medians:
    A δ = [[2, 0], [0, 0]] -> A = [[3, 1], [2, 2]]; B δ = [[1, 0], [1, 0]] -> B = [[1, 0], [1, 0]].
    """
    glob = {"x.lora_A": f32([[1, 1], [2, 2]]), "x.lora_B": f32([[0, 0], [0, 0]])}
    updates = [
        ClientUpdate("1", {"x.lora_A": f32([[3, 1]]), "x.lora_B": f32([[1], [1]])}, 10),
        ClientUpdate(
            "2", {"x.lora_A": f32([[1, 1], [2, 4]]), "x.lora_B": f32([[1, 1], [1, 1]])}, 1
        ),
        ClientUpdate(
            "3", {"x.lora_A": f32([[5, 1], [2, 2]]), "x.lora_B": f32([[3, 0], [0, 0]])}, 1
        ),
    ]
    out = Median().aggregate(glob, updates, [])
    assert out["x.lora_A"].tolist() == [[3, 1], [2, 2]]
    assert out["x.lora_B"].tolist() == [[1, 0], [1, 0]]
    assert out["x.lora_A"].dtype == torch.float32


def test_norm_clip_without_active_clipping_is_fedavg() -> None:
    """Same rank, bound above every delta: clip is exactly the example-weighted mean."""
    glob = {"w": f32([0.0, 0.0])}
    updates = [
        ClientUpdate("0", {"w": f32([1.0, 2.0])}, 1),
        ClientUpdate("1", {"w": f32([3.0, 0.0])}, 3),
    ]
    clip = NormClip(clip_norm=100.0).aggregate(glob, updates, [])
    avg = FedAvg().aggregate(glob, updates, [])
    torch.testing.assert_close(clip["w"], avg["w"])
    # And with clipping active: deltas (1, 2) and (3, 0) clipped to 1: (1, 2)/√5 and (1, 0).
    out = NormClip(clip_norm=1.0).aggregate(glob, updates, [])
    expected = (1 * torch.tensor([1.0, 2.0]) / 5**0.5 + 3 * torch.tensor([1.0, 0.0])) / 4
    torch.testing.assert_close(out["w"], expected)


def test_registry_builds_the_robust_strategies() -> None:
    assert isinstance(build_strategy("median"), Median)
    tm = build_strategy("trimmed_mean", trim_fraction=0.2, mu=0.01)
    assert isinstance(tm, TrimmedMean) and tm.trim_fraction == 0.2 and tm.proximal_mu == 0.01
    assert build_strategy("clip", clip_norm=2.0).describe()["clip_norm"] == 2.0
    with pytest.raises(ValueError, match="clip_norm must be positive"):
        build_strategy("clip", clip_norm=0.0)
    with pytest.raises(ValueError, match="trim_fraction"):
        build_strategy("trimmed_mean", trim_fraction=0.6)


def test_median_has_no_sum_plan() -> None:
    """A median is not a function of sums, so it cannot run under secure aggregation."""
    with pytest.raises(NotImplementedError, match="secure aggregation"):
        Median().sum_plan({"w": f32([0.0])}, [ClientUpdate("0", {"w": f32([1.0])}, 1)], [])


# ---------------------------------------------------------------------------- minority attack


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("attack", ["scale50", "signflip10"])
def test_robust_rules_withstand_a_minority_of_attackers(attack: str, seed: int) -> None:
    """With 2 of 8 clients attacking (``attack_round`` of benchmarks/robust.py, the README's
    figures), FedAvg lands many honest-update norms away from the honest average; median, trimmed
    mean (β = 0.25) and clipping (C = 1.5 x the honest norm) stay within a fraction of one
    honest-update norm of it, on every one of the README's 3 seeds."""
    relative = bench.relative_errors(attack, seed)
    assert set(relative) == {"fedavg", "median", "trimmed_mean", "clip"}
    assert relative["fedavg"] > 2.5, relative
    for rule in ("median", "trimmed_mean", "clip"):
        assert relative[rule] < 0.7, relative
        assert relative[rule] < relative["fedavg"] / 4, relative


def test_relative_errors_are_the_strategies_distances() -> None:
    """relative_errors is distance(rule(round), honest mean) / honest norm, e.g. for the median."""
    glob, updates, target, honest_norm = attack_round("signflip10", 1)
    expected = distance(Median().aggregate(glob, updates, []), target) / honest_norm
    assert bench.relative_errors("signflip10", 1)["median"] == pytest.approx(expected, rel=1e-12)


def test_robust_benchmark_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`fednano-ray bench robust --seeds 3 --json`, in process: per attack and rule, 3 per-seed
    errors, their mean inside a 95% interval, and every robust rule well below FedAvg."""
    bench.main(["--seeds", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [0, 1, 2]
    assert "cpu_model" in out["hardware"]
    assert set(out["results"]) == {"scale50", "signflip10"}
    for attack, rules in out["results"].items():
        assert set(rules) == {"fedavg", "median", "trimmed_mean", "clip"}, attack
        for r in rules.values():
            assert len(r["per_seed"]) == 3
            assert r["mean"] == pytest.approx(sum(r["per_seed"]) / 3)
            lo, hi = r["ci95"]
            assert lo <= min(r["per_seed"]) <= r["mean"] <= max(r["per_seed"]) <= hi
        for rule in ("median", "trimmed_mean", "clip"):
            assert rules[rule]["ci95"][1] < rules["fedavg"]["ci95"][0], (attack, rule)


def test_t_interval_by_hand() -> None:
    """(1, 2, 3): mean 2, s = 1, t(0.975, 2) = 4.303: 2 ± 4.303/√3; one value has no interval."""
    mean, (lo, hi) = bench.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.303 / 3**0.5) and mean - lo == pytest.approx(hi - mean)
    assert bench.t_interval([5.0]) == (5.0, None)


def test_robust_rules_agree_with_fedavg_without_attackers() -> None:
    """With honest clients only, every robust rule is close to FedAvg (relative to the update)."""
    glob, updates, target, honest_norm = attack_round("scale50")
    honest = updates[2:]
    fedavg = FedAvg().aggregate(glob, honest, [])
    assert distance(fedavg, target) < 1e-5 * honest_norm
    for strategy in (Median(), TrimmedMean(0.25), NormClip(10 * honest_norm)):
        assert distance(strategy.aggregate(glob, honest, []), target) < 0.35 * honest_norm


def test_client_deltas_and_apply_delta_round_trip() -> None:
    """θ_global + mean of the deltas is the mean of the states (same rank)."""
    glob, updates, _, _ = attack_round("scale50")
    deltas = client_deltas(glob, [u.state for u in updates], 4)
    mean = {k: sum(d[k] for d in deltas) / len(deltas) for k in glob}
    rebuilt = apply_delta(glob, mean, 4)
    torch.testing.assert_close(rebuilt, FedAvg().aggregate(glob, updates, []), rtol=1e-5, atol=1e-6)
