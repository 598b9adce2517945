"""The method table: one entry per federation.strategy, consistent with the strategy it builds."""

import pytest

from fednano_ray.config import FederationConfig, load_config
from fednano_ray.federation.method import FULL_MLLM, METHODS, Method

TINY = "examples/tiny.yaml"


def _config(name: str):
    extra = ["federation.personalize_steps=2"] if METHODS[name].dual_adapter else []
    return load_config(TINY, [f"federation.strategy={name}", *extra])


def test_the_config_accepts_exactly_the_methods():
    """federation.strategy's choices are METHODS' names (no second list to keep in step)."""
    field = FederationConfig.model_fields["strategy"]
    assert set(field.annotation.__args__) == set(METHODS)
    for name, spec in METHODS.items():
        assert spec.summary in field.description, name


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_a_strategy_that_agrees_with_its_entry(name):
    """What the entry says (personal-only, dual adapter, Fisher upload) is what its strategy does,
    its options are the strategy's constructor arguments, and the resolved method says which
    client kind and uplink the run needs."""
    cfg = _config(name)
    method = cfg.method()
    assert isinstance(method, Method) and method.name == name
    strategy = method.build_strategy()
    spec = METHODS[name]
    assert strategy.personalize_only == spec.personal_only
    assert strategy.uses_fisher == spec.fisher_upload
    assert strategy.dual_adapter == spec.dual_adapter
    for option, value in method.options.items():
        assert getattr(strategy, option) == value, option
    assert method.needs_trainer == (spec.client is not FULL_MLLM)
    assert method.uplink == "plain"
    assert method.bank_size == (method.options["bank_size"] if spec.dual_adapter else 0)
    assert cfg.client_bank_size() == method.bank_size
    assert cfg.clients_hold_llm() == spec.client.holds_llm


def test_secure_aggregation_is_the_uplink_only_where_something_is_summed():
    cfg = load_config(TINY, ["federation.strategy=fedavgm", "trust.secure_aggregation=true"])
    assert cfg.method().uplink == "secagg"
    for name in ("local", "centralized"):
        assert not METHODS[name].aggregates
    assert (
        load_config(TINY, ["federation.strategy=fedavgm"]).method().build_strategy().momentum == 0.9
    )
