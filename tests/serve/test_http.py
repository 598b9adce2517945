"""The Serve app over real HTTP on 127.0.0.1: auth, validation, personalisation, reconfigure,
batching.

One deployment per module (Ingress + the real LLMServer with the HF engine on the tiny model) on
the session Ray cluster; the run directory is written directly (config + checkpoints whose
adapters are random, so clients really differ) instead of training, to keep the module fast.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from fednano_ray.config import load_config
from fednano_ray.federation import rundir
from fednano_ray.serve import auth

ROOT = Path(__file__).resolve().parents[2]
TINY = (
    ROOT / "examples" / "tiny.yaml"
)  # 4 clients: 0, 1 in edge-small (rank 2), 2, 3 in edge-large (rank 4)
APP = "fednano-test"

pytestmark = pytest.mark.timeout(180)


# -- a run directory written directly --------------------------------------------------------------


def write_checkpoint(
    run_dir: Path, rnd: int, *, personal: list[int], seed: int, scale: float = 3.0
) -> Path:
    """checkpoints/round_XXXX with random global adapters (max rank) and per-client personal
    ones.
    """
    from fednano_ray.models.adapter import adapter_state
    from fednano_ray.models.build import build_mllm

    cfg = rundir.read_config(run_dir)
    mllm = build_mllm(cfg.model)
    tiers = cfg.client_tiers()
    r_max = max(cfg.tier_rank(t) for t in tiers)
    gen = torch.Generator().manual_seed(seed)

    def randomised(r: int) -> dict[str, torch.Tensor]:
        edge, _ = mllm.split(
            cfg.adapter, r=r, seed=int(torch.randint(0, 2**31, (1,), generator=gen))
        )
        state = adapter_state(edge.adapters)
        for k in state:
            if k.endswith("lora_B"):
                state[k] = scale * torch.randn(state[k].shape, generator=gen)
        return state

    global_state = randomised(r_max)
    own = {c: randomised(cfg.tier_rank(tiers[c])) for c in personal}
    return rundir.write_checkpoint(
        run_dir, rundir.Checkpoint(round=rnd, global_state=global_state, client_states=own)
    )


def png_b64(seed: int = 0, size: int = 32) -> str:
    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve-run")
    rundir.write_config(d, load_config(TINY))
    # Client 3 has no personal adapters: it is served the global ones.
    write_checkpoint(d, 1, personal=[0, 1, 2], seed=1)
    return d


@pytest.fixture(scope="module")
def tokens(run_dir) -> dict[int, str]:
    return auth.issue_all(run_dir, 4)


# Small CPU shares: the session cluster also hosts the federation tests' actors. A longer batch wait
# than the default, so concurrent requests visibly share a batch on a 2-core machine. A short body
# deadline, so test_http_hardening.py sees a slow client cut off soon (its bodies arrive at once).
DEPLOY = {
    "engine": "hf",
    "name": APP,
    "ingress_num_cpus": 0.25,
    "llm_num_cpus": 0.25,
    "batch_wait_timeout_s": 0.25,
    "body_timeout_s": 5.0,
}
#: Serve's own end-to-end deadline (http_options.request_timeout_s) of the test deployments.
REQUEST_TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def server(ray_cluster, run_dir, tokens):
    """The app (declarative deploy, as `serve deploy`) on a free port of 127.0.0.1; yields (URL,
    deploy s).
    """
    from ray import serve

    from fednano_ray.serve.app import deploy

    port = free_port()
    http = {"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S}
    serve.start(proxy_location="HeadOnly", http_options=http)
    deploy_s = deploy(run_dir, **DEPLOY)
    print(
        "\n[serve] deploy (build + LLM export + Ingress + LLMServer hf, tiny model): "
        f"{deploy_s:.1f} s"
    )
    yield f"http://127.0.0.1:{port}", deploy_s
    serve.shutdown()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


def answer(url: str, client: int | str, token: str | None, **body) -> httpx.Response:
    body = {"image": png_b64(), "question": "What colour is the square?", **body}
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{url}/v1/clients/{client}/answer", json=body, headers=headers, timeout=60)


def chat_body(model: str = "0", text: str = "What colour is the square?", **extra) -> dict:
    content = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
    ]
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def ingress_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Ingress", app_name=APP).stats.remote().result()


def llm_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("LLMServer", app_name=APP).stats.remote().result()


# -- tokens (pure) ---------------------------------------------------------------------------------


def test_tokens_store_only_hashes_with_mode_0600(tmp_path):
    """tokens.json is 0600 and holds no token; reissuing needs rotate, which revokes the old
    token.
    """
    rundir.write_config(tmp_path, load_config(TINY))
    tok = auth.issue_token(tmp_path, 2)
    text = auth.tokens_path(tmp_path).read_text()
    assert (
        tok.startswith(auth.TOKEN_PREFIX)
        and tok not in text
        and tok.removeprefix(auth.TOKEN_PREFIX) not in text
    )
    assert stat.S_IMODE(os.stat(auth.tokens_path(tmp_path)).st_mode) == 0o600
    with pytest.raises(auth.TokenError, match="--rotate"):
        auth.issue_token(tmp_path, 2)
    with pytest.raises(auth.TokenError, match="not a client"):
        auth.issue_token(tmp_path, 4)
    new = auth.issue_token(tmp_path, 2, rotate=True)
    assert auth.verify(tmp_path, 2, new) and not auth.verify(tmp_path, 2, tok)
    assert not auth.verify(tmp_path, 1, new)  # bound to its client
    assert not auth.verify(tmp_path, 3, new)  # a client without a token
    assert not auth.verify(tmp_path, None, new)  # not a client at all


def test_match_choice_and_serve_config(run_dir):
    """Choices match ignoring case, spaces and a final '.'; serve/fednano.yaml is a valid Serve
    config.
    """
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from fednano_ray.serve.app import ServeArgs, app_builder
    from fednano_ray.serve.ingress import match_choice

    assert match_choice(" Red. ", ["blue", "red"]) == 1
    assert match_choice("reddish", ["blue", "red"]) is None and match_choice("red", None) is None
    config = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "serve" / "fednano.yaml").read_text())
    )
    (app,) = config.applications
    assert app.import_path == "fednano_ray.serve.app:app_builder"
    ServeArgs.model_validate(app.args)
    assert {d.name for d in app.deployments} == {"Ingress", "LLMServer"}
    with pytest.raises(Exception, match="not a training run"):
        app_builder({"run_dir": str(ROOT / "no-such-run")})
    assert isinstance(app_builder(ServeArgs(run_dir=str(run_dir), engine="hf")), Application)
    assert (run_dir / rundir.SERVE_LLM / "config.json").is_file()  # the exported server LLM


# -- HTTP ------------------------------------------------------------------------------------------


def test_healthz_and_docs_need_no_auth(url):
    """GET /healthz and the OpenAPI docs answer without a token."""
    r = httpx.get(f"{url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    spec = httpx.get(f"{url}/openapi.json").json()
    assert {
        "/healthz",
        "/v1/clients/{client_id}/answer",
        "/v1/chat/completions",
        "/v1/models",
    } <= set(spec["paths"])
    assert httpx.get(f"{url}/docs").status_code == 200


def test_answer_with_own_token(url, tokens):
    """A client's own token gets its personalised answer; a choice equal to the answer is
    matched.
    """
    r = answer(url, 0, tokens[0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["client_id"] == 0 and body["model"] == "client_00000@round_0001"
    assert isinstance(body["answer"], str) and body["answer"] and body["choice"] is None
    r2 = answer(url, 0, tokens[0], choices=["zzz-not-it", body["answer"]])
    # Greedy decoding: the same answer again, now matched to choice 1.
    assert r2.status_code == 200 and r2.json()["choice"] == 1


def test_auth_failures_reveal_nothing(url, tokens):
    """No token: 401. B's token for A, and any token for an unknown client: the same 403 body."""
    r = answer(url, 0, None)
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    assert "Bearer" in r.json()["error"]["message"]
    wrong = answer(url, 0, tokens[1])
    assert wrong.status_code == 403
    for client in ("99", "abc", "-1", "4"):
        unknown = answer(url, client, tokens[1])
        assert (unknown.status_code, unknown.json()) == (403, wrong.json())
    assert answer(url, 0, "fnr_" + "x" * 43).json() == wrong.json()
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json=chat_body("1"),
        headers={"Authorization": f"Bearer {tokens[0]}"},
    )
    assert (r.status_code, r.json()) == (403, wrong.json())


