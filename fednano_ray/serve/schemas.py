"""HTTP request/response models of the Serve app, and image decoding with size limits.

Everything a caller sends is validated here, at the edge, into typed objects; a bad request is
answered with a 4xx and a message that says what to change (:class:`HTTPError`), never a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import uuid
import warnings
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

MAX_IMAGE_BYTES = 4 * 1024 * 1024  # decoded image file
MAX_IMAGE_CHARS = (
    MAX_IMAGE_BYTES * 4
) // 3 + 256  # its base64 text, plus room for a data-URI header
MAX_IMAGE_SIDE = 4096  # pixels, checked from the header before decoding (no decompression bombs)
MAX_BODY_BYTES = MAX_IMAGE_CHARS + 64 * 1024  # whole request body, checked before JSON parsing
MAX_QUESTION_CHARS = 500
MAX_NEW_TOKENS = 64
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

#: A client id as the API takes it: ASCII decimal, no sign, no leading zeros, no spaces. Python's
#: int() would also take "٠", "𝟎", "00" and " 0" (all 0): one client, one spelling.
CLIENT_ID_PATTERN = r"^(0|[1-9][0-9]{0,8})$"
_CLIENT_ID = re.compile(r"0|[1-9][0-9]{0,8}")
_CLIENT_NAME = re.compile(r"client_([0-9]{5,9})")

_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
    re.IGNORECASE,
)


def parse_client_id(text: str, *, named: bool = False) -> int | None:
    """The client id ``text`` spells canonically, else None.

    Args:
        text: ``"3"`` (the path's ``{client_id}``, chat completions' ``model``).
        named: also take the client's name, exactly as the server writes it (``"client_00003"``,
            :func:`fednano_ray.federation.rundir.client_name`).
    """
    if _CLIENT_ID.fullmatch(text):
        return int(text)
    m = _CLIENT_NAME.fullmatch(text) if named else None
    if m is not None:
        from fednano_ray.federation.rundir import client_name

        cid = int(m.group(1))
        if client_name(cid) == text:
            return cid
    return None


class HTTPError(Exception):
    """A request the app refuses: an HTTP status and a message a person can act on."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def body(self) -> dict:
        """OpenAI's error shape, used by every route so clients parse one format."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description='Where the problem is, e.g. ["body", "question"].')
    msg: str
    type: str | None = None


class ErrorInfo(BaseModel):
    message: str = Field(description="What is wrong with the request and what to change.")
    type: str = Field(
        description="invalid_request_error, authentication_error, permission_error or server_error."
    )
    param: str | None = Field(None, description="The request field at fault, when there is one.")
    code: int = Field(description="The HTTP status.")
    details: list[ErrorDetail] | None = Field(
        None, description="Validation errors (422) only: one entry per problem."
    )


class ErrorResponse(BaseModel):
    """The body of every error response (OpenAI's shape; see :meth:`HTTPError.body`)."""

    error: ErrorInfo


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# ``pattern: \S`` (not blank) is documented in the schema but checked by the validators below, whose
# messages say what to do; likewise the greedy-only settings of the chat request.
_NONBLANK = {"pattern": r"\S"}
Question = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUESTION_CHARS)]
Choice = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    Field(json_schema_extra=_NONBLANK),
]


def _only(value: float | bool, json_type: str) -> dict:
    """JSON schema of an optional field that accepts just ``value`` (a documented constraint)."""
    return {"anyOf": [{"type": json_type, "enum": [value]}, {"type": "null"}]}


def _nonblank(v: str, what: str) -> str:
    if not v.strip():
        raise ValueError(f"{what} is blank; send some text")
    return v


class AnswerRequest(_Model):
    """``POST /v1/clients/{client_id}/answer``: one image, one question, optional choices."""

    image: str = Field(
        description=f"The image as base64 or a data URI (data:image/png;base64,...); PNG, JPEG, "
        f"WebP, GIF or BMP, at most {MAX_IMAGE_BYTES // (1024 * 1024)} MiB and {MAX_IMAGE_SIDE} px "
        "a side.",
        min_length=1,
    )
    question: Question = Field(
        description=f"The question about the image, 1..{MAX_QUESTION_CHARS} characters, not blank.",
        json_schema_extra=_NONBLANK,
    )
    choices: list[Choice] | None = Field(
        None,
        min_length=2,
        max_length=10,
        json_schema_extra={"uniqueItems": True},
        description="Optional candidate answers (2..10, each 1..100 characters, distinct). "
        "When the generated answer equals one of them (case-insensitive), the response's "
        "`choice` is its index.",
    )
    max_new_tokens: int = Field(
        16, ge=1, le=MAX_NEW_TOKENS, description="Most tokens to generate (greedy)."
    )

    @field_validator("question")
    @classmethod
    def _question(cls, v: str) -> str:
        return _nonblank(v, "question")

    @field_validator("choices")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            folded = [c.casefold() for c in v]
            dup = sorted({c for c in v if folded.count(c.casefold()) > 1})
            if dup:
                raise ValueError(f"choices must be distinct (ignoring case); repeated: {dup}")
        return v


