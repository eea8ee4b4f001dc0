"""The installed ``llava-med`` console script and the chat CLI as real terminal processes (entry points, Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sample_images

LLAVA_MED = Path(sys.executable).parent / "llava-med"
TIMEOUT = 120


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def test_console_script_query_with_png(tmp_path):
    assert LLAVA_MED.exists(), "the llava-med console script is installed by pip install -e ."
    png = sample_images.png_file(tmp_path / "lesion.png")
    result = _run([str(LLAVA_MED), "chat", "--query", "Describe the image.", "--image-file", str(png),
                   "--temperature", "0", "--max-new-tokens", "8"])
    assert result.returncode == 0, result.stderr
    assert "tiny random-weight checkpoint" in result.stderr and result.stdout.strip()
    assert "Traceback" not in result.stderr


def test_interactive_exits_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "llava_med.serve.cli", "--max-new-tokens", "4"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        # Wait until the model is loaded and the prompt is shown (the notice is printed right before it).
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if "research use only" in _stderr_so_far(proc):
                break
        assert "research use only" in _stderr_so_far(proc), "the chat never showed its prompt"
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
