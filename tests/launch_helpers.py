"""Run ``llava-med launch`` as a real child process in tests: start it, read its ``stack.json``, stop it, and check
that no child is left behind. Every wait has a deadline; everything binds 127.0.0.1 on free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from servers import FAST_HEARTBEAT_ENV, _base_env, wait_until

from llava_med.serve.processes import ManagedProcess

FREE_PORTS = ["--controller-port", "0", "--worker-port", "0", "--web-port", "0", "--openai-port", "0"]


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


@dataclass
class LaunchedStack:
    """A launcher process (the project's ManagedProcess; its output in ``<log_dir>/launcher.out``) and what it
    reported in ``stack.json``."""

    process: ManagedProcess
    log_dir: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def proc(self) -> subprocess.Popen:
        return self.process.proc

    @property
    def web_url(self) -> str:
        return self.info["web_url"]

    @property
    def controller_url(self) -> str:
        return self.info["controller_url"]

    @property
    def worker_urls(self) -> list[str]:
        return self.info["worker_urls"]

    def child_pids(self) -> list[int]:
        return [c["pid"] for c in self.info["children"]]

    def pid_of(self, role: str) -> int:
        return next(c["pid"] for c in self.info["children"] if c["role"] == role)

    def output(self) -> str:
        """What the launcher printed (stdout and stderr)."""
        return self.process.log_tail(None)

    def logs(self, tail: int = 60) -> str:
        parts = [f"----- launcher -----\n{self.output()[-6000:]}"]
        for log in sorted(self.log_dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"----- {log.name} -----\n" + "\n".join(lines))
        return "\n".join(parts)

    def worker_queue_length(self, index: int = 0) -> int:
        resp = requests.post(self.worker_urls[index] + "/worker_get_status", timeout=5)
        return int(resp.json()["queue_length"])

    def models(self) -> list[str]:
        return requests.post(self.controller_url + "/list_models", timeout=5).json()["models"]

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM the launcher and wait for it; returns its exit code."""
        self.process.signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill_everything(self) -> None:
        """Last-resort cleanup after a failed test: no process may outlive the test."""
        pids = self.child_pids() if self.info else []
        self.process.kill()
        for pid in pids:
            if not pid_gone(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def start_launcher(log_dir: Path, *args: str, timeout: float = 180.0,
                   env: dict[str, str] | None = None) -> LaunchedStack:
    """``python -m llava_med.serve.launch --log-dir LOG_DIR <free ports> *args``; returns once ``stack.json``
    exists (the launcher writes it when every child is healthy). Fails with the logs if the launcher exits."""
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "stack.json").unlink(missing_ok=True)
    argv = [sys.executable, "-m", "llava_med.serve.launch", "--log-dir", str(log_dir), *FREE_PORTS,
            "--startup-timeout", str(int(timeout)), *args]
    process = ManagedProcess("launcher", argv, log_dir / "launcher.out",
                             env=_base_env({**FAST_HEARTBEAT_ENV, **(env or {})})).start()
    stack = LaunchedStack(process, log_dir)
    info_path = log_dir / "stack.json"
    deadline = time.monotonic() + timeout + 20
    while not info_path.exists():
        if not process.alive():
            raise AssertionError(f"the launcher exited with {process.returncode} before the stack was up:\n"
                                 f"{stack.logs()}")
        if time.monotonic() > deadline:
            stack.kill_everything()
            raise AssertionError(f"the stack was not up after {timeout:g} s:\n{stack.logs()}")
        time.sleep(0.1)
    stack.info = json.loads(info_path.read_text())
    wait_until(lambda: "Press Ctrl-C to stop" in stack.output(), 10, message="the launcher's summary")
    return stack
