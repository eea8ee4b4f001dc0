"""A model worker: serves one engine over HTTP, registers with the controller and heartbeats.

Endpoints:

* ``POST /worker_generate_stream``: the original null-byte framed stream. Invalid requests (malformed JSON, wrong
  types, missing prompt, values out of range) get status 200 and ONE error chunk naming the field, exactly like
  engine errors, so the original clients show the cause; they never see a 4xx/5xx from this endpoint.
* ``POST /worker_generate``: the same, not streamed: the final chunk as JSON (200, ``error_code`` says failure).
* ``POST /worker_get_status``, ``GET /health`` (503 ``loading`` until the model is loaded), ``POST /count_token``,
  ``POST /model_details``, ``POST /worker_get_conv_template`` (``{"conv_mode": name}``: the prompt template of the
  served model, so that clients such as the web UI build prompts the way the checkpoint was trained).

Run: ``python -m llava_med.serve.model_worker --controller http://localhost:21001 --port 40000
--worker http://localhost:40000 --model-path microsoft/llava-med-v1.5-mistral-7b``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llava_med.constants import (
    DEFAULT_CONTROLLER_URL,
    DEFAULT_HOST,
    DEFAULT_WORKER_PORT,
    DEFAULT_WORKER_URL,
    ErrorCode,
    worker_heart_beat_interval,
)
from llava_med.conversation import stop_str_for
from llava_med.engine.base import Engine, EngineRequest, GenerationOutput
from llava_med.engine.registry import add_engine_args, build_engine
from llava_med.errors import LlavaMedError
from llava_med.model.prompting import check_prompt_chars
from llava_med.model.args import add_model_args
from llava_med.serve import _http
from llava_med.serve.protocol import (
    CountTokenRequest,
    CountTokenResponse,
    GenerateRequest,
    HealthResponse,
    ConvTemplateResponse,
    ModelDetailsResponse,
    StreamChunk,
    WorkerStatus,
    encode_chunk,
    error_chunk,
    parse_generate_request,
    shown,
)
from llava_med.serve.metrics import CONTENT_TYPE, WorkerMetrics, error_label

__all__ = ["ModelWorker", "build_parser", "create_app", "main", "parse_args", "worker_from_args"]

logger = logging.getLogger(__name__)

#: The original worker capped max_new_tokens at 1024.
DEFAULT_MAX_NEW_TOKENS_CAP = 1024
#: Generations admitted at once when the engine does not say (the original worker's default).
DEFAULT_LIMIT_MODEL_CONCURRENCY = 5
CONTROLLER_TIMEOUT = 5.0
RETRY_MIN_DELAY = 0.5
#: After a request starts or ends the worker heartbeats early (the original did at every request), at most this
#: often, so the controller's queue lengths stay honest.
EARLY_HEARTBEAT_GAP = 0.5


def _error_code_for(exc: BaseException) -> ErrorCode:
    if isinstance(exc, LlavaMedError):
        return exc.code
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):  # torch.cuda.OutOfMemoryError
        return ErrorCode.OUT_OF_MEMORY
    return ErrorCode.INTERNAL_ERROR


class ModelWorker:
    """Holds the engine, bounds concurrency, counts requests, registers and heartbeats.

    Args:
        engine: the engine to serve (loaded by :meth:`start`).
        worker_addr: the URL the controller and clients use to reach this worker.
        controller_addr: the controller's URL.
        limit_model_concurrency: generations running at once; more wait (and count in the queue length).
        stream_interval: send every n-th output (the last is always sent).
        max_new_tokens_cap: requests asking for more new tokens are capped to this (like the original's 1024).
        no_register: do not register with a controller.
        heart_beat_interval: seconds between heartbeats (default: constants / env).
        auth_token: sent as ``Authorization: Bearer`` when registering and heartbeating.
        speed: relative speed reported to the controller (weights its dispatch).
        transport: httpx transport for the controller connection (tests).
        on_load_failure: called with the exception when the model fails to load (``main`` stops the server).
        max_request_bytes: request body limit.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        worker_addr: str = DEFAULT_WORKER_URL,
        controller_addr: str = DEFAULT_CONTROLLER_URL,
        limit_model_concurrency: int = 5,
        stream_interval: int = 1,
        max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP,
        no_register: bool = False,
        heart_beat_interval: float | None = None,
        auth_token: str | None = None,
        speed: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        on_load_failure: Callable[[BaseException], None] | None = None,
        max_request_bytes: int = _http.DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        if limit_model_concurrency < 1:
            raise ValueError(f"limit_model_concurrency must be >= 1, got {limit_model_concurrency}")
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        if max_new_tokens_cap < 1:
            raise ValueError(f"max_new_tokens_cap must be >= 1, got {max_new_tokens_cap}")
        interval = worker_heart_beat_interval() if heart_beat_interval is None else heart_beat_interval
        if interval <= 0:
            raise ValueError(f"heart_beat_interval must be > 0 seconds, got {interval}")
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.engine = engine
        self.worker_addr = worker_addr.rstrip("/")
        self.controller_addr = controller_addr.rstrip("/")
        self.limit_model_concurrency = limit_model_concurrency
        self.stream_interval = stream_interval
        self.max_new_tokens_cap = max_new_tokens_cap
        self.no_register = no_register
        self.heart_beat_interval = float(interval)
        self.auth_token = auth_token or None
        self.speed = float(speed)
        self.max_request_bytes = max_request_bytes
        self._transport = transport
        self._on_load_failure = on_load_failure
        self.load_error: str | None = None
        self.registered = False
        # Honest request counters (never semaphore internals).
        self.running = 0
        self.waiting = 0
        self.total_requests = 0
        # Loop-bound objects are created by start(), in the serving loop.
        self._semaphore: asyncio.Semaphore | None = None
        self._wake: asyncio.Event | None = None
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        #: Tells this worker's status apart from every other's (the controller collapses aliases of one worker).
        self.instance_id = uuid.uuid4().hex
        self.metrics = WorkerMetrics(self.queue_length, engine.metrics)

    # ------------------------------------------------------------------------------------------------ status
    @property
    def model_names(self) -> list[str]:
        return list(self.engine.model_names)

    @property
    def ready(self) -> bool:
        return self.engine.ready and self.error is None

    @property
    def error(self) -> str | None:
        """Why the worker cannot serve: its model failed to load, or its engine broke afterwards."""
        return self.load_error or self.engine.health_error

    def queue_length(self) -> int:
        """Requests holding a generation slot plus requests waiting for one."""
        return self.running + self.waiting

    def get_status(self) -> WorkerStatus:
        return WorkerStatus(model_names=self.model_names, speed=self.speed, queue_length=self.queue_length(),
                            instance_id=self.instance_id, kv_cache=self.engine.kv_cache_status())

    # ------------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start loading the model in the background, then register and heartbeat (unless ``no_register``)."""
        self._semaphore = asyncio.Semaphore(self.limit_model_concurrency)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._load_then_register(), name="worker-load-and-heartbeat")

    async def close(self) -> None:
        task, self._task = self._task, None
        await _http.stop_task(task)
        try:
            await self.engine.shutdown()
        except Exception:  # noqa: BLE001
            logger.exception("engine shutdown failed")
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport, timeout=CONTROLLER_TIMEOUT, trust_env=False,
                headers=_http.auth_headers(self.auth_token),
            )
        return self._client

    async def _load_then_register(self) -> None:
        logger.info("loading the model for %s ...", self.model_names)
        try:
            await self.engine.start()
        except Exception as exc:  # noqa: BLE001 - reported on /health and in the log
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("the model failed to load")
            if self._on_load_failure is not None:
                self._on_load_failure(exc)
            return
        logger.info("model loaded: %s (context length %s)", self.model_names, self.engine.context_length)
        if not self.no_register:
            await self._heartbeat_loop()

    async def register_to_controller(self) -> None:
        data = {"worker_name": self.worker_addr, "check_heart_beat": True,
                "worker_status": self.get_status().model_dump()}
        resp = await self.http.post(self.controller_addr + "/register_worker", json=data)
        if resp.status_code != 200:
            raise RuntimeError(f"the controller refused the registration: HTTP {resp.status_code} {resp.text[:300]}")
        self.registered = True
        logger.info("registered with the controller %s as %s", self.controller_addr, self.worker_addr)

    async def send_heart_beat(self) -> bool:
        """One heartbeat; returns the controller's ``exist``."""
        resp = await self.http.post(
            self.controller_addr + "/receive_heart_beat",
            json={"worker_name": self.worker_addr, "queue_length": self.queue_length()},
        )
        if resp.status_code != 200:
            raise RuntimeError(f"heartbeat refused: HTTP {resp.status_code} {resp.text[:300]}")
        exist = bool(resp.json()["exist"])
        logger.debug("heartbeat: queue length %d, exist=%s", self.queue_length(), exist)
        return exist

    async def _heartbeat_loop(self) -> None:
        delay = RETRY_MIN_DELAY
        need_register = True
        while True:
            if self.error is not None:
                # A broken engine (e.g. a GPU left unusable) stops heartbeating: the controller drops this worker
                # after its expiration and routes to the others; /health keeps saying why.
                logger.error("not heartbeating any more: %s", self.error)
                return
            try:
                if need_register:
                    await self.register_to_controller()
                    need_register = False
                elif not await self.send_heart_beat():
                    logger.warning("the controller does not know this worker (restarted?): registering again")
                    self.registered = False
                    need_register = True
                    continue
                delay = RETRY_MIN_DELAY
                await self._wait_next_beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - controller down or refusing: retry with backoff
                what = "registration" if need_register else "heartbeat"
                logger.warning("%s to %s failed (%s: %s); retrying in %.1f s", what, self.controller_addr,
                               type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max(self.heart_beat_interval, RETRY_MIN_DELAY))

    async def _wait_next_beat(self) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self.heart_beat_interval)
        except asyncio.TimeoutError:
            pass
        else:
            await asyncio.sleep(EARLY_HEARTBEAT_GAP)  # coalesce a burst of request starts/ends
        self._wake.clear()

    def _queue_changed(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------------------------------------ generation
    def check_prompt(self, prompt: str) -> None:
        """Refuse a prompt longer than the context can hold, by its characters, before anything is tokenised."""
        check_prompt_chars(prompt, self.engine.max_prompt_chars, self.engine.context_length)

    def engine_request(self, request: GenerateRequest) -> EngineRequest:
        """The wire request as the engine takes it: the model name checked (when the request names one), the prompt
        measured, sampling settings validated, the served template's stop string added when the request names none,
        ``max_new_tokens`` capped like the original worker."""
        if request.model is not None and request.model not in self.model_names:
            raise LlavaMedError(f"this worker serves {self.model_names}, not the model {shown(request.model)}",
                                code=ErrorCode.INVALID_MODEL)
        self.check_prompt(request.prompt)
        params = request.sampling_params(stop_str_for(self.engine.conv_mode)).capped(self.max_new_tokens_cap)
        return EngineRequest(prompt=request.prompt, images=tuple(request.images or ()), params=params,
                             image_mode=request.image_process_mode, dicom=request.dicom_options)

    async def generate_chunks(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        """The chunks of one request, errors included; waits for a slot; closing it cancels the generation.
        Every request is counted in the metrics (errors by code, time to first text, latency, tokens)."""
        started = time.monotonic()
        first = True
        self.metrics.requests.inc()
        chunks = self._chunks(request)
        try:
            async for chunk in chunks:
                if chunk.error_code:
                    self.metrics.errors.labels(error_label(chunk.error_code)).inc()
                elif first:
                    first = False
                    self.metrics.ttft.observe(time.monotonic() - started)
                if chunk.usage:
                    self.metrics.tokens.inc(chunk.usage.get("completion_tokens", 0))
                yield chunk
        finally:
            await _http.aclose_quietly(chunks)
            self.metrics.latency.observe(time.monotonic() - started)

    async def _chunks(self, request: GenerateRequest) -> AsyncIterator[StreamChunk]:
        if not self.ready:
            if self.load_error is not None:
                yield error_chunk(ErrorCode.INTERNAL_ERROR, f"the model failed to load: {self.load_error}")
            elif self.error is not None:
                yield error_chunk(ErrorCode.INTERNAL_ERROR, f"the worker cannot serve: {self.error}")
            else:
                yield error_chunk(ErrorCode.ENGINE_OVERLOADED,
                                  "the model is still loading; retry when GET /health answers 200")
            return
        try:
            engine_request = self.engine_request(request)
        except LlavaMedError as exc:
            yield error_chunk(exc.code, str(exc))
            return
        if self._semaphore is None:  # used without start() (tests of the class alone)
            self._semaphore = asyncio.Semaphore(self.limit_model_concurrency)
        self.total_requests += 1
        self.waiting += 1
        self._queue_changed()
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        outputs: AsyncIterator[GenerationOutput] | None = None
        frames: AsyncIterator[StreamChunk] | None = None
        try:
            try:
                outputs = self.engine.generate_stream(engine_request)
                frames = self._frames(request, outputs)
                async for chunk in frames:
                    yield chunk
            except LlavaMedError as exc:
                logger.info("request refused: %s (error_code %d)", exc, int(exc.code))
                yield error_chunk(exc.code, str(exc))
            except Exception as exc:  # noqa: BLE001 - the worker keeps serving
                logger.exception("generation failed")
                yield error_chunk(_error_code_for(exc), f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                if frames is not None:
                    await _http.aclose_quietly(frames)
                if outputs is not None:
                    await _http.aclose_quietly(outputs)
        finally:
            self.running -= 1
            self._semaphore.release()
            self._queue_changed()

    async def _frames(self, request: GenerateRequest, outputs: AsyncIterator[GenerationOutput]
                      ) -> AsyncIterator[StreamChunk]:
        prefix = request.prompt if request.echo else ""
        count = 0
        last: GenerationOutput | None = None
        last_sent = False
        async for out in outputs:
            count += 1
            last = out
            last_sent = out.finish_reason is not None or count % self.stream_interval == 0
            if last_sent:
                yield StreamChunk(text=prefix + out.text, finish_reason=out.finish_reason,
                                  usage=out.usage() if out.finish_reason else None)
            if out.finish_reason is not None:
                return
        # The engine ended without a final output (or it was not sent because of stream_interval).
        final = last or GenerationOutput(text="")
        if not last_sent or final.finish_reason is None:
            yield StreamChunk(text=prefix + final.text, finish_reason=final.finish_reason or "stop",
                              usage=final.usage())

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[bytes]:
        """The wire stream of one request."""
        chunks = self.generate_chunks(request)
        try:
            async for chunk in chunks:
                yield encode_chunk(chunk)
        finally:
            await _http.aclose_quietly(chunks)

    async def generate(self, request: GenerateRequest) -> StreamChunk:
        """Run one request to the end; the final chunk (an error chunk on failure)."""
        final: StreamChunk | None = None
        chunks = self.generate_chunks(request)
        try:
            async for chunk in chunks:
                final = chunk
        finally:
            await _http.aclose_quietly(chunks)
        assert final is not None
        return final


# ---------------------------------------------------------------------------------------------------------------- app


def create_app(worker: ModelWorker, *, enable_docs: bool = False) -> FastAPI:
    """The worker's FastAPI app; its lifespan loads the model in the background and runs the heartbeat."""

    app = _http.service_app("LLaVA-Med model worker", worker, "worker", enable_docs=enable_docs)

    async def parse(request: Request) -> GenerateRequest:
        return parse_generate_request(await _http.read_body(request, worker.max_request_bytes))

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> _http.ClosingStreamingResponse:
        # Status 200 + one error chunk for bad requests: what the original clients can display.
        try:
            params = await parse(request)
        except LlavaMedError as exc:
            logger.info("bad request: %s", exc)
            return _http.stream_response(_http.single_chunk_stream(exc.code, str(exc)))
        return _http.stream_response(worker.generate_stream(params))

    @app.post("/worker_generate")
    async def worker_generate(request: Request) -> JSONResponse:
        try:
            params = await parse(request)
        except LlavaMedError as exc:
            chunk = error_chunk(exc.code, str(exc))
        else:
            try:
                chunk = await _http.until_disconnected(request, worker.generate(params))
            except _http.ClientDisconnected as exc:
                logger.info("client left /worker_generate: generation cancelled")
                return JSONResponse(error_chunk(exc.code, str(exc)).model_dump())
        return JSONResponse(chunk.model_dump(exclude_none=True))

    @app.post("/worker_get_status")
    async def worker_get_status() -> WorkerStatus:
        return worker.get_status()

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.error is not None:
            body = HealthResponse(status="error", error=worker.error, model_names=worker.model_names)
            return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
        if not worker.ready:
            return JSONResponse(HealthResponse(status="loading").model_dump(exclude_none=True), status_code=503)
        body = HealthResponse(status="ok", model_names=worker.model_names, queue_length=worker.queue_length())
        return JSONResponse(body.model_dump(exclude_none=True))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=CONTENT_TYPE)

    def not_loaded() -> JSONResponse:
        return _http.error_json(ErrorCode.ENGINE_OVERLOADED, "the model is not loaded yet")  # 503

    @app.post("/count_token")
    async def count_token(request: Request) -> Any:
        data = await _http.read_model(request, CountTokenRequest, worker.max_request_bytes)
        if not worker.ready:
            return not_loaded()
        worker.check_prompt(data.prompt)
        try:
            count = await asyncio.to_thread(worker.engine.count_tokens, data.prompt)  # tokenising may be slow
        except NotImplementedError as exc:
            return _http.error_json(ErrorCode.INTERNAL_ERROR, str(exc), status_code=501)
        return CountTokenResponse(count=count)

    @app.post("/worker_get_conv_template")
    async def worker_get_conv_template() -> Any:
        if not worker.ready:
            return not_loaded()
        return ConvTemplateResponse(conv_mode=worker.engine.conv_mode)

    @app.post("/model_details")
    async def model_details() -> Any:
        if not worker.ready:
            return not_loaded()
        return ModelDetailsResponse(context_length=worker.engine.context_length)

    return app


# ---------------------------------------------------------------------------------------------------------------- cli


def build_parser() -> argparse.ArgumentParser:
    # No other option may start with --controller or --worker: the README's --controller / --worker spellings
    # rely on argparse's prefix matching to reach --controller-address / --worker-address.
    p = argparse.ArgumentParser(
        prog="python -m llava_med.serve.model_worker",
        description="LLaVA-Med model worker: serves one model and registers with a controller.",
        allow_abbrev=True,
    )
    p.add_argument("--host", type=str, default=DEFAULT_HOST, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_WORKER_PORT)
    p.add_argument("--worker-address", type=str, default=None,
                   help=f"URL the controller uses to reach this worker (default http://<host>:<port>, i.e. "
                        f"{DEFAULT_WORKER_URL} with the default host and port)")
    p.add_argument("--controller-address", type=str, default=DEFAULT_CONTROLLER_URL)
    # Loader flags shared with the CLI and the launcher (--model-path, --model-base, --model-name, --device, --dtype,
    # --load-8bit, --load-4bit, --num-gpus, --max-gpu-memory, --vision-tower, --conv-mode, --local-files-only).
    add_model_args(p)
    p.add_argument("--multi-modal", action="store_true",
                   help="accepted for compatibility; multimodality is detected from the checkpoint")
    p.add_argument("--use-flash-attn", action="store_true", help="accepted for compatibility")
    p.add_argument("--limit-model-concurrency", "--limit-worker-concurrency", dest="limit_model_concurrency",
                   type=int, default=None,
                   help="generations admitted at once, more wait in the worker (default: what the engine holds, "
                        "--max-batch-size + --max-queue for --engine hf, 256 for --engine vllm, 5 otherwise, as the original)")
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--auth-token", type=str, default=None,
                   help=f"shared secret sent to the controller (default: env {_http.AUTH_TOKEN_ENV})")
    p.add_argument("--max-new-tokens-cap", type=int, default=DEFAULT_MAX_NEW_TOKENS_CAP,
                   help="requests asking for more new tokens are capped to this (default %(default)s)")
    p.add_argument("--heart-beat-interval", type=float, default=None,
                   help="seconds between heartbeats (default: env LLAVA_MED_WORKER_HEART_BEAT_INTERVAL or 15)")
    p.add_argument("--speed", type=float, default=1.0, help="relative speed reported to the controller")
    p.add_argument("--enable-docs", action="store_true", help="serve /docs and /openapi.json")
    p.add_argument("--log-level", type=str, default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker_address is None:
        args.worker_address = _http.advertised_url(args.host, args.port)
    args.worker_address = args.worker_address.rstrip("/")
    args.controller_address = args.controller_address.rstrip("/")
    if args.auth_token is None:
        args.auth_token = _http.default_auth_token()
    if args.load_8bit and args.load_4bit:
        parser.error("--load-8bit and --load-4bit are exclusive")
    if args.limit_model_concurrency is not None and args.limit_model_concurrency < 1:
        parser.error("--limit-model-concurrency must be >= 1")
    if args.stream_interval < 1:
        parser.error("--stream-interval must be >= 1")
    if args.max_new_tokens_cap < 1:
        parser.error("--max-new-tokens-cap must be >= 1")
    return args


def worker_from_args(args: argparse.Namespace, engine: Engine,
                     on_load_failure: Callable[[BaseException], None] | None = None) -> ModelWorker:
    """The worker the parsed flags describe, serving ``engine``. An engine that queues and batches by itself (hf)
    admits what it holds by default, and answers "busy" past its own queue."""
    return ModelWorker(
        engine,
        worker_addr=args.worker_address,
        controller_addr=args.controller_address,
        limit_model_concurrency=(args.limit_model_concurrency or engine.max_concurrency
                                 or DEFAULT_LIMIT_MODEL_CONCURRENCY),
        stream_interval=args.stream_interval,
        max_new_tokens_cap=args.max_new_tokens_cap,
        no_register=args.no_register,
        heart_beat_interval=args.heart_beat_interval,
        auth_token=args.auth_token,
        speed=args.speed,
        on_load_failure=on_load_failure,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _http.configure_logging(args.log_level)
    logger.info("args: %s", {k: ("***" if k == "auth_token" and v else v) for k, v in vars(args).items()})
    if args.multi_modal:
        logger.warning("--multi-modal is not needed: multimodality is detected from the checkpoint")
    engine = build_engine(args)
    holder: dict[str, Any] = {}

    def stop_on_load_failure(exc: BaseException) -> None:
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    worker = worker_from_args(args, engine, stop_on_load_failure)
    server = _http.build_server(create_app(worker, enable_docs=args.enable_docs), args.host, args.port,
                                args.log_level)
    holder["server"] = server
    server.run()
    if worker.load_error is not None:
        logger.error("exiting: the model failed to load: %s", worker.load_error)
        sys.exit(1)


if __name__ == "__main__":
    main()
