"""The web chat end to end: ``llava-med launch`` on the tiny model (real controller, hf worker and web UI
processes), driven with ``gradio_client``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
from servers import wait_until

from llava_med.serve.web.examples import draw_chest_xray

pytest.importorskip("gradio_client", reason="the web tests need the 'test' extra (gradio_client)")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, request):
    """``llava-med launch`` on the tiny model (real controller, hf worker and web UI processes)."""
    from launch_helpers import pid_gone, start_launcher

    log_dir = tmp_path_factory.mktemp("launch")
    stack = start_launcher(log_dir, "--concurrency-count", "4", timeout=180)
    failed_before = request.session.testsfailed
    try:
        yield stack
        pids = stack.child_pids()
        assert stack.terminate() == 0
        wait_until(lambda: all(pid_gone(p) for p in pids), 10, message="every child gone")
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\n===== launched stack logs =====\n{stack.logs()}")
        stack.kill_everything()


@pytest.fixture(scope="module")
def web(launched):
    from gradio_client import Client

    return Client(launched.web_url, verbose=False, download_files=False)


def xray_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "e2e_xray.png"
    if not path.exists():
        draw_chest_xray(256).save(path)
    return path


def chat_log(launched) -> list[dict]:
    files = sorted((launched.log_dir / "web").glob("*-conv.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def assistant_text(chatbot_value) -> str:
    content = chatbot_value[-1]["content"]
    return "".join(part.get("text", "") for part in content) if isinstance(content, list) else str(content)


@pytest.mark.slow
def test_e2e_chat_with_image_streams_the_answer(launched, web, tmp_path_factory):
    from gradio_client import handle_file

    model = launched.models()[0]
    assert model == "llava-med-tiny-mistral"
    web.predict([handle_file(str(xray_png(tmp_path_factory)))], api_name="/upload")  # the image panel
    job = web.submit("What does this chest X-ray show?", "Default", model, 0.2, 0.7, 24, api_name="/chat")
    job.result(timeout=120)
    outputs = job.outputs()
    answers = [assistant_text(out[0]) for out in outputs]
    assert len(outputs) >= 3, answers  # streamed: the question, partial answers, the final one
    assert answers[-1] and not answers[-1].startswith("⚠️") and not answers[-1].endswith("▌")
    assert any(a.endswith("▌") for a in answers[:-1])  # partial answers were shown while streaming
    user_parts = [m for m in outputs[-1][0] if m["role"] == "user"]
    assert any(p.get("type") == "file" for m in user_parts for p in m["content"])  # the image is in the chat
    record = chat_log(launched)[-1]
    assert record["type"] == "chat" and record["status"] == "done" and record["model"] == model
    assert record["conv_mode"] == "mistral_instruct" and len(record["images"]) == 1
    # A second turn keeps the image (no new upload), and a DICOM upload works too (another session).
    web.predict("And the heart?", "Default", model, 0.2, 0.7, 8, api_name="/chat")
    record = chat_log(launched)[-1]
    assert record["turn"] == 1 and len(record["messages"]) == 4 and record["messages"][0].get("image")
    pydicom_data = pytest.importorskip("pydicom.data")
    from gradio_client import Client

    other = Client(launched.web_url, verbose=False, download_files=False)
    other.predict([handle_file(pydicom_data.get_testdata_file("CT_small.dcm"))], api_name="/upload")
    other.predict("lung", api_name="/window")
    result = other.predict("Which modality?", "Pad", model, 0.2, 0.7, 8, api_name="/chat")
    assert assistant_text(result[0]) and not assistant_text(result[0]).startswith("⚠️")


@pytest.mark.slow
def test_e2e_stop_leaves_the_worker_queue_empty(launched, web, tmp_path_factory):
    from gradio_client import handle_file

    model = launched.models()[0]
    web.predict([handle_file(str(xray_png(tmp_path_factory)))], api_name="/upload")
    job = web.submit("Describe everything in detail.", "Pad", model, 0.9, 1.0, 1024, api_name="/chat")
    wait_until(lambda: len(job.outputs()) >= 4, 60, message="the answer streaming")
    assert launched.worker_queue_length() == 1
    stopped_at = time.monotonic()
    assert job.cancel()
    wait_until(lambda: launched.worker_queue_length() == 0, 15, message="the worker's queue to empty")
    assert time.monotonic() - stopped_at < 15  # a 1024-token answer takes far longer on this model
    wait_until(lambda: chat_log(launched)[-1]["status"] == "stopped", 10, message="the stopped chat logged")


@pytest.mark.slow
def test_e2e_errors_votes_and_logs(launched, web, tmp_path_factory, tmp_path):
    from gradio_client import Client, handle_file

    model = launched.models()[0]
    images_dir = launched.log_dir / "web" / "images"
    before_images = set(images_dir.iterdir())
    before = chat_log(launched)
    client = Client(launched.web_url, verbose=False, download_files=False)
    image = tmp_path / "fresh.png"
    draw_chest_xray(128, seed=7).save(image)
    client.predict([handle_file(str(image))], api_name="/upload")
    for question in ("First question?", "Second question?"):
        client.predict(question, "Default", model, 0.2, 0.7, 8, api_name="/chat")
    client.predict(model, api_name="/upvote")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture")
    status = client.predict([handle_file(str(junk))], api_name="/upload")[2]  # said in the image panel
    assert "junk.png is not an image this chat can read" in status
    result = client.predict("Hello?", "Default", "no-such-model", 0.2, 0.7, 8, api_name="/chat")
    assert "No worker is serving model `no-such-model`" in assistant_text(result[0])
    new = chat_log(launched)[len(before):]
    assert [(r["type"], r.get("status")) for r in new] == [
        ("chat", "done"), ("chat", "done"), ("upvote", None), ("chat", "error")]
    added = set(images_dir.iterdir()) - before_images
    assert len(added) == 1 and next(iter(added)).name == f"{new[0]['images'][0]}.png"  # saved once
    assert requests.get(launched.web_url + "/health", timeout=5).json()["status"] == "ok"


@pytest.mark.slow
def test_e2e_out_of_range_inputs_are_refused_by_name_and_the_chat_goes_on(launched, web):
    """What a script could send past the page's widgets: each is refused with a message naming the value and
    the limit, no chat is started (nothing logged), and the next good question is answered."""
    from gradio_client.exceptions import AppError

    model = launched.models()[0]
    before = len(chat_log(launched))
    good = ("Hi", "Default", model, 0.2, 0.7, 8)
    for index, value, words in [(3, -3.0, "less than minimum value 0.0"), (4, 5.0, "greater than maximum value 1.0"),
                                (5, 10**9, "greater than maximum value 1024"), (1, "Stretch", "not in the list of choices"),
                                (3, "hot", "Expected a `float`")]:
        args = list(good)
        args[index] = value
        with pytest.raises(AppError, match=re.escape(words)) as raised:
            web.predict(*args, api_name="/chat")
        assert "Traceback" not in str(raised.value)
    assert len(chat_log(launched)) == before
    result = web.predict(*good, api_name="/chat")
    assert assistant_text(result[0]) and chat_log(launched)[-1]["status"] == "done"
