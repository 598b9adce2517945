"""FedAvgM: FedAvg with server momentum, as a rule, as sums (secure aggregation) and as state."""

import pytest
import torch

from fednano_ray.strategies import ClientUpdate, FedAvg
from fednano_ray.strategies.fedavgm import FedAvgM


def _state(seed: int, r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "vision.lora_A": torch.randn(r, 6, generator=g),
        "vision.lora_B": torch.randn(5, r, generator=g),
    }


def _updates(seed: int) -> list[ClientUpdate]:
    return [ClientUpdate("0", _state(seed), 3), ClientUpdate("1", _state(seed + 1), 1)]


def test_zero_momentum_is_fedavg_and_momentum_carries_the_last_step():
    """β = 0 gives FedAvg's mean every round; with β the second round moves by β v_1 + Δ_2, where
    v_1 = Δ_1 = mean_1 − θ_0 and Δ_2 = mean_2 − θ_1."""
    theta0 = _state(0)
    plain, still = FedAvg(), FedAvgM(momentum=0.0)
    for rnd in (1, 2):
        expected = plain.aggregate(theta0, _updates(10 * rnd), [])
        got = still.aggregate(theta0, _updates(10 * rnd), [])
        for k in expected:
            torch.testing.assert_close(got[k], expected[k])

    m = FedAvgM(momentum=0.5)
    mean1 = plain.aggregate(theta0, _updates(10), [])
    theta1 = m.aggregate(theta0, _updates(10), [])
    mean2 = plain.aggregate(theta1, _updates(20), [])
    theta2 = m.aggregate(theta1, _updates(20), [])
    for k in theta0:
        v1 = mean1[k] - theta0[k]
        torch.testing.assert_close(theta1[k], mean1[k])  # first round: v = Δ
        torch.testing.assert_close(theta2[k], theta1[k] + 0.5 * v1 + (mean2[k] - theta1[k]))
        assert not torch.allclose(theta2[k], mean2[k])  # the momentum term is there


def test_the_sum_plan_gives_the_rule_and_the_state_round_trips():
    """finish(sum of terms) equals aggregate (so fedavgm runs under SecAgg), and a strategy restored
    from state_dict continues exactly where the first one was (what --resume relies on)."""
    theta0 = _state(0)
    a, b = FedAvgM(momentum=0.7), FedAvgM(momentum=0.7)
    theta1 = a.aggregate(theta0, _updates(1), [])
    terms, finish = b.sum_plan(theta0, _updates(1), [])
    total = {k: sum(t[k] for t in terms) for k in terms[0]}
    for k, v in finish(total).items():
        torch.testing.assert_close(v, theta1[k])
    assert FedAvgM().state_dict() == {}
    restored = FedAvgM(momentum=0.7)
    restored.load_state_dict(a.state_dict())
    nxt, again = a.aggregate(theta1, _updates(2), []), restored.aggregate(theta1, _updates(2), [])
    for k in nxt:
        assert torch.equal(nxt[k], again[k]), k


def test_heterogeneous_ranks_pad_like_fedavg_and_bad_momentum_is_refused():
    theta0 = _state(0, r=4)
    small = ClientUpdate("0", _state(5, r=2), 2)
    got = FedAvgM(momentum=0.9).aggregate(theta0, [small, ClientUpdate("1", _state(6, r=4), 2)], [])
    assert got["vision.lora_A"].shape == (4, 6) and got["vision.lora_B"].shape == (5, 4)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"fedavgm: momentum must be in \[0, 1\)"):
            FedAvgM(momentum=bad)
