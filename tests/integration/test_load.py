"""A small run of scripts/load_test.py (the full one, 64 clients, writes benchmarks/RESULTS.md): concurrent
streaming clients through the controller's relay to two fake workers, with no error, shared by both workers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "load_test.py"


def test_concurrent_streams_through_the_relay_have_no_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run: the scripts' shared modules sit beside it
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    load_test = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "load_test", load_test)  # dataclasses look their module up there
    spec.loader.exec_module(load_test)
    report = load_test.run_load(clients=16, requests_per_client=2, new_tokens=16, token_delay=0.002, deadline=120,
                                log_dir=tmp_path)
    assert report.errors == [] and report.completed == 32
    assert report.tokens == 32 * 16
    assert sum(report.served.values()) == 32 and min(report.served.values()) >= 8  # both workers took a share
