"""Tests for the pure aggregation math, against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from fednano_ray.strategies.aggregate import (
    fedavg,
    fisher_contribution,
    fisher_from_sums,
    fisher_merge,
    fisher_sums,
    max_rank,
    pad_to_rank,
    proximal_penalty,
    rank_dim,
    server_step,
    truncate_to_rank,
    weighted_average,
)


def t(*rows: object) -> torch.Tensor:
    """A float32 tensor from literal values."""
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32)


def lora_state(a: list[list[float]], b: list[list[float]]) -> dict[str, torch.Tensor]:
    """A one-module adapter state: lora_A (r, d), lora_B (d, r)."""
    return {"vision.lora_A": t(a), "vision.lora_B": t(b)}


# ----------------------------------------------------------------------------------------- FedAvg


def test_weighted_average_two_scalars_by_hand() -> None:
    """n = (1, 3), θ = (1, 5): (1*1 + 3*5) / 4 = 4."""
    out = weighted_average([{"w": t([1.0])}, {"w": t([5.0])}], [1, 3])
    assert out["w"].tolist() == [4.0]


def test_weighted_average_matrix_by_hand() -> None:
    """Elementwise (1*θ1 + 3*θ2) / 4 with every entry written out."""
    s1 = {"text.lora_A": t([[1.0, 2.0], [3.0, 4.0]])}
    s2 = {"text.lora_A": t([[5.0, 6.0], [7.0, 8.0]])}
    out = weighted_average([s1, s2], [1.0, 3.0])
    # (1+15)/4, (2+18)/4, (3+21)/4, (4+24)/4
    assert out["text.lora_A"].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert out["text.lora_A"].dtype == torch.float32


def test_fedavg_weights_by_num_examples() -> None:
    """fedavg((θ, n)) is weighted_average with weights n: (1, 3), (1., 5.) -> 4."""
    out = fedavg([({"w": t([1.0])}, 1), ({"w": t([5.0])}, 3)])
    assert out["w"].tolist() == [4.0]


def test_fedavg_ignores_client_order() -> None:
    """Permuting the clients leaves the average unchanged."""
    gen = torch.Generator().manual_seed(0)
    results = [({"w": torch.randn(3, 4, generator=gen)}, n) for n in (2, 7, 5)]
    forward = fedavg(results)
    backward = fedavg(results[::-1])
    rotated = fedavg(results[1:] + results[:1])
    torch.testing.assert_close(forward["w"], backward["w"])
    torch.testing.assert_close(forward["w"], rotated["w"])


def test_fedavg_does_not_mutate_inputs() -> None:
    """The inputs keep their values; the output is a new tensor."""
    s1, s2 = {"w": t([1.0])}, {"w": t([5.0])}
    out = fedavg([(s1, 1), (s2, 3)])
    assert s1["w"].tolist() == [1.0] and s2["w"].tolist() == [5.0]
    assert out["w"] is not s1["w"]


def test_weighted_average_mismatched_keys_names_key_and_client() -> None:
    """A client missing a key is reported by index and key name."""
    s1 = {"text.lora_A": t([1.0]), "text.lora_B": t([1.0])}
    s2 = {"text.lora_A": t([1.0])}
    with pytest.raises(ValueError, match=r"client 1.*text\.lora_B"):
        weighted_average([s1, s2], [1, 1])


def test_weighted_average_mismatched_shapes_names_key() -> None:
    """A shape mismatch names the client and the key."""
    s1 = {"vision.lora_A": torch.zeros(2, 3)}
    s2 = {"vision.lora_A": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match=r"client 1, key 'vision\.lora_A'"):
        weighted_average([s1, s2], [1, 1])


@pytest.mark.parametrize(
    ("weights", "match"),
    [([0, 0], "total weight"), ([1, -1], "client 1"), ([1], "2 states but 1 weights")],
)
def test_weighted_average_rejects_bad_weights(weights: list[float], match: str) -> None:
    """Zero total, negative or miscounted weights are ValueErrors."""
    with pytest.raises(ValueError, match=match):
        weighted_average([{"w": t([1.0])}, {"w": t([2.0])}], weights)


def test_weighted_average_rejects_empty() -> None:
    """No states at all is a ValueError, not an IndexError."""
    with pytest.raises(ValueError, match="no states"):
        weighted_average([], [])


# -------------------------------------------------------------------------------- Fisher merging

# Worked example: n = (1, 2), eps = 0,
#   θ1 = [1, 10], F1 = [1, 0]
#   θ2 = [4,  1], F2 = [2, 3]
# coord 0: (1*1*1 + 2*2*4) / (1*1 + 2*2) = 17 / 5 = 3.4
# coord 1: (1*0*10 + 2*3*1) / (1*0 + 2*3) =  6 / 6 = 1.0  (client 1 has Fisher 0 there: ignored)
FISHER_RESULTS = [
    ({"w": t([1.0, 10.0])}, 1, {"w": t([1.0, 0.0])}),
    ({"w": t([4.0, 1.0])}, 2, {"w": t([2.0, 3.0])}),
]


def test_fisher_merge_by_hand() -> None:
    """The worked example gives [3.4, 1.0]."""
    out = fisher_merge(FISHER_RESULTS, eps=0.0)
    torch.testing.assert_close(out["w"], t([3.4, 1.0]))
    assert out["w"].dtype == torch.float32


def test_fisher_sums_by_hand_and_round_trip() -> None:
    """Sums are [17, 6] / [5, 6]; fisher_from_sums of them equals fisher_merge."""
    num, den = fisher_sums(FISHER_RESULTS, eps=0.0)
    assert num["w"].tolist() == [17.0, 6.0]
    assert den["w"].tolist() == [5.0, 6.0]
    torch.testing.assert_close(
        fisher_from_sums(num, den)["w"], fisher_merge(FISHER_RESULTS, 0.0)["w"]
    )


def test_fisher_contributions_sum_to_fisher_sums() -> None:
    """Per-client terms (what secure aggregation masks) add up to fisher_sums."""
    terms = [fisher_contribution(s, n, f, eps=1e-3) for s, n, f in FISHER_RESULTS]
    num, den = fisher_sums(FISHER_RESULTS, eps=1e-3)
    torch.testing.assert_close(sum(tn["w"] for tn, _ in terms).float(), num["w"])
    torch.testing.assert_close(sum(td["w"] for _, td in terms).float(), den["w"])
    # Client 0, coord 1: n (F + eps) θ = 1 * (0 + 1e-3) * 10 = 0.01
    assert terms[0][0]["w"][1].item() == pytest.approx(0.01)


def test_fisher_merge_round_trip_with_eps_and_ranks() -> None:
    """fisher_from_sums(fisher_sums(...)) == fisher_merge(...) for random, heterogeneous inputs."""
    gen = torch.Generator().manual_seed(1)
    results = []
    for r, n in ((2, 3), (4, 5)):
        state = {
            "vision.lora_A": torch.randn(r, 3, generator=gen),
            "bias": torch.randn(3, generator=gen),
        }
        fisher = {k: torch.rand(v.shape, generator=gen) for k, v in state.items()}
        results.append((state, n, fisher))
    merged = fisher_merge(results, eps=1e-4, rank=4)
    via_sums = fisher_from_sums(*fisher_sums(results, eps=1e-4, rank=4))
    for key in merged:
        torch.testing.assert_close(merged[key], via_sums[key])


def test_fisher_merge_with_equal_fisher_is_fedavg() -> None:
    """The same Fisher on every client cancels: the result is FedAvg."""
    gen = torch.Generator().manual_seed(2)
    fisher = {"w": torch.rand(3, 4, generator=gen) + 0.1}
    states = [{"w": torch.randn(3, 4, generator=gen)} for _ in range(3)]
    ns = [1, 4, 2]
    merged = fisher_merge([(s, n, fisher) for s, n in zip(states, ns, strict=True)])
    torch.testing.assert_close(merged["w"], fedavg(list(zip(states, ns, strict=True)))["w"])


def test_fisher_merge_all_zero_fisher_with_eps_is_fedavg() -> None:
    """With all-zero Fisher the weights are n_i * eps: n = (1, 3), θ = (1, 5) -> 4."""
    zero = {"w": t([0.0])}
    out = fisher_merge([({"w": t([1.0])}, 1, zero), ({"w": t([5.0])}, 3, zero)], eps=1e-8)
    torch.testing.assert_close(out["w"], t([4.0]))


def test_fisher_merge_all_zero_fisher_without_eps_uses_fallback() -> None:
    """With eps = 0 and all-zero Fisher the denominator is 0: fallback if given, else 0."""
    zero = {"w": t([0.0])}
    results = [({"w": t([1.0])}, 1, zero), ({"w": t([5.0])}, 3, zero)]
    assert fisher_merge(results, eps=0.0)["w"].tolist() == [0.0]
    assert fisher_merge(results, eps=0.0, fallback={"w": t([7.0])})["w"].tolist() == [7.0]


def test_fisher_merge_follows_the_confident_client() -> None:
    """On each coordinate the result sits near the client with the much larger Fisher there."""
    results = [
        ({"w": t([0.0, 0.0])}, 1, {"w": t([1e3, 1e-3])}),
        ({"w": t([1.0, 1.0])}, 1, {"w": t([1e-3, 1e3])}),
    ]
    out = fisher_merge(results)
    torch.testing.assert_close(out["w"], t([0.0, 1.0]), atol=1e-5, rtol=0)


def test_fisher_merge_ignores_client_order() -> None:
    """Permuting clients leaves the merge unchanged."""
    forward = fisher_merge(FISHER_RESULTS, eps=1e-6)
    backward = fisher_merge(FISHER_RESULTS[::-1], eps=1e-6)
    torch.testing.assert_close(forward["w"], backward["w"])


def test_fisher_merge_rejects_negative_fisher() -> None:
    """Fisher is a mean of squares: a negative entry is a ValueError naming client and key."""
    results = [({"w": t([1.0])}, 1, {"w": t([-1.0])})]
    with pytest.raises(ValueError, match=r"client 0: key 'w'"):
        fisher_merge(results)


def test_fisher_merge_rejects_fisher_key_mismatch() -> None:
    """A Fisher dict without the state's keys is a ValueError naming the key."""
    results = [({"w": t([1.0]), "v": t([1.0])}, 1, {"w": t([1.0])})]
    with pytest.raises(ValueError, match=r"client 0.*'v'"):
        fisher_merge(results)


