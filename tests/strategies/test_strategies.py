"""Tests for the strategy objects and the registry, against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from fednano_ray.strategies import (
    STRATEGIES,
    Centralized,
    ClientFailure,
    ClientUpdate,
    FedAvg,
    FedAvgLoRA,
    FedDPAF,
    FedNano,
    FedProx,
    Local,
    Strategy,
    build_strategy,
    truncate_to_rank,
)


def t(values: object) -> torch.Tensor:
    """A float32 tensor from literal values."""
    return torch.tensor(values, dtype=torch.float32)


def scalar_update(
    client_id: str, value: float, n: int, fisher: float | None = None
) -> ClientUpdate:
    """An update whose state is one 1-element tensor ``w``."""
    fisher_state = None if fisher is None else {"w": t([fisher])}
    return ClientUpdate(client_id, {"w": t([value])}, n, fisher=fisher_state)


GLOBAL_SCALAR = {"w": t([0.0])}


# --------------------------------------------------------------------------------------- registry


def test_registry_names_and_build() -> None:
    """Every registered name builds an instance of its class with that name."""
    assert set(STRATEGIES) == {
        # federation.strategy
        "fedavg",
        "fedprox",
        "fednano",
        "local",
        "centralized",
        "fedavg-lora",
        "feddpa-f",
        "median",
        "trimmed_mean",
        "clip",
        "dp_fedavg",  # chosen by the trust section
    }
    for name, cls in STRATEGIES.items():
        strategy = build_strategy(name)
        assert isinstance(strategy, cls) and isinstance(strategy, Strategy)
        assert strategy.name == name


def test_build_strategy_passes_options() -> None:
    """Options reach the constructor."""
    assert build_strategy("fedprox", mu=0.1).proximal_mu == 0.1
    fednano = build_strategy("fednano", eps=1e-6)
    assert isinstance(fednano, FedNano) and fednano.eps == 1e-6


def test_build_strategy_unknown_name_lists_valid_names() -> None:
    """An unknown name is a ValueError that lists the valid ones."""
    with pytest.raises(
        ValueError,
        match="centralized, clip, dp_fedavg, fedavg, fedavg-lora, feddpa-f, fednano, fedprox, "
        "local, median, trimmed_mean",
    ):
        build_strategy("fedsgd")


def test_build_strategy_bad_option_is_value_error() -> None:
    """An option the strategy does not take is a ValueError naming the strategy."""
    with pytest.raises(ValueError, match="'fedavg'.*mu"):
        build_strategy("fedavg", mu=0.1)


def test_flags_per_strategy() -> None:
    """Client-side flags: only FedProx has a proximal term, only Local personalises only."""
    assert FedAvg().proximal_mu == 0.0 and not FedAvg().personalize_only
    assert FedProx(mu=0.3).proximal_mu == 0.3 and FedProx(mu=0.3).mu == 0.3
    assert FedNano().proximal_mu == 0.0
    assert Local().personalize_only
    assert not Centralized().personalize_only


@pytest.mark.parametrize(
    "build",
    [
        lambda: FedProx(mu=-0.1),
        lambda: FedNano(eps=-1.0),
        lambda: FedDPAF(train_weight=1.5),
        lambda: FedDPAF(top_k=0),
        lambda: FedDPAF(bank_size=0),
    ],
)
def test_invalid_options_raise(build: object) -> None:
    """Negative mu or eps, a FedDPA-F weight outside [0, 1] or an empty top-k or bank is rejected at
    construction."""
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_describe_records_the_rank_rule() -> None:
    """describe() says which heterogeneous-rank rule was used."""
    info = FedNano(eps=1e-6).describe()
    assert info["strategy"] == "fednano" and info["eps"] == 1e-6
    assert "Fisher 0" in str(info["rank_rule"])
    assert "dilute" in str(FedAvg().describe()["rank_rule"])


def test_feddpa_f_is_fedavg_with_a_dual_adapter_and_records_its_weighting() -> None:
    """FedDPA-F aggregates as FedAvg (also as sums, for SecAgg), flags the dual adapter for the
    coordinator, and describe() records the weighting options."""
    dpa = build_strategy("feddpa-f", train_weight=0.25, top_k=3, bank_size=64)
    assert isinstance(dpa, FedAvg) and dpa.dual_adapter and not FedAvg().dual_adapter
    assert dpa.proximal_mu == 0.0 and not dpa.personalize_only and not dpa.uses_fisher
    updates = [scalar_update("a", 1.0, 1), scalar_update("b", 5.0, 3)]
    terms, finish = dpa.sum_plan(GLOBAL_SCALAR, updates, [])
    summed = {k: sum(term[k] for term in terms) for k in terms[0]}
    assert finish(summed)["w"].tolist() == [4.0]
    info = dpa.describe()
    options = (info["feddpa_train_weight"], info["feddpa_top_k"], info["feddpa_bank_size"])
    assert options == (0.25, 3, 64)
    assert "top-k" in str(info["feddpa_representation"])


def test_client_update_rejects_negative_examples() -> None:
    """num_examples < 0 is a ValueError naming the client."""
    with pytest.raises(ValueError, match="'c1'"):
        ClientUpdate("c1", {"w": t([1.0])}, -1)


# ------------------------------------------------------------------------------ FedAvg & friends


@pytest.mark.parametrize(
    "strategy", [FedAvg(), FedProx(mu=0.5), Centralized(), FedAvgLoRA(), FedDPAF()]
)
def test_fedavg_family_by_hand(strategy: Strategy) -> None:
    """n = (1, 3), θ = (1, 5) -> 4 for FedAvg, FedProx, Centralized and FedDPA-F alike."""
    updates = [scalar_update("a", 1.0, 1), scalar_update("b", 5.0, 3)]
    out = strategy.aggregate(GLOBAL_SCALAR, updates, [])
    assert out["w"].tolist() == [4.0]


def test_failures_do_not_break_aggregation() -> None:
    """Failed clients are data: the result is the average of the updates that arrived."""
    updates = [scalar_update("a", 1.0, 1), scalar_update("b", 5.0, 3)]
    failures = [ClientFailure("c", "deadline 30 s exceeded"), ClientFailure("d", "actor died")]
    for strategy in (FedAvg(), FedNano()):
        assert strategy.aggregate(GLOBAL_SCALAR, updates, failures)["w"].tolist() == [4.0]


def test_no_updates_returns_global_unchanged() -> None:
    """A round in which everyone failed keeps the global state (the same object)."""
    failures = [ClientFailure("a", "crashed")]
    for name in STRATEGIES:
        assert build_strategy(name).aggregate(GLOBAL_SCALAR, [], failures) is GLOBAL_SCALAR


def test_update_key_mismatch_names_client_and_key() -> None:
    """An update without a global key is a ValueError naming client and key."""
    update = ClientUpdate("edge-7", {"v": t([1.0])}, 1)
    with pytest.raises(ValueError, match=r"'edge-7'.*'w'"):
        FedAvg().aggregate(GLOBAL_SCALAR, [update], [])


def test_update_shape_mismatch_outside_rank_names_client_and_key() -> None:
    """Only the rank dim may differ from the global state; d may not."""
    global_state = {"vision.lora_A": torch.zeros(2, 3)}
    update = ClientUpdate("edge-7", {"vision.lora_A": torch.zeros(2, 5)}, 1)
    with pytest.raises(ValueError, match=r"'edge-7', key 'vision\.lora_A'"):
        FedAvg().aggregate(global_state, [update], [])


# ------------------------------------------------------------------------------------- FedNano


def test_fednano_by_hand() -> None:
    """Two coordinates, n = (1, 2), θ_a = (1, 1), θ_b = (4, 4), F_a = (1, 3), F_b = (3, 1), eps = 0.
    Each Fisher is divided by its mean: F_a = (0.5, 1.5), F_b = (1.5, 0.5). Plain Fisher merging
    (max_share 1): weights (0.5, 3) and (1.5, 1): ((0.5 + 12) / 3.5, (1.5 + 4) / 2.5). With the
    default max_share 0.5 neither client may hold more than half of a coordinate: b's 3 and a's 1.5
    are cut to the other's weight, so both coordinates are the plain mean 2.5."""
    w2 = {"w": t([0.0, 0.0])}
    updates = [
        ClientUpdate("a", {"w": t([1.0, 1.0])}, 1, fisher={"w": t([1.0, 3.0])}),
        ClientUpdate("b", {"w": t([4.0, 4.0])}, 2, fisher={"w": t([3.0, 1.0])}),
    ]
    plain = FedNano(eps=0.0, max_share=1.0)
    torch.testing.assert_close(plain.aggregate(w2, updates, [])["w"], t([12.5 / 3.5, 5.5 / 2.5]))
    assert plain.warnings == []
    capped = FedNano(eps=0.0)
    torch.testing.assert_close(capped.aggregate(w2, updates, [])["w"], t([2.5, 2.5]))
    # Scaling one client's Fisher by 1e9 (its claim of how much it matters) changes nothing.
    loud = [updates[0], ClientUpdate("b", updates[1].state, 2, fisher={"w": t([3e9, 1e9])})]
    torch.testing.assert_close(plain.aggregate(w2, loud, [])["w"], t([12.5 / 3.5, 5.5 / 2.5]))


