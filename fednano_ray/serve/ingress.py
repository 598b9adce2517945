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
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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
from fednano_ray.serve.schemas import (
    MAX_BODY_BYTES,
    AnswerRequest,
    AnswerResponse,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ErrorResponse,
    HTTPError,
    Usage,
    decode_image,
)

#: Client models (adapters only) cached per replica; each is 2 * 2 * r * d floats.
MAX_CLIENT_MODELS_PER_REPLICA = 64
PRETRAINED = "pretrained"  # the "checkpoint" served before any round finished (adapters = identity)
_CLIENT_ID = re.compile(r"^(?:client[_-]?)?0*(\d{1,9})$")

app = FastAPI(
    title="fednano-ray",
    summary="Personalised FedNano models: each client's NanoAdapters on a shared frozen "
    "multimodal LLM.",
    description="Every client has its own bearer token (`fednano-ray token RUN_DIR CLIENT_ID`); "
    "a client's personalised model answers only to that token. Decoding is greedy.",
    version="1",
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


@app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


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


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` before anything parses them (413).

    A declared ``Content-Length`` is checked up front; a chunked body is counted as it arrives, so
    neither way can make the replica buffer an unbounded body.
    """

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, message = (
                (413, _BodyTooLarge().detail)
                if length.isdigit()
                else (400, "invalid Content-Length header")
            )
            return await _error(status, message)(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()  # FastAPI re-raises HTTPExceptions from body reading
            return msg

        await self.app(scope, counted, send)


app.add_middleware(BodyLimit)


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
    403: _documented("The token is not this client's (or the client does not exist)"),
    413: _documented("The body or the image is too large"),
    422: _documented("The body does not validate (not JSON, a field missing or out of range)"),
    503: _documented("The language model or the token store is unavailable; retry shortly"),
}


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
        raise HTTPError(
            401,
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(a client's token is issued with `fednano-ray token RUN_DIR CLIENT_ID`)",
            type="authentication_error",
        )
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
    """

    def __init__(self, run_dir: str | Path, llm: Any) -> None:
        from fednano_ray.models.build import build_mllm

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
        self._select(UserConfig())

    # -- checkpoints -----------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve ``user_config``: switch to another checkpoint without redeploying (see module
        doc)."""
        self._select(UserConfig.model_validate(user_config or {}))

    def _select(self, uc: UserConfig) -> None:
        from safetensors.torch import load_file

        ckpt = rundir.resolve_checkpoint(self.run_dir, uc.checkpoint)
        global_state = load_file(str(rundir.adapters_path(ckpt))) if ckpt is not None else None
        # Swap everything at once, then bump the generation: new requests miss the cache and reload.
        self.checkpoint, self.global_state = ckpt, global_state
        self.checkpoint_name = ckpt.name if ckpt is not None else PRETRAINED
        self.user_config = uc.model_dump()
        self.generation += 1

    def load_client_model(self, client_id: int) -> ClientModel:
        """A NanoEdge of the client's rank with the global, then the client's personal, adapters.

        Under ``feddpa-f`` (a bank beside the client's adapters) the client's model is its
        :class:`~fednano_ray.models.dual.DualEdge`: the global and its local adapters, mixed per
        request by the dynamic weight, as evaluation scores it. The mix is done here, before the
        LLM, so it holds for both engines."""
        from safetensors.torch import load_file

        rank = self.cfg.tier_rank(self.tiers[client_id])
        # The one client-model builder training uses (every adapter form, the run's one scaling, the
        # client's tier rank); fresh adapters are the identity until a checkpoint says otherwise.
        edge, _ = self.mllm.split(self.cfg.adapter, r=rank, seed=0)
        edge.eval()  # no dropout: inference only
        ckpt, state = self.checkpoint, self.global_state
        if state is not None:
            load_adapter_state(edge.adapters, state)
        own = rundir.client_adapters_path(ckpt, client_id) if ckpt is not None else None
        personal = own is not None and own.is_file()
        bank = rundir.client_bank_path(ckpt, client_id) if ckpt is not None else None
        if personal and state is not None and bank.is_file():  # FedDPA-F's dual adapter
            top_k = self.cfg.method().options["top_k"]
            weighting = DynamicWeight(rundir.load_bank(bank), top_k=top_k)
            edge = DualEdge.around(edge, weighting=weighting).eval()
            edge.load_states(state, load_file(str(own)))
        elif personal:
            load_adapter_state(edge.adapters, load_file(str(own)))
        edge.requires_grad_(False)
        return ClientModel(
            client_id, f"{rundir.client_name(client_id)}@{self.checkpoint_name}", edge, personal
        )

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
        }

    # -- request path ------------------------------------------------------------------------------

    def _authorize(self, client_id: str, token: str) -> int:
        """The client id, if ``token`` is its token; else 403 with one body for every failure."""
        m = _CLIENT_ID.match(client_id.strip())
        cid = int(m.group(1)) if m else None
        if cid is not None and not 0 <= cid < len(self.tiers):
            cid = None
        try:
            ok = self.tokens.verify(cid, token)  # constant time, also for unknown clients
        except TokenError as e:
            raise HTTPError(
                503, f"the token store of this server is unusable: {e}", type="server_error"
            ) from e
        if not ok or cid is None:
            raise HTTPError(403, "this token is not valid for this client", type="permission_error")
        return cid

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
            out = await _call(self.llm, "generate", z, max_new_tokens, self.stop_token_ids)
        except Exception as e:  # the backend, not the request, failed
            raise HTTPError(
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
        self, client_id: str, body: AnswerRequest, token: Annotated[str, Depends(bearer_token)]
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
        responses=ERROR_RESPONSES,
        summary="OpenAI-style chat completion",
    )
    async def chat_completions(
        self, body: ChatCompletionRequest, token: Annotated[str, Depends(bearer_token)]
    ) -> ChatCompletionResponse:
        cid = self._authorize(body.model, token)
        max_new = body.new_tokens()
        model, out, n_prompt = await self._generate(cid, body.image_url(), body.question(), max_new)
        ids = list(out["token_ids"])
        return ChatCompletionResponse(
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
