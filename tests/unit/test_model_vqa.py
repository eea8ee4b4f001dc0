"""model_vqa in the local mode on the tiny model: the answers file, errors per answer, resume, chunks, flags."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sample_images import png_bytes, png_file, scan

from llava_med.chat import Message, render_chat
from llava_med.eval import model_vqa
from llava_med.model.generation import generate
from llava_med.sampling import SamplingParams

MAX_NEW = 12


def _questions(folder: Path) -> Path:
    for i in range(4):
        png_file(folder / f"scan{i}.png", scan(seed=i))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = [json.dumps({"question_id": i, "image": f"scan{i}.png", "text": f"<image>\nWhat is finding {i}?"})
             for i in range(4)]
    lines += [
        "{this is not json",
        json.dumps({"question_id": "m", "image": "missing.png", "text": "Where is it?"}),
        json.dumps({"question_id": "u", "image": "broken.png", "text": "Is it broken?"}),
        json.dumps({"question_id": "t", "text": "A question without an image?"}),
        json.dumps({"question_id": "e", "image": "scan0.png", "text": "  "}),
        json.dumps({"question_id": 2, "image": "scan1.png", "text": "a repeated id"}),
    ]
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(qfile: Path, answers: Path, *extra: str):
    return model_vqa.parse_args(["--question-file", str(qfile), "--image-folder", str(qfile.parent),
                                 "--answers-file", str(answers), "--max-new-tokens", str(MAX_NEW), "--no-progress",
                                 "--batch-size", "4", *extra])


def _run(args, loaded):
    return asyncio.run(model_vqa.run(args, loaded=loaded))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_run_answers_every_question_and_records_errors(tmp_path, tiny_loaded):
    qfile = _questions(tmp_path)
    answers = tmp_path / "out" / "answers.jsonl"
    summary = _run(_args(qfile, answers), tiny_loaded)
    assert (summary.total, summary.answered, summary.errors, summary.duplicates) == (9, 5, 4, 1)
    records = _records(answers)
    by_key = {r["question_id"] if r["question_id"] is not None else f"line {r['metadata']['line']}": r
              for r in records}
    assert sorted(map(str, by_key)) == ["0", "1", "2", "3", "e", "line 5", "m", "t", "u"]
    assert set(records[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert by_key["m"]["metadata"]["error_code"] == 40002 and "missing.png" in by_key["m"]["metadata"]["error"]
    assert by_key["u"]["metadata"]["error_code"] == 40002
    assert by_key["line 5"]["metadata"]["error_code"] == 40001 and "not valid JSON" in by_key["line 5"]["metadata"][
        "error"]
    assert "non-empty" in by_key["e"]["metadata"]["error"]
    assert by_key[2]["prompt"] == "What is finding 2?", "the repeated id 2 keeps its first question"
    assert by_key["t"]["metadata"] == {} and by_key["t"]["text"]
    assert {r["model_id"] for r in records} == {"llava-med-tiny-mistral"}
    # The answer is the model layer's greedy answer to the prompt render_chat builds (one prompt path).
    rendered = render_chat([Message("user", "What is finding 1?", ("x",))], "mistral_instruct")
    expected = generate(tiny_loaded, rendered.prompt, [png_bytes(scan(seed=1))],
                        SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, stop=rendered.stop))
    assert by_key[1]["text"] == expected.strip()


def test_interrupted_file_is_completed_without_duplicates(tmp_path, tiny_loaded):
    qfile = _questions(tmp_path)
    answers = tmp_path / "answers.jsonl"
    _run(_args(qfile, answers), tiny_loaded)
    full = answers.read_text().splitlines()
    # As if killed: three answers kept, the fourth cut in the middle of its line.
    answers.write_text("\n".join(full[:3]) + "\n" + full[3][: len(full[3]) // 2])
    summary = _run(_args(qfile, answers), tiny_loaded)
    assert (summary.skipped, summary.answered + summary.errors) == (3, 6)
    keys = [model_vqa.answer_key(r) for r in _records(answers)]
    assert len(keys) == len(set(keys)) == 9
    again = _run(_args(qfile, answers), tiny_loaded)
    assert (again.skipped, again.answered, again.errors) == (9, 0, 0)
    assert len(_records(answers)) == 9

    # --retry-errors redoes the failed ones only: with the image now present, "m" is answered.
    png_file(tmp_path / "missing.png", scan(seed=9))
    retried = _run(_args(qfile, answers, "--retry-errors"), tiny_loaded)
    assert (retried.skipped, retried.answered, retried.errors) == (5, 1, 3)
    records = {model_vqa.answer_key(r): r for r in _records(answers)}
    assert len(records) == len(_records(answers)) == 9
    assert records["m"]["metadata"] == {} and records["m"]["text"]


def test_chunks_split_the_questions(tmp_path, tiny_loaded):
    qfile = _questions(tmp_path)
    keys = []
    for idx in range(3):
        out = tmp_path / f"chunk{idx}.jsonl"
        summary = _run(_args(qfile, out, "--num-chunks", "3", "--chunk-idx", str(idx)), tiny_loaded)
        assert summary.total == 3
        keys += [model_vqa.answer_key(r) for r in _records(out)]
    assert len(keys) == len(set(keys)) == 9


@pytest.mark.parametrize(("argv", "message"), [
    (["--num_beams", "4"], "only 1 is supported"),
    (["--temperature", "-1"], "temperature must be between"),
    (["--model", "m"], "give --controller-url too"),
    (["--controller-url", "http://127.0.0.1:9"], "--controller-url needs --model"),
    (["--controller-url", "http://127.0.0.1:9", "--model", "m", "--model-path", "x"], "with --controller-url"),
    (["--num-chunks", "2", "--chunk-idx", "2"], "--chunk-idx must be in"),
])
def test_bad_flags_are_refused_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        model_vqa.parse_args(["--question-file", str(tmp_path / "q.jsonl"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_question_file_and_unreachable_controller(tmp_path, capsys):
    from llava_med.serve.processes import free_port

    assert model_vqa.main(["--question-file", str(tmp_path / "nope.jsonl"), "--no-progress",
                           "--controller-url", "http://127.0.0.1:1", "--model", "m"]) == 2
    assert "cannot read" in capsys.readouterr().err
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "text": "hi"}) + "\n")
    assert model_vqa.main(["--question-file", str(qfile), "--answers-file", str(tmp_path / "a.jsonl"),
                           "--no-progress", "--controller-url", f"http://127.0.0.1:{free_port()}",
                           "--model", "m"]) == 2
    assert "cannot reach the controller" in capsys.readouterr().err


def test_stack_mode_and_scoring_never_import_torch():
    import subprocess
    import sys

    code = ("import sys, llava_med.eval.cli, llava_med.eval.model_vqa, llava_med.eval.vqa_metrics, "
            "llava_med.eval.chat_judge, llava_med.eval.summarize_judge; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
