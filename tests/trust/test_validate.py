"""Update validation: each kind of bad update is rejected with a reason naming the problem."""

from __future__ import annotations

import math

import pytest
import torch

from fednano_ray.strategies.base import ClientUpdate
from fednano_ray.strategies.robust import update_norm
from fednano_ray.trust.validate import REJECTED, screen_updates, validate_update

D = 3


def global_state(r: int = 4) -> dict[str, torch.Tensor]:
    """A rank-``r`` adapter (lora_A (r, D), lora_B (D, r)) plus a rank-free bias, all ones."""
    return {
        "vision.lora_A": torch.ones(r, D),
        "vision.lora_B": torch.ones(D, r),
        "vision.bias": torch.ones(D),
    }


def update(state: dict[str, torch.Tensor], fisher=None, n: int = 5) -> ClientUpdate:
    return ClientUpdate("7", state, n, fisher=fisher)


def test_a_good_update_of_a_smaller_rank_is_accepted() -> None:
    """A rank-2 client of a rank-4 global state, with finite float32 values: no reason."""
    state = {k: v + 0.1 for k, v in global_state(2).items()}
    fisher = {k: torch.rand_like(v) for k, v in state.items()}
    assert (
        validate_update(
            global_state(4),
            update(state, fisher),
            max_rank=4,
            max_update_norm=10.0,
            check_fisher=True,
        )
        is None
    )


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: s.pop("vision.bias"), "missing ['vision.bias']"),
        (lambda s: s.update(extra=torch.ones(1)), "unexpected ['extra']"),
        (lambda s: s.update({"vision.bias": torch.ones(D + 1)}), "'vision.bias' has shape (4,)"),
        (lambda s: s.update({"vision.lora_A": torch.ones(4, D + 1)}), "only dim 0, the rank"),
        (lambda s: s.update({"vision.lora_B": torch.ones(D, 4, 1)}), "only dim 1, the rank"),
        (
            lambda s: s.update({"vision.lora_A": torch.ones(4, D, dtype=torch.float64)}),
            "torch.float64; updates must be torch.float32",
        ),
        (lambda s: s.update({"vision.bias": [1.0, 1.0, 1.0]}), "is a list, not a torch.Tensor"),
        (
            lambda s: s.update(
                {"vision.lora_A": torch.ones(6, D), "vision.lora_B": torch.ones(D, 6)}
            ),
            "rank 6; the rank must be at least 1 and at most 4",
        ),
        (
            lambda s: s.update(
                {"vision.lora_A": torch.ones(0, D), "vision.lora_B": torch.ones(D, 0)}
            ),
            "rank 0",
        ),
        (
            lambda s: s.update({"vision.lora_A": torch.ones(2, D)}),
            "'vision.lora_A' has rank 2 but 'vision.lora_B' has rank 4",
        ),
        (
            lambda s: s["vision.lora_B"].__setitem__((0, 0), float("nan")),
            "1 non-finite entries (1 NaN, 0 Inf)",
        ),
        (lambda s: s["vision.bias"].__setitem__(1, float("inf")), "(0 NaN, 1 Inf)"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(mutate, needle: str) -> None:
    """Missing/extra keys, shapes, dtypes, ranks, NaN/Inf: each reason names the key and problem."""
    state = {k: v.clone() for k, v in global_state(4).items()}
    mutate(state)
    reason = validate_update(global_state(4), update(state), max_rank=4)
    assert reason is not None and needle in reason, reason


def test_a_state_that_is_not_a_mapping_is_rejected() -> None:
    reason = validate_update(global_state(), update([torch.ones(1)]))  # type: ignore[arg-type]
    assert reason == "state is a list, not a mapping of key to tensor"


def test_zero_examples_is_rejected() -> None:
    """An update with no examples carries no weight."""
    reason = validate_update(global_state(), update(global_state(), n=0))
    assert reason is not None and "0 training examples" in reason


def test_norm_bound_at_the_clients_rank() -> None:
    """The norm is taken against the global state truncated to the client's rank, so global rows
    the client never held do not count; 1.0 added to all 2*3 + 3*2 + 3 = 15 entries gives √15."""
    state = {k: v + 1.0 for k, v in global_state(2).items()}
    assert update_norm(global_state(4), state) == pytest.approx(math.sqrt(15))
    assert validate_update(global_state(4), update(state), max_update_norm=3.9) is None
    reason = validate_update(global_state(4), update(state), max_update_norm=3.8)
    assert reason is not None and "update norm ||θ − θ_global|| = 3.873" in reason
    assert "trust.max_update_norm = 3.8" in reason


def test_a_larger_rank_than_the_global_state_is_compared_against_zero_padding() -> None:
    """A rank-4 update of a rank-2 global state: the extra rows are compared with zeros."""
    state = global_state(4)
    # lora_A rows 2..3 (6 ones) and lora_B columns 2..3 (6 ones) differ from the padded zeros.
    assert update_norm(global_state(2), state) == pytest.approx(math.sqrt(12))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda f: f.pop("vision.bias"), "Fisher keys differ"),
        (
            lambda f: f.update({"vision.bias": torch.ones(2)}),
            "Fisher key 'vision.bias' has shape (2,)",
        ),
        (lambda f: f["vision.lora_A"].__setitem__((0, 0), -1e-3), "1 negative entries"),
        (lambda f: f["vision.lora_A"].__setitem__((0, 0), float("inf")), "non-finite"),
        (lambda f: f.update({"vision.bias": torch.ones(D, dtype=torch.float16)}), "torch.float16"),
    ],
)
def test_bad_fisher_is_rejected(mutate, needle: str) -> None:
    """The Fisher is checked like the state (against the state's own shapes) and must be >= 0."""
    state = global_state(2)
    fisher = {k: torch.ones_like(v) for k, v in state.items()}
    mutate(fisher)
    reason = validate_update(global_state(4), update(state, fisher), check_fisher=True)
    assert reason is not None and needle in reason, reason
    # Not checked unless asked (other strategies ignore the Fisher).
    assert validate_update(global_state(4), update(state, fisher)) is None


def test_missing_fisher_is_not_an_error() -> None:
    """FedNano falls back to FedAvg without a Fisher: validation lets it through."""
    assert validate_update(global_state(), update(global_state()), check_fisher=True) is None


def test_screen_updates_splits_valid_and_rejected() -> None:
    """Valid updates pass in order; the others become 'rejected: <reason>' failures."""
    good = ClientUpdate("0", global_state(), 3)
    bad = ClientUpdate("1", {**global_state(), "vision.bias": torch.full((D,), float("nan"))}, 3)
    far = ClientUpdate("2", {k: v * 100 for k, v in global_state().items()}, 3)
    valid, rejected = screen_updates(
        [good, bad, far], lambda u: global_state(), max_update_norm=5.0
    )
    assert valid == [good]
    assert [f.client_id for f in rejected] == ["1", "2"]
    assert all(f.reason.startswith(REJECTED) for f in rejected)
    assert "NaN" in rejected[0].reason and "update norm" in rejected[1].reason


def test_invalid_bounds_raise() -> None:
    with pytest.raises(ValueError, match="max_update_norm"):
        validate_update(global_state(), update(global_state()), max_update_norm=0.0)
    with pytest.raises(ValueError, match="max_rank"):
        validate_update(global_state(), update(global_state()), max_rank=0)
