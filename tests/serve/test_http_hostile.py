"""Hostile input and load against the live Serve app on 127.0.0.1 (issue 7 item 5).

* Property-based fuzzing with schemathesis, driven by the app's own OpenAPI schema
  (``/openapi.json``): schema-valid and schema-invalid requests, with the caller's own token, a
  wrong client's token, generated garbage tokens or none. No response may be a 5xx, and every
  response (status, content type, body) must be one the schema documents.
* A bounded load test: 4 clients x 4 concurrent workers against ``/v1/clients/{id}/answer``; every
  request gets a 200 with its own client's answer (nothing lost or crossed), and a wrong token sent
  during the load is still refused.

The app, run directory and tokens are ``test_http.py``'s fixtures (see ``conftest.py``), deployed
once for this module. The fuzz tests drive schemathesis' strategies with Hypothesis' ``@given``
(``operation.as_strategy``) rather than ``schemathesis.pytest.from_fixture(...).parametrize()``:
that lazy loader sets ``Node._nodeid``, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import base64
import collections
import io
import sys
import threading
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import positive_data_acceptance

if str(Path(__file__).resolve().parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_http import png_b64

pytestmark = pytest.mark.timeout(300)

#: Generated requests per operation and mode (Hypothesis' generate phase only: no shrinking).
MAX_EXAMPLES = 40
OPERATIONS = (
    "POST /v1/clients/{client_id}/answer",
    "POST /v1/chat/completions",
    "GET /healthz",
    "GET /v1/models",
)


# -- fuzzing ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(url):
    """The live app's OpenAPI schema, loaded over HTTP from the running Serve app."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=schemathesis.Config())
    schema.config.update(base_url=url, request_timeout=60)
    return schema


#: (operation, mode, auth, status) -> count, over the module; printed and checked at the end.
SEEN: collections.Counter = collections.Counter()


def _image(kind: str, seed: int) -> str:
    """A real image (``png``, ``gif``) or one broken on purpose (``truncated``, ``flipped``)."""
    raw = base64.b64decode(png_b64(seed % 7, size=8 + seed % 40))
    if kind == "truncated":
        raw = raw[: 8 + seed % (len(raw) - 8)]
    elif kind == "flipped":
        flipped = bytearray(raw)
        for i in range(1 + seed % 5):
            flipped[(seed * 7919 + i * 104729) % len(flipped)] ^= 0xFF
        raw = bytes(flipped)
    elif kind == "gif":
        buf = io.BytesIO()
        Image.new("P", (1 + seed % 64, 1 + seed % 3)).save(buf, "GIF")
        raw = buf.getvalue()
    return base64.b64encode(raw).decode()


