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
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from llava_med.constants import DEFAULT_CONTROLLER_PORT, DEFAULT_HOST, ErrorCode, worker_api_timeout
from llava_med.errors import LlavaMedError
from llava_med.serve import _http
from llava_med.serve.addresses import canonical_url, is_loopback
from llava_med.serve.metrics import CONTENT_TYPE, ControllerMetrics, error_label
from llava_med.serve.protocol import (
    CHUNK_DELIMITER,
    MAX_WORKER_SPEED,
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
    WorkerEntry,
    WorkerListResponse,
    WorkerStatus,
    encode_chunk,
    error_chunk,
    parse_json_body,
    parse_model,
    shown,
)
from llava_med.serve.registry import DISPATCH_METHODS, DispatchMethod, WorkerInfo, WorkerRegistry

__all__ = ["Controller", "DispatchMethod", "WorkerInfo", "create_app", "main", "parse_args"]

logger = logging.getLogger(__name__)

#: Seconds to wait when asking a worker for its status (the original used 5).
STATUS_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
#: Header naming the controllers a relayed request went through (instance ids): a loop, or more than
#: MAX_RELAY_HOPS nested controllers, is refused instead of relayed again.
RELAY_HEADER = "X-LLaVA-Med-Relay"
MAX_RELAY_HOPS = 8


