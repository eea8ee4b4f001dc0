"""Child server processes: start with a log file, wait for ``/health``, stop (SIGTERM, then SIGKILL).

:class:`ManagedProcess` is the one process lifecycle of the project: the launcher (``llava-med launch``), the
benchmarks and the tests all start their servers with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

__all__ = ["ManagedProcess", "ProcessStartError", "free_port", "peak_rss_bytes"]

_PR_SET_PDEATHSIG = 1
HEALTH_POLL_INTERVAL = 0.1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def peak_rss_bytes(pid: int) -> int | None:
    """Peak resident set size of a live process (Linux ``VmHWM``), or None where unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel sends SIGTERM to the child when its parent dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ProcessStartError(RuntimeError):
    """A child server exited or never became healthy; the message holds the tail of its log."""


class ManagedProcess:
    """One server started as a child process, its output going to ``log_path``.

    Args:
        name: shown in logs and errors.
        argv: the command.
        log_path: stdout and stderr of the child (appended).
        health_url: ``GET`` answered 200 once the server is ready (None: ready once started).
        env: the child's environment (default: this process's).
        new_session: start the child in its own session, so a Ctrl-C in the terminal reaches only the parent
            (which then stops its children in order).
        die_with_parent: on Linux, the kernel stops the child if the parent dies, even by SIGKILL.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, health_url: str | None = None,
                 env: Mapping[str, str] | None = None, *, new_session: bool = False,
                 die_with_parent: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.health_url = health_url
        self.env = dict(os.environ if env is None else env)
        self.new_session = new_session
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL,
            start_new_session=self.new_session,
            # Children are started from the parent's main thread, before it runs other threads: preexec_fn is safe.
            preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
        )
        logger.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int | None = 30) -> str:
        """The last ``lines`` lines of the log (all of it for None)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        all_lines = text.splitlines()
        return "\n".join(all_lines[-lines:] if lines else all_lines)

    def wait_healthy(self, timeout: float, *, should_stop: Callable[[], bool] | None = None,
                     client: httpx.Client | None = None) -> None:
        """Wait until ``health_url`` answers 200.

        Raises :class:`ProcessStartError` (with the log's tail) if the process exits or ``timeout`` seconds pass,
        and :class:`InterruptedError` as soon as ``should_stop()`` is true.
        """
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        http = client or httpx.Client(timeout=2.0, trust_env=False)
        try:
            while True:
                if should_stop is not None and should_stop():
                    raise InterruptedError(f"stopped while waiting for {self.name}")
                if not self.alive():
                    raise ProcessStartError(
                        f"{self.name} exited with code {self.returncode} while starting; last lines of "
                        f"{self.log_path}:\n{self.log_tail()}"
                    )
                if self.health_url is None:
                    return
                try:
                    resp = http.get(self.health_url)
                    if resp.status_code == 200:
                        return
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                if time.monotonic() > deadline:
                    raise ProcessStartError(f"{self.name} was not healthy after {timeout:.0f} s ({last}); last "
                                            f"lines of {self.log_path}:\n{self.log_tail()}")
                time.sleep(HEALTH_POLL_INTERVAL)
        finally:
            if client is None:
                http.close()

    def signal(self, signum: int) -> None:
        """Send ``signum`` if the process still runs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        self._close_log()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s: killing it", self.name, timeout)
                self.proc.kill()
                self.proc.wait(timeout)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
