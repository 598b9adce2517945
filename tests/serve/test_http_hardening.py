"""Issue 14 item 5: what a black-box hostile client found in the Serve app, over real HTTP.

* client ids are canonical (ASCII decimal, no leading zeros, no spaces) in the path and in
  ``model``;
* no slash redirect (which echoed the caller's ``Host`` into ``Location``);
* the bearer token is checked before the body is read, parsed or validated;
* a client that sends its body slowly is cut off and does not hold others up;
* the official ``openai`` client works: plain, streaming (SSE chunks + ``[DONE]``), models.list;
* a corrupt ``tokens.json`` is a 503 that names no path.

The app, run directory and tokens are ``test_http.py``'s fixtures (see ``conftest.py``), deployed
once for this module.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

if str(Path(__file__).resolve().parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_http import DEPLOY, answer, chat_body, ingress_stats

from fednano_ray.serve import auth

pytestmark = pytest.mark.timeout(240)


def _wrong(url: str, tokens: dict[int, str]) -> httpx.Response:
    """The reference refusal: client 1's token for client 0, a valid body."""
    r = answer(url, 0, tokens[1])
    assert r.status_code == 403
    return r


def _chat(url: str, token: str | None, body: dict | bytes, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.post(
            f"{url}/v1/chat/completions", content=body, headers=headers, timeout=60, **kw
        )
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


# -- 1. canonical client ids -----------------------------------------------------------------------

#: Forms int() (and the old id pattern) accepted as client 0; path segment as sent on the wire.
NON_CANONICAL_PATHS = {
    "arabic-indic digit": "%D9%A0",  # ٠
    "mathematical bold digit": "%F0%9D%9F%8E",  # 𝟎
    "leading zero": "00",
    "leading space": "%200",
    "trailing space": "0%20",
    "plus sign": "+0",
    "underscore": "0_0",
}


@pytest.mark.parametrize("form", list(NON_CANONICAL_PATHS))
def test_path_client_id_must_be_canonical(url, tokens, form):
    """/v1/clients/{id}/answer with client 0's own token but a non-canonical spelling of 0 is
    refused with the same 403 as a wrong token (the id names no client)."""
    ref = _wrong(url, tokens)
    raw = NON_CANONICAL_PATHS[form]
    r = httpx.post(
        f"{url}/v1/clients/{raw}/answer",
        json={"image": "x", "question": "q"},
        headers={"Authorization": f"Bearer {tokens[0]}"},
        timeout=60,
    )
    assert r.request.url.raw_path == f"/v1/clients/{raw}/answer".encode()  # sent as written
    assert (r.status_code, r.json()) == (403, ref.json()), (form, r.text)


@pytest.mark.parametrize(
    "model", ["٠", "𝟎", "00", " 0", "0 ", "+0", "client_0", "client-0", "client00000", "0x0"]
)
def test_chat_model_must_be_canonical(url, tokens, model):
    """``model`` is the client id ("0") or its name ("client_00000"); any other spelling of 0 is
    the same 403 as a wrong token."""
    ref = _wrong(url, tokens)
    r = _chat(url, tokens[0], chat_body(model, max_tokens=2))
    assert (r.status_code, r.json()) == (403, ref.json()), (model, r.text)


@pytest.mark.parametrize("model", ["0", "client_00000"])
def test_chat_model_canonical_forms_are_served(url, tokens, model):
    r = _chat(url, tokens[0], chat_body(model, max_tokens=2))
    assert r.status_code == 200, r.text
    assert r.json()["model"].startswith("client_00000@")


# -- 2. no redirect that echoes the Host header ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions/"),
        ("POST", "/v1/clients/0/answer/"),
        ("GET", "/healthz/"),
        ("GET", "/v1/models/"),
        ("GET", "/docs/"),
    ],
)
def test_no_slash_redirect_to_a_foreign_host(url, tokens, method, path):
    """A trailing slash is a 404 JSON error, not a 307 whose Location is the caller's Host."""
    r = httpx.request(
        method,
        f"{url}{path}",
        headers={"Host": "evil.example", "Authorization": f"Bearer {tokens[0]}"},
        json=chat_body("0") if method == "POST" else None,
        follow_redirects=False,
        timeout=60,
    )
    assert "location" not in r.headers, (r.status_code, r.headers.get("location"))
    assert not r.is_redirect
    assert r.status_code == 404, r.text
    assert r.json()["error"]["message"]


# -- 3. authentication before the body -------------------------------------------------------------