def _one_user_message(messages: list[dict], url: str) -> list[dict]:
    """The generated chat messages shaped as the API serves them (the schema cannot say it): the
    system messages, then one user message of the generated text and one image part."""
    texts = [
        m["content"]
        if isinstance(m["content"], str)
        else "\n".join(p["text"] for p in m["content"] if p["type"] == "text")
        for m in messages
        if m["role"] == "user"
    ]
    # A blank question would be a 422 (the generated cases that keep one cover that).
    text = next((t for t in texts if t.strip()), "What is in the picture?")
    content = [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    system = [m for m in messages if m["role"] == "system"][:7]
    return [*system, {"role": "user", "content": content}]


def _aim(case, auth: str, image: str, seed: int, tokens: dict[int, str]) -> None:
    """Steer a generated case past the outer checks without making an invalid part valid.

    ``auth`` picks the Authorization header: schemathesis' own (random bearer values, or none), the
    token of the client the request names, another client's token, or none. For schema-valid bodies
    ``image`` may swap the generated string for a real, truncated, bit-flipped or GIF image (and
    shape chat messages as one user message with that image), so the request reaches image
    decoding (corrupt files) and the model. Invalid parts of negative cases are left as generated.
    """
    client = seed % 4
    body_ok = isinstance(case.body, dict) and not case.meta.is_negative_at(ParameterLocation.BODY)
    if (
        auth == "own"
        and case.path_parameters
        and not case.meta.is_negative_at(ParameterLocation.PATH)
    ):
        case.path_parameters = {**case.path_parameters, "client_id": str(client)}
    if auth == "own" and body_ok and "model" in case.body:
        case.body = {**case.body, "model": str(client)}
    if image != "generated" and body_ok:
        data = _image(image, seed)
        if "image" in case.body:
            case.body = {**case.body, "image": data}
        if "messages" in case.body:
            messages = _one_user_message(case.body["messages"], "data:image/png;base64," + data)
            case.body = {**case.body, "messages": messages}
    if not case.meta.is_negative_at(ParameterLocation.HEADER) and auth != "generated":
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if auth != "none":
            headers["Authorization"] = (
                f"Bearer {tokens[client if auth == 'own' else (client + 1) % 4]}"
            )
        case.headers = headers


@pytest.mark.parametrize(
    ("label", "mode"),
    [
        (label, mode)
        for label in OPERATIONS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if label != "GET /healthz" or mode.is_positive  # healthz takes no input to make invalid
    ],
    ids=lambda v: str(v),
)
def test_fuzz_openapi(api_schema, tokens, label, mode):
    """Generated requests, schema-valid and not, never get a 5xx, and every response matches the
    schema.

    All of schemathesis' default checks (no 5xx; status code, content type, headers and body as
    documented; invalid data rejected; ...) but positive_data_acceptance: the schema cannot say "a
    decodable image" or "exactly one user message with one image", so some schema-valid requests
    are rightly refused with a 4xx. A failure prints the request as a curl command.
    """
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the live OpenAPI schema"

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: CI failures reproduce
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    @given(
        case=operation.as_strategy(mode),
        # Weighted towards requests that get through, so the model's path is fuzzed too.
        auth=st.sampled_from(["own", "own", "own", "other client", "generated", "none"]),
        image=st.sampled_from(["png", "png", "gif", "truncated", "flipped", "generated"]),
        seed=st.integers(0, 2**16),
    )
    def fuzz(case, auth, image, seed):
        _aim(case, auth, image, seed, tokens)
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        SEEN[(label, str(mode), auth, response.status_code)] += 1

    fuzz()


def test_fuzz_summary():
    """Every operation was fuzzed, and the requests reached the model (200), auth (401/403) and
    validation.
    """
    if not SEEN:
        pytest.skip("the fuzz tests did not run (deselected)")
    by_status: collections.Counter = collections.Counter()
    for (label, mode, _, status), n in SEEN.items():
        by_status[(label, mode, status)] += n
    print(f"\n[fuzz] {sum(SEEN.values())} requests (operation, mode, status: count):")
    for key, n in sorted(by_status.items()):
        print(f"  {key}: {n}")
    assert {label for label, *_ in SEEN} == set(OPERATIONS)
    assert all(status < 500 for *_, status in SEEN)
    for op in OPERATIONS[:2]:
        statuses = {status for (label, _, _, status) in SEEN if label == op}
        assert {200, 422} <= statuses and statuses & {401, 403}, (op, statuses)


# -- load ------------------------------------------------------------------------------------------

CLIENTS = 4
WORKERS_PER_CLIENT = 4
REQUESTS_PER_WORKER = 8
LOAD_NEW_TOKENS = 6
INPUTS = [(seed, f"What is in the picture? ({seed})") for seed in range(3)]


def _post(http: httpx.Client, url: str, client: int, token: str | None, seed: int, question: str):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = {"image": png_b64(seed), "question": question, "max_new_tokens": LOAD_NEW_TOKENS}
    return http.post(f"{url}/v1/clients/{client}/answer", json=body, headers=headers, timeout=120)


def test_load_many_clients_answers_not_lost_or_crossed(url, tokens):
    """4 clients x 4 concurrent workers: every request is answered 200 with its own client's answer.

    Each client's answer to each input is first taken alone (greedy decoding: deterministic); under
    load every response must carry the caller's client id and model and that same answer, so a
    request answered with another client's adapters, or another request's prompt, is caught. An
    intruder thread sends wrong, garbage and missing tokens during the load: all refused (403/401).
    """
    with httpx.Client() as http:
        reference = {}
        for c in range(CLIENTS):
            for seed, q in INPUTS:
                r = _post(http, url, c, tokens[c], seed, q)
                assert r.status_code == 200, r.text
                reference[(c, seed)] = r.json()
    # The check can only catch crossed answers if clients answer differently.
    for a in range(CLIENTS):
        for b in range(a + 1, CLIENTS):
            assert any(
                reference[(a, s)]["answer"] != reference[(b, s)]["answer"] for s, _ in INPUTS
            ), f"clients {a} and {b} give the same answers: the load test could not see them cross"

    start = threading.Barrier(CLIENTS * WORKERS_PER_CLIENT + 1)
    load_done = threading.Event()
    results: list[tuple[int, int, int, httpx.Response | BaseException]] = []
    intruder: list[tuple[str, int | str]] = []
    lock = threading.Lock()

    def worker(c: int, w: int) -> None:
        with httpx.Client() as http:
            start.wait()
            for i in range(REQUESTS_PER_WORKER):
                seed, q = INPUTS[(w + i) % len(INPUTS)]
                try:
                    out: httpx.Response | BaseException = _post(http, url, c, tokens[c], seed, q)
                except Exception as e:  # noqa: BLE001 - reported by the assertions below
                    out = e
                with lock:
                    results.append((c, w, seed, out))

    def intrude() -> None:
        kinds = ("other client's token", "garbage token", "no token")
        with httpx.Client() as http:
            start.wait()
            n = 0
            while not load_done.is_set() or n < len(kinds):
                what, c = kinds[n % len(kinds)], n % CLIENTS
                token = {kinds[0]: tokens[(c + 1) % CLIENTS], kinds[1]: "fnr_" + "A" * 43}.get(what)
                try:
                    status: int | str = _post(http, url, c, token, 0, INPUTS[0][1]).status_code
                except Exception as e:  # noqa: BLE001 - reported by the assertion below
                    status = repr(e)
                intruder.append((what, status))
                n += 1

    threads = [
        threading.Thread(target=worker, args=(c, w))
        for c in range(CLIENTS)
        for w in range(WORKERS_PER_CLIENT)
    ]
    spy = threading.Thread(target=intrude)
    for t in [*threads, spy]:
        t.start()
    for t in threads:
        t.join(timeout=240)
    load_done.set()
    spy.join(timeout=120)
    assert not any(t.is_alive() for t in [*threads, spy]), "a load thread did not finish"

    errors = [(c, w, out) for c, w, _, out in results if not isinstance(out, httpx.Response)]
    bad = [
        (c, w, out.status_code, out.text[:200])
        for c, w, _, out in results
        if isinstance(out, httpx.Response) and out.status_code != 200
    ]
    crossed = [
        (c, seed, out.json(), reference[(c, seed)])
        for c, _, seed, out in results
        if isinstance(out, httpx.Response)
        and out.status_code == 200
        and out.json() != reference[(c, seed)]
    ]
    refused = collections.Counter(intruder)
    print(
        f"\n[load] {len(results)} requests from {CLIENTS} clients x {WORKERS_PER_CLIENT} workers: "
        f"{len(results) - len(errors) - len(bad)} x 200, {len(bad)} non-200, "
        f"{len(errors)} transport "
        f"errors, {len(crossed)} crossed; intruder during the load: {dict(refused)}"
    )
    assert len(results) == CLIENTS * WORKERS_PER_CLIENT * REQUESTS_PER_WORKER  # nothing lost
    assert not errors, errors[:3]
    assert not bad, bad[:3]
    assert not crossed, crossed[:3]
    expected = {"other client's token": 403, "garbage token": 403, "no token": 401}
    assert intruder and all(status == expected[what] for what, status in intruder), refused
