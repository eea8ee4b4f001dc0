"""Constants shared by every part of the stack.

Timings can be overridden by environment variables; they are read when asked for (functions below), so
nothing here is mutated at run time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import IntEnum
from types import MappingProxyType

# The image placeholder of prompts and its sentinel token id, as in the original LLaVA code base.
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"

# Default ports and addresses of the original project (all bound to loopback by default here).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_CONTROLLER_PORT = 21001
DEFAULT_WORKER_PORT = 21002
DEFAULT_WEB_PORT = 7860
DEFAULT_OPENAI_PORT = 8000
DEFAULT_CONTROLLER_URL = f"http://localhost:{DEFAULT_CONTROLLER_PORT}"
DEFAULT_WORKER_URL = f"http://localhost:{DEFAULT_WORKER_PORT}"

# The message the original clients show; ours always adds the real cause after it.
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"

RESEARCH_ONLY_NOTICE = (
    "LLaVA-Med is for research use only. It is not a medical device and must not be used for clinical "
    "diagnosis, treatment or any other clinical decision."
)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not a number") from exc


def worker_heart_beat_interval() -> float:
    """Seconds between a worker's heartbeats (env LLAVA_MED_WORKER_HEART_BEAT_INTERVAL, default 15)."""
    return _env_float("LLAVA_MED_WORKER_HEART_BEAT_INTERVAL", 15.0)


def controller_heart_beat_expiration() -> float:
    """Seconds after which the controller drops a silent worker (env LLAVA_MED_CONTROLLER_HEART_BEAT_EXPIRATION, default 30)."""
    return _env_float("LLAVA_MED_CONTROLLER_HEART_BEAT_EXPIRATION", 30.0)


def worker_api_timeout() -> float:
    """Seconds a controller or client waits on a worker before giving up (env LLAVA_MED_WORKER_API_TIMEOUT, default 100)."""
    return _env_float("LLAVA_MED_WORKER_API_TIMEOUT", 100.0)


class ErrorCode(IntEnum):
    """Error codes carried in stream chunks (``error_code``); 0 means no error."""

    OK = 0
    BAD_REQUEST = 40001
    BAD_IMAGE = 40002
    IMAGE_COUNT_MISMATCH = 40003
    INVALID_AUTH_KEY = 40101
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    ENGINE_OVERLOADED = 42903
    CANCELLED = 49901
    INTERNAL_ERROR = 50001
    OUT_OF_MEMORY = 50002
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006
    WORKER_UNREACHABLE = 50007
    RELAY_LOOP = 50008


#: The HTTP status every server answers for an error code (where a status is sent at all: the original stream
#: endpoints always answer 200 and carry the code in their one error chunk). The README's table lists it.
HTTP_STATUS: Mapping[ErrorCode, int] = MappingProxyType({
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.BAD_IMAGE: 400,
    ErrorCode.IMAGE_COUNT_MISMATCH: 400,
    ErrorCode.PARAM_OUT_OF_RANGE: 400,
    ErrorCode.CONTEXT_OVERFLOW: 400,
    ErrorCode.INVALID_AUTH_KEY: 401,
    ErrorCode.INVALID_MODEL: 404,
    ErrorCode.ENGINE_OVERLOADED: 503,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.OUT_OF_MEMORY: 503,
    ErrorCode.CONTROLLER_NO_WORKER: 503,
    ErrorCode.CONTROLLER_WORKER_TIMEOUT: 504,
    ErrorCode.WORKER_UNREACHABLE: 503,
    ErrorCode.RELAY_LOOP: 508,
})


def http_status(code: ErrorCode | int) -> int:
    """The HTTP status for ``code`` (:data:`HTTP_STATUS`; unknown codes: 500)."""
    try:
        return HTTP_STATUS[ErrorCode(int(code))]
    except (ValueError, KeyError):
        return 500