def test_fednano_without_fisher_falls_back_to_fedavg_with_warning() -> None:
    """One update without Fisher: FedAvg this round (4.0, not 3.4) and a warning naming it."""
    updates = [scalar_update("a", 1.0, 1, fisher=1.0), scalar_update("b", 5.0, 3)]
    strategy = FedNano()
    assert strategy.aggregate(GLOBAL_SCALAR, updates, [])["w"].tolist() == [4.0]
    assert len(strategy.warnings) == 1
    assert "'b'" in strategy.warnings[0] and "FedAvg" in strategy.warnings[0]
    # Warnings are per call.
    full = [scalar_update("a", 1.0, 1, fisher=1.0), scalar_update("b", 5.0, 3, fisher=1.0)]
    strategy.aggregate(GLOBAL_SCALAR, full, [])
    assert strategy.warnings == []


def test_fednano_fisher_mismatch_names_client() -> None:
    """A Fisher dict that does not match its state is a ValueError naming the client."""
    bad = ClientUpdate("edge-3", {"w": t([1.0])}, 1, fisher={"w": t([1.0, 2.0])})
    with pytest.raises(ValueError, match=r"'edge-3', key 'w'"):
        FedNano().aggregate(GLOBAL_SCALAR, [bad], [])


# ------------------------------------------------------------------------- heterogeneous ranks

