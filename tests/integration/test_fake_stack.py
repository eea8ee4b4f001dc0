"""End to end on real processes (controller + fake-engine workers), driven like the original clients."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from servers import (
    FAST_HEARTBEAT_ENV,
    ProcessGroup,
    ServerProcess,
    free_port,
    last_before_error,
    module_processes,
    original_stream,
    queue_length,
    wait_until,
)

from llava_med.serve.client import ClientConnectionError, LlavaMedClient
from llava_med.serve.protocol import ErrorCode

pytestmark = pytest.mark.slow

MODEL = "llava-med-fake"
PROMPT = "[INST] <image>\nWhat does this chest x-ray show? [/INST]"
ANSWER = "This is a fake answer about: What does this chest x-ray show? (end)"
IMAGE = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image bytes").decode()
HEARTBEAT = float(FAST_HEARTBEAT_ENV["LLAVA_MED_WORKER_HEART_BEAT_INTERVAL"])
LONG = {"model": MODEL, "prompt": "[INST] tell me everything [/INST]", "ignore_eos": True, "max_new_tokens": 1000,
        "temperature": 0.7}


def post(url: str, **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", 10)
    return requests.post(url, **kwargs)


def workers_known(controller: ServerProcess) -> int:
    return requests.get(controller.url + "/health", timeout=5).json()["workers"]


@dataclass
class Stack:
    controller: ServerProcess
    workers: list[ServerProcess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A controller and two workers of the same model; the second started with the README's short flags."""
    with module_processes(tmp_path_factory.mktemp("stack-logs"), request) as group:
        ctrl = group.start_controller()
        w1 = group.start_worker(ctrl.url, model_name=MODEL, wait=False)
        port = free_port()
        w2 = group.start_module(
            "worker", "llava_med.serve.model_worker", "--engine", "fake", "--model-name", MODEL,
            "--controller", ctrl.url, "--worker", f"http://127.0.0.1:{port}", port=port, wait=False,
        )
        for w in (w1, w2):
            w.wait_healthy(30)
        wait_until(lambda: workers_known(ctrl) == 2, 10, message="both workers registered")
        yield Stack(ctrl, [w1, w2])


def test_original_client_flow_direct(stack):
    ctrl = stack.controller.url
    assert post(ctrl + "/refresh_all_workers").status_code == 200
    models = post(ctrl + "/list_models").json()["models"]
    assert models == [MODEL]
    addresses = {post(ctrl + "/get_worker_address", json={"model": MODEL}).json()["address"] for _ in range(4)}
    assert addresses <= {w.url for w in stack.workers} and addresses  # the short-flag worker registered right
    assert post(ctrl + "/get_worker_address", json={"model": "unknown"}).json() == {"address": ""}
    for worker in stack.workers:
        pload = {"model": MODEL, "prompt": PROMPT, "temperature": 0.2, "top_p": 0.7, "max_new_tokens": 512,
                 "stop": "</s>", "images": [IMAGE]}
        chunks = list(original_stream(worker.url, pload))
        assert all(c["error_code"] == 0 for c in chunks)
        output = chunks[-1]["text"][len(PROMPT):].strip()
        assert output == ANSWER
        assert chunks[-1]["text"].split("[/INST]")[-1].strip() == ANSWER  # LLaVA-Med's test_message way


def test_original_client_flow_through_relay(stack):
    pload = {"model": MODEL, "prompt": PROMPT, "images": [IMAGE], "max_new_tokens": 512, "stop": "</s>"}
    chunks = list(original_stream(stack.controller.url, pload))
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"] == PROMPT + ANSWER
    [err] = list(original_stream(stack.controller.url, {**pload, "model": "unknown"}))
    assert err["error_code"] == ErrorCode.CONTROLLER_NO_WORKER
    assert "'unknown'" in err["text"] and MODEL in err["text"]
    [err] = list(original_stream(stack.controller.url, {**pload, "images": [IMAGE, IMAGE]}))
    assert err["error_code"] == ErrorCode.IMAGE_COUNT_MISMATCH and "2 image(s)" in err["text"]


@pytest.mark.parametrize("route", ["direct", "relay"])
def test_client_closing_its_stream_frees_the_worker(stack, route):
    url = stack.workers[0].url if route == "direct" else stack.controller.url
    response = requests.post(url + "/worker_generate_stream", json=LONG, stream=True, timeout=(5, 15))
    lines = (c for c in response.iter_lines(decode_unicode=False, delimiter=b"\0") if c)
    for _ in range(3):
        assert json.loads(next(lines))["error_code"] == 0
    busy = wait_until(lambda: [w for w in stack.workers if queue_length(w.url) == 1], 5, message="a busy worker")
    response.close()
    wait_until(lambda: all(queue_length(w.url) == 0 for w in busy), 5, message="queue length back to 0")


