"""The config tree: strict keys, --set overrides, cross-field checks, frozen, dump round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fednano_ray.app import check_resources
from fednano_ray.config import Config, ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("path", [TINY, QUICKSTART], ids=["tiny", "quickstart"])
def test_examples_load(path):
    """The shipped example configs validate."""
    # Execute
    cfg = load_config(path)

    # Assert
    assert isinstance(cfg, Config)
    assert sum(t.clients for t in cfg.tiers) == cfg.federation.num_clients
    assert len(cfg.client_tiers()) == cfg.federation.num_clients


def test_tiny_example_values():
    """tiny.yaml's values reach the tree (kind, tiers, nested synth section)."""
    # Execute
    cfg = load_config(TINY)

    # Assert
    assert cfg.model.kind == "tiny"
    assert cfg.model.precision == "fp32"
    assert cfg.data.synth.num_train == 160
    assert [t.name for t in cfg.tiers] == ["edge-small", "edge-large"]
    assert [cfg.tier_rank(t) for t in cfg.tiers] == [2, 4]


def test_unknown_top_level_key(tmp_path):
    """A misspelt section is an error naming it as an unknown key."""
    # Prepare
    tree = yaml.safe_load(TINY.read_text())
    tree["modle"] = {"kind": "tiny"}
    path = _write(tmp_path, tree)

    # Execute / Assert
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "modle: unknown key" in msg
    assert str(path) in msg


def test_unknown_nested_key_in_file(tmp_path):
    """A misspelt nested key is an error naming its dotted path."""
    # Prepare
    tree = yaml.safe_load(TINY.read_text())
    tree["federation"]["roundz"] = 5
    path = _write(tmp_path, tree)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"federation\.roundz: unknown key"):
        load_config(path)


def test_unknown_nested_key_via_set():
    """A misspelt --set key is caught the same way."""
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"federation\.roundz: unknown key"):
        load_config(TINY, ["federation.roundz=5"])


def test_unknown_key_inside_a_tier():
    """Unknown keys inside list items are named with their index."""
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"tiers\.0\.batchsize: unknown key"):
        load_config(TINY, ["tiers.0.batchsize=3"])


def test_set_overrides_scalars_lists_and_nested():
    """--set parses YAML scalars and lists and reaches nested sections and list items."""
    # Execute
    cfg = load_config(
        TINY,
        [
            "federation.rounds=7",
            "model.precision=bf16",
            "adapter.modalities=[vision]",
            "model.tiny.hidden_size=256",
            "tiers.1.batch_size=2",
            "train.lr=0.5",
            "data.partition=iid",
        ],
    )

    # Assert
    assert cfg.federation.rounds == 7 and isinstance(cfg.federation.rounds, int)
    assert cfg.model.precision == "bf16"
    assert cfg.adapter.modalities == ("vision",)
    assert cfg.model.tiny.hidden_size == 256
    assert cfg.model.tiny.num_layers == 2  # siblings untouched
    assert cfg.tiers[1].batch_size == 2
    assert cfg.tiers[0].batch_size == 4
    assert cfg.train.lr == 0.5
    assert cfg.data.partition == "iid"


def test_set_creates_missing_section():
    """--set on defaults builds the nested dicts it needs."""
    # Execute
    cfg = load_config(None, ["data.synth.num_train=50", "serve.port=9000"])

    # Assert
    assert cfg.data.synth.num_train == 50
    assert cfg.serve.port == 9000


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("federation.rounds", r"expected key=value"),
        ("federation.rounds.x=1", r"federation\.rounds is not a section"),
        ("tiers.9.batch_size=1", r"--set tiers\.9\.batch_size"),
        ("federation.rounds=many", r"federation\.rounds"),
    ],
    ids=["no-equals", "through-scalar", "bad-index", "bad-type"],
)
def test_malformed_set_errors(override, pattern):
    """A malformed --set is a ConfigError naming the key."""
    # Execute / Assert
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(TINY, [override])
    key = override.split("=")[0]
    assert f"--set {key}: --set" not in str(info.value)  # named once, not wrapped twice


