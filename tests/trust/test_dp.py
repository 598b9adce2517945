"""Client-level DP: DP-FedAvg's mechanism, and ε from the dp-accounting library."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from fednano_ray.strategies import DPFedAvg, build_strategy
from fednano_ray.strategies.base import ClientFailure, ClientUpdate
from fednano_ray.trust.dp import accountant_version, dp_epsilon


def gaussian_delta(eps: float, mu: float) -> float:
    """δ(ε) of a Gaussian mechanism with sensitivity/σ = μ (Balle & Wang 2018, Theorem 8)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


def test_epsilon_with_every_client_every_round_is_the_exact_gaussian() -> None:
    """q = 1 (8 clients, 8 per round): 5 rounds at z = 1 compose to one Gaussian with μ = √5;
    the PLD accountant's ε at δ = 1e-5 satisfies the closed form δ(ε) = 1e-5."""
    eps = dp_epsilon(1.0, 8 / 8, 5, 1e-5, "pld")
    assert gaussian_delta(eps, math.sqrt(5)) == pytest.approx(1e-5, rel=1e-2)
    assert 11.0 < eps < 12.0  # 11.48
    assert dp_epsilon(1.0, 1.0, 5, 1e-5, "rdp") >= eps  # RDP is an upper bound, looser


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling() -> None:
    """Monotone in every argument (RDP here: fast; PLD agrees within its tighter bound)."""
    eps = lambda z, q, t, d=1e-5: dp_epsilon(z, q, t, d, "rdp")
    assert eps(1.0, 0.5, 0) == 0.0
    by_round = [eps(1.0, 0.5, t) for t in (1, 2, 5, 10)]
    assert by_round == sorted(by_round) and by_round[0] > 0
    assert eps(2.0, 0.5, 5) < eps(1.0, 0.5, 5)
    assert eps(1.0, 0.1, 5) < eps(1.0, 0.5, 5)
    assert eps(1.0, 0.5, 5, 1e-3) < eps(1.0, 0.5, 5)
    assert dp_epsilon(1.0, 0.5, 5, 1e-5, "pld") <= eps(1.0, 0.5, 5)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((0.0, 0.5, 1, 1e-5), "noise_multiplier"),
        ((1.0, 0.0, 1, 1e-5), "sampling_rate"),
        ((1.0, 0.5, -1, 1e-5), "rounds"),
        ((1.0, 0.5, 1, 1.0), "delta"),
    ],
)
def test_epsilon_rejects_bad_arguments(args, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        dp_epsilon(*args)


def test_accountant_is_the_pinned_library() -> None:
    assert accountant_version().startswith("dp-accounting==")


# ------------------------------------------------------------------------------- the mechanism


def f32(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_dp_fedavg_clips_averages_over_the_sampled_clients_and_adds_noise() -> None:
    """Two reporting clients and one failure: m = 3. Deltas (3, 4) (norm 5 -> clipped to 1:
    (0.6, 0.8)) and (0, 0.5) (kept): the noiseless average is (0.6, 1.3) / 3. The noise std is
    z C / m = 0.5 * 1 / 3; over 200,000 padded coordinates its sample std matches."""
    size = 200_000
    glob = {"w": torch.zeros(size)}
    a = torch.zeros(size)
    a[:2] = f32([3.0, 4.0])
    b = torch.zeros(size)
    b[1] = 0.5
    updates = [ClientUpdate("0", {"w": a}, 10), ClientUpdate("1", {"w": b}, 1000)]
    failures = [ClientFailure("2", "rejected: NaN")]
    strategy = DPFedAvg(
        clip_norm=1.0,
        noise_multiplier=0.5,
        noise_generator=lambda: torch.Generator().manual_seed(3),
    )
    strategy.begin_round(4)
    out = strategy.aggregate(glob, updates, failures)["w"].double()
    expected = torch.zeros(size, dtype=torch.float64)
    expected[:2] = torch.tensor([0.6, 1.3], dtype=torch.float64) / 3
    noise = out - expected
    assert noise.std().item() == pytest.approx(0.5 / 3, rel=0.01)
    assert abs(noise.mean().item()) < 0.005
    assert strategy.noise_std(3) == pytest.approx(0.5 / 3)

    # With one fixed noise source, sum_plan + finish (the secure-aggregation path) is the same
    # mechanism.
    terms, finish = strategy.sum_plan(glob, updates, failures)
    summed = {"w": sum(term["w"] for term in terms)}
    torch.testing.assert_close(finish(summed)["w"], out.float())


def test_dp_noise_comes_from_os_entropy_not_from_the_seed() -> None:
    """Two runs with the same config (same federation.seed) and the same updates must add different
    noise: a seeded noise stream could be regenerated from config.yaml and subtracted."""
    from fednano_ray.config import load_config
    from fednano_ray.federation.method import Method

    cfg = load_config(
        "examples/tiny.yaml",
        [
            "federation.strategy=fedavg",
            "trust.dp.clip_norm=1.0",
            "trust.dp.noise_multiplier=1.0",
        ],
    )
    glob = {"w": torch.zeros(1000)}
    updates = [ClientUpdate("0", {"w": torch.full((1000,), 0.01)}, 10)]
    released = []
    for _ in range(2):  # two runs: each builds its strategy from the same config
        strategy = Method.from_config(cfg).build_strategy()
        strategy.begin_round(0)
        released.append(strategy.aggregate(glob, updates, [])["w"])
    assert not torch.equal(released[0], released[1])
    # Within a run too: a release never reuses another's noise.
    strategy.begin_round(0)
    assert not torch.equal(strategy.aggregate(glob, updates, [])["w"], released[1])


def test_dp_fedavg_weights_clients_equally() -> None:
    """num_examples does not weigh in (it would break the sensitivity bound)."""
    glob = {"w": f32([0.0])}
    updates = [ClientUpdate("0", {"w": f32([0.1])}, 1), ClientUpdate("1", {"w": f32([0.3])}, 1000)]
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=1e-9)
    assert strategy.aggregate(glob, updates, [])["w"].item() == pytest.approx(0.2, abs=1e-6)


def test_dp_fedavg_options() -> None:
    assert isinstance(build_strategy("dp_fedavg", clip_norm=0.5, noise_multiplier=2.0), DPFedAvg)
    with pytest.raises(ValueError, match="noise_multiplier must be positive"):
        DPFedAvg(noise_multiplier=0.0)
    with pytest.raises(ValueError, match="clip_norm must be positive"):
        DPFedAvg(clip_norm=-1.0)