def test_test_message_script(stack):
    base = [sys.executable, "-m", "llava_med.serve.test_message", "--max-new-tokens", "64",
            "--message", "Describe the chest x-ray"]
    done = subprocess.run([*base, "--controller-address", stack.controller.url, "--model-name", MODEL],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"Models: ['{MODEL}']" in done.stdout and "worker_addr: http://127.0.0.1:" in done.stdout
    assert "[INST] Describe the chest x-ray [/INST]" in done.stdout
    assert done.stdout.rstrip().endswith("This is a fake answer about: Describe the chest x-ray (end)")
    direct = subprocess.run([*base, "--worker-address", stack.workers[1].url], capture_output=True, text=True,
                            timeout=30)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.rstrip().endswith("(end)")
    missing = subprocess.run([*base, "--controller-address", stack.controller.url, "--model-name", "nope"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "no worker serves model 'nope'" in missing.stderr


def test_worker_killed_mid_stream(procs: ProcessGroup):
    ctrl = procs.start_controller()
    workers = [procs.start_worker(ctrl.url, model_name=MODEL, wait=False) for _ in range(2)]
    for w in workers:
        w.wait_healthy(30)
    wait_until(lambda: workers_known(ctrl) == 2, 10, message="both workers registered")

    # Through the relay: an error chunk naming the dead worker, within seconds.
    chunks = original_stream(ctrl.url, LONG, timeout=(5, 20))
    for _ in range(3):
        assert next(chunks)["error_code"] == 0
    [victim] = wait_until(lambda: [w for w in workers if queue_length(w.url) == 1], 5, message="the busy worker")
    [survivor] = [w for w in workers if w is not victim]
    victim.kill()
    killed_at = time.monotonic()
    last = last_before_error(chunks)
    assert time.monotonic() - killed_at < 10
    assert last is not None and last["error_code"] == ErrorCode.WORKER_UNREACHABLE
    assert victim.url in last["text"]
    # The controller stopped routing to it at once; the other worker serves the next requests.
    for _ in range(3):
        assert post(ctrl.url + "/get_worker_address", json={"model": MODEL}).json()["address"] == survivor.url
    chunks = list(original_stream(ctrl.url, {"model": MODEL, "prompt": PROMPT, "images": [IMAGE]}))
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].endswith(ANSWER)

    # Directly: the client gets a ClientConnectionError within seconds.
    client = LlavaMedClient(worker_url=survivor.url, timeout=20)
    stream = client.generate_stream(MODEL, "[INST] go [/INST]", ignore_eos=True, max_new_tokens=1000)
    assert next(stream).output
    survivor.kill()
    killed_at = time.monotonic()
    with pytest.raises(ClientConnectionError):
        for _ in stream:
            pass
    assert time.monotonic() - killed_at < 10
    post(ctrl.url + "/refresh_all_workers")
    assert post(ctrl.url + "/list_models").json() == {"models": []}
    [err] = list(original_stream(ctrl.url, {"model": MODEL, "prompt": "hi"}))
    assert err["error_code"] == ErrorCode.CONTROLLER_NO_WORKER and MODEL in err["text"]


def test_restarted_controller_relearns_workers_within_a_heartbeat(procs: ProcessGroup):
    ctrl = procs.start_controller()
    workers = [procs.start_worker(ctrl.url, model_name=name, wait=False) for name in (MODEL, "other-model")]
    for w in workers:
        w.wait_healthy(30)
    wait_until(lambda: workers_known(ctrl) == 2, 10, message="both workers registered")
    ctrl.kill()
    restarted = procs.start_controller(port=ctrl.port)
    up_at = time.monotonic()
    wait_until(lambda: workers_known(restarted) == 2, 3 * HEARTBEAT + 2, interval=0.05,
               message="workers registered with the new controller")
    # One heartbeat interval, plus a little for a worker whose beat hit the dead port and is backing off.
    assert time.monotonic() - up_at < HEARTBEAT + 1.5
    assert post(restarted.url + "/list_models").json() == {"models": sorted([MODEL, "other-model"])}
    chunks = list(original_stream(restarted.url, {"model": "other-model", "prompt": "[INST] hi [/INST]"}))
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].endswith("(end)")


def test_register_worker_script(procs: ProcessGroup):
    ctrl = procs.start_controller("--auth-token", "s3cret")
    worker = procs.start_worker(None, model_name="manual")  # --no-register
    script = [sys.executable, "-m", "llava_med.serve.register_worker", "--controller-address", ctrl.url]
    refused = subprocess.run([*script, "--worker-name", worker.url], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "Authorization: Bearer" in refused.stderr
    done = subprocess.run([*script, "--worker-name", worker.url, "--auth-token", "s3cret"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert post(ctrl.url + "/list_models").json() == {"models": ["manual"]}
    dead = subprocess.run([*script, "--worker-name", f"http://127.0.0.1:{free_port()}", "--auth-token", "s3cret"],
                          capture_output=True, text=True, timeout=30)
    assert dead.returncode == 1 and "cannot register" in dead.stderr


def test_non_streaming_client_that_leaves_frees_its_slot(stack):
    worker = stack.workers[0]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(worker.url + "/worker_generate", json=LONG, timeout=(5, 1))
    wait_until(lambda: queue_length(worker.url) == 0, 10, message="the worker cancelled the abandoned generation")
