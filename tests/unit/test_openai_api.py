"""The OpenAI-compatible API, driven by the official ``openai`` package, over an in-process controller and fake
worker (real HTTP on 127.0.0.1): the prompts it renders, the response shapes, errors in OpenAI's shape, cancellation.
The tiny real model behind it: tests/integration/test_openai_tiny.py."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import sample_images
from servers import InProcessStack, ThreadedServer, free_port, in_process_stack, wait_until

from llava_med.engine.fake import FakeEngine
from llava_med.serve.model_worker import ModelWorker
from llava_med.serve.model_worker import create_app as create_worker_app
from llava_med.serve.openai_api import OpenAIServer, create_app
from llava_med.serve.web.config import TURN_DONE
from llava_med.serve.web.session import ChatSession, SessionImage, Turn, build_prompt

openai = pytest.importorskip("openai", reason="the API tests use the official openai package (test extra)")

MODEL = "fake-med"
KEY = "sk-test-1"
IMAGE_URL = "data:image/png;base64," + sample_images.png_b64(sample_images.scan())


@pytest.fixture(scope="module")
def stack() -> Iterator[InProcessStack]:
    with in_process_stack(FakeEngine([MODEL], token_delay=0.005), MODEL) as stack:
        yield stack


@pytest.fixture(scope="module")
def api(stack) -> Iterator[ThreadedServer]:
    server = OpenAIServer(stack.controller_url, api_keys=[KEY, "sk-test-2"], request_timeout=10)
    with ThreadedServer(create_app(server)) as running:
        yield running


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key=KEY, max_retries=0, timeout=20)


def user(text: str, *images: str) -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": parts}


def test_models_and_health(client, api, stack):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(api.url + "/health").json()["status"] == "ok"  # no key needed
    assert httpx.get(api.url + "/docs").status_code == 404  # off unless --enable-docs


def test_chat_renders_exactly_as_the_web_chat_and_answers(client, stack):
    answer = client.chat.completions.create(model=MODEL, messages=[
        user("What does this scan show?", IMAGE_URL),
        {"role": "assistant", "content": "A chest film."},
        {"role": "user", "content": "Any effusion?"},
    ], temperature=0, max_tokens=40, seed=3)
    sent = stack.engine.requests[-1]
    # The same conversation in the web chat gives the same prompt (one rendering function).
    session = ChatSession(image=SessionImage("s", "s", IMAGE_URL, "x.png", 1, 1))
    session.turns = [Turn("What does this scan show?", "A chest film.", TURN_DONE), Turn("Any effusion?")]
    web = build_prompt("mistral_instruct", session)
    assert sent.prompt == web.prompt == ("[INST] <image>\nWhat does this scan show? [/INST] A chest film. </s>"
                                         "[INST] Any effusion? [/INST]")
    assert sent.images == (IMAGE_URL,) and sent.params.stop == ("</s>",)
    assert (sent.params.temperature, sent.params.max_new_tokens, sent.params.seed) == (0, 40, 3)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content.startswith("This is a fake answer about:")
    # The fake engine counts a word per token and 576 tokens per image: usage counts the image's tokens (the prompt
    # above has 14 words besides its <image>).
    assert answer.usage.prompt_tokens == 14 + 576
    assert answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_system_prompt_stop_and_length(client, stack):
    answer = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe it"}],
        stop=["answer"], max_completion_tokens=30)
    sent = stack.engine.requests[-1]
    assert sent.prompt == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nDescribe it [/INST]"
    assert sent.params.stop == ("answer", "</s>")  # the user's, then the template's
    assert answer.choices[0].message.content == "This is a fake "
    short = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[user("Look", IMAGE_URL)], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "This is a fake answer about: Look (end)"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8  # one fake token per word
    assert len({c.id for c in chunks}) == 1


def test_completions_raw_prompt_with_images_extension(client, stack):
    prompt = "[INST] <image>\nCompare. [/INST]"
    done = client.completions.create(model=MODEL, prompt=prompt, extra_body={"images": [IMAGE_URL]})
    assert done.choices[0].text == "This is a fake answer about: Compare. (end)"
    assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens == 8
    sent = stack.engine.requests[-1]
    assert sent.prompt == prompt and sent.images == (IMAGE_URL,)
    assert sent.params.max_new_tokens == 16 and sent.params.stop == ()  # OpenAI's default; a raw prompt: no stop
    echoed = client.completions.create(model=MODEL, prompt="[INST] hi [/INST]", echo=True, max_tokens=3)
    assert echoed.choices[0].text == "[INST] hi [/INST]This is a"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="[INST] hi [/INST]", max_tokens=3, stream=True) if c.choices)
    assert streamed == "This is a"


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"model": "no-such-model"}, 404, "'no-such-model' does not exist"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}]}, 400,
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "needs 'image_url'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "nope"}}]}]}, 400,
         "must be a data URL"),
        ({"messages": [user("x", "data:image/png;base64,bm90IGFuIGltYWdl!!")]}, 400, "not valid base64"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "start with a user message"),
        ({"messages": []}, 400, "messages"),
        ({"n": 2}, 400, "only n=1"),
        ({"temperature": 9}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"stop": ["s"] * 20}, 400, "at most 16 stop strings"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_api_keeps_serving(api, kwargs, status, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kwargs}
    resp = httpx.post(api.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert words in error["message"] and "Traceback" not in resp.text
    assert set(error) == {"message", "type", "param", "code"}
    ok = httpx.post(api.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "This is a"


def test_malformed_bodies(api):
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for body in (b"{not json", b"[]", b""):
        resp = httpx.post(api.url + "/v1/chat/completions", content=body, headers=headers)
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"


def test_keys_are_required_on_every_v1_route(api):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        assert httpx.get(api.url + "/v1/models", headers=headers).status_code == 401
        resp = httpx.post(api.url + "/v1/chat/completions", headers=headers,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=api.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    second = openai.OpenAI(base_url=api.url + "/v1", api_key="sk-test-2", max_retries=0)
    assert [m.id for m in second.models.list()] == [MODEL]


class _Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_http_image_urls_are_not_fetched_unless_allowed(client):
    listener = _Listener()
    try:
        with pytest.raises(openai.BadRequestError, match="--allow-image-urls"):
            client.chat.completions.create(model=MODEL, messages=[
                user("x", f"http://127.0.0.1:{listener.port}/scan.png")])
        assert listener.accepted == 0  # no outbound request at all
    finally:
        listener.close()


def test_allowed_image_urls_are_downloaded(stack):
    from fastapi import FastAPI, Response

    png = sample_images.png_bytes()
    image_app = FastAPI()
    image_app.get("/scan.png")(lambda: Response(png, media_type="image/png"))
    server = OpenAIServer(stack.controller_url, allow_image_urls=True)
    with ThreadedServer(image_app) as images, ThreadedServer(create_app(server)) as api:
        client = openai.OpenAI(base_url=api.url + "/v1", api_key="none", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=[user("x", images.url + "/scan.png")], max_tokens=2)
        import base64

        assert base64.b64decode(stack.engine.requests[-1].images[0]) == png


def test_worker_states_map_to_statuses(stack):
    # A worker whose model is still loading: 503 (busy), in OpenAI's shape.
    loading = ModelWorker(FakeEngine(["slow-load"], load_delay=2), no_register=True)  # loading for 2 s
    with ThreadedServer(create_worker_app(loading)) as worker:
        from llava_med.serve.client import LlavaMedClient

        LlavaMedClient(stack.controller_url).register_worker(worker.url, check_heart_beat=False,
                                                             worker_status={"model_names": ["slow-load"]})
        server = OpenAIServer(stack.controller_url)
        with ThreadedServer(create_app(server)) as api:
            resp = httpx.post(api.url + "/v1/chat/completions",
                              json={"model": "slow-load", "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 503 and "still loading" in resp.json()["error"]["message"]
    # An unreachable controller: 503 naming it.
    server = OpenAIServer(f"http://127.0.0.1:{free_port()}")
    with ThreadedServer(create_app(server)) as api:
        resp = httpx.get(api.url + "/v1/models")
        assert resp.status_code == 503 and "cannot be reached" in resp.json()["error"]["message"]


def test_slow_worker_is_a_504(stack):
    slow = ModelWorker(FakeEngine(["slow-tokens"], token_delay=3), no_register=True)
    with ThreadedServer(create_worker_app(slow)) as worker:
        from llava_med.serve.client import LlavaMedClient

        LlavaMedClient(stack.controller_url).register_worker(worker.url, check_heart_beat=False)
        server = OpenAIServer(stack.controller_url, request_timeout=0.5)
        with ThreadedServer(create_app(server)) as api:
            resp = httpx.post(api.url + "/v1/chat/completions", timeout=20,
                              json={"model": "slow-tokens", "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 504 and resp.json()["error"]["type"] == "timeout"
        wait_until(lambda: slow.queue_length() == 0, 10, message="the slow worker freed its slot")


def test_closing_a_stream_cancels_on_the_worker(client, stack, monkeypatch):
    monkeypatch.setattr(stack.engine, "script", "word " * 2000)
    monkeypatch.setattr(stack.engine, "token_delay", 0.02)
    before = stack.engine.cancelled
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "talk"}],
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert stack.worker.queue_length() == 1
    stream.close()
    wait_until(lambda: stack.worker.queue_length() == 0 and stack.engine.cancelled == before + 1, 2,
               message="the worker's queue emptied within 2 s")
