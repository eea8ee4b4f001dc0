"""Hardening for a shared lab, on real processes (controller, a fake-engine worker, a tiny-model worker): each
defect found by an attacker's trial, reproduced against the servers and refused with a clear error, after which the
server keeps serving. Faults: a worker frozen mid-stream (SIGSTOP), aliases, hijack and loop attempts."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import struct
import time

import pytest
import requests
from PIL import Image
from servers import (
    FAST_HEARTBEAT_ENV,
    ServerProcess,
    free_port,
    last_before_error,
    module_processes,
    original_stream,
    queue_length,
    wait_until,
)

from llava_med.constants import SERVER_ERROR_MSG
from llava_med.serve.protocol import ErrorCode

pytestmark = pytest.mark.slow

FAKE, TINY = "llava-med-fake", "llava-med-tiny-mistral"
INTERNALS = ("Traceback", "RecursionError", "TypeError", "RuntimeError", "probability tensor", "nan")


def post(url: str, **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", 30)
    return requests.post(url, **kwargs)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    with module_processes(tmp_path_factory.mktemp("hardening"), request) as group:
        ctrl = group.start_controller()
        tiny = group.start_worker(ctrl.url, "--stream-min-interval", "0", engine="hf", wait=False)
        fake = group.start_worker(ctrl.url, "--fake-token-delay", "0.001", model_name=FAKE)
        tiny.wait_healthy(180)
        wait_until(lambda: set(post(ctrl.url + "/list_models").json()["models"]) == {FAKE, TINY}, 20,
                   message="both workers registered")
        yield group, ctrl, tiny, fake


def raw_stream(url: str, body: bytes | dict) -> list[dict]:
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = post(url + "/worker_generate_stream", **kwargs)
    assert resp.status_code == 200  # the stream endpoint never answers 4xx/5xx: the original clients read chunks
    return [json.loads(part) for part in resp.content.split(b"\0") if part.strip()]


def serves(url: str, model: str) -> bool:
    chunks = raw_stream(url, {"model": model, "prompt": "[INST] hi [/INST]", "max_new_tokens": 3, "temperature": 0})
    return chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"[" * 100_000, ErrorCode.BAD_REQUEST, "deeper than 32 levels"),
        (b'{"model": "%s", "prompt": "\\ud800 what?"}', ErrorCode.BAD_REQUEST, "unpaired surrogate"),
        ({"prompt": "[INST] hi [/INST]", "model": "x" * 100_000}, ErrorCode.INVALID_MODEL, "this worker serves"),
        ({"prompt": "[INST] <image>\nhi [/INST]", "images": ["not base64 !"]}, ErrorCode.BAD_IMAGE, "base64"),
        ({"prompt": "[INST] hi [/INST]", "temperature": 9}, ErrorCode.PARAM_OUT_OF_RANGE, "temperature"),
    ],
    ids=["nested-json", "lone-surrogate", "huge-model-name", "bad-image", "temperature"],
)
@pytest.mark.parametrize("target", ["tiny", "relay"])
def test_bad_inputs_get_one_clear_chunk_then_the_stack_serves(stack, target, body, code, words):
    _, ctrl, tiny, _ = stack
    url = tiny.url if target == "tiny" else ctrl.url
    if isinstance(body, bytes):
        body = body.replace(b"%s", TINY.encode())
    elif "model" not in body:
        body = {**body, "model": TINY}
    if target == "relay" and code == ErrorCode.INVALID_MODEL:
        code, words = ErrorCode.CONTROLLER_NO_WORKER, "no worker serves model 'xxxxx"
    [chunk] = raw_stream(url, body)
    assert chunk["error_code"] == code and words in chunk["text"]
    assert not chunk["text"].startswith(SERVER_ERROR_MSG)  # a bad request is not "high traffic"
    assert len(chunk["text"]) < 400 and not any(word in chunk["text"] for word in INTERNALS)
    assert serves(url, TINY)


def test_degenerate_sampling_values_are_well_defined(stack):
    _, _, tiny, _ = stack
    chunks = raw_stream(tiny.url, {"model": TINY, "prompt": "[INST] hi [/INST]", "top_p": 1e-46, "temperature": 1,
                                   "max_new_tokens": 3, "seed": 1})
    greedy = raw_stream(tiny.url, {"model": TINY, "prompt": "[INST] hi [/INST]", "temperature": 0,
                                   "max_new_tokens": 3})
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"] == greedy[-1]["text"]  # only the top token


def test_other_worker_routes_refuse_cleanly(stack):
    _, _, tiny, _ = stack
    r = post(tiny.url + "/worker_generate", data=b"[" * 100_000)
    assert r.status_code == 200 and r.json()["error_code"] == ErrorCode.BAD_REQUEST
    r = post(tiny.url + "/count_token", data=b'{"prompt": "\\ud800"}')
    assert r.status_code == 400 and "unpaired surrogate" in r.json()["message"]
    for url in (tiny.url, stack[1].url):
        assert requests.get(url + "/docs", timeout=5).status_code == 404
        assert requests.get(url + "/openapi.json", timeout=5).status_code == 404
    assert post(tiny.url + "/count_token", json={"prompt": "[INST] hi [/INST]"}).json()["count"] > 0


def _ico_over_a_huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")
    png = buf.getvalue()
    return struct.pack("<HHHBBBBHHII", 0, 1, 1, 0, 0, 0, 0, 1, 32, len(png), 22) + png


def _palette_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (side, side)).save(buf, "PNG", transparency=0)
    return buf.getvalue()


def test_oversized_prompt_and_images_are_refused_before_the_work(stack):
    """A 30 MB prompt and images whose headers understate them: refused fast, and the worker's memory stays."""
    _, _, tiny, _ = stack
    assert serves(tiny.url, TINY)
    before = rss_mib(tiny.pid)
    started = time.monotonic()
    [chunk] = raw_stream(tiny.url, {"model": TINY, "prompt": "lung " * 6_000_000, "max_new_tokens": 2})
    assert chunk["error_code"] == ErrorCode.CONTEXT_OVERFLOW and "30000000 characters" in chunk["text"]
    assert time.monotonic() - started < 10  # it was 36 s of tokenising
    for data, words in ((_ico_over_a_huge_png(), "12000x12000"), (_palette_png(7000), "7000x7000")):
        image = base64.b64encode(data).decode()
        [chunk] = raw_stream(tiny.url, {"model": TINY, "prompt": "[INST] <image>\nhi [/INST]", "images": [image]})
        assert chunk["error_code"] == ErrorCode.BAD_IMAGE and words in chunk["text"]
    assert serves(tiny.url, TINY)
    assert rss_mib(tiny.pid) - before < 200