def test_wrong_token_is_refused_before_the_body_is_read(url, tokens):
    """A wrong or missing token gets its 403/401 whatever the body: megabytes of garbage (over the
    body limit), invalid JSON, an invalid schema. The app does not read those bodies at all (its
    body-read counter does not move), so an unauthenticated caller cannot make it decode them."""
    ref = _wrong(url, tokens)
    before = ingress_stats().get("bodies_read")
    big = b"{" + b"x" * (7 * 1024 * 1024)  # > the 5.7 MB body limit, and not JSON
    wrong_answer = {"Authorization": f"Bearer {tokens[1]}", "Content-Type": "application/json"}
    garbage_token = {"Authorization": "Bearer fnr_" + "A" * 43, "Content-Type": "application/json"}
    cases = {
        "7 MB not JSON, wrong client": ("/v1/clients/0/answer", big, wrong_answer),
        "not JSON, wrong client": ("/v1/clients/0/answer", b"{not json", wrong_answer),
        "bad schema, wrong client": ("/v1/clients/0/answer", b'{"image": 5}', wrong_answer),
        "7 MB, unknown client": ("/v1/clients/7/answer", big, wrong_answer),
        "7 MB chat, no client's token": ("/v1/chat/completions", big, garbage_token),
        "not JSON chat, no client's token": ("/v1/chat/completions", b"[", garbage_token),
    }
    for what, (path, content, headers) in cases.items():
        r = httpx.post(f"{url}{path}", content=content, headers=headers, timeout=60)
        assert (r.status_code, r.json()) == (403, ref.json()), (what, r.status_code, r.text[:200])
    # Chunked (no Content-Length): refused before the first chunk is read too.
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    r = httpx.post(f"{url}/v1/clients/0/answer", content=chunks, headers=wrong_answer, timeout=60)
    assert (r.status_code, r.json()) == (403, ref.json()), r.text[:200]
    # No token at all: 401, also before the body.
    for path in ("/v1/clients/0/answer", "/v1/chat/completions"):
        r = httpx.post(
            f"{url}{path}", content=big, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer", r.text
    assert ingress_stats()["bodies_read"] == before
    # A valid token of another client: the chat body must be read to see `model`, then the
    # exact client match refuses it with the same 403.
    r = _chat(url, tokens[1], chat_body("0"))
    assert (r.status_code, r.json()) == (403, ref.json())
    assert ingress_stats()["bodies_read"] == before + 1


def _raw_request(url: str, path: str, token: str, length: int) -> socket.socket:
    host, port = urlsplit(url).hostname, urlsplit(url).port
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
    )
    return s