def test_chat_completions_openai_shape(url, tokens):
    """POST /v1/chat/completions with a data-URI image answers in OpenAI's shape."""
    body = chat_body("2", max_tokens=4, temperature=0, messages=None)
    body["messages"] = [{"role": "system", "content": "ignored"}, *chat_body("2")["messages"]]
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {tokens[2]}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (
        out["object"] == "chat.completion"
        and out["id"].startswith("chatcmpl-")
        and isinstance(out["created"], int)
    )
    assert out["model"] == "client_00002@round_0001"
    (choice,) = out["choices"]
    assert (
        choice["index"] == 0
        and choice["message"]["role"] == "assistant"
        and isinstance(choice["message"]["content"], str)
    )
    assert choice["finish_reason"] in ("stop", "length")
    u = out["usage"]
    assert (
        1 <= u["completion_tokens"] <= 4
        and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    )
    assert u["prompt_tokens"] > 16  # 16 visual tokens of the tiny model plus the text


def _big_png_b64() -> str:
    buf = io.BytesIO()
    Image.frombytes("RGB", (1500, 1500), os.urandom(1500 * 1500 * 3)).save(
        buf, "PNG", compress_level=0
    )
    return base64.b64encode(buf.getvalue()).decode()  # ~6.4 MB encoded > the 4 MiB limit


