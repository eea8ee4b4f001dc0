"""The controller: a registry of model workers, dispatch, heartbeat expiry, and a stream relay.

Workers register (``/register_worker``) and heartbeat (``/receive_heart_beat``); clients ask for a worker's
address (``/get_worker_address``) or let the controller relay the stream (``/worker_generate_stream``). It also
answers ``/worker_get_status`` like a worker, so a controller can register with another controller.

Run: ``python -m llava_med.serve.controller --host 127.0.0.1 --port 21001``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request

from llava_med.constants import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_HOST,
    ErrorCode,
    controller_heart_beat_expiration,
    worker_api_timeout,
)
from llava_med.errors import LlavaMedError
from llava_med.serve import _http
from llava_med.serve.protocol import (
    CHUNK_DELIMITER,
    FrameSplitter,
    GetWorkerAddressRequest,
    GetWorkerAddressResponse,
    HealthResponse,
    HeartBeatRequest,
    HeartBeatResponse,
    ListModelsResponse,
    RefreshAllWorkersResponse,
    RegisterWorkerRequest,
    RegisterWorkerResponse,
    WorkerStatus,
    encode_chunk,
    error_chunk,
    parse_json_body,
)

__all__ = ["Controller", "DispatchMethod", "WorkerInfo", "create_app", "main", "parse_args"]

logger = logging.getLogger(__name__)

DISPATCH_METHODS = ("shortest_queue", "lottery")
#: Seconds to wait when asking a worker for its status (the original used 5).
STATUS_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0


class DispatchMethod:
    SHORTEST_QUEUE = "shortest_queue"
    LOTTERY = "lottery"


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float


class Controller:
    """Worker registry and dispatch. Registry methods are synchronous and guarded by a lock (never held across
    an ``await``); methods that talk to workers are ``async``.

    Args:
        dispatch_method: ``shortest_queue`` (default) or ``lottery``.
        heart_beat_expiration: seconds after which a silent worker is dropped (default: constants / env).
        clock: monotonic clock, injectable for tests.
        rng: random source for ``lottery``, injectable for tests.
        auth_token: shared secret required on ``/register_worker`` and ``/receive_heart_beat`` (None: open).
        transport: httpx transport for talking to workers (tests inject a MockTransport).
        api_timeout: seconds to wait for a worker's next bytes while relaying (default: constants / env).
    """

    def __init__(
        self,
        dispatch_method: str = DispatchMethod.SHORTEST_QUEUE,
        *,
        heart_beat_expiration: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        auth_token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        api_timeout: float | None = None,
    ) -> None:
        if dispatch_method not in DISPATCH_METHODS:
            raise ValueError(f"dispatch_method must be one of {DISPATCH_METHODS}, got {dispatch_method!r}")
        expiration = controller_heart_beat_expiration() if heart_beat_expiration is None else heart_beat_expiration
        if expiration <= 0:
            raise ValueError(f"heart_beat_expiration must be > 0 seconds, got {expiration}")
        self.dispatch_method = dispatch_method
        self.heart_beat_expiration = float(expiration)
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.auth_token = auth_token or None
        self.api_timeout = worker_api_timeout() if api_timeout is None else api_timeout
        self._transport = transport
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerInfo] = {}
        self._client: httpx.AsyncClient | None = None
        self._expiry_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle
    @property
    def http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(STATUS_TIMEOUT, connect=CONNECT_TIMEOUT),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
                trust_env=False,
            )
        return self._client

    async def start(self) -> None:
        """Start the expiry task (called by the app's lifespan)."""
        if self._expiry_task is None:
            self._expiry_task = asyncio.create_task(self._expiry_loop(), name="controller-expiry")

    async def close(self) -> None:
        task, self._expiry_task = self._expiry_task, None
        await _http.stop_task(task)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _expiry_loop(self) -> None:
        period = max(0.2, self.heart_beat_expiration / 3)
        while True:
            await asyncio.sleep(period)
            try:
                self.remove_expired_workers()
            except Exception:  # noqa: BLE001 - the loop must survive
                logger.exception("expiry check failed")

    # ------------------------------------------------------------------------------------------------ registry
    def add_worker(self, worker_name: str, check_heart_beat: bool, status: WorkerStatus) -> None:
        with self._lock:
            known = worker_name in self._workers
            self._workers[worker_name] = WorkerInfo(
                list(status.model_names), float(status.speed), int(status.queue_length), check_heart_beat,
                self.clock(),
            )
        logger.info("%s worker %s: %s", "re-registered" if known else "registered", worker_name,
                    status.model_dump())

    async def register_worker(
        self, worker_name: str, check_heart_beat: bool, worker_status: WorkerStatus | dict[str, Any] | None
    ) -> WorkerStatus:
        """Register a worker; with no status, ask the worker. Raises LlavaMedError(WORKER_UNREACHABLE)."""
        worker_name = worker_name.rstrip("/")
        if worker_status is None:
            status = await self.get_worker_status(worker_name)
            if status is None:
                raise LlavaMedError(
                    f"cannot register {worker_name}: it did not answer POST {worker_name}/worker_get_status "
                    f"(is it running, and is the address reachable from the controller?)",
                    code=ErrorCode.WORKER_UNREACHABLE,
                )
        elif isinstance(worker_status, WorkerStatus):
            status = worker_status
        else:
            status = WorkerStatus.model_validate(worker_status)
        self.add_worker(worker_name, check_heart_beat, status)
        return status

    async def get_worker_status(self, worker_name: str) -> WorkerStatus | None:
        """Ask a worker for its status; None (logged) when it cannot be reached or answers nonsense."""
        try:
            resp = await self.http.post(worker_name + "/worker_get_status", timeout=STATUS_TIMEOUT)
            resp.raise_for_status()
            return WorkerStatus.model_validate(resp.json())
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("cannot get the status of %s: %s: %s", worker_name, type(exc).__name__, exc)
            return None

    def remove_worker(self, worker_name: str) -> bool:
        with self._lock:
            removed = self._workers.pop(worker_name, None) is not None
        if removed:
            logger.info("removed worker %s", worker_name)
        return removed

    def workers(self) -> dict[str, WorkerInfo]:
        """A snapshot of the registry."""
        with self._lock:
            return {name: WorkerInfo(list(i.model_names), i.speed, i.queue_length, i.check_heart_beat,
                                     i.last_heart_beat) for name, i in self._workers.items()}

    async def refresh_all_workers(self) -> list[str]:
        """Ask every worker for its status; update the live ones, drop the dead. Returns the removed names."""
        snapshot = self.workers()
        names = list(snapshot)
        statuses = await asyncio.gather(*(self.get_worker_status(n) for n in names))
        removed = []
        for name, status in zip(names, statuses):
            if status is None:
                if self.remove_worker(name):
                    removed.append(name)
                    logger.info("removed stale worker %s", name)
            else:
                self.add_worker(name, snapshot[name].check_heart_beat, status)
        return removed

    def list_models(self) -> list[str]:
        with self._lock:
            models = {m for info in self._workers.values() for m in info.model_names}
        return sorted(models)

    def get_worker_address(self, model_name: str) -> str:
        """A worker serving ``model_name``, or ``""`` when none does."""
        with self._lock:
            candidates = sorted(
                (name, info) for name, info in self._workers.items() if model_name in info.model_names
            )
            if not candidates:
                return ""
            if self.dispatch_method == DispatchMethod.LOTTERY:
                weights = [max(info.speed, 0.0) for _, info in candidates]
                if sum(weights) <= 1e-4:
                    return ""
                name = self.rng.choices([n for n, _ in candidates], weights=weights, k=1)[0]
            else:
                def load(item: tuple[str, WorkerInfo]) -> tuple[float, str]:
                    name_, info = item
                    return (info.queue_length / info.speed if info.speed > 0 else float("inf"), name_)

                name, info = min(candidates, key=load)
                info.queue_length += 1  # as the original: count the request until the next heartbeat
        logger.debug("dispatch %s -> %s", model_name, name)
        return name

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        worker_name = worker_name.rstrip("/")
        with self._lock:
            info = self._workers.get(worker_name)
            if info is None:
                exist = False
            else:
                info.queue_length = queue_length
                info.last_heart_beat = self.clock()
                exist = True
        if not exist:
            logger.info("heartbeat from unknown worker %s: asking it to register", worker_name)
        return exist

    def remove_expired_workers(self) -> list[str]:
        deadline = self.clock() - self.heart_beat_expiration
        with self._lock:
            expired = [n for n, i in self._workers.items() if i.check_heart_beat and i.last_heart_beat < deadline]
            for name in expired:
                del self._workers[name]
        for name in expired:
            logger.warning("worker %s missed its heartbeats for %.1f s: removed", name, self.heart_beat_expiration)
        return expired

    # ------------------------------------------------------------------------------------------------ as a worker
    async def worker_api_get_status(self) -> WorkerStatus:
        """Aggregated status of all workers (so this controller can register with another one)."""
        names = list(self.workers())
        statuses = await asyncio.gather(*(self.get_worker_status(n) for n in names))
        model_names: set[str] = set()
        speed = 0.0
        queue_length = 0
        for status in statuses:
            if status is not None:
                model_names.update(status.model_names)
                speed += status.speed
                queue_length += status.queue_length
        return WorkerStatus(model_names=sorted(model_names), speed=speed, queue_length=queue_length)

    async def generate_stream(self, body: bytes) -> AsyncIterator[bytes]:
        """Relay a worker's stream, or yield one error chunk. Closing this iterator closes the upstream stream."""
        try:
            params = parse_json_body(body)
        except LlavaMedError as exc:
            yield encode_chunk(error_chunk(exc.code, str(exc)))
            return
        model = params.get("model")
        if not isinstance(model, str) or not model:
            yield encode_chunk(error_chunk(
                ErrorCode.BAD_REQUEST,
                f"model: is required to generate through the controller; available models: {self.list_models()}",
            ))
            return

        tried: list[str] = []
        while True:
            address = self.get_worker_address(model)
            if not address or address in tried:
                if tried:
                    message = (f"no reachable worker serves model {model!r} (tried {', '.join(tried)}); "
                               f"available models: {self.list_models()}")
                    code = ErrorCode.WORKER_UNREACHABLE
                else:
                    message = f"no worker serves model {model!r}; available models: {self.list_models()}"
                    code = ErrorCode.CONTROLLER_NO_WORKER
                logger.info("relay: %s", message)
                yield encode_chunk(error_chunk(code, message))
                return
            tried.append(address)
            outcome = _RelayOutcome()
            relay = self._relay_from(address, body, outcome)
            try:
                async for data in relay:
                    yield data
            finally:
                await _http.aclose_quietly(relay)
            if outcome.retry_elsewhere:
                continue  # the worker could not be reached at all: nothing was sent, try another one
            return

    async def _relay_from(self, address: str, body: bytes, outcome: _RelayOutcome) -> AsyncIterator[bytes]:
        url = address + "/worker_generate_stream"
        timeout = httpx.Timeout(self.api_timeout, connect=CONNECT_TIMEOUT)
        request = self.http.build_request(
            "POST", url, content=body, headers={"content-type": "application/json"}, timeout=timeout
        )
        response: httpx.Response | None = None
        try:
            try:
                response = await self.http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent: try another worker
                logger.warning("relay: cannot connect to %s (%s): removing it", address, exc)
                self.remove_worker(address)
                outcome.retry_elsewhere = True
                return
            if response.status_code != 200:
                content = (await response.aread())[:2000]
                if content.rstrip(CHUNK_DELIMITER).lstrip().startswith(b"{") and b'"error_code"' in content:
                    yield content if content.endswith(CHUNK_DELIMITER) else content + CHUNK_DELIMITER
                else:
                    yield encode_chunk(error_chunk(
                        ErrorCode.INTERNAL_ERROR,
                        f"worker {address} answered HTTP {response.status_code}: "
                        f"{content.decode('utf-8', 'replace')[:300]}",
                    ))
                return
            frames = FrameSplitter()
            async for data in response.aiter_bytes():
                for frame in frames.feed(data):
                    yield frame + CHUNK_DELIMITER
            for frame in frames.finish():
                yield frame + CHUNK_DELIMITER
        except httpx.TimeoutException as exc:
            # A busy worker (long queue, slow prefill) is not a dead one: heartbeats decide liveness, not this.
            logger.warning("relay: worker %s timed out: %s", address, exc)
            yield encode_chunk(error_chunk(
                ErrorCode.CONTROLLER_WORKER_TIMEOUT,
                f"worker {address} sent nothing for {self.api_timeout:g} s ({type(exc).__name__}); it may be "
                f"overloaded, try again later",
            ))
        except httpx.HTTPError as exc:
            logger.warning("relay: worker %s failed mid-stream: %s: %s", address, type(exc).__name__, exc)
            self.remove_worker(address)
            yield encode_chunk(error_chunk(
                ErrorCode.WORKER_UNREACHABLE,
                f"worker {address} closed the connection or died during generation ({type(exc).__name__}: "
                f"{exc}); it was removed from the controller, please retry",
            ))
        finally:
            if response is not None:
                await _close_response(response)


class _RelayOutcome:
    __slots__ = ("retry_elsewhere",)

    def __init__(self) -> None:
        self.retry_elsewhere = False


async def _close_response(response: httpx.Response) -> None:
    # Closing an unfinished streamed response drops its connection, so the worker sees the client leave.
    try:
        await response.aclose()
    except Exception:  # noqa: BLE001
        logger.debug("error closing an upstream response", exc_info=True)


# ---------------------------------------------------------------------------------------------------------------- app


def create_app(controller: Controller, *, enable_docs: bool = False) -> FastAPI:
    """The controller's FastAPI app; the controller's expiry task runs for the app's lifetime."""

    app = _http.service_app("LLaVA-Med controller", controller, "controller", enable_docs=enable_docs)

    @app.post("/register_worker")
    async def register_worker(request: Request) -> Any:
        _http.check_bearer(request, controller.auth_token)
        data = await _http.read_model(request, RegisterWorkerRequest)
        try:
            status = await controller.register_worker(data.worker_name, data.check_heart_beat, data.worker_status)
        except LlavaMedError as exc:  # the worker could not be asked for its status: refuse, as a client error
            return _http.error_json(exc.code, str(exc), status_code=400)
        return RegisterWorkerResponse(worker_name=data.worker_name, worker_status=status)

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> HeartBeatResponse:
        _http.check_bearer(request, controller.auth_token)
        data = await _http.read_model(request, HeartBeatRequest)
        return HeartBeatResponse(exist=controller.receive_heart_beat(data.worker_name, data.queue_length))

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> RefreshAllWorkersResponse:
        removed = await controller.refresh_all_workers()
        return RefreshAllWorkersResponse(
            models=controller.list_models(), workers=sorted(controller.workers()), removed=removed
        )

    @app.post("/list_models")
    async def list_models() -> ListModelsResponse:
        return ListModelsResponse(models=controller.list_models())

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> GetWorkerAddressResponse:
        data = await _http.read_model(request, GetWorkerAddressRequest)
        return GetWorkerAddressResponse(address=controller.get_worker_address(data.model))

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> _http.ClosingStreamingResponse:
        try:
            body = await _http.read_body(request)
        except LlavaMedError as exc:  # too large: one error chunk, like every other relay failure
            return _http.stream_response(_http.single_chunk_stream(exc.code, str(exc)))
        return _http.stream_response(controller.generate_stream(body))

    @app.post("/worker_get_status")
    async def worker_get_status() -> WorkerStatus:
        return await controller.worker_api_get_status()

    @app.get("/health")
    async def health() -> HealthResponse:
        return HealthResponse(status="ok", workers=len(controller.workers()), model_names=controller.list_models())

    return app


# ---------------------------------------------------------------------------------------------------------------- cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava_med.serve.controller",
        description="LLaVA-Med controller: registers model workers and dispatches requests to them.",
    )
    parser.add_argument("--host", type=str, default=DEFAULT_HOST, help="bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_CONTROLLER_PORT)
    parser.add_argument("--dispatch-method", type=str, choices=DISPATCH_METHODS, default="shortest_queue")
    parser.add_argument(
        "--heart-beat-expiration", type=float, default=None,
        help="seconds after which a silent worker is dropped "
             "(default: env LLAVA_MED_CONTROLLER_HEART_BEAT_EXPIRATION or 30)",
    )
    parser.add_argument(
        "--auth-token", type=str, default=None,
        help=f"shared secret workers must send to register (default: env {_http.AUTH_TOKEN_ENV}; none: open)",
    )
    parser.add_argument("--enable-docs", action="store_true", help="serve /docs and /openapi.json")
    parser.add_argument("--log-level", type=str, default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.auth_token is None:
        args.auth_token = _http.default_auth_token()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _http.configure_logging(args.log_level)
    safe = {k: ("***" if k == "auth_token" and v else v) for k, v in vars(args).items()}
    logger.info("args: %s", safe)
    controller = Controller(
        args.dispatch_method, heart_beat_expiration=args.heart_beat_expiration, auth_token=args.auth_token
    )
    if controller.auth_token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without --auth-token: anyone who can reach it may register workers",
                       args.host)
    server = _http.build_server(create_app(controller, enable_docs=args.enable_docs), args.host, args.port,
                                args.log_level)
    server.run()


if __name__ == "__main__":
    main()
