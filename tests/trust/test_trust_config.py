"""The ``trust`` config section: defaults, the strategy it builds, and errors that name the key."""

from __future__ import annotations

import pytest
import torch
import yaml

from fednano_ray.config import ConfigError, dump_config, load_config
from fednano_ray.strategies import (
    DPFedAvg,
    FedAvgLoRA,
    FedNano,
    FedProx,
    Median,
    NormClip,
    TrimmedMean,
)
from fednano_ray.strategies.base import ClientUpdate
from fednano_ray.trust.dp import dp_epsilon

TINY = "examples/tiny.yaml"


def dump_config_tree(cfg) -> dict:
    """The config as written to a run directory, parsed back to a tree."""
    return yaml.safe_load(dump_config(cfg))


def test_defaults_change_nothing() -> None:
    """By default: no bound, the strategy's own mean, no DP, no secure aggregation."""
    cfg = load_config(TINY)
    t = cfg.trust
    assert t.max_update_norm is None and t.aggregator == "mean" and t.dp is None
    assert not t.secure_aggregation
    assert isinstance(cfg.method().build_strategy(), FedNano)
    assert load_config(dump_config_tree(cfg)) == cfg  # the section round-trips through YAML


@pytest.mark.parametrize(
    ("overrides", "cls"),
    [
        (["federation.strategy=fedavg", "trust.aggregator=median"], Median),
        (
            [
                "federation.strategy=fedprox",
                "trust.aggregator=trimmed_mean",
                "trust.trim_fraction=0.25",
            ],
            TrimmedMean,
        ),
        (["federation.strategy=fedavg", "trust.aggregator=clip", "trust.clip_norm=2"], NormClip),
        (
            [
                "federation.strategy=fedavg",
                "trust.dp.clip_norm=0.5",
                "trust.dp.noise_multiplier=1.1",
            ],
            DPFedAvg,
        ),
        (["federation.strategy=fedprox", "federation.strategy_options.mu=0.1"], FedProx),
        # fedavg-lora aggregates with FedAvg, so every FedAvg-family rule applies to its LLM LoRA.
        (["federation.strategy=fedavg-lora", "trust.aggregator=median"], Median),
        (
            [
                "federation.strategy=fedavg-lora",
                "trust.dp.clip_norm=0.5",
                "trust.dp.noise_multiplier=1.1",
            ],
            DPFedAvg,
        ),
        (["federation.strategy=fedavg-lora", "trust.secure_aggregation=true"], FedAvgLoRA),
    ],
)
def test_trust_selects_the_strategy(overrides: list[str], cls: type) -> None:
    """trust.aggregator / trust.dp pick the aggregation rule; FedProx's mu stays client-side."""
    cfg = load_config(TINY, overrides)
    strategy = cfg.method().build_strategy()
    assert type(strategy) is cls
    if cfg.federation.strategy == "fedprox":
        assert (
            strategy.proximal_mu == cfg.federation.strategy_options["mu"]
        )  # 0.1 or the default 0.01
    if cls is TrimmedMean:
        assert strategy.trim_fraction == 0.25
    if cls is DPFedAvg:
        assert (strategy.clip_norm, strategy.noise_multiplier) == (0.5, 1.1)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            [
                "federation.strategy=fedavg",
                "trust.aggregator=median",
                "trust.secure_aggregation=true",
            ],
            "trust.secure_aggregation with trust.aggregator 'median' is impossible",
        ),
        (
            [
                "federation.strategy=fedavg",
                "trust.aggregator=trimmed_mean",
                "trust.secure_aggregation=true",
            ],
            "trust.aggregator 'trimmed_mean' is impossible",
        ),
        (
            ["trust.max_update_norm=5", "trust.secure_aggregation=true"],
            "trust.max_update_norm cannot be checked under trust.secure_aggregation",
        ),
        (["federation.strategy=fedavg", "trust.aggregator=clip"], "needs trust.clip_norm"),
        (["federation.strategy=fedavg", "trust.clip_norm=1"], "set trust.aggregator=clip"),
        (
            ["federation.strategy=fedavg", "trust.aggregator=median", "trust.dp.clip_norm=1"],
            "trust.dp clips and averages by itself",
        ),
        (
            ["trust.aggregator=median"],
            "needs federation.strategy fedavg, fedprox or fedavg-lora, not 'fednano'",
        ),
        (
            ["trust.dp.clip_norm=1"],
            "trust.dp needs federation.strategy fedavg, fedprox or fedavg-lora",
        ),
        (
            ["federation.strategy=fedavg", "trust.dp.clip_norm=1", "trust.dp.delta=0.3"],
            "trust.dp.delta (0.3) must be below 1/federation.num_clients (0.25)",
        ),
        (
            ["federation.strategy=fedavg", "trust.dp.noise_multiplier=1"],
            "trust.dp.clip_norm: Field required",
        ),
        (["federation.strategy=local", "trust.secure_aggregation=true"], "'local' has none"),
        (["trust.trim_fraction=0.5"], "trust.trim_fraction"),
        (["trust.max_update_norm=0"], "trust.max_update_norm"),
        (["trust.aggregator=krum"], "trust.aggregator"),
        (["trust.dp.sigma=1"], "trust.dp.sigma: unknown key"),
    ],
)
def test_invalid_trust_settings_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert needle in str(err.value), str(err.value)


