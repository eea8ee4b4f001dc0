"""One command for a whole local stack: a controller, model workers and the web UI, as child processes.

    llava-med launch                                   # tiny model on the CPU: controller, one worker, web UI
    llava-med launch --model-path microsoft/llava-med-v1.5-mistral-7b --gpus 0,1 --workers-per-model 2
    llava-med launch --model-path microsoft/llava-med-v1.5-mistral-7b --gpus 0,1,2,3 --num-gpus 2  # 2 workers x 2
    llava-med launch --model-path A --model-path B --load-4bit --no-web

Every child writes its output to ``<log-dir>/<name>.log`` (the web UI's chats go to ``<log-dir>/web/``). The
launcher starts the controller, waits for its ``/health``, then starts the workers and the web UI together, waits
until every worker has loaded its model and registered, and until the web UI answers; then it prints the URLs
(and writes them, with the PIDs, to ``<log-dir>/stack.json``).

Ctrl-C or SIGTERM stops every child (SIGTERM, then SIGKILL after ``--stop-timeout`` seconds) and exits 0. A child
that dies is reported with the tail of its log, the others are stopped, and the launcher exits 1. Children are in
their own session and, on Linux, are killed by the kernel if the launcher itself is killed, so no process is left
behind.

GPUs: worker *i* gets ``CUDA_VISIBLE_DEVICES`` = the next ``--num-gpus`` devices of ``--gpus`` (cycling); without
``--gpus``, the devices the machine shows (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi``), found without importing
torch.

Ports: the originals by default (controller 21001, workers 21002, 21003, ..., web UI 7860). A port that is already
taken is an error naming it; ``0`` picks a free port (``--controller-port 0 --worker-port 0 --web-port 0``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from llava_med.constants import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_HOST,
    DEFAULT_OPENAI_PORT,
    DEFAULT_WEB_PORT,
    DEFAULT_WORKER_PORT,
)
from llava_med.engine.registry import DEFAULT_ENGINE, add_engine_args, engine_names
from llava_med.model.args import add_model_args
from llava_med.serve import _http
from llava_med.serve.processes import ManagedProcess, ProcessStartError, free_port

__all__ = ["ChildSpec", "LaunchConfig", "LaunchError", "Stack", "build_parser", "config_from_args", "main"]

logger = logging.getLogger(__name__)

DEFAULT_LOG_DIR = "logs"
POLL_INTERVAL = 0.2
MONITOR_INTERVAL = 0.5
LOG_TAIL_LINES = 40


class LaunchError(RuntimeError):
    """The stack could not start (bad options, port taken, a child died or never became healthy)."""


@dataclasses.dataclass
class LaunchConfig:
    """What to start. ``model_paths`` entries of ``None`` mean the embedded tiny checkpoint."""

    host: str = DEFAULT_HOST
    controller_port: int = DEFAULT_CONTROLLER_PORT
    worker_port: int = DEFAULT_WORKER_PORT
    web_port: int = DEFAULT_WEB_PORT
    model_paths: list[str | None] = dataclasses.field(default_factory=lambda: [None])
    workers_per_model: int = 1
    gpus: list[str] = dataclasses.field(default_factory=list)
    gpus_per_worker: int = 1
    engine: str = DEFAULT_ENGINE
    worker_args: list[str] = dataclasses.field(default_factory=list)
    web: bool = True
    web_args: list[str] = dataclasses.field(default_factory=list)
    openai: bool = True
    openai_port: int = DEFAULT_OPENAI_PORT
    openai_args: list[str] = dataclasses.field(default_factory=list)
    log_dir: Path = Path(DEFAULT_LOG_DIR)
    startup_timeout: float = 900.0
    stop_timeout: float = 10.0
    python: str = sys.executable

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir)
        if not self.model_paths:
            self.model_paths = [None]
        if self.workers_per_model < 1:
            raise LaunchError(f"--workers-per-model must be >= 1, got {self.workers_per_model}")
        if self.gpus_per_worker < 1:
            raise LaunchError(f"--num-gpus must be >= 1, got {self.gpus_per_worker}")
        if self.gpus and self.gpus_per_worker > len(self.gpus):
            raise LaunchError(f"--num-gpus {self.gpus_per_worker} needs {self.gpus_per_worker} devices per worker but "
                              f"only {len(self.gpus)} are available ({','.join(self.gpus)}; --gpus to choose)")
        if self.engine not in engine_names():
            raise LaunchError(f"--engine must be one of {', '.join(engine_names())}, got {self.engine!r}")
        for name in ("controller_port", "worker_port", "web_port", "openai_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise LaunchError(f"--{name.replace('_', '-')} must be 0 (any free port) or 1-65535, got {port}")
        if self.startup_timeout <= 0 or self.stop_timeout <= 0:
            raise LaunchError("--startup-timeout and --stop-timeout must be > 0")

    @property
    def num_workers(self) -> int:
        return len(self.model_paths) * self.workers_per_model

    def worker_gpus(self, index: int) -> str | None:
        """``CUDA_VISIBLE_DEVICES`` of worker ``index``: the next ``gpus_per_worker`` devices, cycling."""
        if not self.gpus:
            return None
        start = index * self.gpus_per_worker
        return ",".join(self.gpus[(start + j) % len(self.gpus)] for j in range(self.gpus_per_worker))


@dataclasses.dataclass
class ChildSpec:
    """One child process: its command, environment additions, URL and health check."""

    name: str
    role: str  # controller | worker | web | openai
    argv: list[str]
    port: int
    url: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    model_path: str | None = None
    gpu: str | None = None

    @property
    def health_url(self) -> str:
        return self.url + "/health"


def _port_free(host: str, port: int) -> bool:
    bind_host = "" if host in ("0.0.0.0", "::") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError:
            return False
    return True


def _local_host(host: str) -> str:
    """Where the launcher and the children reach a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else ("::1" if host == "::" else host)


