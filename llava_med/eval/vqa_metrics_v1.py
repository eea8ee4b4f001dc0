"""The LLaVA-Med v1.0 VQA formulas, reproduced exactly (flaws included) for ``vqa_metrics --compat-v1``.

Re-implemented from their description (``vqa_metrics --help`` lists the flaws); the numbers equal those of v1.0's
``run_eval_batch.py`` scoring on the same pairs. Values are percentages, as the original printed them.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

__all__ = ["score_v1", "v1_normalize"]

# The VQA-evaluation normalisation the v1.0 code used.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The lookbehind was mistyped as a lookahead ("(?!<=\d)"), so a period is removed unless a digit follows it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)  # passed as sub()'s count: at most 32 periods are removed
_ARTICLES = ("a", "an", "the")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# Contractions written without their apostrophe -> with it. One apostrophe: the key drops it; two or three: each
# key drops one of them ("couldnt've" and "couldn'tve" -> "couldn't've").
_CONTRACTED = """ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll
how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've
shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd there're
there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's what've when's where'd
where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd you'll you're
you've couldn't've hadn't've he'd've it'd've mightn't've 'ow's'at she'd've shouldn't've somebody'd've someone'd've
something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll y'all'd've you'd've""".split()


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED:
        cuts = [i for i, ch in enumerate(form) if ch == "'"]
        if len(cuts) == 1:
            table[form.replace("'", "")] = form
        else:
            for i in cuts:
                table[form[:i] + form[i + 1:]] = form
    table["somebody'd"] = "somebodyd"  # reversed in the original table
    return table


_CONTRACTIONS = _contractions()


def v1_normalize(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def _words(sentence: str) -> Counter[str]:
    return Counter(sentence.lower().strip().split())


def _exact_match_v1(candidate: str, reference: str) -> float:
    cand, ref = _words(v1_normalize(candidate)), _words(v1_normalize(reference))
    total = sum(cand.values())
    return sum(1 for w in ref if w in cand) / total if total else 0.0


def _f1_v1(candidate: str, reference: str) -> tuple[float, float, float]:
    cand, ref = _words(v1_normalize(candidate)), _words(v1_normalize(reference))
    if not cand or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in cand.items() if w in ref)   # the prediction's repeats all count
    fp = sum(n for w, n in cand.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def _pct(values: list[float]) -> float | None:
    return 100 * sum(values) / len(values) if values else None


def score_v1(pairs: list[tuple[Any, str]]) -> dict[str, dict[str, Any]]:
    """v1.0's table for ``(ground truth, prediction text)`` pairs."""
    exact, f1, precision, recall, open_hit, closed_hit, closed_recall = [], [], [], [], [], [], []
    for truth, text in pairs:
        gold, pred = v1_normalize(truth.answer.lower()), v1_normalize(text.lower())
        if truth.answer_type == "open":
            open_hit.append(float(gold in pred))
            exact.append(_exact_match_v1(pred, gold))
            f, p, r = _f1_v1(pred, gold)
            f1.append(f)
            precision.append(p)
            recall.append(r)
        else:
            closed_recall.append(_f1_v1(pred, gold)[2])
            closed_hit.append(float(gold in pred))
    return {"v1": {
        "exact match score": _pct(exact), "f1 score": _pct(f1), "precision": _pct(precision), "recall": _pct(recall),
        "open accuracy": _pct(open_hit), "yes/no accuracy": _pct(closed_hit), "recall_closed": _pct(closed_recall),
        "num_open": len(open_hit), "num_closed": len(closed_hit),
    }}
