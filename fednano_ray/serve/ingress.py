"""The HTTP front of the Serve app: auth, validation, the caller's personalised NanoEdge,
generation.

::

    POST /v1/clients/{id}/answer ─┐  bearer token ─► verify(id) ─► get_edge(id)
    POST /v1/chat/completions ────┘                                   │ (serve.multiplexed, LRU)
                                                                      │ global + personal adapters
                                    image ─► preprocess ─► encoder ─► connector ─► NanoEdge ─► z'
                                                                                           │ (T, d)
                                                                      LLMServer.generate(z') ─► text

One MLLM is built per replica and its frozen encoder, connector and embedding table are shared by
every client's NanoEdge; a client's model is only its adapters (a few KiB to MiB), so many fit in
the multiplexed cache. ``reconfigure`` (Serve ``user_config``) switches checkpoints in running
replicas: ``{"checkpoint": "round_0003"}`` pins one, ``{"reload": n}`` (any new n) re-reads the
newest. Cached client models are keyed by a generation counter that every reconfigure bumps, so no
request after it is answered by the old adapters; the stale entries age out of the LRU.

:class:`Ingress` is a plain class; :mod:`fednano_ray.serve.app` wraps it with
``serve.deployment(serve.ingress(app)(Ingress))``.

Hostile callers (:class:`Guard`, an ASGI middleware in front of every route): the bearer token is
checked from the headers and the path before any byte of the body is read (chat completions name
their client in the body, so there the token must first be *some* client's, and the exact match
follows after parsing); the body must arrive within ``body_timeout_s`` and fit
``MAX_BODY_BYTES``; a generation that takes longer than ``generate_timeout_s`` is abandoned (503).
Client ids have one spelling (:func:`~fednano_ray.serve.schemas.parse_client_id`), and there are no
slash redirects (Starlette's would echo the caller's ``Host`` into ``Location``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from fednano_ray.config import Config
from fednano_ray.federation import rundir
from fednano_ray.models.adapter import load_adapter_state
from fednano_ray.models.dual import DualEdge, DynamicWeight
from fednano_ray.models.split import NanoEdge
from fednano_ray.serve.auth import TokenError, TokenStore
from fednano_ray.serve.engines import EngineInputError
from fednano_ray.serve.schemas import (
    CLIENT_ID_PATTERN,
    MAX_BODY_BYTES,
    AnswerRequest,
    AnswerResponse,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ErrorResponse,
    HTTPError,
    ModelCard,
    ModelList,
    Usage,
    chat_chunks,
    chat_stream_event_schema,
    decode_image,
    parse_client_id,
)

logger = logging.getLogger(__name__)

#: Client models (adapters only) cached per replica; each is 2 * 2 * r * d floats.
MAX_CLIENT_MODELS_PER_REPLICA = 64
PRETRAINED = "pretrained"  # the "checkpoint" served before any round finished (adapters = identity)
#: Seconds a request's body may take to arrive in full (ServeArgs.body_timeout_s); then 408.
BODY_TIMEOUT_S = 30.0
#: Seconds the LLM server may take to answer one request (ServeArgs.generate_timeout_s); then 503.
GENERATE_TIMEOUT_S = 60.0
_ANSWER_PATH = re.compile(r"/v1/clients/([^/]+)/answer")
_CHAT_PATH = "/v1/chat/completions"
_MODELS_PATH = "/v1/models"

app = FastAPI(
    title="fednano-ray",
    summary="Personalised FedNano models: each client's NanoAdapters on a shared frozen "
    "multimodal LLM.",
    description="Every client has its own bearer token (`fednano-ray token RUN_DIR CLIENT_ID`); "
    "a client's personalised model answers only to that token. Decoding is greedy.",
    version="1",
    # Starlette's slash redirects build Location from the request's Host header: a 307 to any
    # host a caller names. Paths are exact; a trailing slash is a 404.
    redirect_slashes=False,
)


class UserConfig(BaseModel):
    """The Serve ``user_config`` of the ingress: which checkpoint's adapters to serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str | None = Field(
        None,
        pattern=rundir.CHECKPOINT_NAME,
        description="Serve this checkpoint (e.g. round_0003); default the newest.",
    )
    reload: int = Field(
        0, description="Change it to re-read the newest checkpoint (new adapters) without redeploy."
    )


