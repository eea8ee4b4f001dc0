"""``llava-med eval NAME ...``: the evaluation commands (each also runs as ``python -m llava_med.eval.NAME``)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from llava_med.constants import RESEARCH_ONLY_NOTICE

#: name -> (module with main(argv), one-line description)
COMMANDS = {
    "model_vqa": ("llava_med.eval.model_vqa", "answer a question file, locally (batched) or through a controller"),
    "vqa_metrics": ("llava_med.eval.vqa_metrics", "closed accuracy, open recall / exact match / F1 against ground truth"),
    "chat_judge": ("llava_med.eval.chat_judge", "LLaVA-Med Bench: a judge model scores the answers (OpenAI API)"),
    "summarize_judge": ("llava_med.eval.summarize_judge", "the judge scores per question type and domain"),
}


def _usage() -> str:
    lines = ["usage: llava-med eval NAME [options]   (llava-med eval NAME --help)", "", "evaluation commands:"]
    lines += [f"  {name:<17}{desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "'-' may stand for '_' (model-vqa).", "", RESEARCH_ONLY_NOTICE]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        print(f"llava-med eval: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[name][0]).main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
