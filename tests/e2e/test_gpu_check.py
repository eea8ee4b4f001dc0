"""``scripts/gpu_check.py`` on a CPU: the checks a GPU machine runs pass here too, and the figures are written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_gpu_check_passes_on_cpu(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--preset", "tiny",
                           "--new-tokens", "8", "--results", str(results)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in ("padded prefill", "memory"):
        assert f"[PASS] {check}" in proc.stdout
    assert "[FAIL]" not in proc.stdout and "Traceback" not in proc.stderr
    written = results.read_text(encoding="utf-8")
    assert "## GPU check" in written and "All checks passed" in written
    assert "| padded prefill | PASS |" in written and "batch 16:" in written