@dataclass
class ClientModel:
    """What is cached per client: an edge whose adapters are the client's own (frozen parts
    shared)."""

    client_id: int
    name: str  # e.g. client_00003@round_0002
    edge: NanoEdge | DualEdge  # DualEdge: FedDPA-F's global + local adapters
    personal: bool


# -- errors: every failure is a JSON value with a status and a message -----------------------------


def _error(
    status: int, message: str, type: str = "invalid_request_error", headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        HTTPError(status, message, type=type).body(), status_code=status, headers=headers
    )


def _http_error_response(exc: HTTPError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return _http_error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # One readable line per problem; the offending input is NOT echoed (it may be megabytes of
    # base64).
    problems = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; see /docs)"
        elif e.get("type") == "missing":
            msg = "field required"
        problems.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    body = HTTPError(422, "; ".join(problems) or "invalid request").body()
    body["error"]["details"] = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": e.get("type")}
        for e in exc.errors()
    ]
    return JSONResponse(body, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self) -> None:
        super().__init__(
            413,
            f"request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB; "
            "send a smaller image",
        )


class _BodyTimeout(StarletteHTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            408,
            f"the request body did not arrive within {seconds:g} s; send it in one go",
            headers={"Connection": "close"},
        )


_DENIED = "this token is not valid for this client"
_MISSING = (
    "missing bearer token: send 'Authorization: Bearer <token>' "
    "(a client's token is issued with `fednano-ray token RUN_DIR CLIENT_ID`)"
)
_TOKEN_STORE_DOWN = (
    "the token store of this server is unusable (its token file is unreadable or corrupt); "
    "the operator must fix or reissue the tokens"
)


def _denied() -> HTTPError:
    return HTTPError(403, _DENIED, type="permission_error")


def _token_store_down(e: TokenError) -> HTTPError:
    # The reason (it names the file's path) goes to the replica's log, not to the caller.
    logger.error("token store unusable: %s", e)
    return HTTPError(503, _TOKEN_STORE_DOWN, type="server_error")


