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
from llava_med.errors import ImageError, ImageTooLargeError, LlavaMedError
from llava_med.images.decode import image_sha256, load_image
from llava_med.images.dicom import DicomOptions
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
from llava_med.serve.web.export import write_exports
from llava_med.serve.web.messages import chatbot_messages, controller_banner, describe_error, safe_markdown
from llava_med.serve.web.session import ChatSession, Turn, build_prompt, encode_for_model
from llava_med.serve.web.upload import describe_upload_error, discard_upload, read_upload

gradio = pytest.importorskip("gradio", reason="the web UI needs the 'web' extra (gradio)")


def png_file(path: Path, color=(200, 30, 30), size=(48, 32)) -> Path:
    return sample_images.png_file(path, sample_images.solid(color, size))


def session_with_image(tmp_path: Path) -> ChatSession:
    session = ChatSession()
    session.image = encode_for_model(sample_images.solid())
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


def test_chatbot_messages_show_the_question_with_a_thumbnail_and_each_status(tmp_path):
    session = session_with_image(tmp_path)
    session.image = session.image.saved(tmp_path / "images")
    session.turns = [Turn("q1 <b>bold?</b>", "done <script>x</script> `<tag>`", TURN_DONE),
                     Turn("q2", "half", TURN_STOPPED), Turn("q3", "", TURN_ERROR, error="**No worker** here"),
                     Turn("q4", "stream")]
    messages = chatbot_messages(session)
    assert messages[0] == {"role": "user", "content": [{"path": session.image.path,
                                                        "alt_text": "the image asked about"}, "q1 &lt;b>bold?&lt;/b>"]}
    texts = [m["content"] for m in messages[1:]]
    assert texts == ["done &lt;script>x&lt;/script> `<tag>`", "q2", "half\n\n*(stopped)*", "q3",
                     "⚠️ **No worker** here", "q4", "stream▌"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4
    assert chatbot_messages(None) == []


def test_model_html_is_shown_as_text_outside_code():
    assert safe_markdown("a <img src=x onerror=alert(1)> & b") == "a &lt;img src=x onerror=alert(1)> &amp; b"
    assert safe_markdown("```html\n<div>\n```\n<p>") == "```html\n<div>\n```\n&lt;p>"
    assert safe_markdown("open ```\n<b>") == "open ```\n<b>"  # a code block still streaming


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("exc, expected", [
    (NoWorkerError("no worker serves model 'm'"), "No worker is serving model `m`"),
    (WorkerError(ErrorCode.CONTEXT_OVERFLOW, "the prompt has 3000 tokens but the context length is 2048"),
     "The conversation is too long for the model**: The prompt has 3000 tokens"),
    (WorkerError(ErrorCode.BAD_IMAGE, "image 0 is truncated"), "The worker could not use the image"),
    (WorkerError(ErrorCode.ENGINE_OVERLOADED, "the queue is full"), "The worker is busy"),
    (WorkerError(99999, "strange"), "The worker reported an error**: Strange."),
    (ClientTimeoutError("http://w did not answer within 5 s"), "did not answer in time"),
    (ClientConnectionError("the connection broke: urllib3 HTTPConnectionPool(...)"), "connection to the worker"),
    (ImageError("bytes are not an image (UnidentifiedImageError: ...)"), "The image cannot be read"),
    (ImageTooLargeError("image is 9000x9000"), "The image is too large"),
    (RuntimeError("boom"), "Something went wrong while answering"),
])
def test_errors_name_their_cause_without_library_text(exc, expected):
    text = describe_error(exc, model="m")
    assert expected in text
    assert not any(t in text for t in ("Traceback", "urllib3", "HTTPConnectionPool", "UnidentifiedImageError",
                                       "boom"))


def test_controller_banner_names_the_url():
    assert "Cannot reach the controller at http://c:1" in controller_banner("http://c:1", reachable=False)
    assert "has no worker registered" in controller_banner("http://c:1", reachable=True)


# ------------------------------------------------------------------------------------------------- uploads


def test_read_upload_png_dicom_multiframe_series_and_downscale(tmp_path):
    config = WebConfig(log_dir=tmp_path)
    png = read_upload([png_file(tmp_path / "a.png")], config)
    assert (png.image.width, png.image.height, png.name, png.is_dicom) == (48, 32, "a.png", False)
    assert image_sha256(base64.b64decode(png.image.b64)) == png.image.sha256
    assert png.window_choices() == [] and png.wire_options() == {}
    huge = read_upload([png_file(tmp_path / "huge.png", size=(3000, 1500))], config)
    assert (huge.image.width, huge.image.height) == (1344, 672)  # downscaled before sending

    ct = read_upload([sample_images.ct_dicom()], config)
    assert (ct.image.width, ct.image.height) == (128, 128) and ct.is_dicom and ct.info.modality == "CT"
    assert ct.window == "auto" and [v for _, v in ct.window_choices()] == ["soft_tissue", "lung", "bone", "brain",
                                                                           "auto"]
    lung = ct.rerender(window="lung", config=config)
    assert lung.image.sha256 != ct.image.sha256 and lung.wire_options() == {"dicom_window": "lung"}
    mr = read_upload([sample_images.ct_dicom().replace("CT_small", "MR_small")], config)
    assert [v for _, v in mr.window_choices()] == ["stored", "auto"] and mr.window == "stored"

    volume = tmp_path / "v.dcm"
    volume.write_bytes(sample_images.phi_ct_dicom(frames=5))
    multi = read_upload([volume], config)
    assert multi.slices == 5 and multi.index == 2 and multi.wire_options() == {"dicom_window": "auto",
                                                                              "dicom_frame": 2}
    first = multi.rerender(index=0, config=config)
    assert first.index == 0 and first.image.sha256 != multi.image.sha256
    assert first.description()["dicom"]["slice"] == 1 and "PatientName" not in str(first.description())

    files = []
    for name, data in sample_images.ct_series(5):
        (tmp_path / name).write_bytes(data)
        files.append(tmp_path / name)
    series = read_upload(files, config)
    assert series.slices == 5 and series.index == 2 and series.info.slice_location == 20.0
    assert series.name == "5 files" and series.wire_options() == {"dicom_window": "auto"}


def test_upload_problems_in_plain_words_and_limits_before_reading(tmp_path):
    config = WebConfig(log_dir=tmp_path, max_image_bytes=10_000, max_series_files=3)

    def problem(paths) -> str:
        with pytest.raises((ImageError, LlavaMedError)) as err:
            read_upload(paths, config)
        return describe_upload_error(err.value, Path(paths[0]).name, config)

    junk = tmp_path / "notes.png"
    junk.write_text("not a picture")
    assert problem([junk]) == ("notes.png is not an image this chat can read. Upload PNG, JPEG, TIFF, WebP, BMP, GIF "
                               "or DICOM (one file, several slices or a .zip series).")
    big = png_file(tmp_path / "big.png", size=(400, 400))
    big.write_bytes(big.read_bytes() + b"\0" * 20_000)
    assert problem([big]) == f"big.png is {big.stat().st_size:,} bytes; the limit is 10,000 bytes."
    assert "a series may have at most 3" in problem([junk] * 4)
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(sample_images.phi_ct_dicom(frames=1, size=64)[:-3000])  # under the 10,000-byte limit
    assert problem([truncated]) == "cut.dcm is incomplete: the file ends before the image does. Upload it again."
    assert "holds no DICOM image" in problem([junk, junk])
    pixels = WebConfig(log_dir=tmp_path, max_image_pixels=100)
    with pytest.raises(ImageTooLargeError) as err:
        read_upload([png_file(tmp_path / "p.png")], pixels)
    assert "too large to use here" in describe_upload_error(err.value, "p.png", pixels)


def test_discard_upload_deletes_only_gradios_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    copy = tmp_path / "gradio" / "abc123" / "scan.dcm"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"x")
    mine = png_file(tmp_path / "mine.png")
    discard_upload([str(copy), str(mine), None])
    assert not copy.exists() and not copy.parent.exists() and mine.exists()


