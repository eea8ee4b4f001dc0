"""The chat CLI and the ``llava-med`` command, run as real subprocesses on the tiny checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom.data
import pytest
from PIL import Image, ImageDraw

from llava_med.model.generation import SamplingParams, generate
from llava_med.model.image_processing import load_image

LLAVA_MED = Path(sys.executable).parent / "llava-med"
TIMEOUT = 120


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


@pytest.fixture(scope="module")
def png_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "lesion.png"
    img = Image.new("RGB", (256, 192), (20, 20, 20))
    ImageDraw.Draw(img).ellipse((60, 40, 200, 160), fill=(220, 210, 200))
    img.save(path)
    return path


def _expected_answer(loaded, image, max_new_tokens: int) -> str:
    prompt = "[INST] <image>\nDescribe the image. [/INST]"
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=("</s>",))
    return generate(loaded, prompt, [image], params).strip()


def test_console_script_query_with_png_matches_model_layer(png_file, tiny_checkpoint, tiny_loaded):
    assert LLAVA_MED.exists(), "the llava-med console script is installed by pip install -e ."
    result = _run([str(LLAVA_MED), "chat", "--query", "Describe the image.", "--image-file", str(png_file),
                   "--temperature", "0", "--max-new-tokens", "16"])
    assert result.returncode == 0, result.stderr
    assert "tiny random-weight checkpoint" in result.stderr  # says it uses the embedded model
    expected = _expected_answer(tiny_loaded, load_image(str(png_file)), 16)
    assert expected
    assert result.stdout.strip() == expected


def test_module_cli_query_with_dicom(tiny_loaded):
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    result = _run([sys.executable, "-m", "llava_med.serve.cli", "--query", "Describe the image.",
                   "--image-file", ct, "--temperature", "0", "--max-new-tokens", "12"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _expected_answer(tiny_loaded, load_image(ct), 12)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"this is plain text, not pixels", "not an image"), (b"\x89PNG\r\n\x1a\n\x00\x00", "image")],
    ids=["text-file", "truncated-png"],
)
def test_cli_bad_image_is_a_clear_error(tmp_path, content, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    result = _run([sys.executable, "-m", "llava_med", "chat", "--query", "hi", "--image-file", str(bad)])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_query_image_count_and_missing_file(tmp_path):
    result = _run([sys.executable, "-m", "llava_med", "chat", "--query", "hi", "--image-file",
                   str(tmp_path / "missing.png")])
    assert result.returncode == 2
    assert "missing.png" in result.stderr
    assert "Traceback" not in result.stderr


def test_interactive_multi_turn_then_empty_line_exits(png_file):
    result = _run(
        [sys.executable, "-m", "llava_med.serve.cli", "--image-file", str(png_file), "--temperature", "0",
         "--max-new-tokens", "6", "--debug"],
        input="What is shown?\nIs it normal?\n\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ASSISTANT: ") == 2
    assert "exit..." in result.stderr
    # The second turn's prompt holds the first exchange and the image tag once.
    second_prompt = [line for line in result.stderr.splitlines() if "prompt: " in line][-1]
    assert second_prompt.count("<image>") == 1
    assert "Is it normal?" in second_prompt and "[/INST]" in second_prompt


def test_interactive_exits_on_eof_and_ctrl_c(png_file):
    eof = _run([sys.executable, "-m", "llava_med.serve.cli", "--max-new-tokens", "4"], input="")
    assert eof.returncode == 0, eof.stderr
    proc = subprocess.Popen([sys.executable, "-m", "llava_med.serve.cli", "--max-new-tokens", "4"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        # Wait until the model is loaded and the prompt is shown (the notice is printed right before it).
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if _stderr_so_far(proc) and "research use only" in _stderr_so_far(proc):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def _stderr_so_far(proc: subprocess.Popen) -> str:
    """Non-blocking read of what the process wrote to stderr until now (kept on the process object)."""
    buf = getattr(proc, "_seen_err", "")
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        chunk = b""
    finally:
        os.set_blocking(fd, True)
    buf += chunk.decode(errors="replace")
    proc._seen_err = buf
    return buf


def test_llava_med_help_and_unknown_subcommand():
    ok = _run([sys.executable, "-m", "llava_med", "--help"])
    assert ok.returncode == 0 and "chat" in ok.stdout and "research use only" in ok.stdout
    bad = _run([sys.executable, "-m", "llava_med", "frobnicate"])
    assert bad.returncode == 2 and "unknown subcommand" in bad.stderr