def _scope_token(scope: dict) -> str | None:
    """The token of the request's ``Authorization: Bearer <token>`` header (as HTTPBearer reads
    it), else None."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def _replica_ingress() -> Ingress | None:
    """The Ingress instance of this Serve replica, else None (the app outside Serve)."""
    try:
        obj = serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - not in a replica: RayServeException, or no Serve at all
        return None
    return obj if isinstance(obj, Ingress) else None


class Guard:
    """ASGI middleware in front of every route: authentication first, then a bounded body.

    1. Authentication from the headers and the path, before any of the body is read: a request to
       ``/v1/clients/{id}/answer`` needs the token of client ``id`` (a canonical id), one to
       ``/v1/chat/completions`` or ``/v1/models`` the token of *some* client (the endpoint then
       checks the exact client). Else 401 / 403, however large or malformed the body.
    2. A declared ``Content-Length`` over ``max_bytes`` is refused up front (413); a chunked body
       is counted as it arrives, so neither way can make the replica buffer an unbounded body.
    3. The whole body must arrive within the replica's ``body_timeout_s`` (408): a client that
       trickles its body cannot hold a replica's request slot.

    Outside a Serve replica (the FastAPI app on its own) step 1 is left to the endpoints, which
    check the token themselves in any case.
    """

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ingress = _replica_ingress()
        if ingress is not None:
            try:
                ingress.authenticate_scope(scope)
            except HTTPError as e:
                return await _http_error_response(e)(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, message = (
                (413, _BodyTooLarge().detail)
                if length.isdigit()
                else (400, "invalid Content-Length header")
            )
            return await _error(status, message)(scope, receive, send)
        timeout_s = ingress.body_timeout_s if ingress is not None else BODY_TIMEOUT_S
        seen = 0
        deadline: float | None = None
        body_done = False

        async def guarded() -> dict:
            nonlocal seen, deadline, body_done
            if body_done:  # after the body: disconnect listening, not bounded
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:  # the first read of this request's body
                deadline = loop.time() + timeout_s
                if ingress is not None:
                    ingress.bodies_read += 1
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                raise _BodyTimeout(timeout_s) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()  # FastAPI re-raises HTTPExceptions from body reading
                body_done = not msg.get("more_body", False)
            else:
                body_done = True
            return msg

        await self.app(scope, guarded, send)


app.add_middleware(Guard)


def _documented(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **extra}


#: The error responses of the authenticated routes, in the OpenAPI schema (/docs) as they are sent.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented(
        "Bad input the schema cannot express: the image is not base64, not an image or corrupt; "
        "the prompt is too long for the model",
    ),
    401: _documented(
        "No bearer token",
        headers={"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    ),
    403: _documented(
        "The token is not this client's (or the client does not exist, or its id is not "
        "canonical: ASCII decimal without leading zeros)"
    ),
    408: _documented("The request body did not arrive within the server's body timeout"),
    413: _documented("The body or the image is too large"),
    422: _documented("The body does not validate (not JSON, a field missing or out of range)"),
    503: _documented(
        "The language model is unavailable, overloaded or too slow (retry shortly), or the token "
        "store is unusable"
    ),
}
#: The error responses of routes without a body (GET /v1/models).
AUTH_ERROR_RESPONSES = {k: v for k, v in ERROR_RESPONSES.items() if k in (401, 403, 503)}


_bearer = HTTPBearer(
    auto_error=False, description="The client's token (`fednano-ray token RUN_DIR CLIENT_ID`)."
)


def bearer_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 when absent or malformed.

    A dependency, so FastAPI checks it before it validates the body: no token, no validation
    details.
    """
    token = creds.credentials.strip() if creds is not None else ""
    if not token:
        raise HTTPError(401, _MISSING, type="authentication_error")
    return token


# -- the model side, usable without Serve ----------------------------------------------------------


def prompt_embeds(mllm: Any, edge: NanoEdge | DualEdge, image: Any, question: str) -> torch.Tensor:
    """The adapted prompt embeddings z' (T, d) float32 of one image and question."""
    ids, _, mask = mllm.encode_row(question, None)
    pixels = mllm.preprocess([image])  # (1, 3, S, S)
    prompt = torch.ones(1, len(ids), dtype=torch.bool)  # the row is the prompt alone
    with torch.inference_mode():
        z = edge(torch.tensor([ids]), torch.tensor([mask]), pixel_values=pixels, prompt_mask=prompt)
    return z[0].float().contiguous()


def match_choice(answer: str, choices: list[str] | None) -> int | None:
    """Index of the choice the answer equals (case-insensitive, whitespace and a final '.'
    stripped)."""
    if not choices:
        return None
    norm = answer.strip().rstrip(".").strip().casefold()
    for i, c in enumerate(choices):
        if c.strip().rstrip(".").strip().casefold() == norm:
            return i
    return None


async def _call(target: Any, method: str, *args: Any) -> Any:
    """Call ``method`` on a Serve handle (``.remote``) or on a plain object (tests)."""
    fn = getattr(target, method)
    if hasattr(fn, "remote"):
        return await fn.remote(*args)
    out = fn(*args)
    return await out if asyncio.iscoroutine(out) else out


