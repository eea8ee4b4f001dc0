"""Shared fixtures: real server processes (see tests/servers.py) with their logs shown when a test fails."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Make ``import servers`` work however pytest was started (with or without a tests/__init__.py).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from servers import FAST_HEARTBEAT_ENV, ProcessGroup  # noqa: E402

# Exactness tests (the model against an independent implementation, batched against single greedy tokens) and the
# recorded golden streams are float32. ``--dtype auto`` would pick bf16 on a CPU with native bf16, so the default of
# every model loaded by the tests, in process or in a server process (which inherits the environment), is float32.
# A test that wants another dtype passes it explicitly.
os.environ.setdefault("LLAVA_MED_DTYPE", "float32")

# Fixtures of the tiny real checkpoint (tests/model_fixtures.py).
pytest_plugins = ["model_fixtures"]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def fast_heartbeat_env() -> dict[str, str]:
    return dict(FAST_HEARTBEAT_ENV)


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessGroup]:
    """A :class:`servers.ProcessGroup` whose processes are stopped after the test (logs printed on failure)."""
    group = ProcessGroup(tmp_path / "logs", env=FAST_HEARTBEAT_ENV)
    try:
        yield group
    finally:
        group.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if (rep is not None and rep.failed) or os.environ.get("LLAVA_MED_TEST_SHOW_LOGS"):
            print(f"\n===== server logs for {request.node.nodeid} =====\n{group.logs()}")