def test_secure_aggregation_and_dp_together_are_allowed() -> None:
    """Distributed trust: clients clip, the sum is masked, the server adds noise to the sum."""
    cfg = load_config(
        TINY,
        ["federation.strategy=fedavg", "trust.dp.clip_norm=1", "trust.secure_aggregation=true"],
    )
    assert cfg.trust.secure_aggregation and cfg.trust.dp is not None
    assert load_config(dump_config_tree(cfg)) == cfg


# ------------------------------------------------------------------------ the coordinator's policy


def small_round():
    """A rank-2 global adapter and 4 clients that each moved it a little."""
    gen = torch.Generator().manual_seed(0)
    glob = {"v.lora_A": torch.randn(2, 8, generator=gen), "v.lora_B": torch.zeros(8, 2)}
    updates = [
        ClientUpdate(
            str(i), {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in glob.items()}, 10
        )
        for i in range(4)
    ]
    return glob, updates


def test_policy_records_secure_aggregation_and_the_epsilon_spent_per_round() -> None:
    """DP + SecAgg: the policy refuses to aggregate plain updates (under SecAgg none may reach the
    coordinator); the SecAgg uplink's record gets dp_extras, the cumulative ε (from dp-accounting
    at q = 4/4), and the summary reports the final ε."""
    from fednano_ray.trust.secagg_plan import secure_aggregate

    cfg = load_config(
        TINY,
        [
            "federation.strategy=fedavg",
            "trust.dp.clip_norm=1",
            "trust.dp.accountant=rdp",
            "trust.secure_aggregation=true",
        ],
    )
    policy = cfg.method()
    strategy = cfg.method().build_strategy()
    glob, updates = small_round()
    with pytest.raises(ValueError, match="secure_aggregation"):
        policy.aggregate(strategy, 0, glob, updates, [], [])
    history: list[dict] = []
    for rnd in range(3):
        strategy.begin_round(rnd)
        state, info = secure_aggregate(strategy, glob, updates, session=b"round %d" % rnd)
        assert state.keys() == glob.keys()
        history.append(
            {
                "round": rnd,
                "failures": [],
                "secure_aggregation": info,
                **policy.dp_extras(4, history),
            }
        )
    eps = [h["dp_epsilon"] for h in history]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(dp_epsilon(1.0, 1.0, 3, 1e-5, "rdp"))
    assert [h["dp_releases"] for h in history] == [1, 2, 3]
    assert history[0]["dp_noise_std"] == pytest.approx(1.0 * 1.0 / 4)
    info = history[0]["secure_aggregation"]
    assert (
        info["clients"] == 4 and info["summed"] == ["0", "1", "2", "3"] and info["threshold"] == 3
    )
    summary = policy.trust_summary(history)
    assert summary["dp_epsilon"] == pytest.approx(eps[-1]) and summary["dp_releases"] == 3
    assert summary["dp_accountant"].startswith("dp-accounting==")
    assert summary["secure_aggregation"] is True and summary["rejected_updates"] == 0


def test_policy_screens_against_the_start_state() -> None:
    """screen() applies trust.max_update_norm and the Fisher checks of fednano."""
    cfg = load_config(TINY, ["trust.max_update_norm=0.5"])
    glob, updates = small_round()
    updates[1].state["v.lora_A"] = updates[1].state["v.lora_A"] * 50
    updates[2].fisher = {k: -torch.ones_like(v) for k, v in updates[2].state.items()}
    valid, rejected = cfg.method().screen(updates, lambda u: glob)
    assert [u.client_id for u in valid] == ["0", "3"]
    assert [(f.client_id, f.reason.split(" ")[1]) for f in rejected] == [
        ("1", "update"),
        ("2", "Fisher"),
    ]
    history = [{"failures": [{"client_id": f.client_id, "reason": f.reason} for f in rejected]}]
    assert cfg.method().trust_summary(history) == {"rejected_updates": 2}
