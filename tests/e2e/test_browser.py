"""The web chat in a real browser (headless Chromium driven by Playwright), as a new user meets it.

One web UI process serves every test of this module, first with its controller down (the banner names the URL
it tried and Retry works once a controller and a scripted worker are started), then with them. Checked: upload by
choosing, dropping and pasting, a new image replacing the old one without clearing; the user's turn shows their
question and a thumbnail; Stop (the worker's queue empties), Regenerate, votes answered, the export; a CT DICOM
whose preview (the PNG the model sees) changes with the window preset, the request reaching the worker with that
window, a multi-frame file's and a .zip series' slice slider; every problem shown once, with no library text; the
chat above the controls on a phone; no patient-identifying DICOM tag anywhere (page, logs, saved files).
Screenshots (desktop 1400 px, mobile 390 px, dark theme) are kept in ``LLAVA_MED_SCREENSHOT_DIR`` when set.

The worker is the scripted engine (``--engine fake``): it answers at a known pace, and starts each answer with the
DICOM options its request carried. The tiny model's path through the web chat is tested in test_web_e2e.py.

Chromium comes from the system (Debian: ``apt-get install chromium``; ``.ci/run`` installs it): Playwright only
drives it through ``executable_path``, no browser is downloaded. Without Chromium these tests are skipped, saying
so. ``LLAVA_MED_CHROMIUM`` selects another binary.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sample_images import PHI_VALUES, ct_series, phi_ct_dicom, png_bytes, png_file, scan
from servers import ProcessGroup, ServerProcess, free_port, listed_models, module_processes, queue_length, wait_until

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
SCRIPT = " ".join(f"finding{i}" for i in range(150))  # 150 tokens at 0.04 s: 6 s, so Stop lands mid-answer
LIBRARY_TEXT = ("HTTPConnectionPool", "Max retries", "Errno", "urllib3", "NewConnectionError", "Traceback",
                "UnidentifiedImageError", "cannot identify image", "PIL", "pydicom", "InvalidDicomError")
BOT = "#llava-med-chat [data-testid='bot']"
USER = "#llava-med-chat [data-testid='user']"


def find_chromium() -> str | None:
    candidates = [os.environ.get("LLAVA_MED_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  "/usr/bin/chromium"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@dataclass
class Site:
    """The web UI process, the controller and worker behind it (started and stopped by tests), one browser."""

    root: Path
    group: ProcessGroup
    web: ServerProcess
    controller_port: int
    browser: object
    shots: Path
    backend: list[ServerProcess] = field(default_factory=list)

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def start_backend(self) -> None:
        if self.backend:
            return
        controller = self.group.start_controller(port=self.controller_port)
        worker = self.group.start_worker(controller.url, "--fake-token-delay", "0.04", "--fake-script", SCRIPT,
                                         "--stream-min-interval", "0")
        self.backend = [controller, worker]
        wait_until(lambda: listed_models(controller.url), 15,
                   message="the worker registered")

    def stop_backend(self) -> None:
        for proc in reversed(self.backend):
            proc.stop()
        self.backend = []

    def worker_queue_length(self) -> int:
        return queue_length(self.backend[1].url)

    def page(self, *, width: int = 1400, height: int = 1000, dark: bool = False):
        from playwright.sync_api import expect

        page = self.browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(30_000)
        page.goto(self.web.url + ("/?__theme=dark" if dark else "/"), wait_until="domcontentloaded")
        expect(page.locator("#llava-med-input textarea")).to_be_visible()
        return page

    def outputs(self) -> list[Path]:
        """Every file the stack wrote: logs, saved images, exports, Gradio's upload cache."""
        return [p for p in self.root.rglob("*") if p.is_file() and "inputs" not in p.parts]