def test_clients_per_round_above_num_clients():
    """Sampling more clients than exist names both keys."""
    # Execute / Assert
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["federation.clients_per_round=5"])
    msg = str(info.value)
    assert "federation.clients_per_round" in msg
    assert "federation.num_clients" in msg


def test_tiers_must_sum_to_num_clients():
    """Tier sizes that do not add up to num_clients name tiers[*].clients and num_clients."""
    # Execute / Assert
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["federation.num_clients=5"])
    msg = str(info.value)
    assert "tiers[*].clients" in msg
    assert "federation.num_clients" in msg
    assert "4 clients" in msg


def test_hf_needs_name_or_path():
    """model.kind hf without a checkpoint names model.name_or_path."""
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"model\.name_or_path is required"):
        load_config(TINY, ["model.kind=hf"])


def test_hf_with_name_or_path_loads():
    """model.kind hf with a checkpoint id validates (nothing is downloaded at load time)."""
    # Execute
    cfg = load_config(TINY, ["model.kind=hf", "model.name_or_path=llava-hf/llava-1.5-7b-hf"])

    # Assert
    assert cfg.model.name_or_path == "llava-hf/llava-1.5-7b-hf"


def test_missing_file_and_non_mapping(tmp_path):
    """A missing file or a YAML list at the top level are ConfigErrors."""
    # Prepare
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_config_is_frozen():
    """Assigning to any section or field raises."""
    # Prepare
    cfg = load_config(TINY)

    # Execute / Assert
    with pytest.raises(ValidationError):
        cfg.federation.rounds = 99  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.model = cfg.model  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.tiers[0].batch_size = 1  # type: ignore[misc]
    assert cfg.federation.rounds == 2


@pytest.mark.parametrize("path", [TINY, QUICKSTART], ids=["tiny", "quickstart"])
def test_dump_round_trips(path, tmp_path):
    """dump_config's YAML loads back (from a file) to an equal config."""
    # Prepare
    cfg = load_config(path, ["data.path=/some/data", "model.tiny.seed=3"])
    out = tmp_path / "resolved.yaml"

    # Execute
    out.write_text(dump_config(cfg))
    again = load_config(out)

    # Assert
    assert again == cfg
    assert again.data.path == Path("/some/data")
    assert dump_config(again) == dump_config(cfg)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            "adapter.lora_target_modules=[q_proj, embed_tokens]",
            "names ['embed_tokens']: fedavg-lora trains LoRA",
        ),
        ("adapter.lora_target_modules=[lm_head]", "names ['lm_head']"),
        ("adapter.lora_target_modules=[q_proj, q_proj]", "lists a module twice"),
        ("adapter.lora_target_modules=[]", "at least 1 item"),
    ],
)
def test_fedavg_lora_bad_target_modules_name_the_key(override, needle):
    """fedavg-lora's LoRA goes on the decoder's linear layers only; errors name
    adapter.lora_target_modules.
    """
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["federation.strategy=fedavg-lora", override])
    assert "adapter.lora_target_modules" in str(info.value) and needle in str(info.value)


def test_fedavg_lora_defaults_and_no_llm_trainer():
    """fedavg-lora validates with LLaVA's q_proj/v_proj LoRA; it starts no LLM trainer, so the
    trainer's CPUs are not asked of the cluster."""
    cfg = load_config(TINY, ["federation.strategy=fedavg-lora"])
    assert cfg.adapter.lora_target_modules == ("q_proj", "v_proj") and cfg.clients_hold_llm()
    assert not load_config(TINY).clients_hold_llm()
    check_resources(
        cfg, {"CPU": 0.5}
    )  # one actor per tier at 0.25 CPUs, no trainer_num_cpus = 0.5 on top
    with pytest.raises(ConfigError, match="trainer_num_cpus"):
        check_resources(load_config(TINY), {"CPU": 0.5})


