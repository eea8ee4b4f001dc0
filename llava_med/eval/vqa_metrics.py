"""VQA metrics for VQA-RAD / SLAKE / PathVQA style ground truth (closed and open questions).

    llava-med eval vqa_metrics --gt test_gt.jsonl --pred answers.jsonl [--json metrics.json] [--compat-v1]

Ground truth: JSON lines or a JSON list of ``{question_id, answer, answer_type}`` (``answer_type`` ``closed`` or
``open``, any case; optional ``choices``: the closed question's options), as written by
``scripts/convert_vqa_datasets.py`` from the distributed VQA-RAD, SLAKE and PathVQA files; LLaVA-Med's own
``test.json`` (``{id, conversations, answer_type}``) is read as well. Predictions: an answers file of ``model_vqa``
(``{question_id, text, ...}``). Predictions are joined to the ground truth by ``question_id``: missing, extra,
repeated and failed (``metadata.error``) predictions are reported and left out of the scores, never paired by
position.

Text is normalised (Unicode NFKC, lower case, apostrophes removed, other punctuation split off except inside
numbers, articles dropped, number words zero..ten as digits) and compared as whole tokens:

* closed accuracy: the prediction's choice is the candidate answer it mentions first (``yes``/``no`` for yes/no
  questions, else the record's ``choices``), correct when it is the ground truth; without candidates, correct when
  the ground truth's tokens appear in the prediction as a whole-token run. "normal" never matches "no";
* open recall: the share of the ground truth's tokens found in the prediction (counts clipped), what the paper
  reports for open questions; open exact match (token lists equal) and token F1 (SQuAD-style, clipped counts).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llava_med.eval.files import EvalInputError, id_key, iter_jsonl, load_records

__all__ = ["GroundTruth", "Report", "build_parser", "evaluate", "load_ground_truth", "main", "normalize", "tokens"]

CLOSED, OPEN = "closed", "open"
YES_NO = ("yes", "no")

# ------------------------------------------------------------------------------------------------- normalisation
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_DIGIT_SEPARATOR = re.compile(r"(?<=\d)[.,](?=\d)")  # 3.5 and 1,000 stay one token
_NOT_WORD = re.compile(r"[^\w\u2024]+")


def tokens(text: str) -> list[str]:
    """Normalised whole tokens of ``text`` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = _APOSTROPHES.sub("", text)
    text = _DIGIT_SEPARATOR.sub(lambda m: "\u2024" if m.group() == "." else "", text)  # protect decimal points
    words = _NOT_WORD.sub(" ", text.replace("_", " ")).split()
    out = []
    for word in words:
        word = word.replace("\u2024", ".")
        if word in _ARTICLES:
            continue
        out.append(_NUMBER_WORDS.get(word, word))
    return out


def normalize(text: str) -> str:
    return " ".join(tokens(text))


def _find(needle: list[str], hay: list[str]) -> int:
    """Index of the first whole-token occurrence of ``needle`` in ``hay``, or -1."""
    n = len(needle)
    if n == 0:
        return -1
    for i in range(len(hay) - n + 1):
        if hay[i:i + n] == needle:
            return i
    return -1


def closed_choice(prediction: list[str], candidates: list[list[str]]) -> list[str] | None:
    """The candidate the prediction mentions first (the longest one when several start at the same token)."""
    best: tuple[int, int] | None = None
    choice = None
    for cand in candidates:
        pos = _find(cand, prediction)
        if pos >= 0 and (best is None or (pos, -len(cand)) < best):
            best, choice = (pos, -len(cand)), cand
    return choice


def recall(prediction: list[str], truth: list[str]) -> float:
    if not truth:
        return 0.0
    common = Counter(prediction) & Counter(truth)
    return sum(common.values()) / len(truth)


def token_f1(prediction: list[str], truth: list[str]) -> float:
    common = sum((Counter(prediction) & Counter(truth)).values())
    if common == 0:
        return 0.0
    p, r = common / len(prediction), common / len(truth)
    return 2 * p * r / (p + r)


# ------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class GroundTruth:
    question_id: Any
    answer: str
    answer_type: str  # closed / open
    choices: tuple[str, ...] = ()


