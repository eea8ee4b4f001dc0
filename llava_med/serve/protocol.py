"""Every wire model of the serving stack, and the null-byte stream framing, in one place.

The controller and worker endpoints, and their JSON bodies, stay compatible with the original LLaVA / FastChat
clients (the table is in the README, "Wire protocol"):

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
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from llava_med.constants import SERVER_ERROR_MSG, ErrorCode
from llava_med.errors import BadRequestError
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


class WorkerStatus(WireModel):
    """What ``/worker_get_status`` answers (a worker for itself, a controller for all its workers)."""

    model_names: list[str]
    speed: float = Field(default=1, ge=0)
    queue_length: int = Field(default=0, ge=0)


class RegisterWorkerRequest(WireModel):
    """``POST /register_worker``; a null ``worker_status`` makes the controller ask the worker itself."""

    worker_name: StrictStr = Field(min_length=1)
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None

    @field_validator("worker_name")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be the worker's URL, e.g. http://localhost:21002")
        return value


class RegisterWorkerResponse(WireModel):
    registered: bool = True
    worker_name: str
    worker_status: WorkerStatus


class HeartBeatRequest(WireModel):
    """``POST /receive_heart_beat``."""

    worker_name: StrictStr
    queue_length: int = Field(default=0, ge=0)

    @field_validator("worker_name")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.strip().rstrip("/")


class HeartBeatResponse(WireModel):
    """``exist: false`` tells the worker to register again (the controller restarted or dropped it)."""

    exist: bool


class ListModelsResponse(WireModel):
    models: list[str]


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


_ERROR_PREFIX = SERVER_ERROR_MSG + "\n\n(error_code: "


def error_chunk(code: ErrorCode | int, message: str) -> StreamChunk:
    """A final error chunk: the original clients' message, then the code and the real cause."""
    code = int(code)
    return StreamChunk(text=f"{_ERROR_PREFIX}{code}) {message}", error_code=code, finish_reason="error")


def error_cause(chunk: StreamChunk) -> str:
    """The cause written by :func:`error_chunk` (the whole text for chunks from other servers)."""
    text = chunk.text
    if text.startswith(_ERROR_PREFIX):
        _, _, rest = text[len(_ERROR_PREFIX):].partition(") ")
        return rest
    return text


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


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _loc_name(loc: tuple[Any, ...]) -> str:
    # Union members add their type name to the location (stop.str, stop.list[str]); keep field path only.
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and ("[" in item or item in {"str", "int", "float", "bool", "none"}):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "body"


def validation_error_message(exc: ValidationError) -> str:
    """One line naming each bad field, e.g. ``max_new_tokens: must be >= 1, got -5``."""
    seen: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        name = _loc_name(tuple(err.get("loc", ())))
        if name in seen:  # a union reports one error per member; the first is enough
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
        else:
            text = str(err.get("msg", "is invalid"))
            text = text[:1].lower() + text[1:]
        if kind != "missing" and "input" in err:
            text += f", got {_short_repr(err['input'])}"
        seen[name] = f"{name}: {text}"
    return "; ".join(seen.values()) or str(exc)


def validation_error_code(exc: ValidationError) -> ErrorCode:
    """PARAM_OUT_OF_RANGE when every problem is a value out of its range, otherwise BAD_REQUEST."""
    kinds = {err.get("type") for err in exc.errors(include_url=False)}
    if kinds and kinds <= set(_RANGE_ERRORS):
        return ErrorCode.PARAM_OUT_OF_RANGE
    return ErrorCode.BAD_REQUEST


def parse_json_body(body: bytes | str) -> dict[str, Any]:
    """Decode a JSON object body, or raise :class:`BadRequestError` saying what is wrong with it."""
    if not body or not body.strip():
        raise BadRequestError("the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequestError(f"the request body must be a JSON object, got {type(data).__name__}")
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