def _status_line(data: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


def _read_rest(s: socket.socket, timeout_s: float = 10.0) -> bytes:
    """What the server sends until it closes the connection (or ``timeout_s``)."""
    out, end = b"", time.monotonic() + timeout_s
    s.settimeout(0.5)
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def test_wrong_token_with_a_body_that_never_comes_is_refused_at_once(url, tokens):
    """Headers with a wrong token and a Content-Length, then no body: the 403 comes without
    waiting for it."""
    s = _raw_request(url, "/v1/clients/0/answer", tokens[1], 4096)
    try:
        s.settimeout(30)
        data = s.recv(65536)
        data += _read_rest(s, 5.0)
    finally:
        s.close()
    assert _status_line(data) == 403, data[:300]
    assert b"this token is not valid for this client" in data, data[:500]


def test_slow_body_is_cut_off_and_does_not_block_others(url, tokens):
    """A client with a valid token that sends its body one byte every 0.3 s (and never finishes)
    is cut off (408 or the connection closed) after the body deadline, and a legitimate caller is
    answered meanwhile. Bounds are generous: the deadline in this deployment is DEPLOY's
    body_timeout_s."""
    deadline_s = float(DEPLOY.get("body_timeout_s", 5))
    s = _raw_request(url, "/v1/clients/0/answer", tokens[0], 100_000)
    outcome: dict[str, object] = {}

    def trickle() -> None:
        start = time.monotonic()
        s.settimeout(0.3)
        received = b""
        try:
            while time.monotonic() - start < deadline_s + 60:
                try:
                    s.sendall(b" ")
                except OSError as e:  # the server closed the connection
                    outcome["closed"] = repr(e)
                    break
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                except OSError as e:
                    outcome["closed"] = repr(e)
                    break
                if not chunk:
                    outcome["closed"] = "EOF"
                    break
                received += chunk
                if _status_line(received) is not None:
                    received += _read_rest(s)
                    break
        finally:
            outcome["elapsed"] = time.monotonic() - start
            outcome["status"] = _status_line(received)
            outcome["received"] = received[:600]
            s.close()

    t = threading.Thread(target=trickle)
    t.start()
    try:
        time.sleep(1.0)
        ok = answer(url, 1, tokens[1], max_new_tokens=2)  # not held up by the slow one
        assert ok.status_code == 200, ok.text
        assert t.is_alive(), f"the slow client ended before the deadline: {outcome}"
    finally:
        t.join(timeout=deadline_s + 90)
    assert not t.is_alive()
    print(f"\n[slow body] {outcome}")
    cut = outcome["status"] == 408 or (outcome["status"] is None and "closed" in outcome)
    assert cut, outcome
    assert outcome["elapsed"] < deadline_s + 60, outcome
    if outcome["status"] == 408:
        body = outcome["received"].partition(b"\r\n\r\n")[2]
        assert b"body" in body, outcome


def test_deployments_have_bounded_queues(url):
    """Both deployments refuse work beyond a bounded queue (Serve's max_queued_requests; the
    defaults of ServeArgs), rather than queueing without limit."""
    from ray.serve.context import _get_global_client

    from fednano_ray.serve.app import ServeArgs

    details = _get_global_client().get_serve_details()
    deployments = details["applications"][DEPLOY["name"]]["deployments"]
    config = {name: d["deployment_config"] for name, d in deployments.items()}
    defaults = ServeArgs(run_dir=".")
    assert config["Ingress"]["max_queued_requests"] == defaults.ingress_max_queued_requests > 0
    assert config["Ingress"]["max_ongoing_requests"] == defaults.ingress_max_ongoing_requests
    assert config["LLMServer"]["max_queued_requests"] == defaults.llm_max_queued_requests > 0


def test_generation_past_its_deadline_is_503(run_dir):
    """An LLM server that does not answer within generate_timeout_s: the request is abandoned
    with a 503 "retry shortly" (the same path the replica takes, as a plain class)."""
    import asyncio

    from test_http import png_b64

    from fednano_ray.serve.ingress import Ingress
    from fednano_ray.serve.schemas import HTTPError

    class StuckLLM:
        cancelled = False

        async def generate(self, *args):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                StuckLLM.cancelled = True
                raise

    ing = Ingress(run_dir, llm=StuckLLM(), generate_timeout_s=0.5)

    async def get_edge(model_id: str):  # serve.multiplexed needs a replica
        return ing.load_client_model(int(model_id.partition("#")[0]))

    ing.get_edge = get_edge
    start = time.monotonic()
    with pytest.raises(HTTPError) as e:
        asyncio.run(ing._generate(0, png_b64(), "What colour?", 4))
    assert e.value.status == 503 and "within 0.5 s" in e.value.message
    assert time.monotonic() - start < 60 and StuckLLM.cancelled


# -- 6. the official OpenAI client -----------------------------------------------------------------


def _openai(url: str, token: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)


def _messages() -> list[dict]:
    return chat_body("2")["messages"]


def test_openai_client_models_list_shows_only_the_callers_model(url, tokens):
    import openai

    for c in (0, 2):
        models = _openai(url, tokens[c]).models.list()
        assert [m.id for m in models.data] == [str(c)]
        assert models.data[0].object == "model" and models.data[0].owned_by
    with pytest.raises(openai.PermissionDeniedError):
        _openai(url, "fnr_" + "A" * 43).models.list()
    r = httpx.get(f"{url}/v1/models", timeout=30)
    assert r.status_code == 401 and r.json()["error"]["message"]
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert "get" in spec["paths"]["/v1/models"]


def test_openai_client_chat_plain_and_streaming(url, tokens):
    """Plain and stream=True completions through the official client give the same text; the
    stream is chat.completion.chunk events ending with a finish_reason."""
    import openai

    client = _openai(url, tokens[2])
    # The id models.list() gives is the one to send as `model`.
    (model_id,) = [m.id for m in client.models.list().data]
    plain = client.chat.completions.create(
        model=model_id, messages=_messages(), max_tokens=6, temperature=0
    )
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and isinstance(text, str)
    stream = client.chat.completions.create(
        model=model_id,
        messages=_messages(),
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert streamed == text
    assert with_choices[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage == plain.usage
    with pytest.raises(openai.PermissionDeniedError):
        _openai(url, tokens[1]).chat.completions.create(
            model=model_id, messages=_messages(), stream=True
        )


def test_streaming_wire_format(url, tokens):
    """The raw SSE: text/event-stream, `data: {json}` events, the last one `data: [DONE]`."""
    body = chat_body("2", max_tokens=4, stream=True)
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {tokens[2]}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # Errors before the stream starts are plain JSON errors with their status.
    r = _chat(url, tokens[2], chat_body("2", max_tokens=4, stream=True, temperature=0.5))
    assert r.status_code == 422 and r.json()["error"]["message"]


# -- 7. no paths in errors -------------------------------------------------------------------------


def test_corrupt_token_file_is_503_without_a_path(url, tokens, run_dir):
    """A corrupt tokens.json makes every authenticated request a 503 whose message names no path
    (neither the run directory nor any absolute path); restoring the file restores service."""
    path = auth.tokens_path(run_dir)
    good = path.read_bytes()
    tmp = path.with_name(".corrupt-test")
    try:
        tmp.write_bytes(b'{"scheme": "sha256-v1", "clients": {"0": 42}')
        os.replace(tmp, path)
        for r in (
            answer(url, 0, tokens[0]),
            _chat(url, tokens[0], chat_body("0")),
            httpx.get(
                f"{url}/v1/models", headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=30
            ),
        ):
            assert r.status_code == 503, r.text
            message = r.json()["error"]["message"]
            assert message and str(run_dir) not in r.text and str(path) not in r.text
            assert not re.search(r"(^|[\s'\"(=:])/[\w.-]", message), message
    finally:
        tmp.write_bytes(good)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    assert answer(url, 0, tokens[0]).status_code == 200