def _gt_from_record(rec: dict[str, Any], where: str) -> GroundTruth:
    qid = rec.get("question_id", rec.get("id", rec.get("qid")))
    if qid is None:
        raise EvalInputError(f"{where}: no question_id (or id / qid)")
    answer = rec.get("answer", rec.get("gt_answer"))
    if answer is None and isinstance(rec.get("conversations"), list) and len(rec["conversations"]) > 1:
        answer = rec["conversations"][1].get("value")  # LLaVA-Med's test.json: the assistant's turn
    if answer is None or isinstance(answer, (dict, list)):
        raise EvalInputError(f"{where}: no answer (answer, or the second turn of conversations)")
    kind = str(rec.get("answer_type", "")).strip().lower()
    if kind not in (CLOSED, OPEN):
        raise EvalInputError(f"{where}: answer_type must be closed or open, got {rec.get('answer_type')!r}")
    choices = rec.get("choices") or ()
    if not isinstance(choices, (list, tuple)):
        raise EvalInputError(f"{where}: choices must be a list")
    return GroundTruth(qid, str(answer), kind, tuple(str(c) for c in choices))


def load_ground_truth(path: str) -> list[GroundTruth]:
    """Every ground-truth record of ``path`` (:class:`EvalInputError` on a bad one, naming it, or a repeated id)."""
    items = [_gt_from_record(rec, f"{path}: record {i + 1}") for i, rec in enumerate(load_records(path))]
    seen: set[str] = set()
    for item in items:
        if id_key(item.question_id) in seen:
            raise EvalInputError(f"{path}: question_id {item.question_id!r} appears more than once")
        seen.add(id_key(item.question_id))
    return items


@dataclass
class Predictions:
    texts: dict[str, str] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)
    repeated: list[Any] = field(default_factory=list)
    failed: list[Any] = field(default_factory=list)  # metadata.error


def load_predictions(path: str) -> Predictions:
    preds = Predictions()
    for line in iter_jsonl(path):
        rec = line.record
        if rec is None or rec.get("question_id") is None or not isinstance(rec.get("text", ""), str):
            preds.bad_lines.append(line.lineno)
            continue
        key = id_key(rec["question_id"])
        if (rec.get("metadata") or {}).get("error"):
            preds.failed.append(rec["question_id"])
            continue
        if key in preds.texts:
            preds.repeated.append(rec["question_id"])  # the first answer counts
            continue
        preds.texts[key] = rec.get("text", "")
    return preds


# ------------------------------------------------------------------------------------------------- scoring
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Report:
    metrics: dict[str, dict[str, Any]]
    coverage: dict[str, Any]
    compat_v1: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "coverage": self.coverage,
                "formulas": "v1.0 (compat)" if self.compat_v1 else "whole-token (llava-med serve)"}


def _coverage(gt: list[GroundTruth], preds: Predictions) -> tuple[list[tuple[GroundTruth, str]], dict[str, Any]]:
    gt_keys = {id_key(g.question_id) for g in gt}
    failed = {id_key(q) for q in preds.failed}
    pairs = [(g, preds.texts[id_key(g.question_id)]) for g in gt if id_key(g.question_id) in preds.texts]
    missing = [g.question_id for g in gt if id_key(g.question_id) not in preds.texts
               and id_key(g.question_id) not in failed]
    extra = [k for k in preds.texts if k not in gt_keys]
    coverage = {
        "ground_truth": len(gt), "scored": len(pairs),
        "missing": len(missing), "missing_ids": missing[:50],
        "failed": len(preds.failed), "failed_ids": preds.failed[:50],
        "extra": len(extra), "extra_ids": extra[:50],
        "repeated": len(preds.repeated), "repeated_ids": preds.repeated[:50],
        "bad_lines": len(preds.bad_lines),
    }
    return pairs, coverage


def score(pairs: list[tuple[GroundTruth, str]]) -> dict[str, dict[str, Any]]:
    """The whole-token metrics per answer type and overall."""
    rows: dict[str, dict[str, list[float]]] = {k: {"exact_match": [], "token_f1": [], "recall": []}
                                               for k in (CLOSED, OPEN, "overall")}
    accuracy: list[float] = []
    undecided = 0
    for truth, text in pairs:
        pred, gold = tokens(text), tokens(truth.answer)
        values = {"exact_match": float(pred == gold), "token_f1": token_f1(pred, gold), "recall": recall(pred, gold)}
        for name, value in values.items():
            rows[truth.answer_type][name].append(value)
            rows["overall"][name].append(value)
        if truth.answer_type == CLOSED:
            candidates = [tokens(c) for c in truth.choices]
            if not candidates and " ".join(gold) in YES_NO:
                candidates = [[w] for w in YES_NO]
            if candidates:
                if gold not in candidates:
                    candidates.append(gold)
                choice = closed_choice(pred, candidates)
                undecided += choice is None
                accuracy.append(float(choice == gold))
            else:
                accuracy.append(float(_find(gold, pred) >= 0))
    out: dict[str, dict[str, Any]] = {}
    for kind, values in rows.items():
        out[kind] = {"n": len(values["recall"])}
        if kind == CLOSED:
            out[kind]["accuracy"] = _mean(accuracy)
            out[kind]["undecided"] = undecided
        out[kind].update({name: _mean(v) for name, v in values.items()})
    return out


