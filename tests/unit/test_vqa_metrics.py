"""vqa_metrics: hand-computed values, the substring trap, joining by id, the v1.0 formulas, the converter."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from llava_med.eval import vqa_metrics
from llava_med.eval.vqa_metrics import GroundTruth, closed_choice, evaluate, load_predictions, tokens

ROOT = Path(__file__).resolve().parents[2]

# Ground truth in id order; predictions below in another order, with one missing, one failed and one extra.
GT = [
    {"question_id": 1, "answer": "no", "answer_type": "CLOSED"},
    {"question_id": 2, "answer": "yes", "answer_type": "CLOSED"},
    {"question_id": 3, "answer": "no", "answer_type": "closed"},
    {"question_id": 4, "answer": "left", "answer_type": "closed"},
    {"question_id": 5, "answer": "yes", "answer_type": "closed"},
    {"question_id": 6, "answer": "left lung", "answer_type": "OPEN"},
    {"question_id": 7, "answer": "pneumothorax", "answer_type": "open"},
    {"question_id": 8, "answer": "two", "answer_type": "open"},
    {"question_id": 9, "answer": "liver", "answer_type": "open"},
    {"question_id": 10, "answer": "yes", "answer_type": "closed"},
]
PRED = [
    {"question_id": 8, "text": "There are 2 nodules"},
    {"question_id": 99, "text": "an answer to nothing"},
    {"question_id": 5, "text": "The eyes are normal"},
    {"question_id": 1, "text": "Normal."},                       # the trap: "no" is a substring of "normal"
    {"question_id": 7, "text": "Pneumothorax."},
    {"question_id": 10, "text": "", "metadata": {"error": "worker died", "error_code": 50007}},
    {"question_id": 3, "text": "No, the heart is not enlarged."},
    {"question_id": 6, "text": "lung lung"},
    {"question_id": 2, "text": "Yes, there is an effusion."},
    {"question_id": 4, "text": "The lesion is in the left lung."},
]


def _write(tmp_path: Path) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt.json", tmp_path / "pred.jsonl"
    gt.write_text(json.dumps(GT))
    pred.write_text("".join(json.dumps(p) + "\n" for p in PRED))
    return gt, pred


def test_tokens_are_whole_normalised_words():
    assert tokens("No, it is Normal.") == ["no", "it", "is", "normal"]
    assert tokens("The X-ray shows a 3.5 cm mass; 1,000 cells") == ["x", "ray", "shows", "3.5", "cm", "mass",
                                                                   "1000", "cells"]
    assert tokens("Don’t know: TWO lesions") == ["dont", "know", "2", "lesions"]


def test_hand_computed_metrics_joined_by_id(tmp_path):
    gt_path, pred_path = _write(tmp_path)
    report = evaluate(vqa_metrics.load_ground_truth(str(gt_path)), load_predictions(str(pred_path)))
    m = report.metrics
    # closed 1..5: correct 2, 3, 4; 1 ("Normal.") and 5 ("The eyes ...") name neither yes nor no.
    assert m["closed"]["n"] == 5
    assert m["closed"]["accuracy"] == pytest.approx(3 / 5)
    assert m["closed"]["undecided"] == 2
    assert m["closed"]["recall"] == pytest.approx(3 / 5)
    assert m["closed"]["exact_match"] == 0.0
    assert m["closed"]["token_f1"] == pytest.approx((0.4 + 1 / 3 + 1 / 3) / 5)
    # open 6..8: "lung lung" covers half of "left lung" (repeats do not count twice); "2" is "two".
    assert m["open"]["n"] == 3
    assert m["open"]["recall"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["open"]["exact_match"] == pytest.approx(1 / 3)
    assert m["open"]["token_f1"] == pytest.approx((0.5 + 1 + 0.4) / 3)
    assert m["overall"]["n"] == 8
    assert m["overall"]["recall"] == pytest.approx((3 + 2.5) / 8)
    assert m["overall"]["exact_match"] == pytest.approx(1 / 8)
    assert m["overall"]["token_f1"] == pytest.approx((0.4 + 2 / 3 + 0.5 + 1 + 0.4) / 8)
    c = report.coverage
    assert (c["ground_truth"], c["scored"]) == (10, 8)
    assert (c["missing_ids"], c["failed_ids"], c["extra_ids"]) == ([9], [10], ["99"])


def test_compat_v1_reproduces_the_old_numbers(tmp_path):
    gt_path, pred_path = _write(tmp_path)
    out = tmp_path / "v1.json"
    assert vqa_metrics.main(["--gt", str(gt_path), "--pred", str(pred_path), "--compat-v1", "--json", str(out)]) == 0
    v1 = json.loads(out.read_text())["metrics"]["v1"]
    # v1.0: substring matching, so all 5 closed answers "match" ("no" in "normal", "yes" in "eyes").
    assert v1["yes/no accuracy"] == pytest.approx(100.0)
    assert v1["recall_closed"] == pytest.approx(60.0)
    # "lung lung" vs "left lung": tp counts both repeats -> precision 1, recall 2/3, f1 0.8; "exact match" 1/2.
    assert v1["f1 score"] == pytest.approx(100 * (0.8 + 1 + 0.4) / 3)
    assert v1["precision"] == pytest.approx(100 * (1 + 1 + 0.25) / 3)
    assert v1["recall"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3)
    assert v1["exact match score"] == pytest.approx(100 * (0.5 + 1 + 0.25) / 3)
    assert v1["open accuracy"] == pytest.approx(100 * 2 / 3)
    assert (v1["num_open"], v1["num_closed"]) == (3, 5)


def test_v1_normalisation_quirks():
    from llava_med.eval.vqa_metrics_v1 import v1_normalize

    assert v1_normalize("no, the heart is not enlarged.") == "no heart is not enlarged"
    assert v1_normalize("none of two") == "0 of 2"
    assert v1_normalize("dont know; wed") == "don't know wed"
    assert v1_normalize("x-ray, 1,000 cells") == "xray 1000 cells"  # a digit comma removes punctuation instead
    assert v1_normalize("a.b." * 20).count(".") == 40 - 32


def test_choices_decide_closed_answers_by_first_mention():
    cands = [tokens("CT"), tokens("MRI")]
    assert closed_choice(tokens("It is an MRI, not a CT"), cands) == ["mri"]
    assert closed_choice(tokens("CT, not MRI"), cands) == ["ct"]
    gt = [GroundTruth(1, "MRI", "closed", ("CT", "MRI")), GroundTruth(2, "MRI", "closed")]
    preds = vqa_metrics.Predictions(texts={"1": "CT, not MRI", "2": "CT, not MRI"})
    m = evaluate(gt, preds).metrics["closed"]
    # With choices the first mention decides (wrong); without them a whole-token match of the answer counts.
    assert m["accuracy"] == pytest.approx(0.5)


def test_cli_prints_table_and_warnings_and_strict_fails(tmp_path, capsys):
    gt_path, pred_path = _write(tmp_path)
    assert vqa_metrics.main(["--gt", str(gt_path), "--pred", str(pred_path)]) == 0
    out = capsys.readouterr().out
    assert "closed" in out and "60.00" in out
    assert "1 without a prediction: 9" in out and "1 predictions for ids not in the ground truth: 99" in out
    assert vqa_metrics.main(["--gt", str(gt_path), "--pred", str(pred_path), "--strict"]) == 1


def test_bad_ground_truth_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "gt.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "answer": "yes", "answer_type": "maybe"}) + "\n")
    pred = tmp_path / "p.jsonl"
    pred.write_text("")
    assert vqa_metrics.main(["--gt", str(bad), "--pred", str(pred)]) == 2
    assert "answer_type must be closed or open" in capsys.readouterr().err


def _converter():
    spec = importlib.util.spec_from_file_location("convert_vqa_datasets", ROOT / "scripts" / "convert_vqa_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_reads_each_distributed_format(tmp_path):
    conv = _converter()
    rad = tmp_path / "rad.json"
    rad.write_text(json.dumps([
        {"qid": 5, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "No",
         "answer_type": "CLOSED", "phrase_type": "test_freeform", "question_type": "PRES", "image_organ": "HEAD"},
        {"qid": 6, "image_name": "synpic2.jpg", "question": "How many?", "answer": 2, "answer_type": "OPEN",
         "phrase_type": "freeform"},
    ]))
    assert conv.main(["vqa-rad", str(rad), "--out-dir", str(tmp_path / "rad")]) == 0
    q = [json.loads(x) for x in (tmp_path / "rad" / "questions.jsonl").read_text().splitlines()]
    gt = [json.loads(x) for x in (tmp_path / "rad" / "ground_truth.jsonl").read_text().splitlines()]
    assert q == [{"question_id": 5, "image": "synpic1.jpg", "text": "Is there a fracture?"}]
    assert gt[0]["answer"] == "No" and gt[0]["answer_type"] == "closed" and gt[0]["organ"] == "HEAD"

    slake = tmp_path / "slake.json"
    slake.write_text(json.dumps([
        {"qid": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Lung",
         "answer_type": "OPEN", "q_lang": "en", "modality": "CT"},
        {"qid": 2, "img_name": "xmlab1/source.jpg", "question": "哪个器官?", "answer": "肺", "answer_type": "OPEN",
         "q_lang": "zh"},
    ], ensure_ascii=False))
    assert conv.main(["slake", str(slake), "--out-dir", str(tmp_path / "slake")]) == 0
    assert len((tmp_path / "slake" / "questions.jsonl").read_text().splitlines()) == 1

    pvqa = tmp_path / "test_qa.pkl"
    pvqa.write_bytes(pickle.dumps([{"image": "test_0000", "question": "Is this fibrosis?", "answer": "yes"},
                                   {"image": "test_0001", "question": "What is present?", "answer": "granuloma"}]))
    assert conv.main(["pathvqa", str(pvqa), "--out-dir", str(tmp_path / "pvqa")]) == 0
    gt = [json.loads(x) for x in (tmp_path / "pvqa" / "ground_truth.jsonl").read_text().splitlines()]
    assert [(g["question_id"], g["image"], g["answer_type"]) for g in gt] == [(0, "test_0000.jpg", "closed"),
                                                                            (1, "test_0001.jpg", "open")]

    llava = tmp_path / "test.json"
    llava.write_text(json.dumps([{"id": "r1", "image": "a.jpg", "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": "<image>\nIs it normal?"}, {"from": "gpt", "value": "yes"}]}]))
    assert conv.main(["llava", str(llava), "--out-dir", str(tmp_path / "llava")]) == 0
    assert json.loads((tmp_path / "llava" / "questions.jsonl").read_text())["text"] == "Is it normal?"
    # vqa_metrics reads LLaVA-Med's test.json as ground truth directly, too.
    assert vqa_metrics.load_ground_truth(str(llava))[0] == GroundTruth("r1", "yes", "closed")


def test_converter_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps([Evil()]))
    assert _converter().main(["pathvqa", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out and "only plain lists" in captured.err


def test_module_entry_point_runs(tmp_path):
    gt_path, pred_path = _write(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "llava_med", "eval", "vqa_metrics", "--gt", str(gt_path),
                           "--pred", str(pred_path)], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "scored 8 of 10" in proc.stdout