def test_check_resources_accepts_tiny_on_two_cpus():
    """tiny.yaml fits a 2-CPU machine without GPUs."""
    # Execute / Assert: no exception
    check_resources(load_config(TINY), {"CPU": 2.0, "GPU": 0.0})


def test_check_resources_gpu_tier_on_cpu_cluster():
    """A tier asking for a GPU the cluster lacks names tiers[i].num_gpus."""
    # Prepare
    cfg = load_config(TINY, ["tiers.1.num_gpus=1"])

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.num_gpus = 1 \(edge-large\)"):
        check_resources(cfg, {"CPU": 2.0, "GPU": 0.0})


def test_check_resources_missing_custom_resource():
    """A custom resource the cluster does not offer names tiers[i].resources.<name>."""
    # Prepare
    cfg = load_config(TINY, ["tiers.0.resources={edge_small: 1}"])

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.resources\.edge_small = 1 \(edge-small\)"):
        check_resources(cfg, {"CPU": 2.0, "GPU": 0.0})
    check_resources(cfg, {"CPU": 2.0, "edge_small": 4.0})  # offered: fine


def test_check_resources_too_many_cpus():
    """Client actors needing more CPUs than the cluster has name the tiers' num_cpus key."""
    # Prepare
    cfg = load_config(TINY, ["tiers.0.num_cpus=4"])

    # Execute / Assert
    with pytest.raises(ConfigError) as info:
        check_resources(cfg, {"CPU": 2.0, "GPU": 0.0})
    msg = str(info.value)
    assert "tiers[*].num_cpus" in msg  # a sum over all actors, so no single tier index
    assert "4.75 CPUs" in msg  # trainer 0.5 + 4 + 0.25


def test_min_holdout_default_and_quickstart():
    """data.min_holdout is off by default (0) and the quickstart asks for 30 held-out questions per
    client.
    """
    assert load_config(TINY).data.min_holdout == 0
    assert load_config(QUICKSTART).data.min_holdout == 30
    with pytest.raises(ConfigError, match="data.min_holdout"):
        load_config(TINY, ["data.min_holdout=-1"])


DPA = ("federation.strategy=feddpa-f", "federation.personalize_steps=2")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["federation.strategy=local", "federation.personalize_steps=2"],
            r"strategy local has no global model",
        ),
        (
            ["federation.strategy=fedavg-lora", "adapter.factors=frozen_a"],
            r"leave adapter.factors at joint",
        ),
        (["train.fisher=diagonal"], r"train\.fisher"),
        (["train.fisher_examples=0"], r"train\.fisher_examples"),
        (["federation.strategy=feddpa-f"], r"federation\.personalize_steps=20"),
        (
            [
                *DPA,
                "federation.strategy_options.top_k=9",
                "federation.strategy_options.bank_size=8",
            ],
            r"lower top_k or raise bank_size",
        ),
        (
            [*DPA, "federation.strategy_options.train_weight=2"],
            r"strategy_options\.train_weight: .*less than or equal to 1",
        ),
        (
            ["federation.strategy=fedavg", "federation.strategy_options.mu=0.1"],
            r"strategy_options\.mu: unknown option \(valid for fedavg: none\)",
        ),
        (
            ["federation.strategy=fedprox", "federation.strategy_options.eps=0.1"],
            r"strategy_options\.eps: unknown option \(valid for fedprox: mu\)",
        ),
        (
            ["federation.strategy=fedavgm", "federation.strategy_options.momentum=1"],
            r"strategy_options\.momentum",
        ),
        (
            ["federation.strategy=fedavgm", "trust.aggregator=median"],
            r"trust.aggregator 'median'.*not 'fedavgm'",
        ),
        (
            [
                "federation.strategy=fedavgm",
                "adapter.factors=product",
                "train.optimizer_state=reset",
            ],
            r"factors=product .* use fedavg, fedprox or feddpa-f",
        ),
        (
            ["federation.strategy=fedavg-loraa"],
            r"federation.strategy: Input should be 'local', 'centralized'",
        ),
        ([*DPA, "trust.aggregator=median"], r"trust.aggregator 'median'.*not 'feddpa-f'"),
        ([*DPA, "trust.dp.clip_norm=1"], r"trust.dp needs federation.strategy fedavg"),
    ],
)
def test_learning_options_refuse_combinations_that_mean_nothing(overrides, needle):
    """personalisation without a global model, FFA-LoRA on fedavg-lora's LLM LoRA and bad Fisher
    settings are config errors naming the key and the fix."""
    with pytest.raises(ConfigError, match=needle):
        load_config(TINY, overrides)


