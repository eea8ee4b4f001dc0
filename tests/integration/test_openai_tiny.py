"""The OpenAI-compatible API as a real process over a controller, a tiny-model worker and a slow scripted worker
(real processes on 127.0.0.1), driven by the official ``openai`` package."""

from __future__ import annotations

import base64

import pytest
import requests
from sample_images import png_b64, scan
from servers import listed_models, module_processes, original_stream, queue_length, wait_until

from llava_med.chat import Message, render_chat

openai = pytest.importorskip("openai", reason="the API tests use the official openai package (test extra)")

pytestmark = pytest.mark.slow

TINY, SLOW = "llava-med-tiny-mistral", "llava-med-slow"
KEY = "sk-lab-secret"
IMAGE = png_b64(scan(seed=5))
QUESTION = "What does this scan show?"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    with module_processes(tmp_path_factory.mktemp("openai-stack"), request) as group:
        ctrl = group.start_controller()
        tiny = group.start_worker(ctrl.url, engine="hf", wait=False)
        slow = group.start_worker(ctrl.url, "--fake-token-delay", "0.05", "--fake-script", "word " * 1000,
                                  model_name=SLOW)
        api = group.start_module("openai-api", "llava_med.serve.openai_api", "--controller-url", ctrl.url,
                                 "--api-keys", f"other,{KEY}")
        tiny.wait_healthy(180)
        wait_until(lambda: set(listed_models(ctrl.url)) == {TINY, SLOW},
                   20, message="both models listed")
        yield ctrl, tiny, slow, api


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack[3].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_with_an_image_equals_the_workers_greedy_answer(stack, client):
    _, tiny, _, _ = stack
    assert sorted(m.id for m in client.models.list()) == [SLOW, TINY]
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}}]}]
    answer = client.chat.completions.create(model=TINY, messages=messages, temperature=0, max_tokens=16)
    # The same prompt, rendered with the worker's template, straight to the worker (the original protocol).
    rendered = render_chat([Message("user", QUESTION, (IMAGE,))], "mistral_instruct")
    direct = list(original_stream(tiny.url, {"model": TINY, "prompt": rendered.prompt, "images": [IMAGE],
                                             "temperature": 0, "max_new_tokens": 16, "stop": "</s>", "echo": False},
                                  timeout=60))[-1]
    assert direct["error_code"] == 0 and direct["text"]
    assert answer.choices[0].message.content == direct["text"]
    assert answer.choices[0].finish_reason == direct["finish_reason"]
    # prompt_tokens: what /count_token says for the prompt, where each <image> counts as its 576 image tokens.
    count = requests.post(tiny.url + "/count_token", json={"prompt": rendered.prompt}, timeout=10).json()["count"]
    text_only = requests.post(tiny.url + "/count_token", json={"prompt": rendered.prompt.replace("<image>\n", "")},
                              timeout=10).json()["count"]
    assert answer.usage.prompt_tokens == count and count >= text_only + 575
    assert answer.usage.completion_tokens == direct["usage"]["completion_tokens"]
    # Streamed, the deltas add up to the same answer.
    stream = client.chat.completions.create(model=TINY, messages=messages, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct["text"]
    assert chunks[-1].usage.prompt_tokens == count


def test_errors_through_real_processes(stack, client):
    api = stack[3]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="llava-med-v9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="image"):
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}}]}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "lung " * 3000}])
    ok = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_stopping_a_stream_halfway_empties_the_workers_queue(stack, client):
    _, _, slow, _ = stack

    def queue() -> int:
        return queue_length(slow.url)

    stream = client.chat.completions.create(model=SLOW, messages=[{"role": "user", "content": "talk"}],
                                            stream=True, max_tokens=1000)
    for i, _ in enumerate(stream):  # 1000 tokens at 20 per second: 50 s unless cancelled
        if i == 10:
            break
    assert queue() == 1
    stream.close()
    wait_until(lambda: queue() == 0, 2, message="the worker's queue emptied within 2 s")