class _PortAllocator:
    def __init__(self, host: str) -> None:
        self.host = host
        self.used: set[int] = set()

    def take(self, port: int, what: str, flag: str) -> int:
        if port == 0:
            while True:
                chosen = free_port(_local_host(self.host) if ":" not in self.host else "127.0.0.1")
                if chosen not in self.used:
                    break
        else:
            chosen = port
            if chosen in self.used:
                raise LaunchError(f"port {chosen} is given to two servers; pass {flag} 0 for a free port")
            if not _port_free(self.host, chosen):
                raise LaunchError(f"port {chosen} on {self.host} (for the {what}) is already in use; stop what "
                                  f"uses it, or pass {flag} 0 to pick a free port")
        self.used.add(chosen)
        return chosen


def plan(config: LaunchConfig) -> list[ChildSpec]:
    """The children to start, in order: controller, workers, web UI (ports resolved and checked)."""
    ports = _PortAllocator(config.host)
    py = [config.python, "-m"]
    local = _local_host(config.host)
    cport = ports.take(config.controller_port, "controller", "--controller-port")
    controller_url = _http.advertised_url(local, cport)
    children = [ChildSpec("controller", "controller",
                          [*py, "llava_med.serve.controller", "--host", config.host, "--port", str(cport)],
                          cport, controller_url)]
    index = 0
    for model_path in config.model_paths:
        for _ in range(config.workers_per_model):
            wanted = 0 if config.worker_port == 0 else config.worker_port + index
            port = ports.take(wanted, f"worker {index}", "--worker-port")
            url = _http.advertised_url(local, port)
            argv = [*py, "llava_med.serve.model_worker", "--host", config.host, "--port", str(port),
                    "--worker-address", url, "--controller-address", controller_url, "--engine", config.engine]
            if model_path:
                argv += ["--model-path", model_path]
            argv += config.worker_args
            env: dict[str, str] = {}
            gpu = config.worker_gpus(index)
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            children.append(ChildSpec(f"worker-{index}", "worker", argv, port, url, env, model_path, gpu))
            index += 1
    if config.web:
        port = ports.take(config.web_port, "web UI", "--web-port")
        url = _http.advertised_url(local, port)
        argv = [*py, "llava_med.serve.gradio_web_server", "--host", config.host, "--port", str(port),
                "--controller-url", controller_url, "--log-dir", str(config.log_dir / "web"),
                "--model-list-mode", "reload", *config.web_args]
        children.append(ChildSpec("web", "web", argv, port, url, {"GRADIO_ANALYTICS_ENABLED": "False"}))
    if config.openai:
        port = ports.take(config.openai_port, "OpenAI-compatible API", "--openai-port")
        url = _http.advertised_url(local, port)
        argv = [*py, "llava_med.serve.openai_api", "--host", config.host, "--port", str(port),
                "--controller-url", controller_url, *config.openai_args]
        children.append(ChildSpec("openai-api", "openai", argv, port, url))
    return children