def test_exports_hold_the_conversation_and_the_image(tmp_path):
    session = session_with_image(tmp_path)
    session.turns = [Turn("What is it?", "A scan.", TURN_DONE, model="m", params={"temperature": 0.2}),
                     Turn("More?", "", TURN_ERROR, error="**The worker is busy**")]
    markdown, as_json = (Path(p) for p in write_exports(session, tmp_path / "exports"))
    text = markdown.read_text()
    assert "**You:** What is it?" in text and "**LLaVA-Med (m):** A scan." in text
    assert f"](data:image/png;base64,{session.image.b64})" in text and "no answer: **The worker is busy**" in text
    data = json.loads(as_json.read_text())
    assert data["image"]["png_base64"] == session.image.b64 and data["turns"][0]["params"] == {"temperature": 0.2}
    assert [t["status"] for t in data["turns"]] == ["done", "error"]


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
    session.turns = [Turn("q", "a", TURN_DONE, model="m", conv_mode="mistral_instruct", finished=time.time(),
                          params={"temperature": 0.2})]
    log.log_chat(session, session.turns[0], ip="127.0.0.1")
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


def panel_of(ui, path: Path):
    """The image panel after uploading ``path`` (the upload handler's state output)."""
    return ui.upload([str(path)])[ui.c.panel]


