"""adapter.factors=product: the mean of the clients' B@A, re-factorised by truncated SVD."""

from __future__ import annotations

import pytest
import torch

from fednano_ray.config import load_config
from fednano_ray.strategies import FedAvg, FedProx, build_strategy
from fednano_ray.strategies.aggregate import fedavg, merge_products, truncate_to_rank
from fednano_ray.strategies.base import ClientUpdate

D_IN, D_OUT = 12, 10


def _client(rank: int, seed: int, *, offset: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "vision.lora_A": torch.randn(rank, D_IN, generator=g),
        "vision.lora_B": torch.randn(D_OUT, rank, generator=g),
    }
    if offset:
        state["vision.offset"] = torch.randn(3, D_OUT, generator=g)
    return state


def _product(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return state["vision.lora_B"].double() @ state["vision.lora_A"].double()


def _reference(rank: int) -> dict[str, torch.Tensor]:
    return {
        "vision.lora_A": torch.full((rank, D_IN), 0.2),
        "vision.lora_B": torch.zeros(D_OUT, rank),
        "vision.offset": torch.zeros(3, D_OUT),
    }


def test_the_merged_factors_multiply_to_the_mean_product_when_the_rank_allows():
    """Two clients of ranks 2 and 3 (products of rank <= 5) merged at rank 5: B@A is exactly
    (1 B1A1 + 3 B2A2) / 4, which merging A and B separately (FedAvg of the factors) is not."""
    c1, c2 = _client(2, 0, offset=True), _client(3, 1, offset=True)
    merged = merge_products([(c1, 1), (c2, 3)], rank=5, reference=_reference(5))
    want = (_product(c1) + 3 * _product(c2)) / 4
    torch.testing.assert_close(_product(merged), want, rtol=1e-5, atol=1e-5)
    assert merged["vision.lora_A"].shape == (5, D_IN) and merged["vision.lora_B"].shape == (
        D_OUT,
        5,
    )
    torch.testing.assert_close(
        merged["vision.offset"], (c1["vision.offset"] + 3 * c2["vision.offset"]) / 4
    )
    factors = fedavg([(c1, 1), (c2, 3)], rank=5)
    assert (
        _product(factors) - want
    ).abs().max() > 0.1  # the cross terms B_i A_j of separate merging


def test_a_smaller_rank_is_the_best_approximation_and_tiers_take_the_top_components():
    c1, c2 = _client(3, 2), _client(3, 3)
    want = (_product(c1) + _product(c2)) / 2
    u, s, vh = torch.linalg.svd(want)
    merged = merge_products([(c1, 1), (c2, 1)], rank=4, reference=_reference(4))
    best4 = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(
        _product(merged), best4, rtol=1e-5, atol=1e-5
    )  # Eckart-Young at rank 4
    small = truncate_to_rank(merged, 2)  # what a rank-2 client takes (HetLoRA)
    best2 = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    torch.testing.assert_close(_product(small), best2, rtol=1e-5, atol=1e-5)


def test_a_zero_product_keeps_orthogonal_a_rows_at_the_reference_scale():
    """Round 0: every B is 0, so W = 0. The merge must not return A = B = 0 (a saddle no gradient
    leaves): A gets orthogonal rows with the reference's row norm, B stays 0; also when fewer
    components than the rank come in."""
    ref = _reference(4)
    c = float(ref["vision.lora_A"].norm(dim=1).mean())
    for clients in ([_client(2, 4), _client(2, 5)], [_client(1, 6)]):
        states = [{**s, "vision.lora_B": torch.zeros_like(s["vision.lora_B"])} for s in clients]
        merged = merge_products([(s, 1) for s in states], rank=4, reference=ref)
        a = merged["vision.lora_A"].double()
        torch.testing.assert_close(
            a @ a.T, c**2 * torch.eye(4, dtype=torch.float64), rtol=1e-5, atol=1e-6
        )
        assert not merged["vision.lora_B"].any()


def test_fedavg_and_fedprox_merge_products_and_refuse_a_secure_sum():
    c1, c2 = _client(1, 7), _client(3, 8)  # products of rank <= 4: exact at the global rank 4
    glob = {"vision.lora_A": torch.randn(4, D_IN), "vision.lora_B": torch.zeros(D_OUT, 4)}
    ups = [ClientUpdate("0", c1, 10), ClientUpdate("1", c2, 30)]
    for strategy in (
        FedAvg(factors="product"),
        FedProx(mu=0.1, factors="product"),
        build_strategy("fedavg", factors="product"),
    ):
        merged = strategy.aggregate(glob, ups, [])
        torch.testing.assert_close(
            _product(merged), (_product(c1) + 3 * _product(c2)) / 4, rtol=1e-5, atol=1e-5
        )
        assert "B@A" in strategy.rank_rule
        with pytest.raises(ValueError, match="secure sum"):
            strategy.sum_plan(glob, ups, [])
    with pytest.raises(ValueError, match="factors must be"):
        FedAvg(factors="sideways")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["federation.strategy=fednano"], "use fedavg, fedprox or feddpa-f"),
        (["federation.strategy=fedavg"], "train.optimizer_state=reset"),
        (
            [
                "federation.strategy=fedavg",
                "train.optimizer_state=reset",
                "trust.secure_aggregation=true",
            ],
            "needs each client's factors in the clear",
        ),
    ],
)
def test_product_merging_config_errors(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config("examples/tiny.yaml", ["adapter.factors=product", *overrides])
    ok = load_config(
        "examples/tiny.yaml",
        ["adapter.factors=product", "federation.strategy=fedavg", "train.optimizer_state=reset"],
    )
    assert ok.adapter.factors == "product"


def test_the_method_builds_the_product_strategy_from_the_config():
    for strategy, cls in (("fedavg", FedAvg), ("fedprox", FedProx)):
        cfg = load_config(
            "examples/tiny.yaml",
            [
                "adapter.factors=product",
                f"federation.strategy={strategy}",
                "train.optimizer_state=reset",
            ],
        )
        built = cfg.method().build_strategy()  # what the coordinator aggregates with
        assert type(built) is cls and built.factors == "product"