def detect_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The CUDA devices this machine shows, without importing torch: ``CUDA_VISIBLE_DEVICES`` when it is set, else
    ``nvidia-smi``'s list; empty when there is neither."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = []
        for device in (d.strip() for d in visible.split(",")):
            if not device or device.startswith("-"):  # CUDA ignores everything from an invalid entry on
                break
            devices.append(device)
        return devices
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    try:
        out = subprocess.run([nvidia_smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    no_proxy = [p for p in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if p]
    for host in ("127.0.0.1", "localhost", "::1"):
        if host not in no_proxy:
            no_proxy.append(host)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
    env.update(extra)
    return env


class _Child(ManagedProcess):
    """A launched server: a ManagedProcess in its own session (Ctrl-C reaches only the launcher, which stops the
    children in order) that dies with the launcher on Linux, and the spec it was started from."""

    def __init__(self, spec: ChildSpec, log_path: Path) -> None:
        super().__init__(spec.name, spec.argv, log_path, spec.health_url, _child_env(spec.env), new_session=True,
                         die_with_parent=True)
        self.spec = spec


class Stack:
    """Starts, watches and stops the children of one launch.

        stack = Stack(config)
        stack.start()          # raises LaunchError (children already stopped) when something fails
        code = stack.run()     # until a signal (0) or a child's death (1); stops everything
    """

    def __init__(self, config: LaunchConfig, *, out: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.specs = plan(config)
        self.children: list[_Child] = []
        self.stop_event = threading.Event()
        self.signal_received: int | None = None
        self._out = out or (lambda text: print(text, flush=True))
        self._http = httpx.Client(timeout=2.0, trust_env=False)

    # ------------------------------------------------------------------------------------------------ urls
    @property
    def controller_url(self) -> str:
        return self.specs[0].url

    @property
    def web_url(self) -> str | None:
        return next((s.url for s in self.specs if s.role == "web"), None)

    @property
    def openai_url(self) -> str | None:
        """The OpenAI-compatible API's base URL (``.../v1``)."""
        return next((s.url + "/v1" for s in self.specs if s.role == "openai"), None)

    def info(self) -> dict[str, Any]:
        """URLs, PIDs and logs of the children (also written to ``<log-dir>/stack.json``)."""
        return {
            "launcher_pid": os.getpid(),
            "controller_url": self.controller_url,
            "web_url": self.web_url,
            "openai_url": self.openai_url,
            "worker_urls": [s.url for s in self.specs if s.role == "worker"],
            "children": [
                {"name": c.name, "role": c.spec.role, "url": c.spec.url, "pid": c.proc.pid if c.proc else None,
                 "log": str(c.log_path), "model_path": c.spec.model_path, "gpu": c.spec.gpu}
                for c in self.children
            ],
        }

    # ------------------------------------------------------------------------------------------------ start
    def start(self) -> None:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        (self.config.log_dir / "stack.json").unlink(missing_ok=True)  # a previous launch's
        try:
            controller = self._spawn(self.specs[0])
            self._wait_health(controller)
            others = [self._spawn(spec) for spec in self.specs[1:]]  # workers and web UI load in parallel
            workers = [c for c in others if c.spec.role == "worker"]
            for child in others:
                self._wait_health(child)
            self._wait_registered(workers)
        except BaseException:
            self.stop()
            raise
        self._write_info()

    def _spawn(self, spec: ChildSpec) -> _Child:
        child = _Child(spec, self.config.log_dir / f"{spec.name}.log")
        child.start()
        self.children.append(child)
        return child

    def _check_stop(self) -> None:
        if self.stop_event.is_set():
            raise LaunchError("interrupted while starting")

    def _deadline(self) -> float:
        return time.monotonic() + self.config.startup_timeout

    def _wait_health(self, child: _Child) -> None:
        try:
            child.wait_healthy(self.config.startup_timeout, should_stop=self.stop_event.is_set, client=self._http)
        except InterruptedError:
            raise LaunchError("interrupted while starting") from None
        except ProcessStartError as exc:
            if not child.alive():
                raise LaunchError(self.death_report(child, "while starting")) from None
            raise LaunchError(str(exc)) from None
        logger.info("%s is healthy at %s", child.name, child.spec.url)

    def _wait_registered(self, workers: list[_Child]) -> None:
        """Wait until the controller knows every worker."""
        if not workers:
            return
        deadline = self._deadline()
        wanted = {w.spec.url for w in workers}
        known: set[str] = set()
        while True:
            self._check_stop()
            for child in self.children:
                if not child.alive():
                    raise LaunchError(self.death_report(child, "while starting"))
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                resp = self._http.get(self.controller_url + "/list_workers")
                known = {w["address"] for w in resp.json()["workers"]}
                if wanted <= known:
                    return
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(wanted - known))
                raise LaunchError(f"the controller did not register {missing} within "
                                  f"{self.config.startup_timeout:.0f} s; see the logs in {self.config.log_dir}")
            self.stop_event.wait(POLL_INTERVAL * 2)

    def _write_info(self) -> None:
        path = self.config.log_dir / "stack.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.info(), indent=2), encoding="utf-8")
        os.replace(tmp, path)

    def summary(self) -> str:
        lines = ["LLaVA-Med stack is running:"]
        for child in self.children:
            extra = ""
            if child.spec.role == "worker":
                if self.config.engine == "fake":
                    extra = "  fake engine (scripted answers)"
                else:
                    extra = f"  model {child.spec.model_path or 'embedded test checkpoint (random weights)'}"
                if child.spec.gpu is not None:
                    extra += f", CUDA_VISIBLE_DEVICES={child.spec.gpu}"
            label = {"controller": "controller", "worker": child.name, "web": "web UI",
                     "openai": "OpenAI API"}[child.spec.role]
            url = child.spec.url + ("/v1" if child.spec.role == "openai" else "")
            lines.append(f"  {label:<12} {url}  (pid {child.proc.pid if child.proc else '?'}){extra}")
        if self.web_url:
            lines.append(f"Open {self.web_url} in a browser.")
        if self.openai_url:
            lines.append(f"OpenAI-compatible API: base_url={self.openai_url} (e.g. the openai package's "
                         "OpenAI(base_url=..., api_key=...)).")
        lines.append(f"Logs: {self.config.log_dir}/. Press Ctrl-C to stop.")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------ run/stop
    def request_stop(self, signum: int | None = None) -> None:
        if signum is not None and self.signal_received is None:
            self.signal_received = signum
        self.stop_event.set()

    def run(self) -> int:
        """Watch the children until a stop request (returns 0) or a child's death (returns 1); stops all."""
        try:
            while not self.stop_event.wait(MONITOR_INTERVAL):
                for child in self.children:
                    if not child.alive():
                        self._out_err(self.death_report(child, "unexpectedly"))
                        return 1
            return 0
        finally:
            self.stop()

    def death_report(self, child: _Child, when: str) -> str:
        code = child.returncode
        tail = child.log_tail(LOG_TAIL_LINES)
        return (f"{child.name} (pid {child.proc.pid if child.proc else '?'}) exited {when} with code {code}; "
                f"last lines of {child.log_path}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM every live child (web UI first, controller last), wait, SIGKILL the stragglers."""
        for child in reversed(self.children):
            child.signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.stop(self.config.stop_timeout)
            except Exception:
                logger.exception("could not stop %s", child.name)
        self._http.close()

    def _out_err(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------- cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-med launch",
        description="Start a controller, model workers, the web UI and the OpenAI-compatible API as child processes; Ctrl-C stops them all.",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address of every server (default %(default)s)")
    p.add_argument("--controller-port", type=int, default=DEFAULT_CONTROLLER_PORT,
                   help="default %(default)s; 0: a free port")
    p.add_argument("--worker-port", type=int, default=DEFAULT_WORKER_PORT,
                   help="port of the first worker, the next ones count up (default %(default)s); 0: free ports")
    p.add_argument("--web-port", "--port", dest="web_port", type=int, default=DEFAULT_WEB_PORT,
                   help="port of the web UI (default %(default)s); 0: a free port")
    p.add_argument("--model-path", action="append", default=None,
                   help="checkpoint folder or hub id; repeat for several models (default: the embedded tiny "
                        "random-weight checkpoint)")
    p.add_argument("--workers-per-model", type=int, default=1)
    p.add_argument("--gpus", default=None,
                   help="comma-separated devices, e.g. 0,1: each worker gets the next --num-gpus of them as "
                        "CUDA_VISIBLE_DEVICES (cycling); default: the devices the machine shows")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="any other worker flag, repeated, e.g. --worker-arg=--speed --worker-arg=2")
    # Every loader and engine flag of the worker, defined once (llava_med.model.args, the engine registry) and
    # passed on to every worker when set.
    add_model_args(p.add_argument_group("passed to every worker"), paths=False)
    add_engine_args(p)
    web = p.add_argument_group("web UI")
    web.add_argument("--no-web", action="store_true", help="do not start the web UI")
    web.add_argument("--share", action="store_true", help="public Gradio share link (off by default)")
    web.add_argument("--concurrency-count", type=int, default=None)
    web.add_argument("--web-arg", action="append", default=[], metavar="ARG", help="any other web UI flag")
    api = p.add_argument_group("OpenAI-compatible API")
    api.add_argument("--openai-port", type=int, default=DEFAULT_OPENAI_PORT,
                     help="port of the OpenAI-compatible API (default %(default)s); 0: a free port")
    api.add_argument("--no-openai", action="store_true", help="do not start the OpenAI-compatible API")
    api.add_argument("--openai-arg", action="append", default=[], metavar="ARG",
                     help="any other flag of the API, e.g. --openai-arg=--api-keys --openai-arg=secret")
    p.add_argument("--log-dir", default=DEFAULT_LOG_DIR,
                   help="children's logs, stack.json, and the web UI's chat logs in web/ (default %(default)s)")
    p.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds allowed for each server to become healthy (model loading included)")
    p.add_argument("--stop-timeout", type=float, default=10.0,
                   help="seconds a child gets to exit after SIGTERM before SIGKILL")
    return p


def _worker_flags() -> argparse.ArgumentParser:
    """A parser holding exactly the worker flags the launcher passes on."""
    parser = argparse.ArgumentParser(add_help=False)
    add_model_args(parser, paths=False)
    add_engine_args(parser)
    return parser


def forwarded_worker_args(args: argparse.Namespace) -> list[str]:
    """The worker flags set on the launcher's command line (other than ``--engine``), as worker arguments."""
    out: list[str] = []
    for action in _worker_flags()._actions:
        if not action.option_strings or action.dest in ("help", "engine"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # store_true / store_false
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    if args.load_4bit and args.load_8bit:
        raise LaunchError("--load-4bit and --load-8bit are exclusive")
    worker_args = forwarded_worker_args(args) + args.worker_arg
    web_args: list[str] = []
    if args.share:
        web_args.append("--share")
    if args.concurrency_count is not None:
        web_args += ["--concurrency-count", str(args.concurrency_count)]
    web_args += args.web_arg
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    if not gpus and args.engine != "fake" and args.device not in ("cpu", "mps"):
        gpus = detect_gpus()
        if gpus:
            logger.info("CUDA devices %s: each worker gets %d of them (--gpus to choose)", ",".join(gpus),
                        args.num_gpus)
    return LaunchConfig(
        host=args.host, controller_port=args.controller_port, worker_port=args.worker_port, web_port=args.web_port,
        model_paths=list(args.model_path or [None]), workers_per_model=args.workers_per_model, gpus=gpus,
        gpus_per_worker=args.num_gpus,
        engine=args.engine, worker_args=worker_args, web=not args.no_web, web_args=web_args,
        log_dir=Path(args.log_dir), startup_timeout=args.startup_timeout, stop_timeout=args.stop_timeout,
        openai=not args.no_openai, openai_port=args.openai_port, openai_args=args.openai_arg,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _http.configure_logging("info")
    try:
        config = config_from_args(args)
        stack = Stack(config)
    except LaunchError as exc:
        parser.error(str(exc))

    def on_signal(signum: int, frame: Any) -> None:
        if stack.stop_event.is_set():
            return
        logger.info("received %s: stopping the stack", signal.Signals(signum).name)
        stack.request_stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            others = [name for name, on in (("the web UI", config.web), ("the OpenAI API", config.openai)) if on]
            logger.info("starting %d worker(s)%s; logs in %s", config.num_workers,
                        "".join(f" and {name}" for name in others), config.log_dir)
            stack.start()
        except LaunchError as exc:
            if stack.signal_received is not None:
                logger.info("stopped before the stack was up")
                return 0
            print(f"llava-med launch: {exc}", file=sys.stderr, flush=True)
            return 1
        print(stack.summary(), flush=True)
        code = stack.run()
        if code == 0:
            logger.info("all children stopped")
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
