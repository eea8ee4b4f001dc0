"""Every wire model of the serving stack, and the null-byte stream framing, in one place.

(Longer than the other modules on purpose: one module holds every wire model, the original protocol's and the
OpenAI-compatible API's, with the framing and the parsing helpers, so a change of the wire shows in one file.)

The controller and worker endpoints, and their JSON bodies, stay compatible with the original LLaVA / FastChat
clients (described in the README, "Serving: controller, workers and clients by hand"):

* controller: ``/register_worker``, ``/receive_heart_beat``, ``/refresh_all_workers``, ``/list_models``,
  ``/get_worker_address``, ``/worker_generate_stream``, ``/worker_get_status``;
* worker: ``/worker_generate_stream``, ``/worker_get_status`` (plus new ones: ``/health``, ``/worker_generate``,
  ``/count_token``, ``/model_details``).

A generation stream is a sequence of JSON objects, each followed by one ``b"\\0"``:
``{"text": ..., "error_code": 0}``. ``text`` is cumulative and starts with the prompt unless the request asked
for ``echo: false``. An error is a final chunk with ``error_code != 0`` whose text starts with the message the
original clients show (:data:`SERVER_ERROR_MSG`) and then names the real cause.

Unknown request fields are ignored everywhere, as in the original.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from llava_med.constants import SERVER_ERROR_MSG, ErrorCode
from llava_med.errors import BadRequestError
from llava_med.serve.addresses import canonical_url
from llava_med.sampling import (
    MAX_NEW_TOKENS_LIMIT,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    WIRE_DEFAULTS,
    SamplingParams,
    normalize_stop,
)

__all__ = [
    "ErrorCode",
    "SERVER_ERROR_MSG",
    "CHUNK_DELIMITER",
    "AUTH_TOKEN_ENV",
    "default_auth_token",
    "auth_headers",
    "WireModel",
    "KVCacheStatus",
    "WorkerStatus",
    "RegisterWorkerRequest",
    "RegisterWorkerResponse",
    "HeartBeatRequest",
    "HeartBeatResponse",
    "ListModelsResponse",
    "RefreshAllWorkersResponse",
    "GetWorkerAddressRequest",
    "GetWorkerAddressResponse",
    "GenerateRequest",
    "CountTokenRequest",
    "CountTokenResponse",
    "ModelDetailsResponse",
    "HealthResponse",
    "ErrorResponse",
    "StreamChunk",
    "StreamProtocolError",
    "FrameSplitter",
    "encode_chunk",
    "parse_chunk",
    "iter_chunks",
    "aiter_chunks",
    "error_chunk",
    "error_cause",
    "shown",
    "MAX_JSON_DEPTH",
    "OVERLOAD_CODES",
    "validation_error_message",
    "validation_error_code",
    "parse_json_body",
    "parse_model",
    "parse_generate_request",
]

CHUNK_DELIMITER = b"\0"

#: Environment variable holding the optional shared secret that protects worker registration.
AUTH_TOKEN_ENV = "LLAVA_MED_AUTH_TOKEN"


def default_auth_token() -> str | None:
    """The shared secret from the environment (None when unset or empty)."""
    return os.environ.get(AUTH_TOKEN_ENV) or None


def auth_headers(token: str | None) -> dict[str, str]:
    """``Authorization: Bearer <token>`` when a token is set."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class WireModel(BaseModel):
    """Base of every wire model: unknown fields are ignored, as the original servers did."""

    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------------------------------------------
# Controller <-> worker


#: Highest relative speed a worker may report (it weighs the lottery dispatch; infinity would win every draw).
MAX_WORKER_SPEED = 1000.0


class KVCacheStatus(WireModel):
    """A worker's KV cache (engines that have one): ``slots`` requests fit at once, each with room for
    ``slot_tokens``; ``slots_used`` and ``tokens_used`` are taken now; ``bytes`` were allocated at start."""

    slots: int = Field(ge=0)
    slots_used: int = Field(ge=0)
    slot_tokens: int = Field(ge=0)
    tokens_used: int = Field(ge=0)
    bytes: int = Field(ge=0)


