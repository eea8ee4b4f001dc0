"""Model worker on the fake engine: every error path, limits, cancellation, registration and heartbeats."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import requests
from fastapi.testclient import TestClient
from servers import ThreadedServer, free_port, threaded_server, wait_until

from llava_med.constants import SERVER_ERROR_MSG
from llava_med.errors import ImageError
from llava_med.engine.fake import FakeEngine
from llava_med.engine.registry import build_engine
from llava_med.model.naming import model_name_from_path
from llava_med.serve.model_worker import (
    ModelWorker,
    build_parser,
    create_app,
    parse_args,
    worker_from_args,
)
from llava_med.serve.protocol import ErrorCode, GenerateRequest, StreamChunk, iter_chunks

PROMPT = "[INST] <image>\nWhat is shown in this image? [/INST]"
IMAGE = base64.b64encode(b"\x89PNG not really an image but valid base64").decode()
GOOD = {"model": "fake", "prompt": PROMPT, "images": [IMAGE], "max_new_tokens": 64, "temperature": 0.2}


def make_worker(concurrency: int = 5, cap: int = 1024, stream_interval: int = 1, **engine_kwargs) -> ModelWorker:
    engine = FakeEngine(["fake"], **engine_kwargs)
    return ModelWorker(engine, no_register=True, limit_model_concurrency=concurrency, max_new_tokens_cap=cap,
                       stream_interval=stream_interval)


@pytest.fixture
def worker_client() -> Iterator[tuple[TestClient, ModelWorker]]:
    worker = make_worker(context_length=700, image_tokens=576)
    with TestClient(create_app(worker)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, timeout=5, message="worker ready")
        yield client, worker


def stream(client: TestClient, payload: dict | bytes) -> list[StreamChunk]:
    if isinstance(payload, bytes):
        r = client.post("/worker_generate_stream", content=payload)
    else:
        r = client.post("/worker_generate_stream", json=payload)
    assert r.status_code == 200  # errors too: 200 + one error chunk, for the original clients
    return list(iter_chunks([r.content]))


def assert_good_request_works(client: TestClient) -> None:
    chunks = stream(client, GOOD)
    assert chunks and all(c.error_code == 0 for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].text.startswith(PROMPT) and chunks[-1].text.endswith("(end)")


def test_good_request_streams_cumulative_text_with_prompt(worker_client):
    client, worker = worker_client
    chunks = stream(client, GOOD)
    texts = [c.text for c in chunks]
    assert all(t.startswith(PROMPT) for t in texts)
    assert all(a in b for a, b in zip(texts, texts[1:]))  # cumulative
    outputs = [t[len(PROMPT):] for t in texts]  # what the original clients display
    assert outputs[0] == "This"
    assert outputs[-1] == "This is a fake answer about: What is shown in this image? (end)"
    assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage == {"prompt_tokens": 8 + 576, "completion_tokens": 13, "total_tokens": 597}
    assert worker.queue_length() == 0 and worker.engine.finished == 1


def test_raw_wire_format_is_the_original(worker_client):
    client, _ = worker_client
    raw = client.post("/worker_generate_stream", json=GOOD).content
    parts = raw.split(b"\0")
    assert parts[-1] == b"" and all(parts[:-1])
    first = json.loads(parts[0])
    assert first == {"text": PROMPT + "This", "error_code": 0}


def test_echo_false_sends_only_the_generated_text(worker_client):
    client, _ = worker_client
    chunks = stream(client, {**GOOD, "echo": False})
    assert chunks[0].text == "This" and not chunks[-1].text.startswith("[INST]")


def test_stop_string_and_max_new_tokens(worker_client):
    client, _ = worker_client
    assert stream(client, {**GOOD, "stop": "fake"})[-1].text == PROMPT + "This is a "
    last = stream(client, {**GOOD, "max_new_tokens": 3})[-1]
    assert last.text == PROMPT + "This is a" and last.finish_reason == "length"


BAD_CASES = [
    pytest.param(b"{not json", ErrorCode.BAD_REQUEST, "not valid JSON", id="malformed-json"),
    pytest.param(b"", ErrorCode.BAD_REQUEST, "empty", id="empty-body"),
    pytest.param({"model": "fake"}, ErrorCode.BAD_REQUEST, "prompt: is required", id="missing-prompt"),
    pytest.param({**GOOD, "prompt": ["a"]}, ErrorCode.BAD_REQUEST, "prompt: must be a string", id="prompt-type"),
    pytest.param({**GOOD, "max_new_tokens": "many"}, ErrorCode.BAD_REQUEST, "max_new_tokens: must be an integer",
                 id="max-new-tokens-type"),
    pytest.param({**GOOD, "images": IMAGE}, ErrorCode.BAD_REQUEST, "images: must be a list", id="images-type"),
    pytest.param({**GOOD, "images": ["%%%not base64%%%"]}, ErrorCode.BAD_IMAGE, "image 0 is not valid base64",
                 id="bad-base64"),
    pytest.param({**GOOD, "images": [IMAGE, IMAGE]}, ErrorCode.IMAGE_COUNT_MISMATCH,
                 "1 <image> tag(s) but 2 image(s)", id="more-images-than-tags"),
    pytest.param({**GOOD, "images": []}, ErrorCode.IMAGE_COUNT_MISMATCH, "1 <image> tag(s) but 0 image(s)",
                 id="fewer-images-than-tags"),
    pytest.param({**GOOD, "prompt": PROMPT + " word" * 200}, ErrorCode.CONTEXT_OVERFLOW,
                 "context length is 700", id="context-overflow"),
    pytest.param({**GOOD, "max_new_tokens": -5}, ErrorCode.PARAM_OUT_OF_RANGE, "max_new_tokens: must be >= 1, got -5",
                 id="negative-max-new-tokens"),
    pytest.param({**GOOD, "max_new_tokens": 10**15}, ErrorCode.PARAM_OUT_OF_RANGE, "max_new_tokens: must be <=",
                 id="huge-max-new-tokens"),
    pytest.param({**GOOD, "temperature": -1}, ErrorCode.PARAM_OUT_OF_RANGE, "temperature: must be >= 0",
                 id="negative-temperature"),
    pytest.param({**GOOD, "top_p": 0}, ErrorCode.PARAM_OUT_OF_RANGE, "top_p: must be > 0", id="zero-top-p"),
    pytest.param(b"[" * 100_000, ErrorCode.BAD_REQUEST, "deeper than 32 levels", id="deeply-nested-json"),
    pytest.param(b'{"model": "fake", "prompt": "\\ud800 what?"}', ErrorCode.BAD_REQUEST,
                 "prompt is not valid Unicode: it holds an unpaired surrogate", id="lone-surrogate"),
    pytest.param({**GOOD, "model": "other-model"}, ErrorCode.INVALID_MODEL,
                 "this worker serves ['fake'], not the model 'other-model'", id="model-not-served"),
    pytest.param({**GOOD, "prompt": "lung " * 10_000}, ErrorCode.CONTEXT_OVERFLOW,
                 "the prompt has 50000 characters", id="prompt-too-long-for-the-context-by-its-characters"),
]


@pytest.mark.parametrize(("payload", "code", "message"), BAD_CASES)
def test_bad_request_gives_one_clear_error_chunk_then_worker_still_serves(worker_client, payload, code, message):
    client, worker = worker_client
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    [chunk] = stream(client, body)
    assert chunk.error_code == code
    assert not chunk.text.startswith(SERVER_ERROR_MSG)  # a bad request is not "high traffic" ...
    assert message in chunk.text  # ... the text names the real cause
    assert chunk.text.startswith(f"(error_code: {int(code)})")
    assert worker.queue_length() == 0
    assert_good_request_works(client)


def test_huge_but_sane_max_new_tokens_is_capped_like_the_original():
    worker = make_worker(cap=8)
    with TestClient(create_app(worker)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, timeout=5, message="ready")
        last = stream(client, {"prompt": "hi", "max_new_tokens": 5000, "ignore_eos": True})[-1]
        assert last.error_code == 0 and last.finish_reason == "length"
        assert last.usage["completion_tokens"] == 8


@pytest.mark.parametrize(
    ("fail_with", "code", "message"),
    [
        (None, ErrorCode.INTERNAL_ERROR, "RuntimeError: injected engine failure"),
        (ImageError("image 0 is truncated"), ErrorCode.BAD_IMAGE, "image 0 is truncated"),
        (MemoryError("out of memory"), ErrorCode.OUT_OF_MEMORY, "out of memory"),
    ],
)
def test_engine_failure_mid_stream(fail_with, code, message):
    worker = make_worker(fail_after=3, fail_with=fail_with)
    with TestClient(create_app(worker)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, timeout=5, message="ready")
        chunks = stream(client, {"prompt": "hello", "echo": False})
        assert [c.text for c in chunks[:3]] == ["This", "This is", "This is a"]
        assert chunks[-1].error_code == code and message in chunks[-1].text
        assert worker.queue_length() == 0
        worker.engine.fail_after = None
        assert stream(client, {"prompt": "hello"})[-1].finish_reason == "stop"


def test_stream_interval_sends_fewer_chunks_but_always_the_last():
    worker = make_worker(stream_interval=5)
    with TestClient(create_app(worker)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, timeout=5, message="ready")
        chunks = stream(client, {"prompt": "hi", "echo": False})
        # 8 words: outputs 5 and the final one (8).
        assert [c.text for c in chunks] == ["This is a fake answer", "This is a fake answer about: hi (end)"]


def test_health_loading_then_ok_and_requests_during_load():
    worker = make_worker(load_delay=0.5)
    with TestClient(create_app(worker)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        [chunk] = stream(client, {"prompt": "hi"})
        assert chunk.error_code == ErrorCode.ENGINE_OVERLOADED and "loading" in chunk.text
        assert client.post("/model_details").status_code == 503
        wait_until(lambda: client.get("/health").status_code == 200, timeout=5, message="ready")
        assert client.get("/health").json() == {"status": "ok", "model_names": ["fake"], "queue_length": 0}


def test_load_failure_is_reported():
    failures = []
    engine = FakeEngine(["fake"], load_error=RuntimeError("weights missing"))
    worker = ModelWorker(engine, no_register=True, on_load_failure=failures.append)
    with TestClient(create_app(worker)) as client:
        wait_until(lambda: client.get("/health").json()["status"] == "error", timeout=5, message="load error")
        r = client.get("/health")
        assert r.status_code == 503 and "weights missing" in r.json()["error"]
        [chunk] = stream(client, {"prompt": "hi"})
        assert chunk.error_code == ErrorCode.INTERNAL_ERROR and "weights missing" in chunk.text
    assert len(failures) == 1


class _BreakableEngine(FakeEngine):
    """A fake engine that can break after it started (as the transformers engine does after a sticky CUDA error)
    and reports a KV cache."""

    broken: str | None = None

    @property
    def ready(self) -> bool:
        return super().ready and self.broken is None

    @property
    def health_error(self) -> str | None:
        return self.broken

    def kv_cache_status(self) -> dict[str, int]:
        return {"slots": 4, "slots_used": 1, "slot_tokens": 2048, "tokens_used": 600, "bytes": 4 * 2**20}


def test_an_engine_that_breaks_turns_the_worker_unhealthy():
    engine = _BreakableEngine(["fake"])
    worker = ModelWorker(engine, no_register=True)
    with TestClient(create_app(worker)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, timeout=5, message="worker ready")
        assert client.post("/worker_get_status").json() == {
            "model_names": ["fake"], "speed": 1.0, "queue_length": 0, "instance_id": worker.instance_id,
            "kv_cache": {"slots": 4, "slots_used": 1, "slot_tokens": 2048, "tokens_used": 600, "bytes": 4 * 2**20}}
        assert_good_request_works(client)
        engine.broken = "the device failed (CUDA error: an illegal memory access was encountered); restart the worker"
        r = client.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "error" and "illegal memory access" in r.json()["error"]
        [chunk] = stream(client, GOOD)
        assert chunk.error_code == ErrorCode.INTERNAL_ERROR and "illegal memory access" in chunk.text
        assert client.post("/worker_get_status").status_code == 200  # the controller can still ask


def test_other_endpoints(worker_client):
    client, worker = worker_client
    status = client.post("/worker_get_status").json()
    assert status == {"model_names": ["fake"], "speed": 1.0, "queue_length": 0, "instance_id": worker.instance_id}
    assert client.post("/model_details").json() == {"context_length": 700}
    assert client.post("/count_token", json={"prompt": PROMPT}).json() == {"count": 584, "error_code": 0}
    r = client.post("/count_token", json={})
    assert r.status_code == 400 and "prompt: is required" in r.json()["message"]
    final = client.post("/worker_generate", json={**GOOD, "echo": False}).json()
    assert final["error_code"] == 0 and final["text"].endswith("(end)") and final["finish_reason"] == "stop"
    bad = client.post("/worker_generate", json={**GOOD, "images": []}).json()
    assert bad["error_code"] == ErrorCode.IMAGE_COUNT_MISMATCH


def test_request_body_limit():
    engine = FakeEngine(["fake"])
    worker = ModelWorker(engine, no_register=True, max_request_bytes=1000)
    with TestClient(create_app(worker)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, timeout=5, message="ready")
        [chunk] = stream(client, {"prompt": "x" * 2000})
        assert chunk.error_code == ErrorCode.BAD_REQUEST and "limit of 1000" in chunk.text


# ---------------------------------------------------------------------------------------------- real HTTP (threads)


def _open_stream(url: str, payload: dict) -> requests.Response:
    return requests.post(url + "/worker_generate_stream", json=payload, stream=True, timeout=(5, 10))


def test_client_disconnect_cancels_generation_and_frees_the_slot():
    worker = make_worker(concurrency=1, token_delay=0.01)
    engine = worker.engine
    with threaded_server(create_app(worker)) as server:
        wait_until(lambda: requests.get(server.url + "/health").status_code == 200, 5, message="ready")
        long = {"prompt": "hi", "ignore_eos": True, "max_new_tokens": 1000}
        resp = _open_stream(server.url, long)
        lines = (line for line in resp.iter_lines(decode_unicode=False, delimiter=b"\0") if line)
        for _ in range(3):
            assert json.loads(next(lines))["error_code"] == 0
        # A second request waits for the single slot.
        waiting = _open_stream(server.url, long)
        wait_until(lambda: worker.waiting == 1, 5, message="second request waiting")
        assert requests.post(server.url + "/worker_get_status").json()["queue_length"] == 2
        waiting.close()  # leaves while waiting in the queue
        wait_until(lambda: worker.waiting == 0, 5, message="waiting request gone")
        assert engine.started == 1
        resp.close()  # leaves mid-generation
        wait_until(lambda: engine.cancelled == 1 and worker.queue_length() == 0, 5, message="cancellation")
        steps = engine.steps
        time.sleep(0.2)
        assert engine.steps == steps  # nothing runs any more
        assert engine.started == 1 and engine.finished == 0
        # The slot is free: a new request runs at once.
        assert json.loads(requests.post(server.url + "/worker_generate", json={"prompt": "hi"}).content)[
            "finish_reason"] == "stop"


def test_concurrency_limit_and_honest_queue_length():
    worker = make_worker(concurrency=2, token_delay=0.01)
    engine = worker.engine
    with threaded_server(create_app(worker)) as server:
        wait_until(lambda: requests.get(server.url + "/health").status_code == 200, 5, message="ready")
        status = lambda: requests.post(server.url + "/worker_get_status").json()["queue_length"]  # noqa: E731
        long = {"prompt": "go", "ignore_eos": True, "max_new_tokens": 1000}
        streams = [_open_stream(server.url, long) for _ in range(4)]  # headers come at once, even when queued
        wait_until(lambda: worker.running == 2 and worker.waiting == 2, 5, message="2 running + 2 waiting")
        assert status() == 4 and engine.started == 2
        streams[0].close()  # a slot frees: one waiting request starts
        wait_until(lambda: engine.started == 3 and worker.running == 2 and worker.waiting == 1, 5,
                   message="a waiting request started")
        assert status() == 3
        short = _open_stream(server.url, {"prompt": "go", "max_new_tokens": 3})
        for r in streams[1:]:
            r.close()
        chunks = list(iter_chunks(short.iter_content(chunk_size=None)))
        assert chunks[-1].finish_reason == "length" and chunks[-1].error_code == 0
        wait_until(lambda: status() == 0, 5, message="queue length back to 0")
        assert engine.max_running == 2 and engine.finished == 1
        assert engine.cancelled == engine.started - 1 >= 3  # every closed stream that had started was cancelled


# ---------------------------------------------------------------------------------------------- registration


class MockController:
    """A controller stand-in: records calls; can forget workers or be down."""

    def __init__(self) -> None:
        self.down = False
        self.known: set[str] = set()
        self.registrations = 0
        self.heartbeats: list[int] = []
        self.auth: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        self.auth.append(request.headers.get("authorization"))
        body = json.loads(request.content)
        if request.url.path == "/register_worker":
            self.registrations += 1
            self.known.add(body["worker_name"])
            assert body["check_heart_beat"] is True and body["worker_status"]["model_names"] == ["fake"]
            return httpx.Response(200, json={})
        if request.url.path == "/receive_heart_beat":
            self.heartbeats.append(body["queue_length"])
            return httpx.Response(200, json={"exist": body["worker_name"] in self.known})
        return httpx.Response(404)


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_registers_heartbeats_and_reregisters():
    ctrl = MockController()

    async def scenario() -> None:
        worker = ModelWorker(FakeEngine(["fake"]), worker_addr="http://w:1/", controller_addr="http://c:1",
                             heart_beat_interval=0.05, transport=httpx.MockTransport(ctrl), auth_token="tok")
        await worker.start()
        try:
            await _until(lambda: ctrl.registrations == 1 and len(ctrl.heartbeats) >= 2)
            assert ctrl.known == {"http://w:1"}
            # The controller restarts and forgets the worker: exist=false -> register again.
            ctrl.known.clear()
            await _until(lambda: ctrl.registrations == 2)
            # The controller is down for a while, then back (empty): the worker registers again by itself.
            ctrl.down = True
            ctrl.known.clear()
            await asyncio.sleep(0.3)
            ctrl.down = False
            await _until(lambda: ctrl.registrations == 3, timeout=5)
            assert set(ctrl.auth) == {"Bearer tok"}
        finally:
            await worker.close()
        assert worker._task is None

    asyncio.run(scenario())


def test_request_triggers_an_early_heartbeat_with_the_queue_length():
    ctrl = MockController()

    async def scenario() -> None:
        worker = ModelWorker(FakeEngine(["fake"], token_delay=0.05), worker_addr="http://w:1",
                             controller_addr="http://c:1", heart_beat_interval=30,
                             transport=httpx.MockTransport(ctrl))
        await worker.start()
        try:
            await _until(lambda: ctrl.registrations == 1)
            chunks = [c async for c in worker.generate_chunks(GenerateRequest(prompt="a b c"))]
            assert chunks[-1].finish_reason == "stop"
            await _until(lambda: 1 in ctrl.heartbeats and ctrl.heartbeats[-1] == 0)
        finally:
            await worker.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- cli


def test_parse_args_original_flags_and_abbreviations(monkeypatch):
    monkeypatch.delenv("LLAVA_MED_AUTH_TOKEN", raising=False)
    args = parse_args([])
    assert (args.host, args.port, args.worker_address, args.controller_address) == (
        "127.0.0.1", 21002, "http://127.0.0.1:21002", "http://localhost:21001")
    worker = worker_from_args(args, build_engine(args))  # builds the hf engine; nothing is loaded before start()
    assert (worker.limit_model_concurrency, worker.stream_interval, args.engine, worker.max_new_tokens_cap) == (
        16 + 256, 1, "hf", 1024)  # hf: the engine batches and queues by itself
    fake_args = parse_args(["--engine", "fake"])
    assert worker_from_args(fake_args, build_engine(fake_args)).limit_model_concurrency == 5
    assert args.model_path is None and args.local_files_only is False  # hf engine: the embedded tiny checkpoint
    # argparse prefix matching: --controller / --worker must stay unambiguous.
    options = build_parser()._option_string_actions
    assert [o for o in options if o.startswith("--controller")] == ["--controller-address"]
    assert [o for o in options if o.startswith("--worker")] == ["--worker-address"]
    args = parse_args(["--controller", "http://c:1", "--worker", "http://w:2/", "--port", "40000",
                       "--model-path", "/m/llava-med-v1.5-mistral-7b/", "--load-4bit", "--multi-modal",
                       "--use-flash-attn", "--no-register", "--limit-worker-concurrency", "2", "--device", "cpu",
                       "--num-gpus", "2", "--max-gpu-memory", "13GiB", "--dtype", "bfloat16",
                       "--conv-mode", "mistral_instruct", "--vision-tower", "/clip", "--model-base", "/b"])
    assert (args.controller_address, args.worker_address, args.limit_model_concurrency) == (
        "http://c:1", "http://w:2", 2)
    explicit = parse_args(["--engine", "fake", "--limit-worker-concurrency", "2"])
    assert worker_from_args(explicit, build_engine(explicit)).limit_model_concurrency == 2
    assert parse_args(["--port", "31000"]).worker_address == "http://127.0.0.1:31000"
    with pytest.raises(SystemExit):
        parse_args(["--load-8bit", "--load-4bit"])
    with pytest.raises(SystemExit):
        parse_args(["--limit-model-concurrency", "0"])


def test_model_name_from_path():
    assert model_name_from_path("microsoft/llava-med-v1.5-mistral-7b/") == "llava-med-v1.5-mistral-7b"
    assert model_name_from_path("/ckpt/run1/checkpoint-500") == "run1_checkpoint-500"


def test_fake_engine_from_flags():
    engine = build_engine(parse_args(["--engine", "fake", "--fake-script", "a b c", "--fake-context-length", "99"]))
    assert isinstance(engine, FakeEngine)
    assert (engine.model_names, engine.script, engine.context_length) == (["llava-med-fake"], "a b c", 99)
    named = build_engine(parse_args(["--engine", "fake", "--model-path", "/ckpt/llava-med-v1.5-mistral-7b"]))
    assert named.model_names == ["llava-med-v1.5-mistral-7b"]


def test_huge_model_names_are_not_echoed_back_whole(worker_client):
    client, _ = worker_client
    [chunk] = stream(client, {**GOOD, "model": "x" * 100_000})
    assert chunk.error_code == ErrorCode.INVALID_MODEL and len(chunk.text) < 300
    assert_good_request_works(client)


def test_tiny_top_p_is_clamped_not_a_failure():
    from llava_med.sampling import MIN_TOP_P

    request = GenerateRequest(prompt="p", top_p=1e-46, temperature=1.0)
    assert request.sampling_params().top_p == MIN_TOP_P


def test_count_token_refuses_bad_unicode_and_long_prompts(worker_client):
    client, _ = worker_client
    r = client.post("/count_token", content=b'{"prompt": "\\ud800"}')
    assert r.status_code == 400 and "unpaired surrogate" in r.json()["message"]
    r = client.post("/count_token", json={"prompt": "lung " * 10_000})
    assert r.status_code == 400 and r.json()["error_code"] == ErrorCode.CONTEXT_OVERFLOW
    assert client.post("/count_token", json={"prompt": "a b <image>"}).json()["count"] == 2 + 576


def test_metrics(worker_client):
    client, worker = worker_client
    tokens = stream(client, GOOD)[-1].usage["completion_tokens"]
    stream(client, {**GOOD, "images": []})
    text = client.get("/metrics").text
    assert "llava_med_worker_requests_total 2.0" in text
    assert 'llava_med_worker_errors_total{code="IMAGE_COUNT_MISMATCH"} 1.0' in text
    assert f"llava_med_worker_generated_tokens_total {float(tokens)}" in text and tokens > 5
    assert "llava_med_worker_time_to_first_token_seconds_count 1.0" in text
    assert "llava_med_worker_request_duration_seconds_count 2.0" in text
    assert "llava_med_worker_queue_length 0.0" in text
    assert "llava_med_engine_finished_requests 1.0" in text
    assert client.get("/docs").status_code == 404


def test_status_reports_an_instance_id(worker_client):
    client, worker = worker_client
    status = client.post("/worker_get_status").json()
    assert status["instance_id"] == worker.instance_id and len(status["instance_id"]) == 32


def test_a_broken_worker_stops_heartbeating_so_the_controller_drops_it():
    from llava_med.serve.controller import Controller
    from llava_med.serve.controller import create_app as create_controller_app

    controller = Controller(heart_beat_expiration=1.0)
    with threaded_server(create_controller_app(controller)) as ctrl:
        engine = _BreakableEngine(["fake"])
        port = free_port()
        worker = ModelWorker(engine, worker_addr=f"http://127.0.0.1:{port}", controller_addr=ctrl.url,
                             heart_beat_interval=0.2)
        with ThreadedServer(create_app(worker), port=port):
            wait_until(lambda: controller.list_models() == ["fake"], 10, message="registered")
            time.sleep(1.5)  # heartbeats keep it past the expiration
            assert controller.list_models() == ["fake"]
            engine.broken = "the device failed (CUDA error: an illegal memory access was encountered)"
            wait_until(lambda: controller.list_models() == [], 5, message="the broken worker expired")
