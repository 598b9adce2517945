"""cluster.yaml is a valid Ray cluster config and has a node type for every tier the examples
use.
"""

from pathlib import Path

import yaml

from fednano_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_validation():
    """Ray's own validator (the one `ray up` runs) accepts cluster.yaml after filling its
    defaults.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))


def test_every_example_tier_has_a_node_type():
    """Each tier named in examples/ is a custom resource advertised by some node type."""
    advertised = {
        r for node in _cluster()["available_node_types"].values() for r in node.get("resources", {})
    }
    import yaml

    # Grid specs (examples/paper/grid.yaml) are not configs: their cells use the base config beside
    # them.
    configs = [
        p
        for p in sorted(ROOT.glob("examples/**/*.yaml"))
        if "groups" not in yaml.safe_load(p.read_text())
    ]
    assert len(configs) >= 3
    for path in configs:
        for tier in load_config(path).tiers:
            assert tier.name in advertised, (
                f"{path.name}: tier {tier.name!r} has no node type in cluster.yaml"
            )


def test_schema_validation_is_not_a_no_op():
    """A misspelt key is rejected by the same validator, so the first test can fail."""
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _cluster()
    bad["available_node_types"]["edge-small"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
