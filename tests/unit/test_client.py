"""LlavaMedClient against in-process controller and worker servers (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
from PIL import Image
from servers import InProcessStack, ThreadedServer, free_port, in_process_stack, wait_until

from llava_med.serve.client import (
    ClientChunk,
    ClientConnectionError,
    ClientError,
    ClientTimeoutError,
    LlavaMedClient,
    NoWorkerError,
    WorkerError,
    encode_image,
)
from llava_med.serve.controller import Controller
from llava_med.serve.controller import create_app as create_controller_app
from llava_med.engine.fake import FakeEngine
from llava_med.serve.model_worker import ModelWorker
from llava_med.serve.model_worker import create_app as create_worker_app
from llava_med.serve.protocol import ErrorCode

PROMPT = "[INST] <image>\nDescribe the scan. [/INST]"
ANSWER = "This is a fake answer about: Describe the scan. (end)"


@pytest.fixture(scope="module")
def stack() -> Iterator[InProcessStack]:
    with in_process_stack(FakeEngine(["fake-med"], token_delay=0.005), "fake-med") as stack:
        yield stack


def png_image() -> Image.Image:
    return Image.new("RGB", (8, 8), (200, 10, 10))


def test_controller_queries(stack):
    client = LlavaMedClient(stack.controller_url)
    client.refresh_all_workers()
    assert client.list_models() == ["fake-med"]
    assert client.get_worker_address("fake-med") == stack.worker_url
    with pytest.raises(NoWorkerError, match=r"'nope'.*fake-med"):
        client.get_worker_address("nope")
    assert client.worker_status().model_names == ["fake-med"]  # the controller's aggregated status
    assert client.worker_status(stack.worker_url).model_names == ["fake-med"]


@pytest.mark.parametrize("route", ["dispatch", "relay", "direct"])
def test_generate_stream_routes(stack, route):
    if route == "direct":
        client, kwargs = LlavaMedClient(worker_url=stack.worker_url), {}
    else:
        client, kwargs = LlavaMedClient(stack.controller_url), {"via_controller": route == "relay"}
    chunks = list(client.generate_stream("fake-med", PROMPT, [png_image()], **kwargs))
    assert all(isinstance(c, ClientChunk) for c in chunks)
    assert chunks[0].output == "This" and chunks[-1].output == ANSWER
    assert chunks[-1].text == PROMPT + ANSWER and chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage["completion_tokens"] == 10


def test_generate_with_each_image_kind_and_echo_off(stack):
    client = LlavaMedClient(worker_url=stack.worker_url)
    raw = b"\x89PNG raw bytes"
    b64 = base64.b64encode(raw).decode()
    prompt = "[INST] <image>\n<image>\n<image>\nCompare. [/INST]"
    out = client.generate("fake-med", prompt, [png_image(), raw, b64], echo=False)
    assert out.endswith("Compare. (end)") and not out.startswith("[INST]")  # echo off: the answer alone
    sent = stack.engine.requests[-1]
    assert sent.images[1:] == (b64, b64)
    decoded = Image.open(io.BytesIO(base64.b64decode(sent.images[0])))
    assert decoded.size == (8, 8)


def test_encode_image_rejects_other_types():
    with pytest.raises(TypeError, match="PIL images, bytes, pathlib.Path files or base64"):
        encode_image(3.14)


def test_error_chunks_raise_typed_errors(stack):
    direct = LlavaMedClient(worker_url=stack.worker_url)
    with pytest.raises(WorkerError) as info:
        list(direct.generate_stream("fake-med", PROMPT, images=None))
    assert info.value.code == ErrorCode.IMAGE_COUNT_MISMATCH
    assert "1 <image> tag(s) but 0 image(s)" in info.value.message
    with pytest.raises(WorkerError) as info:
        direct.generate("fake-med", "hi", max_new_tokens=-1)
    assert info.value.error_code is ErrorCode.PARAM_OUT_OF_RANGE
    relay = LlavaMedClient(stack.controller_url)
    with pytest.raises(NoWorkerError, match="'missing'"):
        list(relay.generate_stream("missing", "hi", via_controller=True))
    with pytest.raises(NoWorkerError):
        relay.generate("missing", "hi")


def test_connection_errors():
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClientConnectionError, match="cannot reach"):
        LlavaMedClient(dead).list_models()
    with pytest.raises(ClientConnectionError):
        list(LlavaMedClient(worker_url=dead).generate_stream("m", "hi"))
    with pytest.raises(ValueError):
        LlavaMedClient()


def test_timeout_while_waiting_for_tokens():
    worker = ModelWorker(FakeEngine(["slow"], token_delay=3), no_register=True)
    with ThreadedServer(create_worker_app(worker)) as server:
        wait_until(lambda: worker.ready, 5, message="ready")
        client = LlavaMedClient(worker_url=server.url, timeout=0.5)
        with pytest.raises(ClientTimeoutError):
            list(client.generate_stream("slow", "hi"))
        # The worker notices the client left and frees the slot.
        wait_until(lambda: worker.queue_length() == 0, 10, message="slot freed")
    assert issubclass(ClientTimeoutError, ClientError)


def test_closing_the_generator_closes_the_response_and_cancels(stack):
    client = LlavaMedClient(worker_url=stack.worker_url)
    before = stack.engine.cancelled
    gen = client.generate_stream("fake-med", "hi", ignore_eos=True, max_new_tokens=1000)
    assert next(gen).output == "This"
    gen.close()
    wait_until(lambda: stack.engine.cancelled == before + 1 and stack.worker.queue_length() == 0, 5,
               message="cancelled on the worker")


def test_register_worker_by_hand(stack):
    client = LlavaMedClient(stack.controller_url)
    answer = client.register_worker(stack.worker_url, check_heart_beat=False)
    assert answer["worker_status"]["model_names"] == ["fake-med"]
    with pytest.raises(WorkerError, match=r"HTTP 400.*cannot register"):
        client.register_worker(f"http://127.0.0.1:{free_port()}")


def test_controller_registers_with_another_controller(stack):
    """A controller answers /worker_get_status like a worker, so a parent controller can nest it."""
    parent = Controller(heart_beat_expiration=30)
    with ThreadedServer(create_controller_app(parent)) as server:
        client = LlavaMedClient(server.url)
        answer = client.register_worker(stack.controller_url, check_heart_beat=False)  # status asked to the child
        assert answer["worker_status"]["model_names"] == ["fake-med"]
        assert client.list_models() == ["fake-med"]
        assert client.get_worker_address("fake-med") == stack.controller_url
        # parent relay -> child relay -> worker
        assert client.generate("fake-med", PROMPT, [png_image()], via_controller=True) == ANSWER
        # parent dispatch -> child address, which streams like a worker
        assert client.generate("fake-med", PROMPT, [png_image()]) == ANSWER


def test_encode_image_reads_local_files_given_as_paths(tmp_path):
    import base64
    from pathlib import Path

    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG fake bytes")
    assert base64.b64decode(encode_image(Path(path))) == b"\x89PNG fake bytes"
    assert encode_image("aGVsbG8=") == "aGVsbG8="  # strings are base64 already, never read as paths


def test_conv_template_of_a_worker(stack):
    client = LlavaMedClient(stack.controller_url)
    assert client.conv_template(stack.worker_url) == "mistral_instruct"
    with pytest.raises(ClientConnectionError):
        client.conv_template(f"http://127.0.0.1:{free_port()}")


def test_chat_renders_with_the_workers_template_plain_and_streaming(stack):
    from llava_med.chat import Message

    client = LlavaMedClient(stack.controller_url)
    messages = [Message("user", "What is shown?", (png_image(),)), Message("assistant", "A red square."),
                Message("user", "Is it normal?")]
    answer = client.chat("fake-med", messages, temperature=0)
    sent = stack.engine.requests[-1]
    assert sent.prompt == "[INST] <image>\nWhat is shown? [/INST] A red square. </s>[INST] Is it normal? [/INST]"
    assert len(sent.images) == 1
    assert sent.params.stop == ("</s>",) and sent.params.temperature == 0
    # The fake echoes the prompt's last words, which hold the template's "</s>": the stop string cuts it there.
    assert answer == "This is a fake answer about: [/INST] A red square. "
    chunks = list(client.chat("fake-med", [{"role": "user", "content": "Hi"}], stream=True))
    assert chunks[-1].output == "This is a fake answer about: Hi (end)" and chunks[-1].finish_reason == "stop"
    assert stack.engine.requests[-1].prompt == "[INST] Hi [/INST]"
    direct = LlavaMedClient(worker_url=stack.worker_url)
    assert direct.chat(None, [{"role": "user", "content": "Hi"}], conv_mode="llava_v1").endswith("Hi (end)")
    assert stack.engine.requests[-1].prompt.endswith("USER: Hi ASSISTANT:")


def test_chat_errors(stack):
    from llava_med.errors import BadRequestError

    client = LlavaMedClient(stack.controller_url)
    with pytest.raises(NoWorkerError):
        client.chat("nope", [{"role": "user", "content": "Hi"}])
    with pytest.raises(BadRequestError, match="last message"):
        client.chat("fake-med", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