@pytest.fixture(scope="module")
def site(tmp_path_factory, request) -> Iterator[Site]:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium not found: install it (Debian: apt-get install -y chromium; .ci/run does) or set "
                    "LLAVA_MED_CHROMIUM; no browser is downloaded")
    pytest.importorskip("playwright.sync_api", reason="the browser tests need the 'playwright' Python package "
                                                      "(test extra); its browsers are not needed")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=20_000)  # a 2-core machine under load: give the page time
    root = tmp_path_factory.mktemp("browser")
    (root / "tmp").mkdir()
    controller_port = free_port()
    with module_processes(root / "logs", request, title="server logs") as group:
        # TMPDIR: the web UI's exports and Gradio's upload cache land under root, where the PHI test looks.
        web = group.start_module("web", "llava_med.serve.gradio_web_server", "--controller-url",
                                 f"http://127.0.0.1:{controller_port}", "--model-list-mode", "reload", "--log-dir",
                                 str(root / "web"), env={"TMPDIR": str(root / "tmp")}, timeout=90)
        shots = Path(os.environ.get("LLAVA_MED_SCREENSHOT_DIR") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
            try:
                yield Site(root, group, web, controller_port, browser, shots)
            finally:
                browser.close()
        print(f"screenshots: {shots}")


def page_text(page) -> str:
    return page.locator("body").inner_text()


def last_bot_text(page) -> str:
    return page.evaluate(f"() => {{ const m = [...document.querySelectorAll(\"{BOT}\")];"
                         " return m.length ? m[m.length - 1].innerText : ''; }")


def wait_answer_starts(page, words: int = 3) -> str:
    page.wait_for_function(f"() => {{ const m = [...document.querySelectorAll(\"{BOT}\")]; return m.length &&"
                           f" m[m.length - 1].innerText.replace('▌', '').split(/\\s+/).filter(Boolean).length"
                           f" >= {words}; }}")
    return last_bot_text(page).replace("▌", "").strip()


def stop_answer(page, site: Site) -> None:
    from playwright.sync_api import expect

    page.locator("#llava-med-stop").click()
    expect(page.locator("#llava-med-send")).to_be_visible()
    wait_until(lambda: site.worker_queue_length() == 0, 15, message="the worker's queue to empty")


def ask(page, question: str) -> None:
    from playwright.sync_api import expect

    page.locator("#llava-med-input textarea").fill(question)
    page.locator("#llava-med-send").click()
    expect(page.locator("#llava-med-stop")).to_be_visible()


def drop_files(page, selector: str, files: list[tuple[str, bytes]], *, paste: bool = False) -> None:
    """Drop (or paste) files on ``selector`` the way a browser does: a DataTransfer holding File objects."""
    payload = [(name, base64.b64encode(data).decode()) for name, data in files]
    page.evaluate("""([selector, files, paste]) => {
        const dt = new DataTransfer();
        for (const [name, b64] of files) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], name));
        }
        const target = document.querySelector(selector);
        if (paste) {
            target.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
            return;
        }
        for (const type of ["dragenter", "dragover", "drop"]) {
            target.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }
    }""", [selector, payload, paste])


def preview_png(page) -> bytes:
    src = page.locator("#llava-med-preview img").get_attribute("src")
    return page.request.get(src).body()


def test_controller_down_banner_names_the_url_then_retry(site):
    from playwright.sync_api import expect

    site.stop_backend()
    page = site.page()
    try:
        banner = page.locator("#llava-med-banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text(f"Cannot reach the controller at {site.controller_url}")
        # Asking anyway: the question stays in the box, the chat stays empty, the banner is the one message.
        ask_box = page.locator("#llava-med-input textarea")
        ask_box.fill("Is anyone there?")
        page.locator("#llava-med-send").click()
        expect(page.locator("#llava-med-send")).to_be_visible()
        page.wait_for_timeout(500)
        expect(ask_box).to_have_value("Is anyone there?")
        assert page.locator(BOT).count() == 0
        text = page_text(page)
        assert text.count("Cannot reach the controller") == 1, text
        assert not [t for t in LIBRARY_TEXT if t in text]
        assert page.locator(".toast-body").count() == 0
        page.screenshot(path=str(site.shots / "browser_controller_down.png"))

        site.start_backend()
        page.locator("#llava-med-banner-retry").click()
        expect(banner).to_be_hidden()
        expect(page.locator("#llava-med-model input")).to_have_value("llava-med-fake")
    finally:
        page.close()


def test_upload_choose_drop_paste_replace_then_chat_stop_regenerate_vote_export(site, tmp_path):
    from playwright.sync_api import expect

    site.start_backend()
    first = png_file(tmp_path / "inputs" / "chest.png", scan(1, (384, 384)))
    page = site.page()
    try:
        status = page.locator("#llava-med-upload-status")
        expect(page.locator("#llava-med-regenerate")).to_be_disabled()  # nothing to regenerate yet
        # Choose a file: the panel shows the image as the model will see it.
        page.locator("#llava-med-upload input[type=file]").set_input_files(str(first))
        expect(page.locator("#llava-med-preview img")).to_be_visible()
        expect(status).to_contain_text("chest.png: 384×384")
        # Drop another one on the preview, then paste a third: each replaces the image, no clearing needed.
        drop_files(page, "#llava-med-preview", [("dropped.png", png_bytes(scan(2, (300, 200))))])
        expect(status).to_contain_text("dropped.png: 300×200")
        drop_files(page, "#llava-med-input textarea", [("pasted.png", png_bytes(scan(3, (320, 240))))], paste=True)
        expect(status).to_contain_text("pasted.png: 320×240")
        assert page.locator("#llava-med-upload input[type=file]").count() == 1  # the drop zone is still there

        # Ask: the user's turn shows the question and a thumbnail; the answer streams in; Stop cancels it.
        ask(page, "What does this scan show?")
        wait_answer_starts(page)
        user_turn = page.locator(USER).first
        expect(user_turn.locator("img")).to_be_visible()
        expect(page.locator(USER).last).to_contain_text("What does this scan show?")
        assert site.worker_queue_length() == 1
        page.screenshot(path=str(site.shots / "browser_streaming.png"))
        stop_answer(page, site)
        expect(page.locator(BOT).last).to_contain_text("(stopped)")

        # Regenerate replaces the stopped answer; a vote is answered with a notice.
        regenerate = page.locator("#llava-med-regenerate")
        expect(regenerate).to_be_enabled()
        regenerate.click()
        wait_answer_starts(page)
        stop_answer(page, site)
        assert page.locator(BOT).count() == 1
        page.locator("#llava-med-upvote").click()
        expect(page.locator("#llava-med-feedback")).to_contain_text("Upvote recorded")
        expect(page.locator("#llava-med-upvote")).to_be_disabled()

        # Export: Markdown with the image embedded, and JSON.
        with page.expect_download() as download:
            page.locator("#llava-med-export-md").click()
        markdown = Path(download.value.path()).read_text()
        assert "What does this scan show?" in markdown and "](data:image/png;base64," in markdown
        with page.expect_download() as download:
            page.locator("#llava-med-export-json").click()
        exported = json.loads(Path(download.value.path()).read_text())
        assert exported["turns"][0]["question"] == "What does this scan show?"
        assert (exported["image"]["width"], exported["image"]["height"]) == (320, 240)
        page.screenshot(path=str(site.shots / "browser.png"), full_page=True)
    finally:
        page.close()
    records = [json.loads(line) for f in sorted((site.root / "web").glob("*-conv.jsonl"))
               for line in f.read_text().splitlines()]
    assert [(r["type"], r.get("status")) for r in records[-3:]] == [("chat", "stopped"), ("chat", "stopped"),
                                                                    ("upvote", None)]


def test_dicom_window_and_slices_change_what_the_model_sees_and_no_phi_leaks(site, tmp_path):
    from playwright.sync_api import expect

    site.start_backend()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    volume = inputs / "volume.dcm"  # a neutral name: file names are the user's, tags are the patient's
    volume.write_bytes(phi_ct_dicom(frames=5, size=128, SliceLocation=-42.5))
    page = site.page()
    try:
        page.locator("#llava-med-upload input[type=file]").set_input_files(str(volume))
        window, slider = page.locator("#llava-med-window"), page.locator("#llava-med-slice input[type=range]")
        expect(window).to_be_visible()
        for label in ("Soft tissue", "Lung", "Bone", "Brain", "Auto"):
            expect(window.get_by_label(label)).to_be_visible()
        expect(slider).to_have_value("3")  # the middle of 5 frames
        info = page.locator("#llava-med-dicom-info")
        for shown in ("CT", "CHEST", "Synthetic chest CT", "Slice thickness 5 mm"):
            expect(info).to_contain_text(shown)
        expect(info).not_to_contain_text("Slice position")  # the file's, not each frame's: not shown
        before = preview_png(page)
        window.get_by_label("Lung").check()
        wait_until(lambda: preview_png(page) != before, 20, message="the preview to change with the window")
        lung = preview_png(page)
        assert lung[:8] == b"\x89PNG\r\n\x1a\n"
        slider.fill("1")
        wait_until(lambda: preview_png(page) != lung, 20, message="the preview to change with the slice")
        page.screenshot(path=str(site.shots / "browser_dicom.png"), full_page=True)

        # The request carries the chosen window and frame (the scripted worker says what it received).
        ask(page, "Which structures are visible?")
        assert wait_answer_starts(page, 1).startswith("[dicom_window=lung,dicom_frame=0]")
        stop_answer(page, site)

        # A series as a .zip: its slices in order, the middle one first.
        series = inputs / "series.zip"
        with zipfile.ZipFile(series, "w") as zf:
            for name, data in ct_series(5):
                zf.writestr(name, data)
        page.locator("#llava-med-upload input[type=file]").set_input_files(str(series))
        expect(page.locator("#llava-med-upload-status")).to_contain_text("series.zip")
        expect(slider).to_have_value("3")
        expect(page.locator("#llava-med-slice")).to_contain_text("Slice (of 5)")
        expect(info).to_contain_text("Slice position 20 mm")
        page_html, text = page.content(), page_text(page)
    finally:
        page.close()

    # No patient-identifying value anywhere: the page, the logs, the saved images, exports, Gradio's cache.
    needles = [v.encode() for v in PHI_VALUES.values()] + [b"Wallaby", b"Springfield", b"Hibbert", b"Quincy"]
    for needle in needles:
        assert needle.decode() not in page_html and needle.decode() not in text
    outputs = site.outputs()
    assert any(p.suffix == ".png" and p.parent.name == "images" for p in outputs)
    for path in outputs:
        data = path.read_bytes()
        assert not [n for n in needles if n.lower() in data.lower()], path
        uploaded = path.suffix in (".dcm", ".zip") and path.parent.name != "examples"
        assert not uploaded, f"an uploaded file stayed on disk: {path}"
    from PIL import Image

    for path in (p for p in outputs if p.parent.name == "images"):
        with Image.open(path) as img:
            assert img.format == "PNG" and not {k for k in img.info if k not in ("dpi",)}, img.info


def test_every_problem_is_shown_once_in_plain_words(site, tmp_path):
    from playwright.sync_api import expect

    site.start_backend()
    junk = tmp_path / "inputs" / "notes.png"
    junk.parent.mkdir(parents=True)
    junk.write_text("these are my notes, not a picture\n" * 20)
    page = site.page()
    try:
        # A text file named .png: one message, in the upload panel.
        page.locator("#llava-med-upload input[type=file]").set_input_files(str(junk))
        problem = page.locator("#llava-med-upload-status .llava-med-problem")
        expect(problem).to_contain_text("notes.png is not an image this chat can read")
        text = page_text(page)
        assert text.count("is not an image this chat can read") == 1, text
        assert page.locator(".toast-body").count() == 0 and page.locator(BOT).count() == 0
        assert not [t for t in LIBRARY_TEXT if t in text]

        # A question over the limit: the counter says so as it is typed; Enter and Send do not send it.
        box = page.locator("#llava-med-input textarea")
        box.fill("x" * 3500)
        expect(page.locator("#llava-med-counter")).to_have_text("3,500 / 4,000")
        box.fill("Why? " + "x" * 5995)
        counter = page.locator("#llava-med-counter")
        expect(counter).to_contain_text("6,000 / 4,000 characters: shorten the question by 2,000")
        box.press("Enter")
        page.locator("#llava-med-send").click()
        page.wait_for_timeout(800)
        assert page.locator(USER).count() == 0 and page.locator(BOT).count() == 0
        text = page_text(page)
        assert text.count("shorten the question") == 1 and page.locator(".toast-body").count() == 0
        page.screenshot(path=str(site.shots / "browser_problems.png"), full_page=True)
        box.fill("A short question?")
        expect(counter).to_have_text("")
        # An answer that fails (the question and the image are more than the worker's 2048-token context): said
        # once, in the chat; Regenerate stays disabled, there is no answer to replace.
        page.locator("#llava-med-upload input[type=file]").set_input_files(str(png_file(junk.parent / "ok.png")))
        expect(page.locator("#llava-med-preview img")).to_be_visible()
        box.fill("a " * 1500)
        page.locator("#llava-med-send").click()
        expect(page.locator(BOT).last).to_contain_text("The conversation is too long for the model")
        expect(page.locator("#llava-med-regenerate")).to_be_disabled()
        text = page_text(page)
        assert text.count("too long for the model") == 1 and not [t for t in LIBRARY_TEXT if t in text]
    finally:
        page.close()


def test_phone_puts_the_chat_first_and_dark_theme_screenshots(site):
    from playwright.sync_api import expect

    site.start_backend()
    for name, options in (("browser_mobile", {"width": 390, "height": 844}), ("browser_dark", {"dark": True}),
                          ("browser_desktop", {})):
        page = site.page(**options)
        try:
            page.locator("#llava-med-example-1").click()  # the synthetic CT volume
            expect(page.locator("#llava-med-preview img")).to_be_visible()
            expect(page.locator("#llava-med-input textarea")).not_to_have_value("")
            page.locator("#llava-med-send").click()
            wait_answer_starts(page)
            stop_answer(page, site)
            chat = page.locator("#llava-med-chat").bounding_box()
            panel = page.locator("#llava-med-image-panel").bounding_box()
            params = page.locator("#llava-med-parameters").bounding_box()
            if name == "browser_mobile":
                assert chat["y"] + chat["height"] <= panel["y"] and chat["y"] < params["y"]
                assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out
            else:
                assert chat["x"] > panel["x"] + panel["width"] - 1 and abs(chat["y"] - panel["y"]) < 40
            page.screenshot(path=str(site.shots / f"{name}.png"), full_page=True)
        finally:
            page.close()