class WorkerStatus(WireModel):
    """What ``/worker_get_status`` answers (a worker for itself, a controller for all its workers).

    New, optional fields: ``instance_id`` is the same for every address of one running worker (the controller keeps
    one entry per instance, however many aliases, ``localhost``, ``127.0.0.1``, ..., it is registered under);
    ``kv_cache`` (left out when absent) describes the engine's KV cache."""

    model_names: list[StrictStr]
    speed: float = Field(default=1, ge=0, le=MAX_WORKER_SPEED, allow_inf_nan=False)
    queue_length: int = Field(default=0, ge=0)
    instance_id: StrictStr | None = Field(default=None, max_length=128)
    kv_cache: KVCacheStatus | None = None

    @model_serializer(mode="wrap")
    def _leave_out_absent_kv_cache(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("kv_cache") is None:
            data.pop("kv_cache", None)
        return data


class RegisterWorkerRequest(WireModel):
    """``POST /register_worker``. The controller never trusts ``worker_status``: it asks the worker itself."""

    worker_name: StrictStr = Field(min_length=1, max_length=2048)
    check_heart_beat: bool = True
    worker_status: dict[str, Any] | None = None

    @field_validator("worker_name")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return canonical_url(value)


class RegisterWorkerResponse(WireModel):
    registered: bool = True
    worker_name: str
    worker_status: WorkerStatus


class HeartBeatRequest(WireModel):
    """``POST /receive_heart_beat``."""

    worker_name: StrictStr = Field(max_length=2048)
    queue_length: int = Field(default=0, ge=0)

    @field_validator("worker_name")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return canonical_url(value)


class HeartBeatResponse(WireModel):
    """``exist: false`` tells the worker to register again (the controller restarted or dropped it)."""

    exist: bool


class ListModelsResponse(WireModel):
    models: list[str]


class WorkerEntry(WireModel):
    """One worker as the controller knows it (``/list_workers``, new; ``llava-med status`` prints them)."""

    address: str
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    seconds_since_seen: float
    instance_id: str | None = None
    aliases: list[str] = Field(default_factory=list)


class WorkerListResponse(WireModel):
    workers: list[WorkerEntry]


class RefreshAllWorkersResponse(WireModel):
    models: list[str]
    workers: list[str]
    removed: list[str] = Field(default_factory=list)


class GetWorkerAddressRequest(WireModel):
    model: StrictStr


class GetWorkerAddressResponse(WireModel):
    """``address`` is ``""`` when no worker serves the model (original behaviour)."""

    address: str


# --------------------------------------------------------------------------------------------------------------
# Generation


class GenerateRequest(WireModel):
    """Body of ``/worker_generate_stream`` (worker and controller) and ``/worker_generate``.

    ``prompt`` is already templated and holds one ``<image>`` per image. ``max_new_tokens`` above the worker's
    cap (1024 by default, like the original) is capped, not refused. ``echo=False`` (new) makes ``text`` hold
    only the generated text.
    """

    model: StrictStr | None = None
    prompt: StrictStr
    images: list[StrictStr] | None = None
    temperature: float = Field(default=WIRE_DEFAULTS.temperature, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(default=WIRE_DEFAULTS.top_p, gt=0.0, le=1.0, allow_inf_nan=False)
    max_new_tokens: int = Field(default=WIRE_DEFAULTS.max_new_tokens, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    stop: StrictStr | list[StrictStr] | None = None
    echo: bool = True
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False
    image_process_mode: StrictStr | None = None
    # How DICOM images of this request are rendered (others ignore them): a window preset, "stored", "auto" or
    # "C,W", and a 0-based frame of multi-frame files (default: the stored window and the middle frame).
    dicom_window: StrictStr | None = None
    dicom_frame: int | None = Field(default=None, ge=0, le=1_000_000)

    @field_validator("dicom_window")
    @classmethod
    def _known_window(cls, value: str | None) -> str | None:
        from llava_med.images.dicom import normalize_window  # numpy/PIL only when the field is used

        return normalize_window(value)

    @property
    def dicom_options(self) -> Any:
        """The :class:`~llava_med.images.dicom.DicomOptions` of the request, or None when it sets none."""
        if self.dicom_window is None and self.dicom_frame is None:
            return None
        from llava_med.images.dicom import DicomOptions

        return DicomOptions(self.dicom_window, self.dicom_frame)

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        """At most MAX_STOP_STRINGS stop strings of MAX_STOP_CHARS characters (shared with the /v1 API)."""
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        too_long = [s for s in stops if len(s) > MAX_STOP_CHARS]
        if too_long:
            raise ValueError(f"stop strings are limited to {MAX_STOP_CHARS} characters, got one of {len(too_long[0])}")
        return value

    @property
    def num_images(self) -> int:
        return len(self.images or [])

    def sampling_params(self, default_stop: str | None = None) -> SamplingParams:
        """The request's sampling settings. ``default_stop`` (the served template's stop string) applies only when
        the request has no ``stop`` field; an explicit ``stop`` (even ``""``, as the original clients send for
        "none") replaces it."""
        stop = normalize_stop(self.stop) if self.stop is not None else normalize_stop(None, default_stop)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              stop=stop, seed=self.seed, ignore_eos=self.ignore_eos)


class CountTokenRequest(WireModel):
    prompt: StrictStr


class CountTokenResponse(WireModel):
    count: int
    error_code: int = 0


class ModelDetailsResponse(WireModel):
    context_length: int


class ConvTemplateResponse(WireModel):
    """``/worker_get_conv_template``: the prompt template the served checkpoint was trained with."""

    conv_mode: str | None = None


class HealthResponse(WireModel):
    """``GET /health``: ``ok`` (200), ``loading`` or ``error`` (503)."""

    status: str
    model_names: list[str] | None = None
    queue_length: int | None = None
    workers: int | None = None
    error: str | None = None


class ErrorResponse(WireModel):
    """JSON body of a non-streaming error answer (4xx/5xx)."""

    error_code: int
    message: str
    text: str = ""


# --------------------------------------------------------------------------------------------------------------
# OpenAI-compatible API (``/v1``, served by llava_med.serve.openai_api): the subset LLaVA-Med serves. Unknown request
# fields are ignored, as OpenAI clients expect.


class OpenAIImageURL(WireModel):
    url: StrictStr = Field(min_length=1)
    detail: str | None = None


class OpenAIContentPart(WireModel):
    """A part of a message's content: ``{"type": "text", "text"}`` or ``{"type": "image_url", "image_url"}``."""

    type: Literal["text", "image_url"]
    text: StrictStr | None = None
    image_url: OpenAIImageURL | StrictStr | None = None

    @model_validator(mode="after")
    def _has_its_payload(self) -> OpenAIContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url': {'url': ...}")
        return self

    @property
    def url(self) -> str | None:
        return self.image_url.url if isinstance(self.image_url, OpenAIImageURL) else self.image_url


class OpenAIChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[OpenAIContentPart] | None = None


class OpenAIStreamOptions(WireModel):
    include_usage: bool = False


class _OpenAIRequest(WireModel):
    model: StrictStr = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = 1
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    stop: StrictStr | list[StrictStr] | None = None
    stream: bool = False
    stream_options: OpenAIStreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported (one answer per request), got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        return GenerateRequest._bounded_stop(value)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return normalize_stop(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_OpenAIRequest):
    """``POST /v1/chat/completions``."""

    messages: list[OpenAIChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions``: a raw (already templated) prompt with one ``<image>`` per image; ``images`` (an
    extension) holds the images as base64 strings or data URLs. ``max_tokens`` defaults to 16, as OpenAI's."""

    prompt: StrictStr | list[StrictStr]
    images: list[StrictStr] | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got {len(value)}")
        return value

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class OpenAIUsage(WireModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class OpenAIAssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(WireModel):
    index: int = 0
    message: OpenAIAssistantMessage
    finish_reason: str | None = None


class ChatCompletionResponse(WireModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: OpenAIUsage


class OpenAIDelta(WireModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(WireModel):
    index: int = 0
    delta: OpenAIDelta
    finish_reason: str | None = None


class ChatCompletionChunk(WireModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: OpenAIUsage | None = None


class CompletionChoice(WireModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(WireModel):
    """A ``text_completion``, or one chunk of a streamed one (``usage`` on the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


class OpenAIModelCard(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-med"


class OpenAIModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModelCard]


class OpenAIErrorBody(WireModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(WireModel):
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error shape."""

    error: OpenAIErrorBody


# --------------------------------------------------------------------------------------------------------------
# Stream framing


class StreamChunk(WireModel):
    """One element of a generation stream. ``finish_reason`` and ``usage`` are sent on the last chunk only."""

    text: str
    error_code: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    @property
    def is_error(self) -> bool:
        return self.error_code != 0


class StreamProtocolError(ValueError):
    """The bytes received are not a valid chunk stream (bad JSON, or a stream cut inside a chunk)."""


def encode_chunk(chunk: StreamChunk | dict[str, Any]) -> bytes:
    """Serialise one chunk: compact JSON (None fields left out) followed by one ``b"\\0"``."""
    if isinstance(chunk, StreamChunk):
        data = chunk.model_dump(exclude_none=True)
    else:
        data = {k: v for k, v in chunk.items() if v is not None}
    # ensure_ascii (json's default, as in the original) keeps every control byte escaped: no NUL inside.
    return json.dumps(data).encode("utf-8") + CHUNK_DELIMITER


def parse_chunk(data: bytes | str) -> StreamChunk:
    """Parse one chunk (without its delimiter)."""
    try:
        return StreamChunk.model_validate_json(data)
    except ValidationError as exc:
        shown = data[:200] if isinstance(data, (bytes, str)) else data
        raise StreamProtocolError(f"invalid stream chunk {shown!r}: {validation_error_message(exc)}") from exc


class FrameSplitter:
    """Splits a byte stream into its frames (the bytes between two ``b"\\0"``), however the bytes arrive.

    ``feed`` returns the frames completed by new bytes, ``finish`` what is left at the end (a last frame sent
    without its delimiter). Empty frames (keep-alives) are skipped. The controller's relay forwards frames as they
    are; :func:`iter_chunks` parses them.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        *complete, self._buffer = self._buffer.split(CHUNK_DELIMITER)
        return [part for part in complete if part.strip()]

    def finish(self) -> list[bytes]:
        rest, self._buffer = self._buffer, b""
        return [rest] if rest.strip() else []


def _parse_last(frames: list[bytes]) -> list[StreamChunk]:
    try:
        return [parse_chunk(frame) for frame in frames]
    except StreamProtocolError as exc:
        raise StreamProtocolError(f"stream ended inside a chunk ({len(frames[-1])} bytes left over)") from exc


def iter_chunks(byte_iterable: Iterable[bytes]) -> Iterator[StreamChunk]:
    """Split a byte stream on ``b"\\0"`` and parse each chunk (empty ones, used as keep-alives, are skipped)."""
    splitter = FrameSplitter()
    for data in byte_iterable:
        for frame in splitter.feed(data):
            yield parse_chunk(frame)
    yield from _parse_last(splitter.finish())


async def aiter_chunks(byte_iterable: AsyncIterable[bytes]) -> AsyncIterator[StreamChunk]:
    """Async variant of :func:`iter_chunks`."""
    splitter = FrameSplitter()
    async for data in byte_iterable:
        for frame in splitter.feed(data):
            yield parse_chunk(frame)
    for chunk in _parse_last(splitter.finish()):
        yield chunk


#: The errors that really are overload or network conditions: only their chunks carry the original clients'
#: "NETWORK ERROR DUE TO HIGH TRAFFIC" banner (a bad image or a prompt too long is not high traffic).
OVERLOAD_CODES = frozenset({ErrorCode.ENGINE_OVERLOADED, ErrorCode.OUT_OF_MEMORY, ErrorCode.CONTROLLER_WORKER_TIMEOUT,
                            ErrorCode.WORKER_UNREACHABLE})
_CODE_PREFIX = "(error_code: "
_ERROR_PREFIX = SERVER_ERROR_MSG + "\n\n" + _CODE_PREFIX


def error_chunk(code: ErrorCode | int, message: str) -> StreamChunk:
    """A final error chunk: ``(error_code: N) cause``, after the original clients' banner for overload and network
    conditions (:data:`OVERLOAD_CODES`)."""
    code = int(code)
    prefix = _ERROR_PREFIX if code in OVERLOAD_CODES else _CODE_PREFIX
    return StreamChunk(text=f"{prefix}{code}) {message}", error_code=code, finish_reason="error")


def error_cause(chunk: StreamChunk) -> str:
    """The cause written by :func:`error_chunk` (the whole text for chunks from other servers)."""
    text = chunk.text
    for prefix in (_ERROR_PREFIX, _CODE_PREFIX):
        if text.startswith(prefix):
            return text[len(prefix):].partition(") ")[2]
    return text


def shown(value: Any, limit: int = 60) -> str:
    """A user-provided value as error messages quote it: repr, cut to ``limit`` characters (a 100 KB model name is
    not echoed back whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Validation messages

_RANGE_ERRORS = {
    "greater_than": ("must be >", "gt"),
    "greater_than_equal": ("must be >=", "ge"),
    "less_than": ("must be <", "lt"),
    "less_than_equal": ("must be <=", "le"),
}
_TYPE_WORDS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "missing": "is required",
}


def _loc_name(loc: tuple[Any, ...]) -> str:
    # Union members add their type name to the location (stop.str, stop.list[str]); keep field path only.
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif _is_union_member(item):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "body"


def _is_union_member(item: Any) -> bool:
    return isinstance(item, str) and ("[" in item or item in {"str", "int", "float", "bool", "none"})


def validation_error_message(exc: ValidationError) -> str:
    """One line naming each bad field, e.g. ``max_new_tokens: must be >= 1, got -5``.

    A union (``content``: a string or a list of parts) reports one error per member; a type mismatch with one member
    is left out when another member got further (``messages[0].content[0].type``), so the message names the cause.
    """
    errors = [(err, _loc_name(tuple(err.get("loc", ())))) for err in exc.errors(include_url=False)]
    names = [name for _, name in errors]

    def noise(err: dict[str, Any], name: str) -> bool:
        mismatch = str(err.get("type", "")).endswith("_type") and any(map(_is_union_member, err.get("loc", ())))
        return mismatch and any(other != name and other.startswith(name) for other in names)

    seen: dict[str, str] = {}
    for err, name in errors:
        if name in seen or noise(err, name):  # a union reports one error per member; the first is enough
            continue
        kind = err.get("type", "")
        ctx = err.get("ctx") or {}
        if kind in _RANGE_ERRORS:
            words, key = _RANGE_ERRORS[kind]
            text = f"{words} {ctx.get(key)}"
        elif kind in _TYPE_WORDS:
            text = _TYPE_WORDS[kind]
        elif kind == "string_too_short":
            text = "must not be empty"
        elif kind == "value_error":  # our own validators: their message names the value
            text = str(ctx.get("error") or err.get("msg", "is invalid"))
        else:
            text = str(err.get("msg", "is invalid"))
            text = text[:1].lower() + text[1:]
        if kind not in ("missing", "value_error") and "input" in err:
            text += f", got {shown(err['input'])}"
        seen[name] = f"{name}: {text}"
    return "; ".join(seen.values()) or str(exc)


def validation_error_code(exc: ValidationError) -> ErrorCode:
    """PARAM_OUT_OF_RANGE when every problem is a value out of its range, otherwise BAD_REQUEST."""
    kinds = {err.get("type") for err in exc.errors(include_url=False)}
    if kinds and kinds <= set(_RANGE_ERRORS):
        return ErrorCode.PARAM_OUT_OF_RANGE
    return ErrorCode.BAD_REQUEST


#: Deepest JSON nesting a request may have (the deepest body of the protocol, an OpenAI chat with image parts, has 5).
MAX_JSON_DEPTH = 32
_JSON_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body`` nests arrays/objects deeper than ``limit``, found by scanning only the structural characters
    (so a body of 100,000 ``[`` is refused before the parser recurses into it)."""
    depth = 0
    in_string = False
    skip_to = -1
    for match in _JSON_STRUCTURE.finditer(body):
        pos = match.start()
        if pos < skip_to:
            continue
        char = body[pos]
        if in_string:
            if char == 0x5C:  # a backslash escapes the next character
                skip_to = pos + 2
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif char in (0x5D, 0x7D):
            depth -= 1
    return False


def _check_unicode(value: Any, where: str = "body") -> None:
    """Refuse strings that are not valid Unicode (a lone surrogate such as "\\ud800" decodes from JSON but cannot be
    encoded, tokenised or logged)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequestError(
                f"{where} is not valid Unicode: it holds an unpaired surrogate ({value[exc.start]!r} at character "
                f"{exc.start}); send UTF-8 text"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, key if where == "body" else f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{where}[{i}]")


def parse_json_body(body: bytes | str) -> dict[str, Any]:
    """Decode a JSON object body, or raise :class:`BadRequestError` saying what is wrong with it (not JSON, nested
    deeper than :data:`MAX_JSON_DEPTH`, not an object, strings that are not valid Unicode)."""
    if not body or not body.strip():
        raise BadRequestError("the request body is empty; send a JSON object")
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if json_depth_exceeds(raw):
        raise BadRequestError(f"the request body nests JSON arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    _check_unicode(data)
    return data


def parse_model(model_cls: type[WireModel], data: Any) -> Any:
    """Validate ``data`` (a dict or raw JSON bytes) into ``model_cls``, raising typed errors with clear text."""
    if isinstance(data, (bytes, str)):
        data = parse_json_body(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise BadRequestError(validation_error_message(exc), code=validation_error_code(exc)) from exc


def parse_generate_request(body: bytes | str | dict[str, Any]) -> GenerateRequest:
    """Parse a generate body; errors are :class:`LlavaMedError` with BAD_REQUEST or PARAM_OUT_OF_RANGE."""
    return parse_model(GenerateRequest, body)
