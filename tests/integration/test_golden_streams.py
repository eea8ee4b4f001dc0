"""The wire output is byte-identical to what was recorded before the architecture change (tests/golden.py).

Error streams were re-recorded once, deliberately: a bad request's error chunk no longer carries the original
"NETWORK ERROR DUE TO HIGH TRAFFIC" banner, which is now kept for overload and network conditions only.

The transformers engine hands a reader that fell behind only its newest (cumulative) text, so on a loaded machine a
tiny-model stream may skip some intermediate chunks: each chunk received must then be, byte for byte, one of the
recorded chunks, in order, ending with the recorded final chunk. Scripted (fake) streams and errors are compared whole.
"""

from __future__ import annotations

import json

import pytest
from golden import GOLDEN_FILE, record_streams

pytestmark = pytest.mark.slow


def test_streams_are_byte_identical_to_the_recording(tmp_path):
    expected = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))
    got = record_streams(tmp_path / "logs")
    assert sorted(got) == sorted(expected)
    for name in expected:
        if name.startswith(("tiny-", "relay-")):
            assert_same_chunks(name, got[name], expected[name])
        else:
            assert got[name] == expected[name], f"stream {name!r} changed"


def assert_same_chunks(name: str, got: str, expected: str) -> None:
    frames, recorded = got.split("\0"), expected.split("\0")
    assert frames[-2:] == recorded[-2:], f"stream {name!r}: its final chunk changed"  # [..., final, ""]
    position = 0
    for frame in frames:
        assert frame in recorded[position:], f"stream {name!r}: chunk {frame[:120]!r} was never recorded"
        position = recorded.index(frame, position) + 1
