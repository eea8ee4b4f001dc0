"""End to end with the real engine: a controller, a tiny-model worker (`--engine hf`) and a fake worker, as real
processes, driven like the original LLaVA clients."""

from __future__ import annotations

import base64

import pytest
import requests
from sample_images import png_b64, scan
from servers import listed_models, module_processes, original_stream, queue_length, wait_until

from llava_med.chat import Message, render_chat
from llava_med.model.generation import generate
from llava_med.sampling import SamplingParams
from llava_med.serve.client import LlavaMedClient, WorkerError
from llava_med.serve.protocol import ErrorCode

pytestmark = pytest.mark.slow

TINY = "llava-med-tiny-mistral"
FAKE = "llava-med-fake"


IMAGE = png_b64(scan())
RENDERED = render_chat([Message("user", "What does this scan show?", (IMAGE,))], "mistral_instruct")
PROMPT, STOP = RENDERED.prompt, RENDERED.stop_str


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    with module_processes(tmp_path_factory.mktemp("tiny-stack-logs"), request) as group:
        ctrl = group.start_controller()
        real = group.start_worker(ctrl.url, engine="hf", wait=False)  # no --model-path: the embedded tiny model
        fake = group.start_worker(ctrl.url, model_name=FAKE, wait=False)
        real.wait_healthy(180)
        fake.wait_healthy(30)
        wait_until(lambda: set(listed_models(ctrl.url)) == {TINY, FAKE},
                   20, message="both models listed")
        yield ctrl, real


def test_image_request_gives_model_layer_greedy_text(stack, tiny_loaded):
    ctrl, _ = stack
    requests.post(ctrl.url + "/refresh_all_workers", timeout=10)
    models = requests.post(ctrl.url + "/list_models", timeout=10).json()["models"]
    assert TINY in models
    address = requests.post(ctrl.url + "/get_worker_address", json={"model": TINY}, timeout=10).json()["address"]
    assert address
    pload = {"model": TINY, "prompt": PROMPT, "images": [IMAGE], "temperature": 0.0, "top_p": 1.0,
             "max_new_tokens": 24, "stop": STOP}
    expected = generate(tiny_loaded, PROMPT, [base64.b64decode(IMAGE)],
                        SamplingParams(temperature=0.0, max_new_tokens=24, stop=(STOP,)))
    assert expected
    for url in (address, ctrl.url):  # straight to the worker, and through the controller's relay
        chunks = list(original_stream(url, pload))
        assert all(c["error_code"] == 0 for c in chunks)
        assert chunks[-1]["text"].startswith(PROMPT)
        assert chunks[-1]["text"][len(PROMPT):] == expected
        outputs = [c["text"][len(PROMPT):] for c in chunks]
        assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:]))


def test_worker_reports_its_template(stack):
    _, real = stack
    status = requests.post(real.url + "/worker_get_status", timeout=10).json()
    assert status["model_names"] == [TINY]
    # The KV cache: allocated at start for --max-batch-size 16 requests of the whole context (1 MiB each here).
    assert status["kv_cache"] == {"slots": 16, "slots_used": 0, "slot_tokens": 2048, "tokens_used": 0,
                                  "bytes": 16 * 2**20}
    details = requests.post(real.url + "/model_details", timeout=10).json()
    assert details["context_length"] == 2048


@pytest.mark.parametrize(
    ("pload", "code", "words"),
    [
        ({"prompt": PROMPT, "images": ["%%%not-base64%%%"]}, ErrorCode.BAD_IMAGE, "base64"),
        ({"prompt": PROMPT, "images": [base64.b64encode(b"GIF89a-truncated").decode()]}, ErrorCode.BAD_IMAGE, "image"),
        ({"prompt": PROMPT, "images": []}, ErrorCode.IMAGE_COUNT_MISMATCH, "number of images"),
        ({"prompt": "[INST] hi [/INST]", "images": [IMAGE]}, ErrorCode.IMAGE_COUNT_MISMATCH, "number of images"),
        ({"prompt": "[INST] " + "lung " * 3000 + "[/INST]"}, ErrorCode.CONTEXT_OVERFLOW, "context"),
        ({"prompt": PROMPT, "images": ["/etc/hostname"]}, ErrorCode.BAD_IMAGE, "base64"),
        ({"prompt": PROMPT, "images": [IMAGE], "max_new_tokens": -3}, ErrorCode.PARAM_OUT_OF_RANGE, "max_new_tokens"),
        ({"prompt": PROMPT, "images": [IMAGE], "temperature": -1}, ErrorCode.PARAM_OUT_OF_RANGE, "temperature"),
        ({"prompt": PROMPT, "images": [IMAGE], "image_process_mode": "Stretch"}, ErrorCode.BAD_REQUEST, "Stretch"),
        ({"prompt": PROMPT, "images": [IMAGE], "stop": ["x"] * 17}, ErrorCode.BAD_REQUEST, "at most 16 stop"),
        ({"prompt": PROMPT, "images": [IMAGE], "stop": "y" * 4000}, ErrorCode.BAD_REQUEST, "limited to 256"),
        ({"prompt": PROMPT, "images": [IMAGE], "seed": 2**100}, ErrorCode.PARAM_OUT_OF_RANGE, "seed"),
    ],
    ids=["bad-base64", "truncated", "missing-image", "extra-image", "too-long", "file-path", "neg-tokens",
         "neg-temperature", "bad-mode", "many-stops", "long-stop", "huge-seed"],
)
def test_bad_requests_to_real_worker_then_good_one(stack, pload, code, words):
    _, real = stack
    chunks = list(original_stream(real.url, {"model": TINY, **pload}))
    assert len(chunks) == 1
    assert chunks[0]["error_code"] == code
    assert words.lower() in chunks[0]["text"].lower()
    good = list(original_stream(real.url, {"model": TINY, "prompt": "[INST] hi [/INST]", "temperature": 0,
                                           "max_new_tokens": 4}))
    assert good[-1]["error_code"] == 0


def test_python_client_streams_and_reports_typed_errors(stack):
    ctrl, _ = stack
    client = LlavaMedClient(controller_url=ctrl.url)
    text = client.generate(TINY, PROMPT, images=[IMAGE], temperature=0.0, max_new_tokens=8)
    assert text
    with pytest.raises(WorkerError) as info:
        client.generate(TINY, PROMPT, images=[], max_new_tokens=8)
    assert info.value.code == ErrorCode.IMAGE_COUNT_MISMATCH


def test_closing_stream_frees_the_real_worker(stack):
    _, real = stack
    response = requests.post(real.url + "/worker_generate_stream",
                             json={"model": TINY, "prompt": "[INST] talk [/INST]", "max_new_tokens": 1000,
                                   "ignore_eos": True, "temperature": 0.7}, stream=True, timeout=60)
    lines = response.iter_lines(delimiter=b"\0")
    next(lines)
    next(lines)
    response.close()

    def idle() -> bool:
        return queue_length(real.url) == 0

    wait_until(idle, 20, message="queue length back to 0 after the client left")