def test_a_client_leaving_mid_upload_leaves_no_traceback(stack):
    _, _, tiny, fake = stack
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000)
    time.sleep(0.5)
    assert serves(fake.url, FAKE)
    assert "Traceback" not in fake.log_tail(None) and "ERROR" not in fake.log_tail(None)


# ---------------------------------------------------------------------------------------------------------- registry


def register(ctrl: ServerProcess, worker_name: str, **extra) -> requests.Response:
    return post(ctrl.url + "/register_worker", json={"worker_name": worker_name, "check_heart_beat": False, **extra})


def test_a_hijacker_cannot_win_dispatch(stack):
    _, ctrl, _, fake = stack
    dead = f"http://127.0.0.1:{free_port()}"
    r = register(ctrl, dead, worker_status={"model_names": [FAKE], "speed": 1e9, "queue_length": 0})
    assert r.status_code == 400 and "did not answer" in r.json()["message"]
    # A real worker registered by hand with an inflated speed: its own status counts, not the registrant's.
    body = b'{"worker_name": "%s", "check_heart_beat": false, "worker_status": {"model_names": ["stolen-model"], ' \
           b'"speed": 1e999}}' % fake.url.encode()  # 1e999: infinity once parsed
    r = post(ctrl.url + "/register_worker", data=body)
    assert r.status_code == 200 and r.json()["worker_status"]["speed"] == 1.0
    workers = requests.get(ctrl.url + "/list_workers", timeout=5).json()["workers"]
    assert dead not in [w["address"] for w in workers]
    assert "stolen-model" not in post(ctrl.url + "/list_models").json()["models"]
    for url in (f"{fake.url}/?", f"{fake.url}/x?y=1", "http://user:pw@127.0.0.1:1"):
        assert register(ctrl, url).status_code == 400


def test_aliases_of_one_worker_are_one_entry(stack):
    _, ctrl, _, fake = stack
    port = fake.port
    for host in ("127.0.0.1", "localhost", "127.1", "[::ffff:127.0.0.1]", "0x7f.0.0.1"):
        assert register(ctrl, f"http://{host}:{port}").status_code == 200
    entries = [w for w in requests.get(ctrl.url + "/list_workers", timeout=5).json()["workers"]
               if w["model_names"] == [FAKE]]
    assert len(entries) == 1 and entries[0]["aliases"] == [f"http://localhost:{port}"]
    assert {post(ctrl.url + "/get_worker_address", json={"model": FAKE}).json()["address"] for _ in range(4)} == {
        f"http://127.0.0.1:{port}"}


