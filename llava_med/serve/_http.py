"""HTTP helpers shared by the controller and the worker: streaming, errors, auth, logging, running uvicorn."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llava_med.constants import ErrorCode, http_status
from llava_med.errors import BadRequestError, LlavaMedError
from llava_med.serve.protocol import (  # noqa: F401 - auth helpers re-exported for the servers
    AUTH_TOKEN_ENV,
    ErrorResponse,
    WireModel,
    auth_headers,
    default_auth_token,
    encode_chunk,
    error_chunk,
    parse_model,
)

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=WireModel)

#: The stream media type; the original servers sent StreamingResponse's default (none), clients do not check it.
STREAM_MEDIA_TYPE = "application/octet-stream"


class AuthError(LlavaMedError):
    code = ErrorCode.INVALID_AUTH_KEY


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its async iterator when the response ends.

    Starlette (ASGI http spec < 2.4, which uvicorn reports) cancels the streaming task when the client
    disconnects: the generator gets a CancelledError if it was awaiting inside, but stays suspended at its
    ``yield`` if the cancellation hit while sending, to be closed whenever the garbage collector runs. Closing
    it here makes cancellation immediate and deterministic (the generator's ``finally`` runs now).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await aclose_quietly(self.body_iterator)


async def aclose_quietly(iterator: Any) -> None:
    """``aclose()`` an async iterator (in the calling task, like ``contextlib.aclosing``); errors are logged.

    Closing an exhausted or never-started generator is a no-op. Generators should clean up without awaiting:
    the caller may be inside a cancelled scope (a disconnected client), where any await raises again.
    """
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # noqa: BLE001 - cleanup must not mask the real outcome
        logger.exception("error while closing a stream")


#: How often a handler that is not streaming checks whether its client is still there.
DISCONNECT_POLL_INTERVAL = 0.25


class ClientDisconnected(LlavaMedError):
    """The client left before its answer was ready (the work was cancelled)."""

    code = ErrorCode.CANCELLED

    def __init__(self) -> None:
        super().__init__("the client disconnected")


async def until_disconnected(request: Request, work: Any) -> Any:
    """Await ``work``. Starlette does not cancel a plain handler when its client leaves: poll, and if the client
    disconnects first, cancel ``work`` (freeing its slot) and raise :class:`ClientDisconnected`."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_INTERVAL)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientDisconnected()
    return task.result()


async def single_chunk_stream(code: ErrorCode | int, message: str) -> AsyncIterator[bytes]:
    yield encode_chunk(error_chunk(code, message))


def stream_response(iterator: AsyncIterator[bytes], status_code: int = 200) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(iterator, status_code=status_code, media_type=STREAM_MEDIA_TYPE)


def error_json(code: ErrorCode | int, message: str, status_code: int | None = None) -> JSONResponse:
    chunk = error_chunk(code, message)
    body = ErrorResponse(error_code=int(code), message=message, text=chunk.text)
    return JSONResponse(body.model_dump(), status_code=status_code or http_status(code))


async def stop_task(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait for it; a failure it ended with is logged, never raised."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # noqa: BLE001 - shutting down: report and go on
        logger.exception("background task %s failed", task.get_name())


def service_app(title: str, service: Any, state_name: str, *, enable_docs: bool = False) -> FastAPI:
    """A FastAPI app whose lifespan runs ``await service.start()`` and ``await service.close()``, with the service on
    ``app.state.<state_name>`` and the shared error handlers installed. Routes are added by the caller.
    ``/docs`` and ``/openapi.json`` are served only with ``enable_docs`` (``--enable-docs``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title=title, lifespan=lifespan, **docs)
    setattr(app.state, state_name, service)
    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every non-streaming endpoint answers typed errors as ``{error_code, message, text}`` JSON."""

    async def on_llava_med_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LlavaMedError)
        return error_json(exc.code, str(exc))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_json(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    app.add_exception_handler(LlavaMedError, on_llava_med_error)
    app.add_exception_handler(Exception, on_unexpected)


#: Default limit on request bodies (base64 images included).
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


async def read_body(request: Request, limit: int = DEFAULT_MAX_REQUEST_BYTES) -> bytes:
    """The request body, refusing (BadRequestError) bodies over ``limit`` bytes without reading them whole. A
    client that leaves in the middle of its upload is a CANCELLED error, logged without a traceback."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequestError(f"the request body has {int(declared)} bytes, more than the limit of {limit}")
    parts: list[bytes] = []
    size = 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise BadRequestError(f"the request body is larger than the limit of {limit} bytes")
            parts.append(part)
    except ClientDisconnect:
        logger.info("%s: the client left before sending its whole request (%d bytes)", request.url.path, size)
        raise LlavaMedError("the client disconnected before its request was complete",
                            code=ErrorCode.CANCELLED) from None
    return b"".join(parts)


async def read_model(request: Request, model_cls: type[M], limit: int = DEFAULT_MAX_REQUEST_BYTES) -> M:
    """Parse the request body into ``model_cls``; BadRequestError (400) with a message naming the field."""
    return parse_model(model_cls, await read_body(request, limit))


def check_bearer(request: Request, token: str | None) -> None:
    """Require ``Authorization: Bearer <token>`` when a token is configured."""
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise AuthError("this endpoint needs the header 'Authorization: Bearer <token>' (see --auth-token)")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AuthError("wrong auth token (see --auth-token / LLAVA_MED_AUTH_TOKEN)")


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
    )
    # httpx logs every request at INFO (heartbeats included); our own modules log what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def build_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for ``app``; ``server.run()`` blocks, ``server.should_exit = True`` stops it."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        log_config=None,  # keep the standard logging set up by configure_logging
    )
    return uvicorn.Server(config)


def advertised_url(host: str, port: int) -> str:
    """The URL others use to reach a server bound to ``host:port``."""
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"