# d = 2; global at rank 3 (row 2 = 9), updates at rank 2 ("big", n=1) and rank 1 ("small", n=3).
GLOBAL_R3 = {
    "vision.lora_A": t([[0.0, 0.0], [0.0, 0.0], [9.0, 9.0]]),
    "vision.lora_B": t([[0.0, 0.0, 9.0], [0.0, 0.0, 9.0]]),
}


def hetero_updates(with_fisher: bool) -> list[ClientUpdate]:
    """big: rows [2, 2], [4, 4]; small: row [6, 6]; Fisher 1 everywhere if asked."""
    big = {
        "vision.lora_A": t([[2.0, 2.0], [4.0, 4.0]]),
        "vision.lora_B": t([[2.0, 4.0], [2.0, 4.0]]),
    }
    small = {"vision.lora_A": t([[6.0, 6.0]]), "vision.lora_B": t([[6.0], [6.0]])}

    def fisher(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return {k: torch.ones_like(v) for k, v in state.items()} if with_fisher else None

    return [
        ClientUpdate("big", big, 1, fisher=fisher(big)),
        ClientUpdate("small", small, 3, fisher=fisher(small)),
    ]


def test_fedavg_heterogeneous_ranks_by_hand() -> None:
    """Max rank 3. Row 0: (2 + 18)/4 = 5; row 1: (4 + 0)/4 = 1 (diluted); row 2: nobody -> 0."""
    out = FedAvg().aggregate(GLOBAL_R3, hetero_updates(with_fisher=False), [])
    assert out["vision.lora_A"].tolist() == [[5.0, 5.0], [1.0, 1.0], [0.0, 0.0]]
    assert out["vision.lora_B"].tolist() == [[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]]


def test_fednano_heterogeneous_ranks_by_hand() -> None:
    """Row 0: 5; row 1: big alone -> 4 (no dilution); row 2: nobody -> global value 9. With the
    default max_share 0.5, small's 3/4 of row 0 is cut to half: (2 + 6) / 2 = 4; row 1, which big
    alone holds, stays big's."""
    updates = hetero_updates(with_fisher=True)
    out = FedNano(eps=0.0, max_share=1.0).aggregate(GLOBAL_R3, updates, [])
    assert out["vision.lora_A"].tolist() == [[5.0, 5.0], [4.0, 4.0], [9.0, 9.0]]
    assert out["vision.lora_B"].tolist() == [[5.0, 4.0, 9.0], [5.0, 4.0, 9.0]]
    capped = FedNano(eps=0.0).aggregate(GLOBAL_R3, updates, [])
    assert capped["vision.lora_A"].tolist() == [[4.0, 4.0], [4.0, 4.0], [9.0, 9.0]]


@pytest.mark.parametrize("strategy", [FedAvg(), FedNano()])
def test_heterogeneous_result_at_max_rank_truncates_to_each_client(strategy: Strategy) -> None:
    """The global state comes back at the max rank; each client truncates to its own rank."""
    global_state = {"text.lora_A": torch.zeros(2, 4), "text.lora_B": torch.zeros(4, 2)}
    gen = torch.Generator().manual_seed(0)
    updates = []
    for client_id, r in (("r2", 2), ("r8", 8), ("r4", 4)):
        state = {
            "text.lora_A": torch.randn(r, 4, generator=gen),
            "text.lora_B": torch.randn(4, r, generator=gen),
        }
        fisher = {k: torch.rand(v.shape, generator=gen) for k, v in state.items()}
        updates.append(ClientUpdate(client_id, state, 10, fisher=fisher))
    out = strategy.aggregate(global_state, updates, [])
    assert out["text.lora_A"].shape == (8, 4) and out["text.lora_B"].shape == (4, 8)
    for update in updates:
        r = update.state["text.lora_A"].shape[0]
        mine = truncate_to_rank(out, r)
        assert mine["text.lora_A"].shape == (r, 4) and mine["text.lora_B"].shape == (4, r)
    # Rank rows 4..7 are held by client r8 alone: Fisher merging returns its values exactly there
    # (FedAvg would dilute them by the padded zeros of r2 and r4).
    if isinstance(strategy, FedNano):
        torch.testing.assert_close(out["text.lora_A"][4:], updates[1].state["text.lora_A"][4:])


# ---------------------------------------------------------------------------------------- Local


def test_local_returns_global_unchanged() -> None:
    """Local never aggregates, even given updates of other ranks."""
    strategy = Local()
    out = strategy.aggregate(GLOBAL_R3, hetero_updates(with_fisher=False), [])
    assert out is GLOBAL_R3
    assert out["vision.lora_A"].tolist() == [[0.0, 0.0], [0.0, 0.0], [9.0, 9.0]]