class AnswerResponse(_Model):
    client_id: int = Field(description="The client whose personalised model answered.")
    answer: str = Field(description="The generated answer text (greedy decoding).")
    choice: int | None = Field(
        description="Index of the choice the answer equals (case-insensitive), else null."
    )
    model: str = Field(
        description="Which adapters answered: client id and checkpoint, e.g. "
        "client_00003@round_0002."
    )


# -- OpenAI-style chat completions -----------------------------------------------------------------


class ImageURL(_Model):
    url: str = Field(description="A data URI (data:image/png;base64,...); no web URLs.")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted for compatibility; ignored."
    )


class TextPart(_Model):
    type: Literal["text"]
    text: str = Field(max_length=MAX_QUESTION_CHARS)


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] = Field(
        description="Text, or a list of text and image_url parts."
    )
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool | None = Field(
        None, description="Send a last chunk with the token usage (and no choices)."
    )


class ChatCompletionRequest(_Model):
    """``POST /v1/chat/completions``, the subset of OpenAI's request this single-turn VQA model
    serves.

    ``model`` is the client id (``"3"``, as ``GET /v1/models`` lists it) or its name
    (``"client_00003"``). Exactly one user message with exactly one image; system messages are
    accepted and ignored (the model has a fixed prompt); no assistant history. Decoding is greedy
    only: ``temperature`` must be 0 or absent, ``top_p`` 1, ``n`` 1. ``stream: true`` answers with
    server-sent events (``chat.completion.chunk``, then ``data: [DONE]``).
    """

    model: str = Field(
        max_length=32,
        description='The client id whose personalised model answers: "3" (ASCII decimal, no '
        'leading zeros or spaces), or its name "client_00003". It must be the token\'s client.',
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=8)
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS, description="Most tokens to generate (default 16)."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS, description="Alias of max_tokens."
    )
    temperature: float | None = Field(
        None,
        description="Must be 0 or absent: the model decodes greedily.",
        json_schema_extra=_only(0, "number"),
    )
    top_p: float | None = Field(
        None,
        description="Must be 1 or absent (greedy decoding).",
        json_schema_extra=_only(1, "number"),
    )
    n: int | None = Field(
        None, description="Must be 1 or absent.", json_schema_extra=_only(1, "integer")
    )
    stream: bool | None = Field(
        None,
        description="Answer with server-sent events (text/event-stream): chat.completion.chunk "
        "objects, then `data: [DONE]`. The answer is decoded first (errors are plain JSON with "
        "their status), then sent as one content chunk.",
    )
    stream_options: StreamOptions | None = Field(None, description="With stream only.")
    seed: int | None = Field(None, description="Accepted; greedy decoding is deterministic anyway.")
    user: str | None = Field(None, max_length=256, description="Accepted; ignored.")

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.temperature not in (None, 0):
            raise ValueError(
                f"temperature={self.temperature:g} is not supported: this server decodes greedily "
                "only; send temperature 0 or leave it out"
            )
        if self.top_p not in (None, 1):
            raise ValueError("top_p must be 1 or absent: this server decodes greedily only")
        if self.n not in (None, 1):
            raise ValueError("n must be 1 or absent: one completion per request")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if any(m.role == "assistant" for m in self.messages):
            raise ValueError(
                "assistant messages are not supported: this is a single-turn model; "
                "send one user message"
            )
        users = [m for m in self.messages if m.role == "user"]
        if len(users) != 1:
            raise ValueError(f"send exactly one user message (got {len(users)})")
        content = users[0].content
        images = (
            [p for p in content if isinstance(p, ImagePart)] if isinstance(content, list) else []
        )
        if len(images) != 1:
            raise ValueError(
                "the user message needs exactly one image part "
                f'{{"type": "image_url", "image_url": '
                f'{{"url": "data:image/png;base64,..."}}}} (got {len(images)})'
            )
        if not self.question().strip():
            raise ValueError("the user message has no text: add a text part with the question")
        if len(self.question()) > MAX_QUESTION_CHARS:
            raise ValueError(f"the question is longer than {MAX_QUESTION_CHARS} characters")
        return self

    def _user(self) -> ChatMessage:
        return next(m for m in self.messages if m.role == "user")

    def question(self) -> str:
        content = self._user().content
        if isinstance(content, str):
            return content
        return "\n".join(p.text for p in content if isinstance(p, TextPart))

    def image_url(self) -> str:
        content = self._user().content
        assert isinstance(content, list)
        return next(p.image_url.url for p in content if isinstance(p, ImagePart))

    def new_tokens(self) -> int:
        return self.max_tokens or self.max_completion_tokens or 16