class Controller(WorkerRegistry):
    """The registry (:class:`~llava_med.serve.registry.WorkerRegistry`) plus everything that talks to workers:
    verified registration, polling of workers without heartbeats, the aggregated status and the stream relay.

    Args:
        dispatch_method, heart_beat_expiration, clock, rng: see :class:`WorkerRegistry`.
        auth_token: shared secret required on every state-changing route (None: those routes accept loopback
            clients only).
        transport: httpx transport for talking to workers (tests inject a MockTransport).
        api_timeout: seconds to wait for a worker's next bytes while relaying (default: constants / env).
        max_request_bytes: largest relayed request body.
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
        max_request_bytes: int = _http.DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        super().__init__(dispatch_method, heart_beat_expiration=heart_beat_expiration, clock=clock, rng=rng)
        self.auth_token = auth_token or None
        self.api_timeout = worker_api_timeout() if api_timeout is None else api_timeout
        self.max_request_bytes = max_request_bytes
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        #: Reported in this controller's own status: registering the controller with itself (under any address)
        #: is refused, and a relay that comes back through it is stopped.
        self.instance_id = uuid.uuid4().hex
        self.metrics = ControllerMetrics(self._metrics_view)

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
                await self.poll_unmonitored()
            except Exception:  # noqa: BLE001 - the loop must survive
                logger.exception("expiry check failed")

    async def poll_unmonitored(self) -> list[str]:
        """Ask the workers registered without heartbeats for their status; drop those that stop answering.
        Returns the dropped names."""
        return await self._recheck(self.unmonitored_due(), logging.WARNING,
                                   "worker %s (registered without heartbeats) stopped answering: removed")

    async def _recheck(self, names: list[str], level: int, removed_msg: str) -> list[str]:
        """Ask the workers ``names`` for their status at once: update those that answer, remove those that do not
        (each logged with ``removed_msg`` at ``level``). Returns the removed names."""
        statuses = await asyncio.gather(*(self.get_worker_status(name) for name in names))
        removed = []
        for name, status in zip(names, statuses):
            if status is None:
                if self.remove_worker(name):
                    removed.append(name)
                    logger.log(level, removed_msg, name)
            else:
                self.touch(name, status)
        return removed

    # ------------------------------------------------------------------------------------------------ registration
    async def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: Any = None
                              ) -> WorkerStatus:
        """Register a worker after asking it for its status itself (a status sent with the registration is
        ignored: never trusted). Refuses (LlavaMedError) a worker that does not answer, answers nonsense, or is this
        very controller. Returns the verified status."""
        worker_name = canonical_url(worker_name)
        status, problem = await self._ask_status(worker_name)
        if status is None:
            self.metrics.registrations.labels("refused").inc()
            raise LlavaMedError(
                f"cannot register {worker_name}: {problem} (is it running, and is the address reachable from the "
                "controller?)", code=ErrorCode.WORKER_UNREACHABLE,
            )
        if status.instance_id == self.instance_id:
            self.metrics.registrations.labels("refused").inc()
            raise LlavaMedError(f"cannot register {worker_name}: that address is this controller itself",
                                code=ErrorCode.BAD_REQUEST)
        self.add_worker(worker_name, check_heart_beat, status)
        self.metrics.registrations.labels("accepted").inc()
        return status

    async def _ask_status(self, worker_name: str) -> tuple[WorkerStatus | None, str]:
        try:
            resp = await self.http.post(worker_name + "/worker_get_status", timeout=STATUS_TIMEOUT)
        except httpx.HTTPError as exc:
            return None, f"it did not answer POST {worker_name}/worker_get_status ({type(exc).__name__})"
        if resp.status_code != 200:
            return None, f"POST {worker_name}/worker_get_status answered HTTP {resp.status_code}"
        try:
            return parse_model(WorkerStatus, resp.content), ""
        except LlavaMedError as exc:
            return None, f"its status is not acceptable: {exc}"

    async def get_worker_status(self, worker_name: str) -> WorkerStatus | None:
        """Ask a worker for its status; None (logged) when it cannot be reached or answers nonsense."""
        status, problem = await self._ask_status(worker_name)
        if status is None:
            logger.warning("cannot get the status of %s: %s", worker_name, problem)
        return status

    async def refresh_all_workers(self) -> list[str]:
        """Ask every worker for its status; update the live ones, drop the dead. Returns the removed names."""
        return await self._recheck(list(self.workers()), logging.INFO, "removed stale worker %s")

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
        return WorkerStatus(model_names=sorted(model_names), speed=min(speed, MAX_WORKER_SPEED),
                            queue_length=queue_length, instance_id=self.instance_id)

    def _metrics_view(self) -> dict[str, tuple[str, Any]]:
        workers = self.workers()
        return {
            "llava_med_controller_workers": ("Registered workers", len(workers)),
            "llava_med_controller_models": ("Models served by at least one worker", len(self.list_models())),
            "llava_med_controller_worker_queue_length": (
                "Each worker's queue length as last reported", {n: i.queue_length for n, i in workers.items()}),
            "llava_med_controller_worker_last_seen_seconds": (
                "Seconds since each worker last proved alive",
                {n: max(0.0, self.clock() - i.last_heart_beat) for n, i in workers.items()}),
        }

    async def generate_stream(self, body: bytes, via: Sequence[str] = ()) -> AsyncIterator[bytes]:
        """Relay a worker's stream, or yield one error chunk (counted by code). Closing this iterator closes the
        upstream stream. ``via``: the controllers the request already went through (the relay header)."""
        self.metrics.relayed.inc()
        relay = self._relay(body, via)
        last = b""
        try:
            async for data in relay:
                last = data
                yield data
        finally:
            await _http.aclose_quietly(relay)
        self._count_error(last)  # an error is always a stream's last chunk

    def _count_error(self, frame: bytes) -> None:
        try:
            code = int(parse_json_body(frame.rstrip(CHUNK_DELIMITER)).get("error_code", 0))
        except (LlavaMedError, TypeError, ValueError):
            return
        if code:
            self.metrics.errors.labels(error_label(code)).inc()

    async def _relay(self, body: bytes, via: Sequence[str]) -> AsyncIterator[bytes]:
        if self.instance_id in via or len(via) >= MAX_RELAY_HOPS:
            what = "came back to this controller" if self.instance_id in via else f"went through {len(via)} controllers"
            logger.warning("relay refused: the request %s (a registration loop?)", what)
            yield encode_chunk(error_chunk(ErrorCode.RELAY_LOOP, f"the request {what}: the controllers are "
                                           "registered with each other in a loop; fix their registrations"))
            return
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
        hops = ",".join([*via, self.instance_id])

        tried: list[str] = []
        while True:
            address = self.get_worker_address(model, exclude=via)
            if not address or address in tried:
                if tried:
                    message = (f"no reachable worker serves model {shown(model)} (tried {', '.join(tried)}); "
                               f"available models: {self.list_models()}")
                    code = ErrorCode.WORKER_UNREACHABLE
                else:
                    message = f"no worker serves model {shown(model)}; available models: {self.list_models()}"
                    code = ErrorCode.CONTROLLER_NO_WORKER
                logger.info("relay: %s", message)
                yield encode_chunk(error_chunk(code, message))
                return
            tried.append(address)
            self.metrics.dispatched.labels(model).inc()
            outcome = _RelayOutcome()
            relay = self._relay_from(address, body, outcome, hops)
            try:
                async for data in relay:
                    yield data
            finally:
                await _http.aclose_quietly(relay)
            if outcome.retry_elsewhere:
                continue  # the worker could not be reached at all: nothing was sent, try another one
            return

    async def _relay_from(self, address: str, body: bytes, outcome: _RelayOutcome, hops: str
                          ) -> AsyncIterator[bytes]:
        url = address + "/worker_generate_stream"
        timeout = httpx.Timeout(self.api_timeout, connect=CONNECT_TIMEOUT)
        request = self.http.build_request(
            "POST", url, content=body, headers={"content-type": "application/json", RELAY_HEADER: hops},
            timeout=timeout,
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

    def allowed_to_change(request: Request) -> None:
        """Every state-changing route: the shared secret when there is one, else a client on this machine."""
        if controller.auth_token:
            _http.check_bearer(request, controller.auth_token)
        elif not is_loopback(request.client.host if request.client else None):
            raise _http.AuthError(
                f"{request.url.path} accepts only clients on the controller's own machine when it runs without "
                "--auth-token; start the controller (and the workers) with --auth-token to accept other hosts")

    @app.post("/register_worker")
    async def register_worker(request: Request) -> Any:
        allowed_to_change(request)
        data = await _http.read_model(request, RegisterWorkerRequest)
        try:
            status = await controller.register_worker(data.worker_name, data.check_heart_beat, data.worker_status)
        except LlavaMedError as exc:  # the worker could not be verified: refuse, as a client error
            return _http.error_json(exc.code, str(exc), status_code=400)
        return RegisterWorkerResponse(worker_name=data.worker_name, worker_status=status)

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> HeartBeatResponse:
        allowed_to_change(request)
        data = await _http.read_model(request, HeartBeatRequest)
        return HeartBeatResponse(exist=controller.receive_heart_beat(data.worker_name, data.queue_length))

    @app.post("/refresh_all_workers")
    async def refresh_all_workers(request: Request) -> RefreshAllWorkersResponse:
        allowed_to_change(request)
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
        address = controller.get_worker_address(data.model)
        if address:  # the client talks to that worker itself: a dispatch, as a relay's is
            controller.metrics.dispatched.labels(data.model).inc()
        return GetWorkerAddressResponse(address=address)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> _http.ClosingStreamingResponse:
        try:
            body = await _http.read_body(request, controller.max_request_bytes)
        except LlavaMedError as exc:  # too large: one error chunk, like every other relay failure
            return _http.stream_response(_http.single_chunk_stream(exc.code, str(exc)))
        via = [v for v in request.headers.get(RELAY_HEADER, "").split(",") if v][: MAX_RELAY_HOPS + 1]
        return _http.stream_response(controller.generate_stream(body, via))

    @app.api_route("/list_workers", methods=["GET", "POST"])
    async def list_workers() -> WorkerListResponse:
        aliases = controller.aliases()
        now = controller.clock()
        return WorkerListResponse(workers=[
            WorkerEntry(address=name, model_names=info.model_names, speed=info.speed,
                        queue_length=info.queue_length, check_heart_beat=info.check_heart_beat,
                        seconds_since_seen=round(now - info.last_heart_beat, 3), instance_id=info.instance_id,
                        aliases=sorted(a for a, e in aliases.items() if e == name))
            for name, info in sorted(controller.workers().items())])

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(controller.metrics.render(), media_type=CONTENT_TYPE)

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
    parser.add_argument("--max-request-bytes", type=int, default=_http.DEFAULT_MAX_REQUEST_BYTES,
                        help="largest relayed request body, base64 images included (default %(default)s)")
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
        args.dispatch_method, heart_beat_expiration=args.heart_beat_expiration, auth_token=args.auth_token,
        max_request_bytes=args.max_request_bytes,
    )
    if controller.auth_token is None:
        logger.info("no --auth-token: workers may register (and heartbeat, and refresh the registry) only from this "
                    "machine; give the controller and its workers --auth-token to accept workers on other hosts")
        if not is_loopback(args.host):
            logger.warning(
                "listening on %s without --auth-token: any host that reaches this port can send prompts and images "
                "to the models and read the model list; registration stays limited to this machine, but put the "
                "controller behind a firewall or reverse proxy, or bind 127.0.0.1", args.host)
    else:
        logger.info("registration, heartbeats and refreshes need the shared secret (--auth-token)")
    server = _http.build_server(create_app(controller, enable_docs=args.enable_docs), args.host, args.port,
                                args.log_level)
    server.run()


if __name__ == "__main__":
    main()