def evaluate(gt: list[GroundTruth], preds: Predictions, *, compat_v1: bool = False) -> Report:
    pairs, coverage = _coverage(gt, preds)
    if compat_v1:
        from llava_med.eval.vqa_metrics_v1 import score_v1

        return Report(score_v1(pairs), coverage, compat_v1=True)
    return Report(score(pairs), coverage)


# ------------------------------------------------------------------------------------------------- output
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.2f}" if not math.isnan(value) else "nan"
    return str(value)


def format_report(report: Report) -> str:
    lines = []
    if report.compat_v1:
        lines.append("v1.0 formulas (--compat-v1; values in %, as the original printed them)")
        for name, value in report.metrics["v1"].items():
            lines.append(f"  {name:<20}{f'{value:.2f}' if isinstance(value, float) else _fmt(value)}")
    else:
        names = ["n", "accuracy", "recall", "exact_match", "token_f1"]
        lines.append(f"{'':<10}" + "".join(f"{n:>13}" for n in names) + "   (%)")
        for kind in (CLOSED, OPEN, "overall"):
            row = report.metrics[kind]
            lines.append(f"{kind:<10}" + "".join(f"{_fmt(row.get(n)):>13}" for n in names))
        undecided = report.metrics[CLOSED].get("undecided")
        if undecided:
            lines.append(f"{undecided} closed answers named none of the candidate answers (counted wrong)")
    c = report.coverage
    lines.append(f"scored {c['scored']} of {c['ground_truth']} ground-truth questions")
    for name, what in (("missing", "without a prediction"), ("failed", "whose prediction has metadata.error"),
                       ("extra", "predictions for ids not in the ground truth"),
                       ("repeated", "repeated predictions (the first one counts)"),
                       ("bad_lines", "unreadable prediction lines")):
        if c[name]:
            ids = c.get(f"{name}_ids")
            shown = f": {', '.join(map(str, ids[:10]))}{' ...' if c[name] > 10 else ''}" if ids else ""
            lines.append(f"WARNING: {c[name]} {what}{shown}")
    return "\n".join(lines)


V1_HELP = """\
--compat-v1 reproduces the LLaVA-Med v1.0 evaluation formulas exactly (the scoring of llava/eval/run_eval_batch.py
of v1.0: its VQA-style normalisation, applied to the lower-cased texts), for comparing with numbers computed by it.
Their known flaws:
  * closed "yes/no accuracy": the normalised ground truth is searched as a SUBSTRING of the normalised prediction,
    so "no" matches "normal", "not", "know", "nodule"; "yes" matches "eyes"; "left" matches "cleft";
  * open "open accuracy": the same substring test;
  * "recall" / "precision" / "f1 score" count every repeat of a prediction word as a hit (a prediction repeating a
    right word scores more than its share; recall can exceed what the prediction really covers), and are 0 when no
    word matches; "recall" is what the paper reports for open questions;
  * "exact match score" is not an exact match: the number of distinct ground-truth words found in the prediction
    divided by the number of prediction words;
  * the normalisation keeps ':', '*', '%', '#' and other characters inside words, turns "none" into "0", and removes
    at most 32 periods (the regex's count argument was the re.UNICODE flag);
  * the original paired predictions with the ground truth by line order after asserting equal id lists; here they
    are joined by question_id in both modes.
BLEU scores (nltk) of the original are not computed."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llava-med eval vqa_metrics",
        description="Closed accuracy and open recall / exact match / token F1 of a model_vqa answers file against "
                    "VQA-RAD / SLAKE / PathVQA style ground truth, joined by question_id.",
        epilog=V1_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gt", required=True, help="ground truth: {question_id, answer, answer_type[, choices]} records "
                                               "(JSON lines or list; LLaVA-Med's test.json too)")
    p.add_argument("--pred", required=True, help="answers file of model_vqa ({question_id, text, ...})")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the metrics and coverage as JSON")
    p.add_argument("--compat-v1", action="store_true", help="the v1.0 formulas, flaws included (see below)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a ground-truth question is missing or failed, or a prediction is extra")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        gt = load_ground_truth(args.gt)
        preds = load_predictions(args.pred)
    except EvalInputError as exc:
        print(f"vqa_metrics: {exc}", file=sys.stderr)
        return 2
    report = evaluate(gt, preds, compat_v1=args.compat_v1)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.as_dict(), fh, indent=2)
            fh.write("\n")
    c = report.coverage
    if args.strict and (c["missing"] or c["failed"] or c["extra"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