class ChatMessageOut(_Model):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Model):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(_Model):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Model):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Model):
    """One server-sent event of a streamed completion (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


def chat_chunks(response: ChatCompletionResponse, *, include_usage: bool) -> list[str]:
    """A finished completion as OpenAI's stream: the role, the content, the finish reason, the
    usage (if asked), then ``[DONE]``; each a ``data: ...`` server-sent event."""
    (choice,) = response.choices
    head = {"id": response.id, "created": response.created, "model": response.model}
    chunks = [
        ChatCompletionChunk(
            **head, choices=[ChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))]
        ),
        ChatCompletionChunk(
            **head,
            choices=[ChunkChoice(index=0, delta=ChatDelta(content=choice.message.content))],
        ),
        ChatCompletionChunk(
            **head,
            choices=[ChunkChoice(index=0, delta=ChatDelta(), finish_reason=choice.finish_reason)],
        ),
    ]
    if include_usage:
        chunks.append(ChatCompletionChunk(**head, choices=[], usage=response.usage))
    events = [f"data: {c.model_dump_json(exclude_none=True)}\n\n" for c in chunks]
    return [*events, "data: [DONE]\n\n"]


def _inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its ``$defs`` inlined (none of these models is recursive), so
    it can stand inside an OpenAPI document, whose ``#/$defs`` would not resolve."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target = defs[node["$ref"].rsplit("/", 1)[-1]]
                return walk({**target, **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def chat_stream_event_schema() -> dict:
    """The OpenAPI schema of one server-sent event of a streamed chat completion (OpenAPI < 3.2:
    a text/event-stream ``schema`` describes each event): ``data`` is a chunk's JSON, or
    ``[DONE]`` last."""
    chunk = _inlined(ChatCompletionChunk.model_json_schema(mode="serialization"))
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": chunk,
                    },
                ],
                "description": "A chat.completion.chunk as JSON; `[DONE]` ends the stream.",
            },
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
    }


# -- models ----------------------------------------------------------------------------------------


class ModelCard(_Model):
    id: str = Field(description="The caller's client id: the `model` of chat completions.")
    object: Literal["model"] = "model"
    created: int = Field(description="When this server replica started (Unix seconds).")
    owned_by: str = Field(description='The client whose adapters answer, e.g. "client_00003".')


class ModelList(_Model):
    """``GET /v1/models``: the caller's own model only (a token sees no other client)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- images ----------------------------------------------------------------------------------------


def decode_image_bytes(text: str) -> bytes:
    """Base64 or a ``data:`` URI -> the image file's bytes.

    Raises:
        HTTPError: 400 for anything that is not base64 / a base64 data URI (web URLs are refused:
            the server fetches nothing), 413 when it is too large.
    """
    s = text.strip()
    if s.lower().startswith(("http://", "https://")):
        raise HTTPError(
            400,
            "image URLs are not fetched: send the image inline as base64 or a data URI "
            "(data:image/png;base64,...)",
            param="image",
        )
    if s.lower().startswith("data:"):
        m = _DATA_URI.match(s)
        if m is None:
            raise HTTPError(
                400, "malformed data URI: expected data:image/<type>;base64,<data>", param="image"
            )
        if not m.group("b64"):
            raise HTTPError(
                400,
                "data URI is not base64-encoded: use data:image/<type>;base64,<data>",
                param="image",
            )
        mime = (m.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise HTTPError(
                400,
                f"data URI has media type {mime!r}; send an image (image/png, image/jpeg, ...)",
                param="image",
            )
        s = s[m.end() :]
    s = "".join(s.split())  # line-wrapped base64 is common
    if len(s) > MAX_IMAGE_CHARS:
        raise HTTPError(
            413,
            f"image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB; send a smaller image",
            param="image",
        )
    s = s.replace("-", "+").replace("_", "/")  # accept the URL-safe alphabet too
    s += "=" * (-len(s) % 4)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPError(
            400,
            f"image is not valid base64 ({e}); encode the file's bytes with base64",
            param="image",
        ) from None
    if not raw:
        raise HTTPError(400, "image is empty", param="image")
    if len(raw) > MAX_IMAGE_BYTES:
        raise HTTPError(
            413,
            f"image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB; send a smaller image",
            param="image",
        )
    return raw


def decode_image(text: str):
    """Base64 / data URI -> an RGB ``PIL.Image``, with size limits checked before pixels are
    decoded.

    Raises:
        HTTPError: 400 (not base64, not an image, unsupported format, corrupt), 413 (too large).
    """
    from PIL import Image, UnidentifiedImageError

    raw = decode_image_bytes(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # reads the header only
            w, h = im.size
            if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_SIDE * MAX_IMAGE_SIDE:
                raise HTTPError(
                    413,
                    f"image is {w}x{h} px; the limit is {MAX_IMAGE_SIDE} px a side",
                    param="image",
                )
            if w < 1 or h < 1:
                raise HTTPError(400, f"image is {w}x{h} px", param="image")
            im.seek(0)  # first frame of an animation
            return im.convert("RGB")
    except HTTPError:
        raise
    except UnidentifiedImageError:
        raise HTTPError(
            400,
            f"the data is not an image in a supported format ({', '.join(IMAGE_FORMATS)})",
            param="image",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise HTTPError(413, f"image has too many pixels: {e}", param="image") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise HTTPError(
            400, f"the image could not be decoded (truncated or corrupt?): {e}", param="image"
        ) from None