def _tall_png_b64() -> str:
    buf = io.BytesIO()
    Image.new("L", (8, 5000)).save(buf, "PNG")  # tiny file, too many pixels a side
    return base64.b64encode(buf.getvalue()).decode()


BAD_ANSWERS = {
    "not base64": ({"image": "this is not base64!"}, 400),
    "not an image": ({"image": base64.b64encode(b"just some bytes, not a picture").decode()}, 400),
    "wrong media type": ({"image": "data:text/plain;base64,aGVsbG8="}, 400),
    "web url": ({"image": "https://example.com/cat.png"}, 400),
    "oversized image": ({"image": "BIG"}, 413),
    "too many pixels": ({"image": "TALL"}, 413),
    "question too long": ({"question": "why? " * 101}, 422),
    "blank question": ({"question": "   "}, 422),
    "max_new_tokens 0": ({"max_new_tokens": 0}, 422),
    "max_new_tokens 10000": ({"max_new_tokens": 10_000}, 422),
    "one choice": ({"choices": ["red"]}, 422),
    "unknown field": ({"temperature": 0.5}, 422),
    "missing image": ({"image": None}, 422),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_bad_answer_requests_are_4xx(url, tokens, case):
    """Bad input to /answer is a 4xx JSON error with a message, never a 500."""
    patch, status = BAD_ANSWERS[case]
    body = {"image": png_b64(), "question": "What colour?", **patch}
    body["image"] = {"BIG": _big_png_b64, "TALL": _tall_png_b64}.get(
        body["image"], lambda: body["image"]
    )()
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(
        f"{url}/v1/clients/0/answer",
        json=body,
        headers={"Authorization": f"Bearer {tokens[0]}"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


BAD_CHATS = {
    "temperature 0.7": chat_body(temperature=0.7),
    "empty messages": chat_body(messages=[]),
    "no image": chat_body(messages=[{"role": "user", "content": "What colour?"}]),
    "max_tokens 10000": chat_body(max_tokens=10_000),
    "stream_options without stream": chat_body(stream_options={"include_usage": True}),
    "assistant history": chat_body(
        messages=[*chat_body()["messages"], {"role": "assistant", "content": "red"}]
    ),
    "bad part type": chat_body(
        messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]
    ),
    "not base64 image": chat_body(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "q"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                ],
            }
        ]
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_bad_chat_requests_are_4xx(url, tokens, case):
    """Bad input to /v1/chat/completions is a 4xx JSON error with a message, never a 500."""
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json=BAD_CHATS[case],
        headers={"Authorization": f"Bearer {tokens[0]}"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]


def test_malformed_bodies_are_4xx(url, tokens):
    """Not JSON, wrong JSON types and unknown routes are 4xx with the same error shape."""
    h = {"Authorization": f"Bearer {tokens[0]}"}
    for content in (
        b"{not json",
        b"[]",
        b'"a string"',
        b"null",
        b'{"image": 5, "question": ["x"]}',
    ):
        r = httpx.post(
            f"{url}/v1/clients/0/answer",
            content=content,
            headers={**h, "Content-Type": "application/json"},
        )
        assert r.status_code == 422 and r.json()["error"]["message"], (content, r.text)
    # Over the body limit: refused before JSON parsing (else it would be 422).
    big = b"x" * (6 * 1024 * 1024)
    r = httpx.post(
        f"{url}/v1/clients/0/answer",
        content=big,
        headers={**h, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    # Chunked, without Content-Length: counted as it arrives.
    chunked = (big[i : i + 65536] for i in range(0, len(big), 65536))
    r = httpx.post(
        f"{url}/v1/clients/0/answer",
        content=chunked,
        headers={**h, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413, r.text
    assert httpx.get(f"{url}/v1/nope").status_code == 404
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405


def test_clients_get_their_own_adapters(url, tokens, run_dir):
    """Two clients with different personal adapters: different model ids, embeddings and answers."""
    from fednano_ray.serve.ingress import Ingress, prompt_embeds
    from fednano_ray.serve.schemas import decode_image

    outs = {c: answer(url, c, tokens[c], max_new_tokens=12).json() for c in (0, 1)}
    assert outs[0]["model"] != outs[1]["model"]
    assert outs[0]["answer"] != outs[1]["answer"]
    loads = ingress_stats()["loads"]
    assert any(x.startswith("0#") for x in loads) and any(x.startswith("1#") for x in loads)
    # The same code path as the replica, as a plain class: the embeddings differ, the frozen parts
    # are shared.
    ing = Ingress(run_dir, llm=None)
    m0, m1 = ing.load_client_model(0), ing.load_client_model(1)
    assert m0.edge.encoder is m1.edge.encoder and m0.edge.embed_tokens is m1.edge.embed_tokens
    img = decode_image(png_b64())
    z0, z1 = (prompt_embeds(ing.mllm, m.edge, img, "What colour is the square?") for m in (m0, m1))
    assert z0.shape == z1.shape and not torch.allclose(z0, z1)


def test_served_edge_computes_what_the_client_trained(run_dir):
    """The serving path builds each client's NanoEdge as the client actors do (mllm.split at the
    tier's rank, the run's one scaling adapter.lora_alpha / adapter.r): the same adapters give the
    same z' on both."""
    from fednano_ray.models.adapter import adapter_state, load_adapter_state
    from fednano_ray.models.build import build_mllm
    from fednano_ray.serve.ingress import Ingress, prompt_embeds
    from fednano_ray.serve.schemas import decode_image

    cfg = rundir.read_config(run_dir)
    ing = Ingress(run_dir, llm=None)
    img = decode_image(png_b64())
    for c in (0, 3):  # rank 2 with personal adapters; rank 4 with the global ones
        served = ing.load_client_model(c).edge
        rank = cfg.tier_rank(cfg.client_tiers()[c])
        trained, _ = build_mllm(cfg.model).split(cfg.adapter, r=rank)
        load_adapter_state(trained.adapters, adapter_state(served.adapters))
        for m, ad in served.adapters.items():
            assert (
                ad.r == rank and ad.scaling == trained.adapters[m].scaling == cfg.adapter.scaling
            ), (c, m)
        q = "What colour is the square?"
        torch.testing.assert_close(
            prompt_embeds(ing.mllm, served, img, q), prompt_embeds(ing.mllm, trained, img, q)
        )


def test_token_cli_and_rotation_while_serving(url, run_dir, tokens):
    """`fednano-ray token --rotate` prints a new token once; the running app honours it at once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fednano_ray", "token", str(run_dir), "3"]
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert refused.returncode == 2 and "--rotate" in refused.stderr
    done = subprocess.run(
        [*cmd, "--rotate"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    new = done.stdout.strip()
    assert new.startswith("fnr_") and new not in auth.tokens_path(run_dir).read_text()
    assert answer(url, 3, tokens[3]).status_code == 403
    ok = answer(url, 3, new)
    assert ok.status_code == 200 and ok.json()["model"] == "client_00003@round_0001"
    tokens[3] = new


def test_reconfigure_switches_checkpoint_without_redeploy(url, tokens, run_dir):
    """A new user_config reaches the running replicas: new adapters, same processes, LLM not
    reloaded.
    """
    from fednano_ray.serve.app import deploy

    before = answer(url, 2, tokens[2], max_new_tokens=12).json()
    stats, llm = ingress_stats(), llm_stats()
    write_checkpoint(run_dir, 2, personal=[0, 1, 2, 3], seed=2)
    deploy(run_dir, user_config={"reload": 1}, **DEPLOY)
    after = answer(url, 2, tokens[2], max_new_tokens=12).json()
    assert after["model"] == "client_00002@round_0002" and after["answer"] != before["answer"]
    new_stats = ingress_stats()
    assert new_stats["pid"] == stats["pid"] and new_stats["generation"] > stats["generation"]
    assert new_stats["user_config"] == {"checkpoint": None, "reload": 1}
    # The LLM server's counters survived: its replica was not restarted either.
    assert llm_stats()["requests"] > llm["requests"]
    # A checkpoint that does not exist is refused before it reaches (and would take down) the
    # replica.
    from fednano_ray.config import ConfigError

    with pytest.raises(
        ConfigError, match="round_0099 .* complete ones: \\['round_0001', 'round_0002'\\]"
    ):
        deploy(run_dir, user_config={"checkpoint": "round_0099"}, **DEPLOY)
    assert answer(url, 2, tokens[2]).status_code == 200
    # Pin the old checkpoint again: the same answer as before comes back.
    deploy(run_dir, user_config={"checkpoint": "round_0001"}, **DEPLOY)
    assert answer(url, 2, tokens[2], max_new_tokens=12).json() == before
    assert ingress_stats()["pid"] == stats["pid"]


def test_concurrent_clients_are_batched(url, tokens):
    """16 concurrent requests from 4 clients all succeed and the LLM server decodes them in
    batches.
    """

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            reqs = [
                client.post(
                    f"{url}/v1/clients/{c}/answer",
                    json={
                        "image": png_b64(i),
                        "question": f"How many objects? ({i})",
                        "max_new_tokens": 6,
                    },
                    headers={"Authorization": f"Bearer {tokens[c]}"},
                )
                for i in range(4)
                for c in range(4)
            ]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 16, [
        r.text for r in responses if r.status_code != 200
    ]
    assert {r.json()["client_id"] for r in responses} == {0, 1, 2, 3}
    stats = llm_stats()
    assert stats["max_batch_size_seen"] > 1, stats
