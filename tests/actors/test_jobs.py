"""`ray job submit`: a training run submitted as a Ray job to the running cluster
(docs/SCALING.md).
"""

import os
import shlex
import sys
import time
from pathlib import Path

from fednano_ray.federation import rundir

REPO = Path(__file__).resolve().parents[2]


def test_a_training_run_submitted_as_a_ray_job_succeeds(ray_cluster, tmp_path):
    """The job's driver joins the cluster with `--address auto` (Ray sets RAY_ADDRESS for it) and
    writes the run.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster, _ = ray_cluster
    run = tmp_path / "run"
    # Run from the repo root; the package is installed (editable) in this venv: no working_dir.
    # (With one, this one-machine Cluster's nodes share one runtime_resources folder and unpack over
    # each other.)
    entrypoint = " ".join(
        shlex.quote(a)
        for a in [
            sys.executable,
            "-m",
            "fednano_ray",
            "train",
            "examples/tiny.yaml",
            "--address",
            "auto",
            "--run-dir",
            str(run),
            "--set",
            "federation.rounds=1",
        ]
    )
    env = {
        k: os.environ[k]
        for k in ("FEDNANO_RAY_CACHE", "RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
    }
    client = JobSubmissionClient(f"http://{cluster.webui_url}")
    job_id = client.submit_job(
        entrypoint=f"cd {shlex.quote(str(REPO))} && {entrypoint}", runtime_env={"env_vars": env}
    )

    deadline = time.monotonic() + 300
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-3000:]}"
    assert (
        "Started a local Ray instance" not in logs
    )  # it joined the cluster, it did not start its own
    assert "global test accuracy" in logs  # the summary table went to the job's logs
    results = rundir.read_results(run)
    assert results["summary"]["rounds"] == 1 and results["rounds"][0]["aggregated"]
    # On THIS cluster: not on another Ray instance of this machine that "auto" could also find.
    assert results["coordinator_node"] == cluster.head_node.node_id
