"""An OpenAI-compatible API over the controller: the ``openai`` SDK, LangChain and evaluation harnesses talk to
LLaVA-Med unchanged.

    llava-med openai-api --controller-url http://localhost:21001 --port 8000
    # python: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none").chat.completions.create(...)

Endpoints (FastChat's design: its own process, a client of the controller and the workers):

* ``GET /v1/models`` (the controller's models), ``GET /health``;
* ``POST /v1/chat/completions``: content as a string or parts (``text``, ``image_url`` with a ``data:`` URL, or an
  ``http(s)`` URL only with ``--allow-image-urls``); the conversation is rendered by
  :func:`llava_med.chat.render_chat` with the template the serving worker reports, exactly as the web chat renders
  it; ``stream`` (SSE, ``stream_options.include_usage``, ``data: [DONE]``) or not;
* ``POST /v1/completions``: a raw, already templated prompt with one ``<image>`` per image in the ``images``
  extension field (base64 or data URLs), for harnesses that template themselves.

Errors come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the status of
:data:`llava_med.constants.HTTP_STATUS` (401 key, 404 model, 400 bad request, 503 no worker or busy, 504 timeout).
A client that disconnects cancels the generation on the worker. ``--api-keys`` (or ``LLAVA_MED_API_KEYS``) requires
``Authorization: Bearer <key>`` on every ``/v1`` route.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llava_med.chat import Message, render_chat
from llava_med.constants import DEFAULT_CONTROLLER_URL, DEFAULT_HOST, DEFAULT_OPENAI_PORT, ErrorCode, http_status
from llava_med.errors import BadRequestError, ImageError, LlavaMedError
from llava_med.images.decode import ImageLimits, fetch_url
from llava_med.sampling import MAX_NEW_TOKENS_LIMIT, WIRE_DEFAULTS, normalize_stop
from llava_med.serve import _http
from llava_med.serve.addresses import is_loopback
from llava_med.serve.client import (
    AsyncLlavaMedClient,
    ClientChunk,
    ClientConnectionError,
    ClientError,
    ClientTimeoutError,
    NoWorkerError,
    WorkerError,
    generate_payload,
)
from llava_med.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    OpenAIAssistantMessage,
    OpenAIChatMessage,
    OpenAIDelta,
    OpenAIErrorBody,
    OpenAIErrorResponse,
    OpenAIModelCard,
    OpenAIModelList,
    OpenAIUsage,
    WireModel,
)

__all__ = ["OpenAIServer", "build_parser", "create_app", "main"]

logger = logging.getLogger(__name__)

API_KEYS_ENV = "LLAVA_MED_API_KEYS"
#: OpenAI's default for /v1/completions; chat completions default to what the worker allows.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# error code -> OpenAI's error type and code strings
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 499: "invalid_request_error", 503: "service_unavailable", 504: "timeout"}
_OPENAI_CODES = {ErrorCode.INVALID_AUTH_KEY: "invalid_api_key", ErrorCode.INVALID_MODEL: "model_not_found",
                 ErrorCode.CONTEXT_OVERFLOW: "context_length_exceeded", ErrorCode.ENGINE_OVERLOADED: "server_busy"}


class APIError(LlavaMedError):
    """An error answered in OpenAI's shape; ``param`` names the request field at fault, when there is one."""

    def __init__(self, message: str, *, code: ErrorCode, param: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


def error_response(code: ErrorCode | int, message: str, param: str | None = None) -> JSONResponse:
    status = http_status(code)
    try:
        name = _OPENAI_CODES.get(ErrorCode(int(code))) or ErrorCode(int(code)).name.lower()
    except ValueError:
        name = str(int(code))
    body = OpenAIErrorResponse(error=OpenAIErrorBody(message=message, type=_OPENAI_TYPES.get(status, "server_error"),
                                                     param=param, code=name))
    return JSONResponse(body.model_dump(), status_code=status)


def _api_error(exc: BaseException) -> APIError:
    """Any failure of a request as an APIError naming the cause (never a traceback)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, WorkerError):
        return APIError(exc.message, code=exc.error_code)
    if isinstance(exc, ClientTimeoutError):
        return APIError(f"the worker did not answer in time: {exc}", code=ErrorCode.CONTROLLER_WORKER_TIMEOUT)
    if isinstance(exc, ClientConnectionError):
        return APIError(f"the serving stack cannot be reached: {exc}", code=ErrorCode.WORKER_UNREACHABLE)
    if isinstance(exc, LlavaMedError):
        return APIError(str(exc), code=exc.code)
    logger.exception("unexpected error")
    return APIError(f"internal error ({type(exc).__name__}); see the server's log", code=ErrorCode.INTERNAL_ERROR)


@dataclass
class _Job:
    """One generation: where it runs, what it asks, and what the answer is called."""

    model: str
    worker: str
    payload: dict[str, Any]
    prompt_echo: str = ""


class OpenAIServer:
    """State of the API server: the stack client, the keys, the image URL policy.

    Args:
        controller_url: the controller the workers are registered with.
        api_keys: keys accepted as ``Authorization: Bearer <key>`` on ``/v1`` routes (empty: open).
        allow_image_urls: fetch ``http(s)`` image URLs (off by default: a server fetching user URLs can be made to
            reach internal hosts).
        image_limits: byte limit of a fetched image (and of every image).
        image_url_timeout: seconds allowed for one image download.
        request_timeout: seconds to wait for a worker's next bytes.
        conv_mode: one template for every model (default: what each worker reports).
    """

    def __init__(self, controller_url: str = DEFAULT_CONTROLLER_URL, *, api_keys: Sequence[str] = (),
                 allow_image_urls: bool = False, image_limits: ImageLimits | None = None,
                 image_url_timeout: float = 10.0, request_timeout: float | None = None,
                 conv_mode: str | None = None) -> None:
        self.controller_url = controller_url.rstrip("/")
        self.api_keys = tuple(k for k in api_keys if k)
        self.allow_image_urls = allow_image_urls
        self.image_limits = image_limits or ImageLimits()
        self.image_url_timeout = image_url_timeout
        self.request_timeout = request_timeout
        self.conv_mode = conv_mode
        self._client: AsyncLlavaMedClient | None = None

    @property
    def client(self) -> AsyncLlavaMedClient:
        if self._client is None:
            self._client = AsyncLlavaMedClient(self.controller_url, timeout=self.request_timeout)
        return self._client

    async def start(self) -> None:
        self.client  # noqa: B018 - created in the serving loop

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------------------------------------ checks
    def check_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError("missing API key: send 'Authorization: Bearer <key>' (see --api-keys)",
                           code=ErrorCode.INVALID_AUTH_KEY)
        if not any(hmac.compare_digest(given.strip().encode(), key.encode()) for key in self.api_keys):
            raise APIError("invalid API key", code=ErrorCode.INVALID_AUTH_KEY)

    async def worker_for(self, model: str) -> str:
        """The worker that will answer ``model``: 404 for a model nobody serves, 503 when its workers are gone."""
        try:
            return await self.client.get_worker_address(model)  # one call to the controller when all is well
        except NoWorkerError:
            models = await self.client.list_models()
            if model not in models:
                raise APIError(f"the model {model!r} does not exist; available models: {models}",
                               code=ErrorCode.INVALID_MODEL, param="model") from None
            raise

    async def image(self, url: str, where: str) -> str:
        """What the worker receives for an ``image_url``: a data URL as is, an http(s) URL downloaded (only with
        ``--allow-image-urls``) and sent as base64."""
        head = url[:16].lower()
        if head.startswith("data:"):
            return url
        if head.startswith(("http://", "https://")):
            if not self.allow_image_urls:
                raise APIError(f"{where}: image URLs are not fetched by this server (start it with "
                               "--allow-image-urls); send the image as a data URL: data:image/png;base64,...",
                               code=ErrorCode.BAD_IMAGE, param="messages")
            try:
                data = await asyncio.to_thread(fetch_url, url, self.image_limits, self.image_url_timeout)
            except ImageError as exc:
                raise APIError(f"{where}: {exc}", code=exc.code, param="messages") from exc
            return base64.b64encode(data).decode("ascii")
        raise APIError(f"{where}: an image_url must be a data URL (data:image/png;base64,...) or, when the server "
                       "allows it, an http(s) URL", code=ErrorCode.BAD_IMAGE, param="messages")

    async def messages(self, items: list[OpenAIChatMessage]) -> list[Message]:
        out: list[Message] = []
        for i, item in enumerate(items):
            role = "system" if item.role == "developer" else item.role
            content = item.content
            if content is None or isinstance(content, str):
                out.append(Message(role, content or ""))
                continue
            parts: list[Any] = []
            for j, part in enumerate(content):
                if part.type == "text":
                    parts.append(part.text)
                else:
                    parts.append(_ImagePart(await self.image(part.url or "", f"messages[{i}].content[{j}]")))
            message = Message.from_parts(role, parts, is_image=lambda p: isinstance(p, _ImagePart))
            out.append(Message(role, message.text, tuple(p.data for p in message.images)))
        return out

    # ------------------------------------------------------------------------------------------------ generation
    async def chat_job(self, req: ChatCompletionRequest) -> _Job:
        worker = await self.worker_for(req.model)
        messages = await self.messages(req.messages)
        conv_mode = await self.client.conv_mode_for(worker, self.conv_mode)
        try:
            rendered = render_chat(messages, conv_mode)
        except LlavaMedError as exc:
            raise APIError(str(exc), code=exc.code, param="messages") from exc
        stop = normalize_stop(req.stop_strings, *rendered.stop)
        payload = self._payload(req, rendered.prompt, rendered.images, stop, req.max_new_tokens)
        return _Job(req.model, worker, payload)

    async def completion_job(self, req: CompletionRequest) -> _Job:
        worker = await self.worker_for(req.model)
        max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        payload = self._payload(req, req.text, req.images or [], req.stop_strings, max_tokens)
        return _Job(req.model, worker, payload, prompt_echo=req.text if req.echo else "")

    @staticmethod
    def _payload(req: ChatCompletionRequest | CompletionRequest, prompt: str, images: list[Any],
                 stop: Sequence[str], max_tokens: int | None) -> dict[str, Any]:
        # OpenAI's own defaults (temperature and top_p 1) are the wire's; without max_tokens, as many tokens as the
        # worker allows (its --max-new-tokens-cap) and the context holds.
        return generate_payload(
            req.model, prompt, images,
            temperature=WIRE_DEFAULTS.temperature if req.temperature is None else req.temperature,
            top_p=WIRE_DEFAULTS.top_p if req.top_p is None else req.top_p,
            max_new_tokens=max_tokens if max_tokens is not None else MAX_NEW_TOKENS_LIMIT,
            stop=list(stop), seed=req.seed, echo=False,
        )

    async def first_and_rest(self, job: _Job) -> tuple[ClientChunk, AsyncIterator[ClientChunk]]:
        """Start the generation and wait for its first chunk, so that a refusal (bad image, busy, too long) is
        answered with its HTTP status before any byte of a stream is sent."""
        chunks = self.client.generate_stream(job.worker, job.payload)
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            raise APIError("the worker ended the stream without an answer", code=ErrorCode.INTERNAL_ERROR) from None
        except BaseException:
            await _http.aclose_quietly(chunks)
            raise
        return first, chunks


class _ImagePart:
    __slots__ = ("data",)

    def __init__(self, data: str) -> None:
        self.data = data


def _usage(chunk: ClientChunk) -> OpenAIUsage:
    return OpenAIUsage(**(chunk.usage or {}))


def _finish_reason(chunk: ClientChunk) -> str:
    return chunk.finish_reason if chunk.finish_reason in ("stop", "length") else "stop"


def _sse(model: WireModel | dict[str, Any]) -> bytes:
    data = model.model_dump(exclude_none=True) if isinstance(model, WireModel) else model
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _Answer:
    """The deltas of a cumulative stream (the worker sends the whole answer so far)."""

    def __init__(self) -> None:
        self.text = ""

    def delta(self, chunk: ClientChunk) -> str:
        if not chunk.output.startswith(self.text):
            return ""
        new, self.text = chunk.output[len(self.text):], chunk.output
        return new


async def _collect(first: ClientChunk, rest: AsyncIterator[ClientChunk]) -> ClientChunk:
    last = first
    async for chunk in rest:
        last = chunk
    return last


# ---------------------------------------------------------------------------------------------------------------- app


def create_app(server: OpenAIServer, *, enable_docs: bool = False) -> FastAPI:
    """The API's FastAPI app (``/docs`` only with ``enable_docs``)."""
    app = _http.service_app("LLaVA-Med OpenAI-compatible API", server, "openai", enable_docs=enable_docs)

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        err = _api_error(exc)
        if err.code != ErrorCode.INTERNAL_ERROR:
            logger.info("%s %s: %s (%s)", request.method, request.url.path, err, int(err.code))
        return error_response(err.code, str(err), err.param)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(ErrorCode.INTERNAL_ERROR, f"internal error ({type(exc).__name__}); see the server's log")

    app.add_exception_handler(LlavaMedError, on_api_error)
    app.add_exception_handler(ClientError, on_api_error)
    app.add_exception_handler(Exception, on_unexpected)

    async def parse(request: Request, model_cls: type[WireModel]) -> Any:
        server.check_key(request)
        try:
            return await _http.read_model(request, model_cls)
        except BadRequestError as exc:
            field = str(exc).split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
            raise APIError(str(exc), code=exc.code, param=field if field in model_cls.model_fields else None) from exc

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "controller_url": server.controller_url}

    @app.get("/v1/models")
    async def list_models(request: Request) -> OpenAIModelList:
        server.check_key(request)
        created = int(time.time())
        return OpenAIModelList(data=[OpenAIModelCard(id=m, created=created) for m in await server.client.list_models()])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        job = await server.chat_job(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            last = await _http.until_disconnected(request, _collect(*await server.first_and_rest(job)))
            return ChatCompletionResponse(
                id=rid, created=created, model=job.model, usage=_usage(last),
                choices=[ChatCompletionChoice(message=OpenAIAssistantMessage(content=last.output),
                                              finish_reason=_finish_reason(last))])
        first, rest = await server.first_and_rest(job)

        def event(delta: OpenAIDelta, finish: str | None = None) -> bytes:
            return _sse(ChatCompletionChunk(id=rid, created=created, model=job.model, choices=[
                ChatCompletionChunkChoice(delta=delta, finish_reason=finish)]))

        async def events() -> AsyncIterator[bytes]:
            answer = _Answer()
            yield event(OpenAIDelta(role="assistant", content=""))
            async for chunk in _chain(first, rest):
                text = answer.delta(chunk)
                if text:
                    yield event(OpenAIDelta(content=text))
                if chunk.finish_reason is not None:
                    yield event(OpenAIDelta(), _finish_reason(chunk))
                    if req.include_usage:
                        yield _sse(ChatCompletionChunk(id=rid, created=created, model=job.model, choices=[],
                                                       usage=_usage(chunk)))

        return _event_stream(events(), rest)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        req: CompletionRequest = await parse(request, CompletionRequest)
        job = await server.completion_job(req)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def response(text: str, finish: str | None, usage: OpenAIUsage | None = None) -> CompletionResponse:
            return CompletionResponse(id=rid, created=created, model=job.model, usage=usage,
                                      choices=[CompletionChoice(text=text, finish_reason=finish)])

        if not req.stream:
            last = await _http.until_disconnected(request, _collect(*await server.first_and_rest(job)))
            return response(job.prompt_echo + last.output, _finish_reason(last), _usage(last))
        first, rest = await server.first_and_rest(job)

        async def events() -> AsyncIterator[bytes]:
            answer = _Answer()
            if job.prompt_echo:
                yield _sse(response(job.prompt_echo, None))
            async for chunk in _chain(first, rest):
                text = answer.delta(chunk)
                finish = _finish_reason(chunk) if chunk.finish_reason is not None else None
                if text or finish:
                    yield _sse(response(text, finish))
                if finish and req.include_usage:
                    yield _sse(CompletionResponse(id=rid, created=created, model=job.model, choices=[],
                                                  usage=_usage(chunk)))

        return _event_stream(events(), rest)

    return app


def _event_stream(events: AsyncIterator[bytes], upstream: AsyncIterator[ClientChunk]) -> Any:
    """The SSE response: ``events``, then ``data: [DONE]``. A failure after the first byte (the worker died) is
    one ``error`` event; the upstream stream is closed in every case, so a client that leaves cancels on the worker."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        except (ClientError, LlavaMedError) as exc:
            err = _api_error(exc)
            yield _sse({"error": {"message": str(err), "type": "server_error", "code": int(err.code)}})
        finally:
            await _http.aclose_quietly(events)
            await _http.aclose_quietly(upstream)
        yield b"data: [DONE]\n\n"

    return _http.ClosingStreamingResponse(body(), media_type="text/event-stream")


async def _chain(first: ClientChunk, rest: AsyncIterator[ClientChunk]) -> AsyncIterator[ClientChunk]:
    yield first
    async for chunk in rest:
        yield chunk


# ---------------------------------------------------------------------------------------------------------------- cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-med openai-api",
                                description="OpenAI-compatible API (/v1) over a LLaVA-Med controller and its workers.")
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_OPENAI_PORT, help="default %(default)s")
    p.add_argument("--controller-url", "--controller-address", dest="controller_url", default=DEFAULT_CONTROLLER_URL,
                   help="default %(default)s")
    p.add_argument("--api-keys", default=None,
                   help=f"comma-separated keys required as 'Authorization: Bearer <key>' (default: env {API_KEYS_ENV}; "
                        "none: open)")
    p.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image URLs (off: only data URLs are accepted)")
    p.add_argument("--max-image-bytes", type=int, default=ImageLimits().max_bytes,
                   help="largest image accepted or downloaded (default %(default)s)")
    p.add_argument("--image-url-timeout", type=float, default=10.0, help="seconds for one image download")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds to wait for a worker's next bytes (default: env LLAVA_MED_WORKER_API_TIMEOUT or 100)")
    p.add_argument("--conv-mode", default=None, help="one prompt template for every model (default: each worker's)")
    p.add_argument("--enable-docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _http.configure_logging(args.log_level)
    keys = [k.strip() for k in (args.api_keys or os.environ.get(API_KEYS_ENV, "")).split(",") if k.strip()]
    server = OpenAIServer(
        args.controller_url, api_keys=keys, allow_image_urls=args.allow_image_urls,
        image_limits=ImageLimits(max_bytes=args.max_image_bytes), image_url_timeout=args.image_url_timeout,
        request_timeout=args.request_timeout, conv_mode=args.conv_mode,
    )
    if not keys and not is_loopback(args.host):
        logger.warning("serving /v1 on %s without --api-keys: anyone who can reach it may use the models", args.host)
    logger.info("OpenAI-compatible API at %s/v1 (controller %s, %s)", _http.advertised_url(args.host, args.port),
                args.controller_url, f"{len(keys)} API key(s)" if keys else "no API key required")
    _http.build_server(create_app(server, enable_docs=args.enable_docs), args.host, args.port, args.log_level).run()


if __name__ == "__main__":
    main()
