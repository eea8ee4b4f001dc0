"""Recorded wire streams: the exact bytes a worker (and the controller's relay) sent for a few fixed requests.

``tests/data/golden_streams.json`` was recorded by ``python tests/golden.py`` before the architecture change of the
engine, sampling and chat modules; ``tests/integration/test_golden_streams.py`` replays the same requests and
asserts byte-identical streams, so refactoring can never change what the original clients receive.

Every request is deterministic: greedy or seeded sampling on the tiny checkpoint, with ``--stream-min-interval 0``
(one chunk per token, no timing in the chunking), or the fake engine without token delay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests
from sample_images import png_b64, scan

GOLDEN_FILE = Path(__file__).resolve().parent / "data" / "golden_streams.json"

TINY = "llava-med-tiny-mistral"
FAKE = "llava-med-fake"


def requests_for(image: str) -> dict[str, tuple[str, Any]]:
    """name -> (target: 'tiny' | 'fake' | 'relay', JSON body or raw bytes)."""
    q = "[INST] <image>\nWhat does this scan show? [/INST]"
    return {
        "tiny-text-greedy": ("tiny", {"model": TINY, "prompt": "[INST] Is the heart enlarged? [/INST]",
                                      "temperature": 0, "max_new_tokens": 12}),
        "tiny-image-greedy": ("tiny", {"model": TINY, "prompt": q, "images": [image], "temperature": 0,
                                       "max_new_tokens": 12}),
        "tiny-image-pad-noecho-stop": ("tiny", {"model": TINY, "prompt": q, "images": [image], "temperature": 0,
                                                "max_new_tokens": 10, "echo": False, "stop": ["</s>", "zz"],
                                                "image_process_mode": "Crop"}),
        "tiny-seeded-sampling": ("tiny", {"model": TINY, "prompt": "[INST] Describe a CT scan. [/INST]",
                                          "temperature": 0.7, "top_p": 0.9, "seed": 1234, "max_new_tokens": 10,
                                          "ignore_eos": True}),
        "tiny-defaults": ("tiny", {"model": TINY, "prompt": "[INST] hi [/INST]", "seed": 7, "max_new_tokens": 6}),
        "tiny-image-count-mismatch": ("tiny", {"model": TINY, "prompt": q, "images": [], "max_new_tokens": 4}),
        "tiny-bad-json": ("tiny", b"{not json"),
        "tiny-temperature-out-of-range": ("tiny", {"model": TINY, "prompt": "[INST] hi [/INST]",
                                                   "temperature": 9.5}),
        "tiny-missing-prompt": ("tiny", {"model": TINY}),
        "relay-image-greedy": ("relay", {"model": TINY, "prompt": q, "images": [image], "temperature": 0,
                                         "max_new_tokens": 8}),
        "relay-unknown-model": ("relay", {"model": "no-such-model", "prompt": "[INST] hi [/INST]"}),
        "fake-text": ("fake", {"model": FAKE, "prompt": "[INST] What is a pleural effusion? [/INST]",
                               "max_new_tokens": 64}),
        "fake-image-length": ("fake", {"model": FAKE, "prompt": q, "images": [image], "max_new_tokens": 5,
                                       "echo": False}),
    }


def fetch(url: str, body: Any) -> str:
    """The raw stream of ``POST url/worker_generate_stream`` (JSON text with its NUL delimiters)."""
    kwargs = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    resp = requests.post(url + "/worker_generate_stream", timeout=120, **kwargs)
    assert resp.status_code == 200, resp.text
    return resp.content.decode("ascii")


def record_all(urls: dict[str, str]) -> dict[str, str]:
    image = png_b64(scan())
    return {name: fetch(urls[target], body) for name, (target, body) in requests_for(image).items()}


def record_streams(log_dir: Path) -> dict[str, str]:
    """Start a controller, a tiny-model worker and a fake worker, and record every stream of :func:`requests_for`
    (the recording and the test that replays it run this same function). The servers' logs are printed on failure."""
    from servers import FAST_HEARTBEAT_ENV, ProcessGroup, listed_models, wait_until

    group = ProcessGroup(log_dir, env=FAST_HEARTBEAT_ENV)
    try:
        ctrl = group.start_controller()
        tiny = group.start_worker(ctrl.url, "--stream-min-interval", "0", "--dtype", "float32", engine="hf",
                                  wait=False)
        fake = group.start_worker(None, "--fake-token-delay", "0", model_name=FAKE)
        tiny.wait_healthy(180)
        wait_until(lambda: listed_models(ctrl.url) == [TINY], 20,
                   message="the tiny worker registered")
        return record_all({"tiny": tiny.url, "fake": fake.url, "relay": ctrl.url})
    except BaseException:
        print(group.logs())
        raise
    finally:
        group.stop_all()


def main() -> int:  # pragma: no cover - run by hand to (re)record
    import tempfile

    streams = record_streams(Path(tempfile.mkdtemp(prefix="golden-")))
    GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps(streams, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"recorded {len(streams)} streams to {GOLDEN_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
