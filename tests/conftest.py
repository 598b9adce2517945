"""Shared fixtures: offline env, and ONE Ray cluster for the whole test run (Ray starts once)."""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never touch the user's cache: the synthetic data and features go to a per-run folder.
os.environ.setdefault("FEDNANO_RAY_CACHE", tempfile.mkdtemp(prefix="fednano-test-cache-"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small-model tests (use via ``pytest.mark.usefixtures``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """A simulated multi-node cluster (ray.cluster_utils.Cluster): a head plus one node per client tier.

    Nodes advertise a custom resource named after their tier, as cluster.yaml's node types do.
    Logical CPUs exceed the 2 physical cores on purpose: tiny-model actors are mostly idle.
    """
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "temp_dir": tmp, "include_dashboard": False},
    )
    nodes = {
        "edge-small": cluster.add_node(num_cpus=2, resources={"edge-small": 4}),
        "edge-large": cluster.add_node(num_cpus=2, resources={"edge-large": 4}),
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()