def test_feddpa_f_takes_the_fedavg_options():
    """feddpa-f's federated phase is FedAvg: secure aggregation and product merging apply; the
    weighting options have the documented defaults."""
    fed = load_config(TINY, [*DPA, "trust.secure_aggregation=true"]).federation
    assert fed.strategy_options == {"train_weight": 0.5, "top_k": 5, "bank_size": 256}
    load_config(TINY, [*DPA, "adapter.factors=product", "train.optimizer_state=reset"])


def test_strategy_options_are_filled_per_method_and_the_older_flat_keys_still_load(tmp_path):
    """federation.strategy_options holds the method's options with their defaults; a config.yaml
    written before the move (flat fedprox_mu / fisher_eps / feddpa_* keys, every one of them
    dumped) loads with the keys of its own method moved, the others dropped, and dumps in the new
    form."""
    assert load_config(TINY).federation.strategy_options == {"eps": 1e-8, "max_share": 0.5}
    assert load_config(TINY, ["federation.strategy=fedavg"]).federation.strategy_options == {}
    assert load_config(TINY, ["federation.strategy=fedavgm"]).federation.strategy_options == {
        "momentum": 0.9
    }
    old = yaml.safe_load(dump_config(load_config(TINY)))
    old["federation"].pop("strategy_options")
    old["federation"].update(strategy="fedprox", fedprox_mu=0.3, fisher_eps=1e-6, feddpa_top_k=7)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_config(path)
    assert cfg.federation.strategy_options == {"mu": 0.3}
    assert cfg.method().build_strategy().proximal_mu == 0.3
    again = yaml.safe_load(dump_config(cfg))["federation"]
    assert again["strategy_options"] == {"mu": 0.3} and "fedprox_mu" not in again
    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_learning_defaults():
    """The defaults: choice objective, kept AdamW moments, end-point Fisher normalised, joint
    factors, no personalisation."""
    cfg = load_config(TINY)
    assert (
        cfg.train.objective,
        cfg.train.optimizer_state,
        cfg.train.fisher,
        cfg.train.fisher_normalize,
    ) == ("choice", "keep", "endpoint", True)
    assert cfg.adapter.factors == "joint" and cfg.federation.personalize_steps == 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["federation.strategy=local"], r"local aggregates nothing: set federation.server_lr=1"),
        (["federation.strategy=centralized"], r"centralized aggregates nothing"),
        (
            [
                "federation.strategy=fedavg",
                "adapter.factors=product",
                "train.optimizer_state=reset",
            ],
            r"re-factorises the global adapters every round",
        ),
        ([], None),
        (["adapter.factors=frozen_a"], None),
    ],
)
def test_server_lr_needs_an_aggregating_strategy_and_stable_factors(overrides, match):
    """federation.server_lr != 1 steps from the old global state: nothing to step for local and
    centralized, and product merging's re-factorised factors are in another basis."""
    args = [str(TINY), ["federation.server_lr=3", *overrides]]
    if match is None:
        assert load_config(*args).federation.server_lr == 3.0
    else:
        with pytest.raises(ConfigError, match=match):
            load_config(*args)
    assert (
        load_config(str(TINY), overrides).federation.server_lr == 1.0
    )  # the default is the aggregate


def test_server_lr_must_be_positive():
    with pytest.raises(ConfigError, match=r"federation\.server_lr"):
        load_config(str(TINY), ["federation.server_lr=0"])