def test_chat_streams_with_the_workers_template_and_logs(ui, fake_stack, tmp_path):
    c = ui.c
    panel = panel_of(ui, png_file(tmp_path / "cxr.png"))
    outputs = list(ui.chat(None, panel, "What is shown?", "Pad", "fake-med", 0.2, 0.7, 64, None))
    assert len(outputs) >= 4  # first the question, then the answer growing
    session, chat = outputs[-1][c.state], outputs[-1][c.chatbot]
    assert outputs[0][c.textbox] == "" and session.turns[-1].status == TURN_DONE
    assert session.turns[-1].conv_mode == "llava_v1"
    answer = chat[-1]["content"]
    assert answer.startswith("This is a fake answer about:") and answer.endswith("USER: What is shown? (end)")
    request = fake_stack.engine.requests[-1]
    assert request.prompt.endswith("USER: <image>\nWhat is shown? ASSISTANT:")  # llava_v1, from the worker
    assert request.image_mode == "Pad" and request.params.stop == ("</s>",) and len(request.images) == 1
    assert request.dicom is None  # a PNG: no DICOM fields
    assert outputs[-1][c.export_md]["interactive"] and Path(outputs[-1][c.export_md]["value"]).exists()
    # Second turn without a new upload: the image stays with the conversation.
    outputs = list(ui.chat(session, panel, "And the heart?", "Pad", "fake-med", 0.2, 0.7, 64, None))
    assert outputs[-1][c.state] is session and len(session.turns) == 2
    assert fake_stack.engine.requests[-1].prompt.count("<image>") == 1
    records = [json.loads(x) for x in ui.log.path_for().read_text().splitlines()]
    assert [r["type"] for r in records] == ["chat", "chat"] and records[1]["turn"] == 1
    assert len(list(ui.log.images_dir.iterdir())) == 1


def test_dicom_panel_sends_its_window_and_frame(ui, fake_stack, tmp_path):
    c = ui.c
    volume = tmp_path / "v.dcm"
    volume.write_bytes(sample_images.phi_ct_dicom(frames=3))
    view = ui.upload([str(volume)])
    assert view[c.window]["visible"] and view[c.slice]["visible"] and view[c.slice]["value"] == 2
    lung = ui.choose_window("lung", view[c.panel])
    first = ui.choose_slice(1, lung[c.panel])
    assert c.upload not in lung  # changing the window keeps the drop zone as it is
    assert len({view[c.panel].image.sha256, lung[c.panel].image.sha256, first[c.panel].image.sha256}) == 3
    out = last(ui.chat(None, first[c.panel], "Which organ?", "Default", "fake-med", 0.2, 0.7, 8, None))
    assert out[c.chatbot][-1]["content"].startswith("[dicom_window=lung,dicom_frame=0]")
    assert fake_stack.engine.requests[-1].dicom == DicomOptions("lung", 0)
    record = json.loads(ui.log.path_for().read_text().splitlines()[-1])
    assert record["image_details"]["dicom"]["window"] == "lung" and record["image_details"]["dicom"]["slice"] == 1
    assert "Doe" not in json.dumps(record) and "PID" not in json.dumps(record)


