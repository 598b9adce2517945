"""Shared fixtures: offline env, and ONE Ray cluster for the whole test run (Ray starts once)."""

import os
import socket
import tempfile
from pathlib import Path

import pytest

# Tests name the project's files from its root (examples/tiny.yaml, fednano_ray/assets): run them
# from there whatever directory pytest was started in (`pytest /path/to/repo/tests` works too).
ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A simulated multi-node cluster (ray.cluster_utils.Cluster): a head plus one node per client
    tier.

    Nodes advertise a custom resource named after their tier, as cluster.yaml's node types do.
    Logical CPUs exceed the 2 physical cores on purpose: tiny-model actors are mostly idle.
    The head runs the dashboard, whose job agent `ray job submit` talks to
    (tests/actors/test_jobs.py).
    """
    import ray
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    # Cluster() records the head's address in Ray's default temp dir (/tmp/ray) whatever temp_dir
    # says, and fails on a fresh machine where no Ray has run yet and that folder does not exist.
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "temp_dir": tmp,
            # Free ports, not 8265/52365: another test run on this machine may hold those.
            "include_dashboard": True,
            "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(),
        },
    )
    # A job's driver gets RAY_ADDRESS from its supervisor, which reads ray_current_cluster in the
    # head's temp dir; Cluster writes it only under /tmp/ray, and without it Ray picks ANY
    # gcs_server running on this machine (other test runs'). Name ours there, as `ray start --head`
    # does.
    from ray._private.utils import write_ray_address

    write_ray_address(cluster.address, tmp)
    nodes = {
        "edge-small": cluster.add_node(num_cpus=2, resources={"edge-small": 4}),
        "edge-large": cluster.add_node(num_cpus=2, resources={"edge-large": 4}),
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, tmp_path_factory):
    """ONE plain run of examples/tiny.yaml (2 rounds, fp32, seed 0), shared by the tests that read a
    finished run or need an uninterrupted reference: ``(run_dir, results)``. Read it, never write to
    it."""
    from fednano_ray.app import train
    from fednano_ray.config import load_config

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    return run, train(load_config("examples/tiny.yaml"), run, progress=False)
