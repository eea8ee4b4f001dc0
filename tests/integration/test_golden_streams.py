"""The wire output is byte-identical to what was recorded before the architecture change (tests/golden.py)."""

from __future__ import annotations

import json

import pytest
import requests
from golden import FAKE, GOLDEN_FILE, TINY, record_all
from servers import FAST_HEARTBEAT_ENV, ProcessGroup, wait_until

pytestmark = pytest.mark.slow


def test_streams_are_byte_identical_to_the_recording(tmp_path):
    expected = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))
    group = ProcessGroup(tmp_path / "logs", env=FAST_HEARTBEAT_ENV)
    try:
        ctrl = group.start_controller()
        tiny = group.start_worker(ctrl.url, "--stream-min-interval", "0", "--dtype", "float32", engine="hf",
                                  wait=False)
        fake = group.start_worker(None, "--fake-token-delay", "0", model_name=FAKE)
        tiny.wait_healthy(180)
        wait_until(lambda: requests.post(ctrl.url + "/list_models", timeout=5).json()["models"] == [TINY], 20,
                   message="the tiny worker registered")
        got = record_all({"tiny": tiny.url, "fake": fake.url, "relay": ctrl.url})
    except BaseException:
        print(group.logs())
        raise
    finally:
        group.stop_all()
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], f"stream {name!r} changed"
