"""Start real controller / worker processes (and in-process uvicorn servers) for tests.

Everything binds 127.0.0.1 on free ports; every wait has a deadline; logs go to files shown on failure.

    group = ProcessGroup(tmp_path)
    ctrl = group.start_controller("--heart-beat-expiration", "3")
    w = group.start_worker(ctrl.url, model_name="m", env={"LLAVA_MED_WORKER_HEART_BEAT_INTERVAL": "1"})
    ...
    group.stop_all()

For the real engine: ``group.start_worker(ctrl.url, "--model-path", tiny_dir, engine="hf", timeout=180)``
(no ``--model-path`` is added by these helpers).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from llava_med.serve.processes import ManagedProcess, free_port

HOST = "127.0.0.1"

#: Short heartbeat timings for tests that restart or kill processes (the ``procs`` fixture uses them).
FAST_HEARTBEAT_ENV = {
    "LLAVA_MED_WORKER_HEART_BEAT_INTERVAL": "1",
    "LLAVA_MED_CONTROLLER_HEART_BEAT_EXPIRATION": "3",
    "LLAVA_MED_WORKER_API_TIMEOUT": "20",
}


def original_stream(url: str, pload: dict, timeout: float | tuple[float, float] = 15) -> Iterator[dict]:
    """Exactly what the original gradio server / test_message do with a worker (or controller) stream."""
    response = requests.post(url + "/worker_generate_stream", headers={"User-Agent": "LLaVA Client"}, json=pload,
                             stream=True, timeout=timeout)
    for chunk in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
        if chunk:
            yield json.loads(chunk.decode())


def last_before_error(chunks: Iterator[dict]) -> dict | None:
    """Read an original-protocol stream until its error chunk (returned), or to its end (the last chunk)."""
    last = None
    for last in chunks:
        if last["error_code"]:
            break
    return last


def queue_length(url: str) -> int:
    """The queue length a worker (or a controller) reports on ``/worker_get_status``."""
    return int(requests.post(url + "/worker_get_status", timeout=5).json()["queue_length"])


def listed_models(controller_url: str) -> list[str]:
    """The models a controller lists (``/list_models``)."""
    return requests.post(controller_url + "/list_models", timeout=5).json()["models"]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass (AssertionError).

    Exceptions raised by the predicate count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {type(last_exc).__name__}: {last_exc})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}{detail}")
        time.sleep(interval)


class ServerProcess(ManagedProcess):
    """A server started as a subprocess on 127.0.0.1:<port> (the project's ManagedProcess, with its URL)."""

    def __init__(self, name: str, port: int, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        super().__init__(name, argv, log_path, f"http://{HOST}:{port}/health", env)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_text(self, tail: int | None = 200) -> str:
        return self.log_tail(tail)

    def wait_healthy(self, timeout: float = 30.0) -> ServerProcess:  # type: ignore[override]
        super().wait_healthy(timeout)
        return self


def _base_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    merged["PYTHONUNBUFFERED"] = "1"
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        merged.pop(key, None)
    merged["NO_PROXY"] = merged["no_proxy"] = "127.0.0.1,localhost"
    if env:
        merged.update(env)
    return merged


class ProcessGroup:
    """Starts servers as subprocesses, remembers them, and stops them all (``stop_all``)."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.processes: list[ServerProcess] = []
        self._count = 0

    def _start(self, name: str, module: str, port: int | None, args: Sequence[str],
               env: Mapping[str, str] | None, wait: bool, timeout: float) -> ServerProcess:
        port = port or free_port()
        self._count += 1
        argv = [sys.executable, "-m", module, "--host", HOST, "--port", str(port), *args]
        proc = ServerProcess(f"{name}:{port}", port, argv, self.log_dir / f"{self._count:02d}-{name}-{port}.log",
                             _base_env({**self.env, **(env or {})}))
        self.processes.append(proc)
        proc.start()
        if wait:
            proc.wait_healthy(timeout)
        return proc

    def start_module(self, name: str, module: str, *args: str, port: int | None = None,
                     env: Mapping[str, str] | None = None, wait: bool = True, timeout: float = 30.0) -> ServerProcess:
        """``python -m MODULE --host 127.0.0.1 --port P *args`` (any server with a ``/health`` endpoint)."""
        return self._start(name, module, port, args, env, wait, timeout)

    def start_controller(self, *args: str, port: int | None = None, env: Mapping[str, str] | None = None,
                         wait: bool = True, timeout: float = 30.0) -> ServerProcess:
        """``python -m llava_med.serve.controller --host 127.0.0.1 --port P *args``."""
        return self._start("controller", "llava_med.serve.controller", port, args, env, wait, timeout)

    def start_worker(self, controller_url: str | None, *args: str, engine: str = "fake",
                     model_name: str | None = None, port: int | None = None,
                     env: Mapping[str, str] | None = None, wait: bool = True,
                     timeout: float = 30.0) -> ServerProcess:
        """``python -m llava_med.serve.model_worker --engine E ...``; ``controller_url=None`` adds --no-register.

        The worker advertises http://127.0.0.1:P. Extra ``args`` go last (e.g. ``--model-path``).
        """
        port = port or free_port()
        full = ["--engine", engine, "--worker-address", f"http://{HOST}:{port}"]
        if controller_url:
            full += ["--controller-address", controller_url]
        else:
            full += ["--no-register"]
        if model_name:
            full += ["--model-name", model_name]
        full += list(args)
        return self._start("worker", "llava_med.serve.model_worker", port, full, env, wait, timeout)

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop()

    def logs(self, tail: int = 80) -> str:
        parts = []
        for proc in self.processes:
            parts.append(f"----- {proc.name} ({proc.log_path}) -----\n{proc.log_text(tail)}")
        return "\n".join(parts)



@contextlib.contextmanager
def module_processes(log_dir: Path, request: Any, env: Mapping[str, str] | None = FAST_HEARTBEAT_ENV,
                     title: str = "stack logs", tail: int = 80) -> Iterator[ProcessGroup]:
    """A :class:`ProcessGroup` for a module-scoped fixture: every process stopped at the end, and the logs printed
    when a test that used it failed (``request`` is the fixture's ``pytest.FixtureRequest``)."""
    group = ProcessGroup(log_dir, env=env)
    failed_before = request.session.testsfailed
    try:
        yield group
    finally:
        group.stop_all()
        if request.session.testsfailed > failed_before:
            print(f"\n===== {title} =====\n{group.logs(tail)}")

# ---------------------------------------------------------------------------------------------------------------
# In-process server (for tests that need to look inside the engine while talking real HTTP)


class ThreadedServer:
    """Run an ASGI app with uvicorn in a background thread on a free port (lifespan included)."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=15, message="in-process server start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def threaded_server(app: Any) -> Iterator[ThreadedServer]:
    with ThreadedServer(app) as server:
        yield server


@dataclass
class InProcessStack:
    """A controller and one fake-engine worker served by uvicorn in this process (see :func:`in_process_stack`)."""

    controller_url: str
    worker_url: str
    engine: Any
    worker: Any


@contextlib.contextmanager
def in_process_stack(engine: Any, model: str) -> Iterator[InProcessStack]:
    """Controller + worker over ``engine`` on free loopback ports, in threads; yields once the model is listed.

    For tests that talk real HTTP but look inside the engine (its counters) or the worker.
    """
    from llava_med.serve.controller import Controller
    from llava_med.serve.controller import create_app as create_controller_app
    from llava_med.serve.model_worker import ModelWorker
    from llava_med.serve.model_worker import create_app as create_worker_app

    controller = Controller(heart_beat_expiration=30)
    with ThreadedServer(create_controller_app(controller)) as ctrl:
        port = free_port()
        worker = ModelWorker(engine, worker_addr=f"http://{HOST}:{port}", controller_addr=ctrl.url,
                             heart_beat_interval=5)
        with ThreadedServer(create_worker_app(worker), port=port) as wrk:
            wait_until(lambda: controller.list_models() == [model], 10, message="worker registered")
            yield InProcessStack(ctrl.url, wrk.url, engine, worker)
