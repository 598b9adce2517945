"""The Ray instance `train` and `serve` start keeps Ray's token authentication on: a process
without the cluster's token cannot join it, and the token file is readable by its owner only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(240)

HOLD = textwrap.dedent(
    """
    import sys
    import ray
    from fednano_ray.app import init_ray, protect_ray_token, ray_auth_mode
    init_ray(num_cpus=1)
    token = protect_ray_token()
    print(ray_auth_mode(), oct(token.stat().st_mode & 0o777), ray.get_runtime_context().gcs_address,
          flush=True)
    sys.stdin.readline()  # hold the cluster until the test is done
    ray.shutdown()
    """
)

JOIN = textwrap.dedent(
    """
    import sys
    import ray
    try:
        ray.init(address=sys.argv[1])
        print("joined")
    except Exception as e:
        print("refused", type(e).__name__)
    """
)


def test_the_local_cluster_needs_its_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # a token of its own, not the machine's
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = holder.stdout.readline().split()
        assert len(line) == 3, holder.stderr.read() if holder.poll() is not None else line
        mode, perms, gcs = line
        assert mode == "token" and perms == "0o600"
        token = (tmp_path / ".ray" / "auth_token").read_text().strip()
        assert stat.S_IMODE((tmp_path / ".ray" / "auth_token").stat().st_mode) == 0o600

        def join(**extra: str) -> str:
            out = subprocess.run(
                [sys.executable, "-c", JOIN, gcs],
                check=False,
                env={**env, "HOME": str(tmp_path / "other"), **extra},
                capture_output=True,
                text=True,
                timeout=120,
            )
            return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]

        assert join(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32).startswith("refused")
        assert join(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) == "joined"
    finally:
        if holder.poll() is None:
            holder.communicate("\n", timeout=60)