def test_loops_are_refused(stack, tmp_path):
    group, ctrl, _, _ = stack
    r = register(ctrl, ctrl.url.replace("127.0.0.1", "localhost"))
    assert r.status_code == 400 and "this controller itself" in r.json()["message"]
    # Two controllers registered with each other: the relay stops at once instead of bouncing.
    other = group.start_controller()
    worker = group.start_worker(other.url, "--fake-token-delay", "0", model_name="looped")
    wait_until(lambda: post(other.url + "/list_models").json()["models"] == ["looped"], 10, message="registered")
    assert register(ctrl, other.url).status_code == 200
    assert register(other, ctrl.url).status_code == 200
    started = time.monotonic()
    chunks = raw_stream(ctrl.url, {"model": "no-such-model-anywhere", "prompt": "hi"})
    assert chunks[-1]["error_code"] in (ErrorCode.CONTROLLER_NO_WORKER, ErrorCode.RELAY_LOOP)
    assert time.monotonic() - started < 5
    # Each lists the other's models too, but a relay never goes back to a controller it came through:
    # ctrl -> other -> its worker, and other -> ctrl -> ctrl's worker.
    for _ in range(4):
        assert raw_stream(ctrl.url, {"model": "looped", "prompt": "[INST] hi [/INST]"})[-1]["error_code"] == 0
        done = raw_stream(other.url, {"model": FAKE, "prompt": "[INST] hi [/INST]", "max_new_tokens": 2})
        assert done[-1]["error_code"] == 0
    worker.stop()
    other.stop()


def test_workers_without_heartbeats_expire_when_they_stop_answering(stack):
    group, ctrl, _, _ = stack
    manual = group.start_worker(None, model_name="manual-model")  # --no-register: no heartbeats
    assert register(ctrl, manual.url).status_code == 200
    manual.kill()
    expiration = float(FAST_HEARTBEAT_ENV["LLAVA_MED_CONTROLLER_HEART_BEAT_EXPIRATION"])
    wait_until(lambda: "manual-model" not in post(ctrl.url + "/list_models").json()["models"], 2 * expiration + 3,
               message="the silent manual entry expired")


def test_a_frozen_worker_times_out_and_the_other_serves(procs):
    """SIGSTOP mid-stream: the client gets a timeout error (not a hang), the controller stops routing to it."""
    env = {"LLAVA_MED_WORKER_API_TIMEOUT": "3"}
    frozen = None
    try:
        ctrl = procs.start_controller(env=env)
        workers = [procs.start_worker(ctrl.url, "--fake-token-delay", "0.05", model_name=FAKE, env=env)
                   for _ in range(2)]
        wait_until(lambda: len(requests.get(ctrl.url + "/list_workers", timeout=5).json()["workers"]) == 2, 10,
                   message="both registered")
        long = {"model": FAKE, "prompt": "[INST] talk [/INST]", "ignore_eos": True, "max_new_tokens": 500}
        chunks = original_stream(ctrl.url, long, timeout=(5, 20))
        assert next(chunks)["error_code"] == 0
        [frozen] = [w for w in workers if queue_length(w.url) == 1]
        frozen.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        last = last_before_error(chunks)
        assert last["error_code"] == ErrorCode.CONTROLLER_WORKER_TIMEOUT and frozen.url in last["text"]
        assert time.monotonic() - stopped_at < 10
        [survivor] = [w for w in workers if w is not frozen]
        wait_until(lambda: {post(ctrl.url + "/get_worker_address", json={"model": FAKE}).json()["address"]
                            for _ in range(3)} == {survivor.url}, 10, message="the frozen worker left the registry")
        chunks = list(original_stream(ctrl.url, {"model": FAKE, "prompt": "[INST] hi [/INST]"}))
        assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].endswith("(end)")  # the survivor answers
    finally:
        if frozen is not None:
            frozen.signal(signal.SIGCONT)


def test_status_command_prints_the_workers(stack):
    import subprocess
    import sys

    _, ctrl, tiny, fake = stack
    done = subprocess.run([sys.executable, "-m", "llava_med", "status", "--controller-url", ctrl.url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:4] == ["WORKER", "MODELS", "QUEUE", "SPEED"]
    assert any(tiny.url in row and TINY in row and " ok " in row for row in rows)
    assert any(fake.url in row and FAKE in row for row in rows)
    as_json = subprocess.run([sys.executable, "-m", "llava_med", "status", "--controller-url", ctrl.url, "--json"],
                             capture_output=True, text=True, timeout=60)
    assert {w["address"] for w in json.loads(as_json.stdout)} >= {tiny.url, fake.url}
    gone = subprocess.run([sys.executable, "-m", "llava_med", "status", "--controller-url",
                           f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "cannot ask the controller" in gone.stderr
