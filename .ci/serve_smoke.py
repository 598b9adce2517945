#!/usr/bin/env python3
"""Serving smoke check of the environment this interpreter runs in (CI: the base install).

Trains ``examples/tiny.yaml`` (random-weight tiny model) into a temporary run directory, issues
client 0's token, starts ``fednano-ray serve RUN --engine hf`` on a free 127.0.0.1 port, and checks:

* ``GET /healthz`` answers 200 (with fastapi >= 0.137, Ray Serve 2.60's class ingress answers
  every route 422 ``query.self: field required``);
* ``POST /v1/clients/0/answer`` without a token answers 401, with the token 200 and an ``answer``.

Everything it starts (the server and its private Ray instance, whose temp dir is inside the run's
temporary folder) is stopped on exit. Exit status 0 on success, 1 with a message otherwise.

Usage: python .ci/serve_smoke.py [--run-dir DIR] [--ready-timeout 180] [--keep]
(``--run-dir`` of an already-trained run skips training; handy when iterating.)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fednano_ray"]


class SmokeError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[serve-smoke] {msg}", file=sys.stderr, flush=True)


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line[:300] for line in lines[-n:]) or "    (empty)"


def run(cmd: list[str], env: dict[str, str], logfile: Path, timeout: float) -> str:
    """Run a CLI step; its stdout+stderr go to ``logfile``; return stdout alone."""
    t0 = time.perf_counter()
    with open(logfile, "w") as err:
        try:
            p = subprocess.run(
                cmd,
                check=False,
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as e:
            raise SmokeError(
                f"`{' '.join(cmd[2:])}` ran past {timeout:.0f} s; log:\n{tail(logfile)}"
            ) from e
    with open(logfile, "a") as f:
        f.write(p.stdout)
    if p.returncode != 0:
        raise SmokeError(f"`{' '.join(cmd[2:])}` exited {p.returncode}; log:\n{tail(logfile)}")
    log(f"{' '.join(cmd[2:4])}: ok ({time.perf_counter() - t0:.0f} s)")
    return p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str, url: str, body: dict | None = None, token: str | None = None
) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def png_b64() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(img).ellipse((6, 6, 26, 26), fill="red")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server (it shuts Serve and its private Ray down), then SIGKILL what is left of
    its session (the server was started with its own session, so nothing else is in it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    sid = proc.pid
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    left.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        log(f"killed {len(left)} leftover process(es) of the server's session")


def smoke(work: Path, run_dir: Path | None, ready_timeout: float) -> None:
    env = dict(os.environ)
    # The private Ray instances keep their sessions here, not in /tmp/ray.
    env["RAY_TMPDIR"] = str(work)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    if run_dir is None:
        run_dir = work / "run"
        run(
            CLI + ["train", "examples/tiny.yaml", "--run-dir", str(run_dir), "--tokens", "none"],
            env,
            work / "train.log",
            timeout=900,
        )
        token = run(CLI + ["token", str(run_dir), "0"], env, work / "token.log", timeout=120)
    else:
        token = run(
            CLI + ["token", str(run_dir), "0", "--rotate"], env, work / "token.log", timeout=120
        )
    token = token.strip().splitlines()[0]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_log = work / "serve.log"
    t0 = time.perf_counter()
    with open(serve_log, "w") as out:
        proc = subprocess.Popen(
            CLI
            + ["serve", str(run_dir), "--engine", "hf", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Before the app is up the Serve proxy refuses connections, then answers 404/503.
        status, text = 0, ""
        while True:
            if proc.poll() is not None:
                raise SmokeError(
                    f"`fednano-ray serve` exited {proc.returncode} before answering; log:\n"
                    f"{tail(serve_log)}"
                )
            if time.perf_counter() - t0 > ready_timeout:
                last = f"{status} {text[:200]}" if status else "no connection"
                raise SmokeError(
                    f"GET /healthz not answered within {ready_timeout:.0f} s (last: {last}); "
                    f"server log:\n{tail(serve_log)}"
                )
            try:
                status, text = http("GET", f"{url}/healthz")
            except (OSError, urllib.error.URLError):
                status, text = 0, ""
            if status not in (0, 404, 503):
                break
            time.sleep(1)
        if status != 200:
            hint = ""
            if "query.self" in text or '"self"' in text:
                hint = (
                    "\n  Ray Serve's class ingress sees `self` as a query parameter: a fastapi "
                    "release it cannot route (fastapi >= 0.137 with ray 2.60). Compare "
                    "`pip list | grep -i fastapi` with the pin in pyproject.toml."
                )
            raise SmokeError(f"GET /healthz answered {status}, expected 200: {text[:400]}{hint}")
        log(f"GET /healthz: 200 ({time.perf_counter() - t0:.0f} s after start)")

        answer_url = f"{url}/v1/clients/0/answer"
        body = {"image": png_b64(), "question": "What colour is the shape?", "max_new_tokens": 4}
        status, text = http("POST", answer_url, body)
        if status != 401:
            raise SmokeError(
                f"POST {answer_url} without a token answered {status}, expected 401: {text[:400]}"
            )
        log("POST answer without a token: 401")
        status, text = http("POST", answer_url, body, token=token)
        if status != 200:
            raise SmokeError(
                f"POST {answer_url} with client 0's token answered {status}, expected 200: "
                f"{text[:400]}\nserver log:\n{tail(serve_log)}"
            )
        try:
            answer = json.loads(text)["answer"]
        except (ValueError, KeyError, TypeError) as e:
            raise SmokeError(f"POST {answer_url}: 200 but no `answer` field: {text[:400]}") from e
        if not isinstance(answer, str):
            raise SmokeError(f"POST {answer_url}: `answer` is not a string: {text[:400]}")
        log(f"POST answer with the token: 200, answer {answer!r}")
    finally:
        stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, help="an already-trained run to serve (skips training)")
    p.add_argument(
        "--ready-timeout", type=float, default=180.0, help="seconds to wait for /healthz"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, run)")
    args = p.parse_args()

    # SIGTERM/SIGHUP (a CI timeout) unwind like Ctrl-C, so the server is stopped.
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    t0 = time.perf_counter()
    # Short path: Ray's Unix sockets live under RAY_TMPDIR and their paths are length-limited.
    work = Path(
        tempfile.mkdtemp(prefix="fnr-smoke-", dir="/tmp" if os.path.isdir("/tmp") else None)
    )
    ok = False
    try:
        smoke(work, args.run_dir.resolve() if args.run_dir else None, args.ready_timeout)
        ok = True
    except SmokeError as e:
        log(f"FAILED: {e}")
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        if args.keep or not ok:
            log(f"logs kept in {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    log(f"{'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
