"""A real browser (headless Chromium driven by Playwright) on the stack started by ``llava-med launch``: open the
page, upload an image, ask, see the answer stream in, press Stop (the worker's queue empties), then Regenerate; a
screenshot is saved.

The worker is the scripted engine at 20 tokens per second with a long script, so that Stop always lands in the
middle of an answer (the tiny model finishes 512 tokens in about two seconds, a race with the click). The tiny
model's path through the web chat is tested end to end in test_web_e2e.py.

Chromium comes from the system (Debian: ``apt-get install chromium``; ``.ci/run`` installs it): Playwright only
drives it through ``executable_path``, no browser is downloaded. Without Chromium the test is skipped, saying so.
Set ``LLAVA_MED_CHROMIUM`` to use another binary and ``LLAVA_MED_SCREENSHOT_DIR`` to keep the screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from launch_helpers import start_launcher
from servers import wait_until

from llava_med.serve.web.examples import draw_chest_xray

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def find_chromium() -> str | None:
    candidates = [os.environ.get("LLAVA_MED_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  "/usr/bin/chromium"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium not found: install it (Debian: apt-get install -y chromium; .ci/run does) or set "
                    "LLAVA_MED_CHROMIUM; no browser is downloaded")
    pytest.importorskip("playwright.sync_api", reason="the browser test needs the 'playwright' Python package "
                                                      "(test extra); its browsers are not needed")
    return path


def set_slider(page, elem_id: str, value: str, timeout: float = 20.0) -> None:
    """Set a Gradio slider through its range input. Just after its accordion opens, the page may re-render the
    slider with its initial value, so set it until it holds."""
    import time

    slider = page.locator(f"#{elem_id} input[type=range]")
    number = page.locator(f"#{elem_id} input[type=number]")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        slider.fill(value)
        page.wait_for_timeout(300)
        if slider.input_value() == value and number.input_value() == value:
            return
    raise AssertionError(f"the slider #{elem_id} did not keep the value {value}")


def test_browser_upload_ask_stop_regenerate(chromium_path, tmp_path, request):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=20_000)  # a 2-core machine under load: give the page time

    image = tmp_path / "chest_xray.png"
    draw_chest_xray(384).save(image)
    stack = start_launcher(tmp_path / "stack", "--engine", "fake", "--fake-token-delay", "0.05",
                           "--fake-script", " ".join(f"finding{i}" for i in range(600)), timeout=180)
    shots = Path(os.environ.get("LLAVA_MED_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(30_000)
                page.goto(stack.web_url, wait_until="domcontentloaded")
                textbox = page.locator("#llava-med-input textarea")
                expect(textbox).to_be_visible()
                expect(page.get_by_text("Research use only.")).to_be_visible()
                expect(page.locator("#llava-med-model input")).to_have_value("llava-med-fake")
                page.get_by_text("Parameters").click()  # opened early: its sliders settle while we chat

                # Upload: the preview shows the decoded image.
                page.locator("#llava-med-upload input[type=file]").set_input_files(str(image))
                expect(page.locator("#llava-med-preview img")).to_be_visible()
                expect(page.locator("#llava-med-upload-status")).to_contain_text("384×384")

                # Ask (the default 512 output tokens take the scripted engine 25 s): the answer streams in.
                textbox.fill("What does this chest X-ray show?")
                page.locator("#llava-med-send").click()
                stop = page.locator("#llava-med-stop")
                expect(stop).to_be_visible()
                bot = page.locator("#llava-med-chat [data-testid='bot']").last
                page.wait_for_function(
                    "() => { const m = [...document.querySelectorAll(\"#llava-med-chat [data-testid='bot']\")];"
                    " return m.length && m[m.length - 1].innerText.replace('▌', '').trim().length > 10; }")
                expect(page.locator("#llava-med-chat img").first).to_be_visible()  # the image is in the chat
                assert stack.worker_queue_length() == 1
                page.screenshot(path=str(shots / "browser_streaming.png"), full_page=True)

                # Stop: the answer is marked stopped, Send is back, and the worker really cancelled.
                stop.click()
                expect(bot).to_contain_text("(stopped)")
                expect(page.locator("#llava-med-send")).to_be_visible()
                expect(stop).to_be_hidden()
                wait_until(lambda: stack.worker_queue_length() == 0, 15, message="the worker's queue to empty")

                # Regenerate a short answer: it replaces the stopped one.
                set_slider(page, "llava-med-max-tokens", "16")
                regenerate = page.locator("#llava-med-regenerate")
                expect(regenerate).to_be_enabled()
                regenerate.click()
                expect(page.locator("#llava-med-send")).to_be_visible(timeout=60_000)
                expect(bot).not_to_contain_text("(stopped)")
                expect(page.locator("#llava-med-upvote")).to_be_enabled()
                answer = bot.inner_text().strip()
                assert answer and not answer.endswith("▌") and not answer.startswith("⚠")
                assert page.locator("#llava-med-chat [data-testid='bot']").count() == 1
                page.screenshot(path=str(shots / "browser.png"), full_page=True)
            finally:
                browser.close()
        records = [json.loads(line) for f in sorted((stack.log_dir / "web").glob("*-conv.jsonl"))
                   for line in f.read_text().splitlines()]
        assert [(r["type"], r["status"]) for r in records] == [("chat", "stopped"), ("chat", "done")]
        assert records[1]["params"]["max_new_tokens"] == 16
        assert stack.terminate() == 0
        print(f"screenshots: {shots}")
    except BaseException:
        print(f"\n===== stack logs =====\n{stack.logs()}")
        raise
    finally:
        stack.kill_everything()