def test_problems_are_shown_once_in_their_place(ui, tmp_path):
    c = ui.c
    junk = tmp_path / "scan.png"
    junk.write_bytes(b"just text, not an image")
    view = ui.upload([str(junk)])
    assert c.panel not in view  # the panel keeps what it had
    assert "scan.png is not an image this chat can read" in view[c.upload_status]
    out = last(ui.chat(None, None, "Hello?", "Default", "no-such-model", 0.2, 0.7, 64, None))
    assert "No worker is serving model `no-such-model`" in out[c.chatbot][-1]["content"]
    assert out[c.regenerate]["interactive"] is False  # nothing to regenerate after an error
    with pytest.raises(gradio.Error, match="5,000 characters long; the limit is 4,000"):
        last(ui.chat(None, None, "x" * 5000, "Default", "fake-med", 0.2, 0.7, 64, None))
    out = last(ui.chat(None, None, "   ", "Default", "fake-med", 0.2, 0.7, 64, None))
    assert out[c.feedback] == "Type a question first." and out[c.state].turns == []


def test_unreachable_controller_is_a_banner_and_the_question_stays(tmp_path):
    from llava_med.serve.web.ui import WebUI

    url = f"http://127.0.0.1:{free_port()}"
    ui = WebUI(WebConfig(controller_url=url, log_dir=tmp_path, examples=False))
    c = ui.c
    assert ui.page_load(None)[c.banner]["visible"]
    out = last(ui.chat(None, None, "Hello?", "Default", "m", 0.2, 0.7, 64, None))
    assert out[c.banner]["visible"] and f"Cannot reach the controller at {url}" in out[c.banner_text]
    assert out[c.state].turns == [] and out[c.chatbot] == [] and out[c.textbox] == "Hello?"
    refreshed = ui.refresh_models("m")
    assert refreshed[c.banner]["visible"] and refreshed[c.model]["choices"] == []


def test_stop_flag_and_closing_the_generator_cancel_on_the_worker(ui, fake_stack, monkeypatch):
    engine = fake_stack.engine
    monkeypatch.setattr(engine, "script", "word " * 500)  # a long answer: 10 s at 0.02 s per token
    before = engine.cancelled
    long = {"model": "fake-med", "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 1000}
    # 1. The Stop handler sets the session's flag: the stream ends at the next chunk.
    gen = ui.chat(None, None, "Tell me everything " * 40, "Default", *long.values(), None)
    session = next(gen)[ui.c.state]
    next(gen)
    stopper = threading.Timer(0.2, ui.stop, args=(session,))
    stopper.start()
    rest = list(gen)
    stopper.join()
    assert session.turns[-1].status == TURN_STOPPED and "stopped" in rest[-1][ui.c.chatbot][-1]["content"]
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
    c = ui.c
    red = panel_of(ui, png_file(tmp_path / "red.png"))
    blue = panel_of(ui, png_file(tmp_path / "blue.png", color=(0, 0, 200)))
    session = last(ui.chat(None, red, "q1", "Default", "fake-med", 0.2, 0.7, 16, None))[c.state]
    out = ui.upvote(session, "fake-med", None)
    assert session.voted and out[c.upvote]["interactive"] is False  # once per answer
    assert out[c.feedback].startswith("✓ Upvote recorded.")
    outputs = list(ui.chat(session, blue, "q2", "Default", "fake-med", 0.2, 0.7, 16, None))
    session2 = outputs[-1][c.state]
    assert session2 is not session and len(session2.turns) == 1 and session2.conv_id != session.conv_id
    assert outputs[0][c.feedback] == "A new image: a new conversation started."
    cleared = ui.clear()
    assert cleared[c.state].turns == [] and cleared[c.chatbot] == [] and cleared[c.panel] is None
    assert cleared[c.textbox] == "" and cleared[c.preview]["visible"] is False
    types = [json.loads(x)["type"] for x in ui.log.path_for().read_text().splitlines()]
    assert types == ["chat", "upvote", "chat"]
