"""``fednano-ray serve`` itself, on a run that ``fednano-ray train`` wrote.

The other serving tests deploy the app from Python over hand-made checkpoints; this one runs the
command a user runs: a token from ``fednano-ray token``, then ``fednano-ray serve RUN --address
... --port ...`` as its own process on the session cluster, answering over HTTP on 127.0.0.1 from
the newest checkpoint the training run wrote, until Ctrl-C stops it and takes Serve down.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_http import free_port, png_b64

from fednano_ray.federation import rundir

pytestmark = pytest.mark.timeout(300)


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fednano_ray", *args], **kwargs)


def _wait_healthy(url: str, proc: subprocess.Popen, deadline_s: float = 240) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"fednano-ray serve exited with {proc.returncode}:\n{out}\n{err}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"fednano-ray serve did not answer {url}/healthz within {deadline_s} s")


def test_serve_command_answers_from_a_trained_run(tiny_run, ray_cluster, tmp_path):
    from ray import serve

    trained, results = tiny_run
    run = tmp_path / "run"
    shutil.copytree(trained, run)  # the shared run is read-only: tokens are written beside it
    newest = rundir.latest_checkpoint(run)
    assert newest is not None and newest.name == rundir.round_name(results["rounds"][-1]["round"])

    issued = subprocess.run(
        [sys.executable, "-m", "fednano_ray", "token", str(run), "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    token = issued.stdout.strip()
    assert token.startswith("fnr_") and "only its hash is kept" in issued.stderr

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cluster, _ = ray_cluster
    proc = _cli(
        "serve",
        str(run),
        "--address",
        cluster.address,
        "--port",
        str(port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_healthy(url, proc)
        # The command is ready when it prints its URLs (healthz answers a little before).
        api_line, docs_line = proc.stdout.readline(), proc.stdout.readline()
        assert f"{url}/v1/clients/<client_id>/answer" in api_line, api_line
        assert f"{url}/docs" in docs_line, docs_line
        body = {"image": png_b64(), "question": "What colour is the square?"}

        def ask(client: int, bearer: str) -> httpx.Response:
            return httpx.post(
                f"{url}/v1/clients/{client}/answer",
                json=body,
                headers={"Authorization": f"Bearer {bearer}"},
                timeout=120,
            )

        r = ask(1, token)
        assert r.status_code == 200, r.text
        out = r.json()
        # The newest checkpoint that training wrote answered, with client 1's adapters.
        assert out["client_id"] == 1 and out["model"] == f"client_00001@{newest.name}"
        assert isinstance(out["answer"], str) and out["answer"]
        # The token is client 1's only: client 0 is refused, and so is a made-up token.
        for client, bearer in ((0, token), (1, "fnr_" + "x" * 43)):
            denied = ask(client, bearer)
            assert denied.status_code == 403, denied.text
        # Ctrl-C: the command shuts Serve down and exits cleanly.
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert "shutting down" in stderr
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        serve.shutdown()
