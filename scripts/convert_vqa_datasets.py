#!/usr/bin/env python
"""Convert the distributed VQA-RAD, SLAKE and PathVQA files into the evaluation's two files.

    python scripts/convert_vqa_datasets.py vqa-rad "VQA_RAD Dataset Public.json" --out-dir data/vqa_rad
    python scripts/convert_vqa_datasets.py slake Slake1.0/test.json --out-dir data/slake            # --lang en
    python scripts/convert_vqa_datasets.py pathvqa pvqa/qas/test/test_qa.pkl --out-dir data/pathvqa
    python scripts/convert_vqa_datasets.py llava data_RAD/test.json --out-dir data/rad  # LLaVA-Med's test.json

Writes ``OUT_DIR/questions.jsonl`` (``{question_id, image, text}``: the input of ``llava-med eval model_vqa``) and
``OUT_DIR/ground_truth.jsonl`` (``{question_id, answer, answer_type (closed/open), question, image, ...}``: the
``--gt`` of ``llava-med eval vqa_metrics``), and prints the ``--image-folder`` to use. Images are not copied.

Formats:
* ``vqa-rad``: the OSF release's ``VQA_RAD Dataset Public.json`` (``qid, image_name, question, answer,
  answer_type, phrase_type``); ``--split test`` keeps the ``test_freeform`` / ``test_para`` questions, ``train`` the
  others, ``all`` every one. Images: ``VQA_RAD Image Folder``.
* ``slake``: SLAKE's ``test.json`` (``qid, img_name, question, answer, answer_type, q_lang``); ``--lang en`` (default)
  or ``zh`` or ``all``. Images: ``imgs``.
* ``pathvqa``: PathVQA's ``qas/<split>/<split>_qa.pkl`` (a list of ``{image, question, answer}``); ids are the
  positions in the file; yes/no answers are closed, others open. The pickle is read with a loader that only accepts
  plain lists, dicts, strings and numbers, so a tampered file cannot run code. Images: ``images/<split>`` (``.jpg``).
* ``llava``: LLaVA-Med's conversation-style ``test.json`` (``id, image, conversations, answer_type``).
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

YES_NO = {"yes", "no"}


class ConversionError(ValueError):
    pass


def _load_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConversionError(f"{path}: expected a JSON list of objects")
    return data


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise ConversionError(f"the pickle refers to {module}.{name}: only plain lists, dicts, strings and numbers "
                              f"are accepted")


def _load_plain_pickle(path: Path) -> list[dict[str, Any]]:
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConversionError(f"{path}: expected a list of dicts")
    return data


def _answer_type(value: Any, answer: str) -> str:
    kind = str(value or "").strip().lower()
    if kind in ("closed", "open"):
        return kind
    return "closed" if answer.strip().lower() in YES_NO else "open"


def _record(qid: Any, image: str | None, question: str, answer: Any, answer_type: Any, **extra: Any
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    question = question.replace("<image>", "").strip()
    answer = str(answer).strip()
    q = {"question_id": qid, "image": image, "text": question}
    if image is None:
        del q["image"]
    gt = {"question_id": qid, "answer": answer, "answer_type": _answer_type(answer_type, answer),
          "question": question, "image": image, **{k: v for k, v in extra.items() if v is not None}}
    return q, gt


def convert_vqa_rad(records: Iterable[dict[str, Any]], split: str) -> list[tuple[dict, dict]]:
    out = []
    for r in records:
        is_test = str(r.get("phrase_type", "")).startswith("test")
        if split == "all" or (split == "test") == is_test:
            out.append(_record(r["qid"], r["image_name"], r["question"], r["answer"], r.get("answer_type"),
                               question_type=r.get("question_type"), organ=r.get("image_organ")))
    return out


def convert_slake(records: Iterable[dict[str, Any]], lang: str) -> list[tuple[dict, dict]]:
    return [_record(r["qid"], r["img_name"], r["question"], r["answer"], r.get("answer_type"),
                    modality=r.get("modality"), content_type=r.get("content_type"), lang=r.get("q_lang"))
            for r in records if lang == "all" or r.get("q_lang", "en") == lang]


def convert_pathvqa(records: Sequence[dict[str, Any]]) -> list[tuple[dict, dict]]:
    out = []
    for i, r in enumerate(records):
        image = str(r["image"])
        out.append(_record(i, image if Path(image).suffix else image + ".jpg", r["question"], r["answer"], None))
    return out


def convert_llava(records: Iterable[dict[str, Any]]) -> list[tuple[dict, dict]]:
    out = []
    for r in records:
        turns = r.get("conversations") or r.get("conversatons")  # the misspelling occurs in LLaVA-Med's files
        if not isinstance(turns, list) or len(turns) < 2:
            raise ConversionError(f"record {r.get('id')!r} has no question/answer conversation")
        out.append(_record(r["id"], r.get("image"), turns[0]["value"], turns[1]["value"], r.get("answer_type")))
    return out


def convert(fmt: str, path: Path, *, split: str = "test", lang: str = "en") -> list[tuple[dict, dict]]:
    try:
        if fmt == "vqa-rad":
            return convert_vqa_rad(_load_json(path), split)
        if fmt == "slake":
            return convert_slake(_load_json(path), lang)
        if fmt == "pathvqa":
            return convert_pathvqa(_load_plain_pickle(path))
        if fmt == "llava":
            return convert_llava(_load_json(path))
    except KeyError as exc:
        raise ConversionError(f"{path}: a record lacks the field {exc} of the {fmt} format") from exc
    raise ConversionError(f"unknown format {fmt!r}")


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


IMAGE_FOLDERS = {"vqa-rad": "VQA_RAD Image Folder", "slake": "imgs", "pathvqa": "images/<split>",
                 "llava": "the data set's images folder"}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Formats: vqa-rad, slake, pathvqa, llava (see the script's docstring).")
    p.add_argument("format", choices=["vqa-rad", "slake", "pathvqa", "llava"])
    p.add_argument("input", type=Path, help="the data set's question file")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--split", choices=["test", "train", "all"], default="test", help="vqa-rad only (default test)")
    p.add_argument("--lang", choices=["en", "zh", "all"], default="en", help="slake only (default en)")
    args = p.parse_args(argv)
    try:
        pairs = convert(args.format, args.input, split=args.split, lang=args.lang)
    except ConversionError as exc:
        print(f"convert_vqa_datasets: {exc}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "questions.jsonl", (q for q, _ in pairs))
    write_jsonl(args.out_dir / "ground_truth.jsonl", (gt for _, gt in pairs))
    closed = sum(gt["answer_type"] == "closed" for _, gt in pairs)
    print(f"{len(pairs)} questions ({closed} closed, {len(pairs) - closed} open) -> "
          f"{args.out_dir / 'questions.jsonl'}, {args.out_dir / 'ground_truth.jsonl'}")
    print(f"--image-folder: {IMAGE_FOLDERS[args.format]} of the data set")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
