"""The LLaVA-Med Bench summary: the judge's scores per question type and image domain.

    llava-med eval summarize_judge --scores-file scores.jsonl [--json summary.json]

Reads the scores file of ``chat_judge`` (or one written by the original ``eval_multimodal_chat_gpt_score.py``: the
scores are then parsed from ``gpt_eval``). As the original ``summarize_gpt_review.py``: for each question type
(``conversation``, ``detailed_description``), each domain (``chest_xray``, ``mri``, ``histology``, ``gross``,
``ct_scan``: a question counts in the FIRST of these its ``domain`` marks true) and overall, the mean score of the
reference answer (``gpt4_score``, assistant 1), of the model (``pred_score``, assistant 2), the mean of the
per-question ratios model / reference in % (``pred_relative_score``) and the number of questions (``data_size``).
Replies without two scores and questions the judge could not answer are counted and left out (the original
crashed on them); a reference score of 0 leaves that question out of the relative score only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from llava_med.eval.files import EvalInputError, load_records

__all__ = ["COLUMNS", "DOMAINS", "domain_of", "main", "parse_scores", "summarize"]

DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
TYPES = ("conversation", "detailed_description")
COLUMNS = (*TYPES, *DOMAINS, "overall")
ROWS = ("gpt4_score", "pred_score", "pred_relative_score", "data_size")

_LABEL = re.compile(r"(?i)\bassistant\s*[12]\b\s*[:：\-]?")
_OUT_OF_TEN = re.compile(r"/\s*10\b")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
_LABELLED = [re.compile(rf"(?is)\bassistant\s*{i}\b\D{{0,40}}?(\d+(?:\.\d+)?)") for i in (1, 2)]


def _score_pair(values: Sequence[str]) -> tuple[float, float] | None:
    if len(values) != 2:
        return None
    a, b = (float(v) for v in values)
    return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None


def parse_scores(reply: Any) -> tuple[float, float] | None:
    """The two scores of a judge's reply (reference answer, model answer), or None when it has not exactly two.

    The prompt asks for a first line holding only the two scores ("8 6"); "8, 6", "8/10 6/10" and
    "Assistant 1: 8 Assistant 2: 6" (on one line or two) are accepted too. Scores must lie in [0, 10].
    """
    if not isinstance(reply, str) or not reply.strip():
        return None
    first = next(line for line in reply.strip().splitlines() if line.strip())
    pair = _score_pair(_NUMBER.findall(_OUT_OF_TEN.sub(" ", _LABEL.sub(" ", first))))
    if pair is not None:
        return pair
    labelled = [m.group(1) for m in (rx.search(reply) for rx in _LABELLED) if m]
    return _score_pair(labelled) if len(labelled) == 2 else None


def domain_of(record: dict[str, Any]) -> str | None:
    """The first domain the record's ``domain`` flags mark true (the original's rule), or None."""
    flags = record.get("domain") or {}
    if not isinstance(flags, dict):
        return None
    return next((d for d in DOMAINS if flags.get(d)), None)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"table": {column: {gpt4_score, pred_score, pred_relative_score, data_size}}, "counts": {...}}``."""
    groups: dict[str, list[tuple[float, float]]] = {}
    counts = {"records": len(records), "scored": 0, "malformed": 0, "judge_errors": 0, "zero_reference": 0}
    malformed_ids: list[Any] = []
    for rec in records:
        if rec.get("error"):
            counts["judge_errors"] += 1
            continue
        scores = rec.get("scores")
        pair = tuple(scores) if isinstance(scores, list) and len(scores) == 2 else parse_scores(rec.get("gpt_eval"))
        if pair is None:
            counts["malformed"] += 1
            malformed_ids.append(rec.get("question_id"))
            continue
        counts["scored"] += 1
        for column in (rec.get("type"), domain_of(rec), "overall"):
            if column:
                groups.setdefault(str(column), []).append((float(pair[0]), float(pair[1])))
    table: dict[str, dict[str, Any]] = {}
    order = [c for c in COLUMNS if c in groups] + sorted(c for c in groups if c not in COLUMNS)
    for column in order:
        pairs = groups[column]
        ratios = [b / a for a, b in pairs if a != 0]
        if column == "overall":
            counts["zero_reference"] = len(pairs) - len(ratios)
        relative = _mean(ratios)
        table[column] = {"gpt4_score": _mean([a for a, _ in pairs]), "pred_score": _mean([b for _, b in pairs]),
                         "pred_relative_score": None if relative is None else 100 * relative,
                         "data_size": len(pairs)}
    return {"table": table, "counts": counts, "malformed_ids": malformed_ids[:50]}


def format_summary(summary: dict[str, Any]) -> str:
    table = summary["table"]
    columns = list(table)
    width = max([len(c) for c in columns] + [8]) + 2
    lines = [f"{'':<20}" + "".join(f"{c:>{width}}" for c in columns)]
    for row in ROWS:
        cells = []
        for c in columns:
            value = table[c][row]
            cells.append("-" if value is None else (str(value) if row == "data_size" else f"{value:.2f}"))
        lines.append(f"{row:<20}" + "".join(f"{v:>{width}}" for v in cells))
    c = summary["counts"]
    lines.append(f"{c['scored']} of {c['records']} questions scored")
    if c["malformed"]:
        ids = ", ".join(map(str, summary["malformed_ids"][:10]))
        lines.append(f"WARNING: {c['malformed']} judge replies without two scores (left out): {ids}")
    if c["judge_errors"]:
        lines.append(f"WARNING: {c['judge_errors']} questions the judge did not answer (left out; chat_judge "
                     f"--retry-errors redoes them)")
    if c["zero_reference"]:
        lines.append(f"{c['zero_reference']} questions with a reference score of 0 are left out of the relative score")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-med eval summarize_judge",
                                description="Summarise a chat_judge scores file per question type and domain.")
    p.add_argument("--scores-file", required=True, help="scores file of chat_judge (or of the original script)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the summary as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = summarize(load_records(args.scores_file))
    except EvalInputError as exc:
        print(f"summarize_judge: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
