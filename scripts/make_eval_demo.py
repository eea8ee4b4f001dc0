#!/usr/bin/env python
"""Write a small synthetic evaluation set, to try the evaluation commands without downloading a data set.

    python scripts/make_eval_demo.py --out-dir eval_demo

Writes, with images drawn by code (dark "scans" with bright ellipses; no patient data):

* ``eval_demo/images/*.png``;
* ``eval_demo/questions.jsonl`` + ``eval_demo/ground_truth.jsonl``: VQA-style questions (closed yes/no and open) for
  ``llava-med eval model_vqa`` and ``llava-med eval vqa_metrics``;
* ``eval_demo/bench.jsonl``: the same images as LLaVA-Med Bench questions (``llava_med_eval_qa50_qa.jsonl`` format)
  for ``llava-med eval chat_judge``.

The answers are facts of the drawings (how many ellipses, on which side), so a real model could score on them; the
embedded tiny model answers noise.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

DOMAINS = ("chest_xray", "mri", "ct_scan", "histology", "gross")


def draw(rng: random.Random, count: int, side: str) -> Image.Image:
    img = Image.new("RGB", (256, 256), (10, 10, 14))
    d = ImageDraw.Draw(img)
    d.ellipse((24, 24, 232, 232), outline=(90, 90, 90), width=6)
    for _ in range(count):
        x = rng.randint(40, 100) if side == "left" else rng.randint(140, 200)
        y = rng.randint(50, 190)
        r = rng.randint(8, 18)
        d.ellipse((x - r, y - r, x + r, y + r), fill=(230, 225, 210))
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("eval_demo"))
    p.add_argument("--images", type=int, default=8, help="images drawn (3 questions each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    (args.out_dir / "images").mkdir(parents=True, exist_ok=True)
    questions, truth, bench = [], [], []
    for i in range(args.images):
        count, side = rng.randint(0, 3), rng.choice(["left", "right"])
        name = f"scan{i:03d}.png"
        draw(rng, count, side).save(args.out_dir / "images" / name)
        items = [("Is there a bright lesion in the image?", "yes" if count else "no", "closed"),
                 ("How many bright lesions are there?", str(count), "open")]
        if count:
            items.append(("On which side are the lesions?", side, "closed"))
        for j, (text, answer, kind) in enumerate(items):
            qid = 10 * i + j
            questions.append({"question_id": qid, "image": name, "text": text})
            truth.append({"question_id": qid, "answer": answer, "answer_type": kind, "question": text, "image": name,
                          **({"choices": ["left", "right"]} if "side" in text else {})})
        described = f"{count} bright round lesion{'s' if count != 1 else ''}" + (f" on the {side}" if count else "")
        bench.append({
            "question_id": i, "image": name, "pair_id": f"demo_{i}", "text": "Describe the findings.\n<image>",
            "gpt4_answer": f"The image shows {described} inside a grey ring on a dark background.",
            "fig_caption": f"Synthetic scan with {described}.", "fig_label": f"Fig. {i + 1}",
            "in_text_mention": [{"tokens": f"A synthetic scan ( Fig. {i + 1} ) .", "entities": []}],
            "domain": {d: d == DOMAINS[i % len(DOMAINS)] for d in DOMAINS},
            "type": "detailed_description" if i % 2 else "conversation",
        })
    for name, records in (("questions", questions), ("ground_truth", truth), ("bench", bench)):
        with open(args.out_dir / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{len(questions)} VQA questions and {len(bench)} bench questions on {args.images} images in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