def test_fisher_merge_rejects_state_shape_mismatch() -> None:
    """States of different shapes (and no rank=) name the key."""
    results = [
        ({"text.lora_B": torch.zeros(3, 2)}, 1, {"text.lora_B": torch.ones(3, 2)}),
        ({"text.lora_B": torch.zeros(3, 4)}, 1, {"text.lora_B": torch.ones(3, 4)}),
    ]
    with pytest.raises(ValueError, match=r"client 1, key 'text\.lora_B'"):
        fisher_merge(results)


# ------------------------------------------------------------------------- heterogeneous ranks


@pytest.mark.parametrize(
    ("key", "dim"),
    [
        ("vision.lora_A", 0),
        ("text.lora_B", 1),
        ("layer.q.lora_A.weight", 0),
        ("layer.q.lora_B.default.weight", 1),
        ("vision.bias", None),
        ("my_lora_A_scale", None),
    ],
)
def test_rank_dim(key: str, dim: int | None) -> None:
    """lora_A carries the rank on dim 0, lora_B on dim 1, anything else has none."""
    assert rank_dim(key) == dim


def test_pad_then_truncate_round_trip() -> None:
    """Padding rank 2 -> 4 adds zero rows/columns; truncating back restores the original."""
    state = {
        "vision.lora_A": t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),  # (r=2, d=3)
        "vision.lora_B": t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),  # (d=3, r=2)
        "vision.bias": t([7.0, 8.0, 9.0]),
    }
    padded = pad_to_rank(state, 4)
    assert padded["vision.lora_A"].tolist() == [
        [1.0, 2.0, 3.0],
        [4.0, 5.0, 6.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
    ]
    assert padded["vision.lora_B"].tolist() == [
        [1.0, 2.0, 0.0, 0.0],
        [3.0, 4.0, 0.0, 0.0],
        [5.0, 6.0, 0.0, 0.0],
    ]
    assert padded["vision.bias"] is state["vision.bias"]
    # The adapter's delta B @ A is unchanged by padding.
    torch.testing.assert_close(
        padded["vision.lora_B"] @ padded["vision.lora_A"],
        state["vision.lora_B"] @ state["vision.lora_A"],
    )
    back = truncate_to_rank(padded, 2)
    for key, value in state.items():
        assert torch.equal(back[key], value)
    assert max_rank([state]) == 2 and max_rank([state, padded]) == 4


def test_truncate_keeps_first_rank_components() -> None:
    """Truncating rank 3 -> 1 keeps row 0 of lora_A and column 0 of lora_B."""
    state = lora_state([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = truncate_to_rank(state, 1)
    assert out["vision.lora_A"].tolist() == [[1.0, 2.0]]
    assert out["vision.lora_B"].tolist() == [[1.0], [4.0]]


def test_pad_and_truncate_refuse_the_wrong_direction() -> None:
    """pad_to_rank never shrinks and truncate_to_rank never grows; both name the key."""
    state = lora_state([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"'vision\.lora_A' has rank 2 > 1"):
        pad_to_rank(state, 1)
    with pytest.raises(ValueError, match=r"'vision\.lora_A' has rank 2 < 3"):
        truncate_to_rank(state, 3)


def test_max_rank_without_lora_keys_is_zero() -> None:
    """States with no rank-carrying key have max rank 0 (padding is then a no-op)."""
    assert max_rank([{"w": torch.zeros(3)}]) == 0
    assert max_rank([]) == 0


# Heterogeneous example, d = 2, n = (1, 3):
#   big   (rank 2): lora_A = [[2, 2], [4, 4]],  lora_B = [[2, 4], [2, 4]]
#   small (rank 1): lora_A = [[6, 6]],          lora_B = [[6], [6]]
# Row/column 0 is held by both: (1*2 + 3*6) / 4 = 5.
# Row/column 1 is held by big only:
#   FedAvg (padded zeros dilute):       (1*4 + 3*0) / 4 = 1
#   Fisher, F = 1 everywhere, eps = 0:  (1*1*4) / (1*1) = 4   (small adds nothing there)
BIG = lora_state([[2.0, 2.0], [4.0, 4.0]], [[2.0, 4.0], [2.0, 4.0]])
SMALL = lora_state([[6.0, 6.0]], [[6.0], [6.0]])


def ones_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fisher 1 on every entry."""
    return {k: torch.ones_like(v) for k, v in state.items()}


def test_fedavg_zero_padding_dilutes_extra_rank() -> None:
    """Under FedAvg the small client's padded zeros pull row 1 from 4 to 1."""
    out = fedavg([(BIG, 1), (SMALL, 3)], rank=2)
    assert out["vision.lora_A"].tolist() == [[5.0, 5.0], [1.0, 1.0]]
    assert out["vision.lora_B"].tolist() == [[5.0, 1.0], [5.0, 1.0]]


def test_fisher_zero_padding_does_not_dilute_extra_rank() -> None:
    """Under Fisher merging the padded client has weight 0 on row 1, which stays at 4."""
    results = [(BIG, 1, ones_like(BIG)), (SMALL, 3, ones_like(SMALL))]
    out = fisher_merge(results, eps=0.0, rank=2)
    assert out["vision.lora_A"].tolist() == [[5.0, 5.0], [4.0, 4.0]]
    assert out["vision.lora_B"].tolist() == [[5.0, 4.0], [5.0, 4.0]]
    # eps > 0 is not given to padded entries either.
    out_eps = fisher_merge(results, eps=1e-2, rank=2)
    torch.testing.assert_close(out_eps["vision.lora_A"], t([[5.0, 5.0], [4.0, 4.0]]))


def test_prepadding_with_zero_fisher_dilutes_only_by_eps() -> None:
    """Padding state and Fisher beforehand gives the padded zeros weight n * eps, no more.

    Row 1: (1 * (1 + eps) * 4) / (1 * (1 + eps) + 3 * eps), with eps = 0.1 -> 4.4 / 1.4.
    """
    results = [
        (BIG, 1, ones_like(BIG)),
        (pad_to_rank(SMALL, 2), 3, pad_to_rank(ones_like(SMALL), 2)),
    ]
    out = fisher_merge(results, eps=0.1)
    assert out["vision.lora_A"][1, 0].item() == pytest.approx(4.4 / 1.4, rel=1e-6)
    assert out["vision.lora_A"][0, 0].item() == pytest.approx(5.0, rel=1e-6)


def test_rank_rows_no_client_holds() -> None:
    """Rows beyond every client's rank: 0 under FedAvg, the fallback under Fisher merging."""
    fallback = lora_state([[0.0, 0.0], [9.0, 9.0]], [[0.0, 9.0], [0.0, 9.0]])
    assert fedavg([(SMALL, 1)], rank=2)["vision.lora_A"].tolist() == [[6.0, 6.0], [0.0, 0.0]]
    out = fisher_merge([(SMALL, 1, ones_like(SMALL))], rank=2, fallback=fallback)
    torch.testing.assert_close(out["vision.lora_A"], t([[6.0, 6.0], [9.0, 9.0]]))
    torch.testing.assert_close(out["vision.lora_B"], t([[6.0, 9.0], [6.0, 9.0]]))


# ------------------------------------------------------------------------------------- FedProx


def test_proximal_penalty_value_and_gradient() -> None:
    """mu = 0.5, θ = [1, 2], θ_g = [0, 4]: 0.5/2 * (1 + 4) = 1.25; grad = mu (θ − θ_g)."""
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    global_theta = torch.tensor([0.0, 4.0], requires_grad=True)
    penalty = proximal_penalty({"w": theta}, {"w": global_theta}, mu=0.5)
    assert penalty.item() == pytest.approx(1.25)
    penalty.backward()
    assert theta.grad is not None
    assert theta.grad.tolist() == [0.5, -1.0]
    assert global_theta.grad is None  # the global state is a constant


def test_proximal_penalty_sums_over_keys() -> None:
    """Two keys: mu = 2, diffs [1] and [[1, 1]] -> 2/2 * (1 + 2) = 3."""
    state = {"a": t([1.0]), "b": t([[1.0, 1.0]])}
    global_state = {"a": t([0.0]), "b": t([[0.0, 0.0]])}
    assert proximal_penalty(state, global_state, mu=2.0).item() == pytest.approx(3.0)


def test_proximal_penalty_zero_mu_and_validation() -> None:
    """mu = 0 gives 0; negative mu and key mismatches are ValueErrors naming the key."""
    state = {"w": t([1.0])}
    assert proximal_penalty(state, {"w": t([3.0])}, mu=0.0).item() == 0.0
    with pytest.raises(ValueError, match="mu"):
        proximal_penalty(state, {"w": t([3.0])}, mu=-1.0)
    with pytest.raises(ValueError, match=r"'v'"):
        proximal_penalty(state, {"v": t([3.0])}, mu=1.0)


def test_server_step_scales_the_move_from_the_global_state():
    """θ + lr·(aggregate − θ): lr 1 is the aggregate, lr 3 three times its move; a lower-rank global
    state is zero-padded (HetLoRA), and untouched coordinates stay put at any lr."""
    g = {"v.lora_A": torch.ones(2, 5), "v.lora_B": torch.zeros(5, 2), "s.offset": torch.zeros(3)}
    agg = {
        "v.lora_A": torch.full((4, 5), 2.0),
        "v.lora_B": torch.ones(5, 4),
        "s.offset": torch.zeros(3),
    }
    assert server_step(g, agg, 1.0) == agg
    out = server_step(g, agg, 3.0)
    assert out["v.lora_A"].shape == (4, 5)
    assert torch.equal(out["v.lora_A"][:2], torch.full((2, 5), 4.0))  # 1 + 3 * (2 - 1)
    assert torch.equal(out["v.lora_A"][2:], torch.full((2, 5), 6.0))  # padded 0 + 3 * (2 - 0)
    assert torch.equal(out["v.lora_B"], torch.full((5, 4), 3.0))
    assert torch.equal(out["s.offset"], torch.zeros(3))
    assert all(out[k].dtype == agg[k].dtype for k in agg)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_server_step_rejects_a_bad_learning_rate(lr):
    with pytest.raises(ValueError, match="server learning rate"):
        server_step({"x": torch.zeros(1)}, {"x": torch.ones(1)}, lr)


def test_server_step_rejects_different_keys():
    with pytest.raises(ValueError, match="different keys"):
        server_step({"x": torch.zeros(1)}, {"y": torch.ones(1)}, 2.0)
