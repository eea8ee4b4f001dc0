"""model_vqa through a real stack: a controller and two tiny-model workers (`--engine hf`) as processes.

* the answers file equals the local batched run's (greedy), and both workers answered part of the questions;
* a run killed halfway (SIGTERM, then SIGKILL) and restarted completes the file: no duplicate, no missing id.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from sample_images import png_file, scan
from servers import _base_env, listed_models, module_processes, wait_until

from llava_med.eval import model_vqa

pytestmark = pytest.mark.slow

TINY = "llava-med-tiny-mistral"
ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 90.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    with module_processes(tmp_path_factory.mktemp("eval-stack-logs"), request) as group:
        ctrl = group.start_controller()
        workers = [group.start_worker(ctrl.url, engine="hf", wait=False) for _ in range(2)]
        for worker in workers:
            worker.wait_healthy(180)

        def both_registered() -> bool:
            status = requests.post(ctrl.url + "/worker_get_status", timeout=5).json()
            return listed_models(ctrl.url) == [TINY] and \
                status["speed"] >= 2

        wait_until(both_registered, 30, message="both workers registered")
        yield ctrl, workers


def _question_file(folder: Path, n: int, text_only_every: int = 4) -> Path:
    lines = []
    words = ["lesion", "effusion", "nodule", "fracture", "mass", "opacity", "edema", "cyst"]
    for i in range(n):
        text = f"{'Describe the' if i % 3 else 'Is there a'} {words[i % len(words)]} in region {i}?"
        if i % text_only_every == text_only_every - 1:
            lines.append(json.dumps({"question_id": i, "text": text}))
        else:
            png_file(folder / f"img{i}.png", scan(seed=i))
            lines.append(json.dumps({"question_id": i, "image": f"img{i}.png", "text": text + "\n<image>"}))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _stack_cmd(ctrl_url: str, qfile: Path, answers: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llava_med.eval.model_vqa", "--controller-url", ctrl_url, "--model", TINY,
            "--question-file", str(qfile), "--image-folder", str(qfile.parent), "--answers-file", str(answers),
            "--no-progress", *extra]


def _by_id(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["question_id"] for r in records]
    assert len(ids) == len(set(ids)), "an id answered twice"
    return {r["question_id"]: r for r in records}


def _generate_requests(worker) -> int:
    return worker.log_text(None).count("POST /worker_generate_stream")


def test_local_and_stack_answers_are_identical_and_both_workers_served(stack, tiny_loaded, tmp_path):
    ctrl, workers = stack
    qfile = _question_file(tmp_path, 24)
    local, remote = tmp_path / "local.jsonl", tmp_path / "stack.jsonl"
    common = ["--max-new-tokens", "20", "--no-progress"]
    args = model_vqa.parse_args(["--question-file", str(qfile), "--image-folder", str(tmp_path), "--answers-file",
                                 str(local), "--batch-size", "6", *common])
    summary = asyncio.run(asyncio.wait_for(model_vqa.run(args, loaded=tiny_loaded), DEADLINE))
    assert (summary.answered, summary.errors) == (24, 0)

    before = [_generate_requests(w) for w in workers]
    proc = subprocess.run(_stack_cmd(ctrl.url, qfile, remote, "--concurrency", "4", *common), check=False, capture_output=True,
                          text=True, timeout=DEADLINE, env=_base_env(None), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "24 answered now (0 with errors)" in proc.stdout

    a, b = _by_id(local), _by_id(remote)
    assert sorted(a) == sorted(b) == list(range(24))
    fields = ("prompt", "text", "model_id", "metadata")
    assert {i: tuple(a[i][f] for f in fields) for i in a} == {i: tuple(b[i][f] for f in fields) for i in b}
    assert len({r["text"] for r in a.values()}) > 1, "the questions got different answers (a meaningful comparison)"
    served = [_generate_requests(w) - n for w, n in zip(workers, before)]
    assert sum(served) == 24 and min(served) > 0, f"each worker answered part of the questions: {served}"


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        lines = path.read_text().count("\n") if path.exists() else 0
        if lines >= count:
            return lines
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {count} answers in {DEADLINE} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_restarts_and_completes_the_file(stack, tmp_path, sig):
    ctrl, _ = stack
    n = 60
    qfile = _question_file(tmp_path, n)
    answers = tmp_path / "answers.jsonl"
    cmd = _stack_cmd(ctrl.url, qfile, answers, "--concurrency", "2", "--max-new-tokens", "48")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_base_env(None), cwd=ROOT)
    try:
        _wait_for_lines(answers, n // 2, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -sig if sig == signal.SIGKILL else proc.returncode == 143, out + err
    kept = answers.read_text()
    assert n // 2 <= kept.count("\n") < n, "stopped halfway"

    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=DEADLINE, env=_base_env(None), cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    records = _by_id(answers)
    assert sorted(records) == list(range(n)), "no missing id"
    assert all(r["metadata"] == {} and r["text"] for r in records.values())
    # Every complete line (a killed write leaves its line without the newline) was kept and skipped.
    assert f"{kept.count(chr(10))} already in the answers file" in done.stdout