class Ingress:
    """The Serve ingress of one training run.

    Args:
        run_dir: a training run directory (config.yaml, checkpoints/, tokens.json).
        llm: a handle to the ``LLMServer`` deployment (or an object with the same ``generate``).
        body_timeout_s: seconds a request body may take to arrive in full (then 408).
        generate_timeout_s: seconds the LLM server may take for one request (then 503).
    """

    def __init__(
        self,
        run_dir: str | Path,
        llm: Any,
        *,
        body_timeout_s: float = BODY_TIMEOUT_S,
        generate_timeout_s: float = GENERATE_TIMEOUT_S,
    ) -> None:
        from fednano_ray.models.build import build_mllm

        if body_timeout_s <= 0 or generate_timeout_s <= 0:
            raise ValueError("body_timeout_s and generate_timeout_s must be > 0")
        self.body_timeout_s = float(body_timeout_s)
        self.generate_timeout_s = float(generate_timeout_s)
        self.bodies_read = 0  # requests whose body this replica started to read (Guard)

        self.run_dir = Path(run_dir)
        self.cfg: Config = rundir.read_config(self.run_dir)
        # Built once per replica; its frozen encoder, connector and embeddings serve every client.
        self.mllm = build_mllm(self.cfg.model)
        self.llm = llm
        self.tokens = TokenStore(self.run_dir)
        self.tiers = self.cfg.client_tiers()
        tok = self.mllm.tokenizer
        end = tok.encode(self.mllm.prompt.end, add_special_tokens=False)
        self.stop_token_ids = sorted(
            {int(tok.eos_token_id)} | ({end[0]} if len(end) == 1 else set())
        )
        decoder_cfg = getattr(self.mllm.parts.decoder, "config", None)
        self.max_positions: int | None = getattr(decoder_cfg, "max_position_embeddings", None)
        self.generation = 0
        self.loads: collections.deque[str] = collections.deque(maxlen=256)
        self.started = int(time.time())
        self._select(UserConfig())

    # -- checkpoints -----------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve ``user_config``: switch to another checkpoint without redeploying (see module
        doc)."""
        self._select(UserConfig.model_validate(user_config or {}))

    def _select(self, uc: UserConfig) -> None:
        """Choose what to serve: ``uc.checkpoint``, or the newest checkpoint that checks out.

        Nothing is read here: the first client model loaded afterwards resolves, checks (every file
        serving reads against state.json's sha256) and loads it (:meth:`_served_checkpoint`). So a
        pinned checkpoint is the only one read (Serve calls ``reconfigure`` with it after
        ``__init__`` selected the default), and a corrupt or missing pinned checkpoint fails the
        requests that need it with a 503 naming it, rather than the replica."""
        import threading

        if not hasattr(self, "_checkpoint_lock"):
            self._checkpoint_lock = threading.Lock()
        with self._checkpoint_lock:
            # Swap everything at once, then bump the generation: new requests miss the cache and
            # load the new selection.
            self._pending: UserConfig | None = uc
            self.checkpoint: Path | None = None
            self.checkpoint_state: dict[str, Any] | None = None
            self.global_state: dict[str, torch.Tensor] | None = None
            self.checkpoint_name = uc.checkpoint or "newest"
            self.user_config = uc.model_dump()
            self.generation += 1

    def _resolve_checkpoint(self, uc: UserConfig) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint ``uc`` selects and its state.json, every file serving reads checked.

        Unpinned, a corrupt newer checkpoint is passed over, with a warning, for the newest that
        checks out (None before round 1: the pretrained model). Errors name checkpoints and files
        by their names under ``checkpoints/`` only: they reach HTTP responses.

        Raises:
            HTTPError: 503, the pinned checkpoint is missing or corrupt, or none checks out.
        """
        import logging

        if uc.checkpoint is not None:
            try:
                ckpt = rundir.resolve_checkpoint(self.run_dir, uc.checkpoint)
            except ValueError:
                raise HTTPError(
                    503,
                    f"the pinned checkpoint {uc.checkpoint} is missing or incomplete",
                    type="server_error",
                ) from None
            assert ckpt is not None  # a name resolves to its folder or raises
            try:
                return ckpt, rundir.verify_checkpoint(ckpt, serving=True)
            except rundir.CorruptCheckpoint as e:
                raise HTTPError(503, f"the pinned {e}", type="server_error") from e
        ckpt, state, skipped = rundir.newest_valid_checkpoint(self.run_dir, serving=True)
        for bad in skipped:
            logging.getLogger(__name__).warning(
                "serving: %s; serving %s instead",
                bad,
                ckpt.name if ckpt is not None else "nothing",
            )
        if ckpt is None and skipped:
            raise HTTPError(
                503,
                "no checkpoint of this run checks out: " + "; ".join(str(b) for b in skipped),
                type="server_error",
            )
        return ckpt, state

    def _served_checkpoint(
        self,
    ) -> tuple[Path | None, dict[str, Any] | None, dict[str, torch.Tensor] | None]:
        """The selected checkpoint, its state.json and its global adapters, loaded on first use
        (:meth:`_select`); all None for the pretrained model.

        Raises:
            HTTPError: 503, as :meth:`_resolve_checkpoint`, or the adapters do not check out.
        """
        with self._checkpoint_lock:
            uc = self._pending
            if uc is not None:
                ckpt, manifest = self._resolve_checkpoint(uc)
                global_state = None
                if ckpt is not None and manifest is not None:
                    try:
                        global_state = rundir.load_checkpoint_tensors(
                            ckpt, rundir.ADAPTERS, manifest
                        )
                    except rundir.CorruptCheckpoint as e:
                        raise HTTPError(503, str(e), type="server_error") from e
                self.checkpoint, self.checkpoint_state = ckpt, manifest
                self.global_state = global_state
                self.checkpoint_name = ckpt.name if ckpt is not None else PRETRAINED
                self._pending = None
            return self.checkpoint, self.checkpoint_state, self.global_state

    def load_client_model(self, client_id: int) -> ClientModel:
        """A NanoEdge of the client's rank with the global, then the client's personal, adapters.

        Under ``feddpa-f`` (a bank beside the client's adapters) the client's model is its
        :class:`~fednano_ray.models.dual.DualEdge`: the global and its local adapters, mixed per
        request by the dynamic weight, as evaluation scores it. The mix is done here, before the
        LLM, so it holds for both engines.

        Every file is read through its checkpoint's state.json: only the clients it lists have
        personal adapters, and each file must match its sha256.

        Raises:
            HTTPError: 503, the checkpoint (:meth:`_served_checkpoint`) or a file of this client's
                does not check out, naming it (``round_0003/clients/client_00001.safetensors``).
        """
        ckpt, manifest, state = self._served_checkpoint()
        rank = self.cfg.tier_rank(self.tiers[client_id])
        # The one client-model builder training uses (every adapter form, the run's one scaling, the
        # client's tier rank); fresh adapters are the identity until a checkpoint says otherwise.
        edge, _ = self.mllm.split(self.cfg.adapter, r=rank, seed=0)
        edge.eval()  # no dropout: inference only
        if state is not None:
            load_adapter_state(edge.adapters, state)
        served: NanoEdge | DualEdge = edge
        personal = ckpt is not None and manifest is not None and client_id in manifest["client_ids"]
        if personal:
            assert ckpt is not None and manifest is not None
            own = rundir.client_adapters_path(ckpt, client_id).relative_to(ckpt).as_posix()
            bank = rundir.client_bank_path(ckpt, client_id).relative_to(ckpt).as_posix()
            listed = manifest.get(rundir.FILES)
            has_bank = bank in listed if listed is not None else (ckpt / bank).is_file()
            try:
                own_state = rundir.load_checkpoint_tensors(ckpt, own, manifest)
                bank_rows = (
                    rundir.load_checkpoint_tensors(ckpt, bank, manifest)["bank"]
                    if has_bank and state is not None
                    else None
                )
            except rundir.CorruptCheckpoint as e:
                raise HTTPError(503, str(e), type="server_error") from e
            if bank_rows is not None and state is not None:  # FedDPA-F's dual adapter
                top_k = self.cfg.method().options["top_k"]
                weighting = DynamicWeight(bank_rows, top_k=top_k)
                dual = DualEdge.around(edge, weighting=weighting).eval()
                dual.load_states(state, own_state)
                served = dual
            else:
                load_adapter_state(edge.adapters, own_state)
        served.requires_grad_(False)
        name = ckpt.name if ckpt is not None else PRETRAINED
        return ClientModel(client_id, f"{rundir.client_name(client_id)}@{name}", served, personal)

    @serve.multiplexed(max_num_models_per_replica=MAX_CLIENT_MODELS_PER_REPLICA)
    async def get_edge(self, model_id: str) -> ClientModel:
        """Serve's per-replica LRU of client models; ``model_id`` is
        ``"<client_id>#<generation>"``."""
        client_id = int(model_id.partition("#")[0])
        model = await asyncio.to_thread(self.load_client_model, client_id)
        self.loads.append(f"{model_id}={model.name}")
        return model

    def stats(self) -> dict[str, Any]:
        """Replica state for operators and tests (over a deployment handle only, not over HTTP)."""
        return {
            "pid": os.getpid(),
            "checkpoint": self.checkpoint_name,
            "generation": self.generation,
            "user_config": self.user_config,
            "loads": list(self.loads),
            "bodies_read": self.bodies_read,
        }

    # -- request path ------------------------------------------------------------------------------

    def _authorize(self, client_id: str, token: str, *, named: bool = False) -> int:
        """The client id, if ``token`` is its token; else 403 with one body for every failure.

        ``client_id`` must be canonical (``"3"``; with ``named`` also ``"client_00003"``): other
        spellings int() would take ("03", " 3", "٣") are no client's."""
        cid = parse_client_id(client_id, named=named)
        if cid is not None and not 0 <= cid < len(self.tiers):
            cid = None
        try:
            ok = self.tokens.verify(cid, token)  # constant time, also for unknown clients
        except TokenError as e:
            raise _token_store_down(e) from None
        if not ok or cid is None:
            raise _denied()
        return cid

    def _client_of(self, token: str) -> int:
        """The client whose token this is (any client); else the same 403."""
        try:
            cid = self.tokens.client_of(token)
        except TokenError as e:
            raise _token_store_down(e) from None
        if cid is None or not 0 <= cid < len(self.tiers):
            raise _denied()
        return cid

    def authenticate_scope(self, scope: dict) -> None:
        """:class:`Guard`'s check of a request from its headers and path alone (no body read).

        Raises:
            HTTPError: 401 (no bearer token), 403 (not the path's client's token; for chat
                completions and models, no client's token), 503 (token store unusable).
        """
        method, path = scope.get("method"), scope.get("path", "")
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        answer = _ANSWER_PATH.fullmatch(path) if method == "POST" else None
        chat = method == "POST" and path == _CHAT_PATH
        models = method == "GET" and path == _MODELS_PATH
        if not (answer or chat or models):
            return  # no such authenticated route: the router answers (404, 405, ...)
        token = _scope_token(scope)
        if token is None:
            raise HTTPError(401, _MISSING, type="authentication_error")
        if answer is not None:
            self._authorize(answer.group(1), token)
        else:
            self._client_of(token)

    async def _generate(
        self, cid: int, image_text: str, question: str, max_new_tokens: int
    ) -> tuple[ClientModel, dict, int]:
        model = await self.get_edge(f"{cid}#{self.generation}")

        def embed() -> torch.Tensor:
            return prompt_embeds(self.mllm, model.edge, decode_image(image_text), question)

        z = await asyncio.to_thread(embed)  # image decoding and the encoder run off the event loop
        if self.max_positions is not None and z.shape[0] + max_new_tokens > self.max_positions:
            raise HTTPError(
                400,
                f"prompt ({z.shape[0]} tokens with the image) plus max_new_tokens exceeds "
                f"the model's {self.max_positions} positions; shorten the question",
                param="question",
            )
        try:
            async with asyncio.timeout(self.generate_timeout_s):
                out = await _call(self.llm, "generate", z, max_new_tokens, self.stop_token_ids)
        except TimeoutError:
            raise HTTPError(
                503,
                f"the language model did not answer within {self.generate_timeout_s:g} s "
                "(overloaded); retry shortly",
                type="server_error",
            ) from None
        except Exception as e:
            # Through a Serve handle the replica's exception arrives as a RayTaskError that is
            # also an instance of the original class; its message is the original's.
            if isinstance(e, EngineInputError):  # the request's fault: the engine refused it
                cause = getattr(e, "cause", None)
                message = str(cause if isinstance(cause, EngineInputError) else e)
                raise HTTPError(400, message, param="question") from None
            raise HTTPError(  # the backend, not the request, failed
                503,
                f"the language model is unavailable ({type(e).__name__}); retry shortly",
                type="server_error",
            ) from e
        return model, out, int(z.shape[0])

    @app.get("/healthz", summary="Liveness (no auth)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/v1/clients/{client_id}/answer",
        response_model=AnswerResponse,
        responses=ERROR_RESPONSES,
        summary="Answer a question about an image",
    )
    async def answer(
        self,
        client_id: Annotated[
            str,
            PathParam(
                pattern=CLIENT_ID_PATTERN,
                description="The client id: ASCII decimal without leading zeros, e.g. 3.",
            ),
        ],
        body: AnswerRequest,
        token: Annotated[str, Depends(bearer_token)],
    ) -> AnswerResponse:
        cid = self._authorize(client_id, token)
        model, out, _ = await self._generate(cid, body.image, body.question, body.max_new_tokens)
        text = str(out["text"]).strip()
        return AnswerResponse(
            client_id=cid, answer=text, choice=match_choice(text, body.choices), model=model.name
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={
            **ERROR_RESPONSES,
            200: {
                "description": "The completion; with `stream: true`, server-sent events: "
                "`data: {chat.completion.chunk}` lines, then `data: [DONE]`.",
                "content": {"text/event-stream": {"schema": chat_stream_event_schema()}},
            },
        },
        summary="OpenAI-style chat completion (optionally streamed)",
    )
    async def chat_completions(
        self, body: ChatCompletionRequest, token: Annotated[str, Depends(bearer_token)]
    ) -> ChatCompletionResponse:
        cid = self._authorize(body.model, token, named=True)
        max_new = body.new_tokens()
        model, out, n_prompt = await self._generate(cid, body.image_url(), body.question(), max_new)
        ids = list(out["token_ids"])
        response = ChatCompletionResponse(
            model=model.name,
            choices=[
                ChatChoice(
                    index=0,
                    message=ChatMessageOut(content=str(out["text"]).strip()),
                    finish_reason="length" if len(ids) >= max_new else "stop",
                )
            ],
            usage=Usage(
                prompt_tokens=n_prompt, completion_tokens=len(ids), total_tokens=n_prompt + len(ids)
            ),
        )
        if not body.stream:
            return response
        usage = bool(body.stream_options and body.stream_options.include_usage)
        # Decoded in full first, so every error above is still a JSON error with its status.
        events = chat_chunks(response, include_usage=usage)

        async def stream() -> Any:
            for event in events:
                yield event

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses=AUTH_ERROR_RESPONSES,
        summary="The caller's model (OpenAI-style list; a token sees only its own client)",
    )
    async def models(self, token: Annotated[str, Depends(bearer_token)]) -> ModelList:
        cid = self._client_of(token)
        card = ModelCard(
            id=str(cid),
            created=self.started,
            owned_by=rundir.client_name(cid),
        )
        return ModelList(data=[card])
