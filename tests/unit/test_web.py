"""The web UI: prompt building, rendering, errors, logs and examples as functions; its handlers against an
in-process controller and fake worker (Stop really cancels on the worker). End to end: tests/e2e/test_web_e2e.py."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sample_images
from servers import InProcessStack, free_port, in_process_stack, wait_until

from llava_med.constants import ErrorCode
from llava_med.errors import ImageError, ImageTooLargeError
from llava_med.images.decode import ImageLimits, image_sha256, load_image
from llava_med.serve.client import (
    ClientConnectionError,
    ClientTimeoutError,
    NoWorkerError,
    WorkerError,
)
from llava_med.chat import Message, render_chat
from llava_med.engine.fake import FakeEngine
from llava_med.serve.model_worker import ModelWorker
from llava_med.serve.model_worker import create_app as create_worker_app
from llava_med.serve.web.chat_log import ConversationLog
from llava_med.serve.web.config import TURN_DONE, TURN_ERROR, TURN_STOPPED, WebConfig
from llava_med.serve.web.examples import draw_chest_xray, prepare_examples
from llava_med.serve.web.messages import chatbot_messages, describe_error
from llava_med.serve.web.session import ChatSession, Turn, build_prompt, prepare_image

gradio = pytest.importorskip("gradio", reason="the web UI needs the 'web' extra (gradio)")


def png_file(path: Path, color=(200, 30, 30), size=(48, 32)) -> Path:
    return sample_images.png_file(path, sample_images.solid(color, size))


def session_with_image(tmp_path: Path) -> ChatSession:
    session = ChatSession()
    session.image = prepare_image(png_file(tmp_path / "x.png"))
    return session


# ------------------------------------------------------------------------------------------------- prompt building


def test_prompt_with_image_and_history_uses_the_template(tmp_path):
    session = session_with_image(tmp_path)
    session.turns = [Turn("What is this?", "A chest film.", TURN_DONE), Turn("Any effusion?")]
    rendered = build_prompt("mistral_instruct", session)
    assert rendered.prompt == "[INST] <image>\nWhat is this? [/INST] A chest film. </s>[INST] Any effusion? [/INST]"
    assert rendered.stop == ("</s>",) and rendered.images == [session.image.b64]
    # One rendering for every front end: the same conversation as chat messages gives the same prompt.
    messages = [Message("user", "What is this?", (session.image.b64,)), Message("assistant", "A chest film."),
                Message("user", "Any effusion?")]
    assert render_chat(messages, "mistral_instruct") == rendered
    rendered = build_prompt("llava_v1", session)
    assert rendered.prompt.endswith(
        "USER: <image>\nWhat is this? ASSISTANT: A chest film.</s> USER: Any effusion? ASSISTANT:")
    assert rendered.stop == ("</s>",)


def test_failed_and_empty_turns_stay_out_of_the_prompt(tmp_path):
    session = session_with_image(tmp_path)
    session.turns = [Turn("first", "", TURN_ERROR, error="no worker"), Turn("second", "", TURN_STOPPED),
                     Turn("third", "partial answer", TURN_STOPPED), Turn("fourth")]
    rendered = build_prompt("mistral_instruct", session)
    # The image goes with the first question that is in the prompt.
    assert rendered.prompt == "[INST] <image>\nthird [/INST] partial answer </s>[INST] fourth [/INST]"
    assert len(rendered.images) == 1


def test_text_only_prompt():
    session = ChatSession(turns=[Turn("hello")])
    rendered = build_prompt("mistral_instruct", session)
    assert rendered.prompt == "[INST] hello [/INST]" and rendered.images == []


# ------------------------------------------------------------------------------------------------- rendering


def test_chatbot_messages_show_the_image_once_and_each_status(tmp_path):
    session = session_with_image(tmp_path / "..")
    session.image = prepare_image(png_file(tmp_path / "y.png"), images_dir=tmp_path / "images")
    session.turns = [Turn("q1", "done answer", TURN_DONE), Turn("q2", "half", TURN_STOPPED),
                     Turn("q3", "", TURN_ERROR, error="**No worker** here"), Turn("q4", "stream")]
    messages = chatbot_messages(session)
    assert messages[0] == {"role": "user", "content": {"path": session.image.path, "orig_name": "y.png"}}
    texts = [m["content"] for m in messages[1:]]
    assert texts == ["q1", "done answer", "q2", "half\n\n*(stopped)*", "q3", "⚠️ **No worker** here", "q4",
                     "stream▌"]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 4
    assert chatbot_messages(None) == []


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("exc, expected", [
    (NoWorkerError("no worker serves model 'm'"), "No worker is serving model `m`"),
    (WorkerError(ErrorCode.CONTEXT_OVERFLOW, "the prompt has 3000 tokens but the context length is 2048"),
     "The conversation is too long for the model** (error 40303 CONTEXT_OVERFLOW): the prompt has 3000 tokens"),
    (WorkerError(ErrorCode.BAD_IMAGE, "image 0 is truncated"), "The worker could not use the image"),
    (WorkerError(ErrorCode.ENGINE_OVERLOADED, "the queue is full"), "The worker is busy"),
    (WorkerError(99999, "strange"), "The worker reported an error** (error 99999 UNKNOWN): strange"),
    (ClientTimeoutError("http://w did not answer within 5 s"), "did not answer in time"),
    (ClientConnectionError("cannot reach http://c"), "Cannot reach the server at http://ctrl"),
    (ImageError("bytes are not an image"), "The image cannot be read**: bytes are not an image"),
    (ImageTooLargeError("image is 9000x9000"), "The image is too large"),
    (RuntimeError("boom"), "Unexpected error** (RuntimeError): boom"),
])
def test_errors_name_their_cause(exc, expected):
    text = describe_error(exc, model="m", controller_url="http://ctrl")
    assert expected in text and "Traceback" not in text


# ------------------------------------------------------------------------------------------------- images


def test_prepare_image_png_dicom_bad_and_too_large(tmp_path):
    images = tmp_path / "images"
    png = prepare_image(png_file(tmp_path / "a.png"), images_dir=images)
    assert (png.width, png.height, png.name) == (48, 32, "a.png")
    assert Path(png.path) == images / f"{png.sha256}.png"
    assert image_sha256(base64.b64decode(png.b64)) == png.sha256
    again = prepare_image(png_file(tmp_path / "b.png"), images_dir=images)  # same pixels, another file
    assert again.sha256 == png.sha256 and len(list(images.iterdir())) == 1  # saved once

    pydicom_data = pytest.importorskip("pydicom.data")
    ct = prepare_image(pydicom_data.get_testdata_file("CT_small.dcm"), images_dir=images)
    assert (ct.width, ct.height) == (128, 128) and len(list(images.iterdir())) == 2

    junk = tmp_path / "scan.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError):
        prepare_image(junk)
    with pytest.raises(ImageTooLargeError):
        prepare_image(png_file(tmp_path / "big.png", size=(200, 200)), limits=ImageLimits(max_pixels=1000))
    huge = prepare_image(png_file(tmp_path / "huge.png", size=(3000, 1500)))
    assert (huge.width, huge.height) == (1344, 672)  # downscaled before sending


def test_examples_are_real_or_drawn_and_decodable(tmp_path):
    examples = prepare_examples(tmp_path / "examples")
    names = [Path(e.path).name for e in examples]
    assert "synthetic_chest_xray.png" in names
    assert "CT_small.dcm" in names and "MR_small.dcm" in names  # pydicom's own test files
    for example in examples:
        assert Path(example.path).parent == tmp_path / "examples" and example.question.rstrip(".?")
        image = load_image(Path(example.path).read_bytes())
        assert min(image.size) >= 64
    again = prepare_examples(tmp_path / "examples")  # idempotent
    assert [e.path for e in again] == [e.path for e in examples]
    xray = draw_chest_xray()
    assert xray.size == (512, 512) and xray.mode == "RGB"


# ------------------------------------------------------------------------------------------------- logs


def test_conversation_log_lines(tmp_path):
    log = ConversationLog(tmp_path / "logs")
    session = session_with_image(tmp_path)
    session.turns = [Turn("q", "a", TURN_DONE, model="m", conv_mode="mistral_instruct", finished=time.time())]
    log.log_chat(session, session.turns[0], params={"temperature": 0.2}, ip="127.0.0.1")
    log.log_vote("upvote", session, model="m", ip="127.0.0.1")
    lines = log.path_for().read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["type"] for r in records] == ["chat", "upvote"]
    chat = records[0]
    assert chat["conv_id"] == session.conv_id and chat["status"] == "done" and chat["model"] == "m"
    assert chat["images"] == [session.image.sha256] and chat["params"] == {"temperature": 0.2}
    assert chat["messages"] == [{"role": "user", "content": "q", "image": session.image.sha256},
                                {"role": "assistant", "content": "a", "status": "done"}]
    assert log.path_for().name.endswith("-conv.jsonl")


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="model_list_mode"):
        WebConfig(model_list_mode="sometimes")
    with pytest.raises(ValueError, match="concurrency_count"):
        WebConfig(concurrency_count=0)
    with pytest.raises(ValueError, match="unknown conv_mode"):
        WebConfig(conv_mode="nope")
    cfg = WebConfig(controller_url="http://c:1/", log_dir=tmp_path)
    assert cfg.controller_url == "http://c:1" and cfg.examples_dir == tmp_path / "examples"


def test_cli_flags():
    from llava_med.serve.gradio_web_server import parse_args

    args = parse_args(["--controller", "http://x:1", "--model-list-mode", "reload", "--concurrency-count", "3",
                       "--moderate", "--embed"])
    assert args.controller_url == "http://x:1" and args.model_list_mode == "reload"
    assert args.concurrency_count == 3 and args.moderate and args.embed
    assert args.host == "127.0.0.1" and args.port == 7860 and not args.share


# ------------------------------------------------------------------------------------------------- handlers


@pytest.fixture(scope="module")
def fake_stack() -> Iterator[InProcessStack]:
    with in_process_stack(FakeEngine(["fake-med"], token_delay=0.02, conv_mode="llava_v1"), "fake-med") as stack:
        yield stack


@pytest.fixture
def ui(fake_stack, tmp_path):
    from llava_med.serve.web.ui import WebUI

    return WebUI(WebConfig(controller_url=fake_stack.controller_url, log_dir=tmp_path / "web", examples=False))


def last(outputs):
    """The last value yielded by a handler."""
    value = None
    for value in outputs:
        pass
    return value


def test_worker_reports_its_template(fake_stack):
    resp = requests.post(fake_stack.worker_url + "/worker_get_conv_template", timeout=5)
    assert resp.json() == {"conv_mode": "llava_v1"}
    loading = ModelWorker(FakeEngine(["x"], load_delay=30), no_register=True)
    from fastapi.testclient import TestClient

    resp = TestClient(create_worker_app(loading)).post("/worker_get_conv_template")  # no lifespan: never loads
    assert resp.status_code == 503 and resp.json()["error_code"] == ErrorCode.ENGINE_OVERLOADED


def test_chat_streams_with_the_workers_template_and_logs(ui, fake_stack, tmp_path):
    image = png_file(tmp_path / "cxr.png")
    outputs = list(ui.chat(None, "What is shown?", str(image), "Pad", "fake-med", 0.2, 0.7, 64, None))
    assert len(outputs) >= 4  # first the question, then the answer growing
    session, chat = outputs[-1][0], outputs[-1][1]
    assert session.turns[-1].status == TURN_DONE and session.turns[-1].conv_mode == "llava_v1"
    answer = chat[-1]["content"]
    assert answer.startswith("This is a fake answer about:") and answer.endswith("USER: What is shown? (end)")
    request = fake_stack.engine.requests[-1]
    assert request.prompt.endswith("USER: <image>\nWhat is shown? ASSISTANT:")  # llava_v1, from the worker
    assert request.image_mode == "Pad" and request.params.stop == ("</s>",) and len(request.images) == 1
    # Second turn without re-uploading: the image stays with the conversation.
    outputs = list(ui.chat(session, "And the heart?", None, "Pad", "fake-med", 0.2, 0.7, 64, None))
    assert outputs[-1][0] is session and len(session.turns) == 2
    assert fake_stack.engine.requests[-1].prompt.count("<image>") == 1
    records = [json.loads(x) for x in ui.log.path_for().read_text().splitlines()]
    assert [r["type"] for r in records] == ["chat", "chat"] and records[1]["turn"] == 1
    assert len(list(ui.log.images_dir.iterdir())) == 1


def test_chat_errors_are_shown_in_the_chat(ui, tmp_path):
    junk = tmp_path / "scan.dcm"
    junk.write_bytes(b"DICM? no, just text")
    out = last(ui.chat(None, "What is this?", str(junk), "Default", "fake-med", 0.2, 0.7, 64, None))
    assert out[0].turns[-1].status == TURN_ERROR and "The image cannot be read" in out[1][-1]["content"]
    out = last(ui.chat(None, "Hello?", None, "Default", "no-such-model", 0.2, 0.7, 64, None))
    assert "No worker is serving model `no-such-model`" in out[1][-1]["content"]
    out = last(ui.chat(None, "x" * 5000, None, "Default", "fake-med", 0.2, 0.7, 64, None))
    assert "Your message is too long" in out[1][-1]["content"]


def test_unreachable_controller_is_named(tmp_path):
    from llava_med.serve.web.ui import WebUI

    url = f"http://127.0.0.1:{free_port()}"
    ui = WebUI(WebConfig(controller_url=url, log_dir=tmp_path, examples=False))
    out = last(ui.chat(None, "Hello?", None, "Default", "m", 0.2, 0.7, 64, None))
    assert f"Cannot reach the server at {url}" in out[1][-1]["content"]


def test_stop_flag_and_closing_the_generator_cancel_on_the_worker(ui, fake_stack, monkeypatch):
    engine = fake_stack.engine
    monkeypatch.setattr(engine, "script", "word " * 500)  # a long answer: 10 s at 0.02 s per token
    before = engine.cancelled
    long = {"model": "fake-med", "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 1000}
    # 1. The Stop handler sets the session's flag: the stream ends at the next chunk.
    gen = ui.chat(None, "Tell me everything " * 40, None, "Default", *long.values(), None)
    session = next(gen)[0]
    next(gen)
    stopper = threading.Timer(0.2, ui.stop, args=(session,))
    stopper.start()
    rest = list(gen)
    stopper.join()
    assert session.turns[-1].status == TURN_STOPPED and "stopped" in rest[-1][1][-1]["content"]
    wait_until(lambda: engine.cancelled == before + 1 and fake_stack.worker.queue_length() == 0, 10,
               message="the worker cancelled the request")
    # 2. Gradio's cancellation closes the generator: its finally closes the HTTP stream.
    gen = ui.regenerate(session, "Default", *long.values(), None)
    for _ in range(3):
        next(gen)
    assert fake_stack.worker.queue_length() == 1
    gen.close()
    assert session.turns[-1].status == TURN_STOPPED
    wait_until(lambda: engine.cancelled == before + 2 and fake_stack.worker.queue_length() == 0, 10,
               message="the worker cancelled the request")
    statuses = [json.loads(x)["status"] for x in ui.log.path_for().read_text().splitlines()]
    assert statuses == ["stopped", "stopped"]


def test_votes_clear_and_new_image_starts_a_new_conversation(ui, tmp_path):
    red, blue = png_file(tmp_path / "red.png"), png_file(tmp_path / "blue.png", color=(0, 0, 200))
    session = last(ui.chat(None, "q1", str(red), "Default", "fake-med", 0.2, 0.7, 16, None))[0]
    out = ui.upvote(session, "fake-med", None)
    assert session.voted and out[7]["interactive"] is False  # voting again is disabled until the next answer
    session2 = last(ui.chat(session, "q2", str(blue), "Default", "fake-med", 0.2, 0.7, 16, None))[0]
    assert session2 is not session and len(session2.turns) == 1 and session2.conv_id != session.conv_id
    cleared = ui.clear()
    assert cleared[0].turns == [] and cleared[1] == [] and cleared[-3:] == (None, None, "")
    types = [json.loads(x)["type"] for x in ui.log.path_for().read_text().splitlines()]
    assert types == ["chat", "upvote", "chat"]


@pytest.mark.filterwarnings("ignore:The image cannot be read:UserWarning")  # gr.Warning outside a page
def test_preview_decodes_dicom_and_names_bad_files(ui, tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    image, text = ui.preview(pydicom_data.get_testdata_file("MR_small.dcm"))
    assert image.size == (64, 64) and "64×64" in text
    junk = tmp_path / "x.png"
    junk.write_bytes(b"junk")
    image, text = ui.preview(str(junk))
    assert image is None and text.startswith("⚠️") and "cannot be read" in text
