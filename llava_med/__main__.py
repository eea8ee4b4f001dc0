"""``llava-med``: one command for every part of the stack (``llava-med SUBCOMMAND --help``)."""

from __future__ import annotations

import importlib
import sys

from llava_med.constants import RESEARCH_ONLY_NOTICE

# subcommand -> (module with main(argv), one-line description)
SUBCOMMANDS = {
    "chat": ("llava_med.serve.cli", "chat in the terminal, or answer one --query"),
    "controller": ("llava_med.serve.controller", "run the controller that workers register with"),
    "worker": ("llava_med.serve.model_worker", "run a model worker"),
    "web": ("llava_med.serve.gradio_web_server", "run the web chat (Gradio) over a controller"),
    "openai-api": ("llava_med.serve.openai_api", "run the OpenAI-compatible API (/v1) over a controller"),
    "launch": ("llava_med.serve.launch",
               "start a controller, workers, the web UI and the OpenAI API together (Ctrl-C stops all)"),
    "status": ("llava_med.serve.status", "show a controller's workers, models, queues and health"),
    "test-message": ("llava_med.serve.test_message", "send one message through a controller"),
    "register-worker": ("llava_med.serve.register_worker", "register a worker with a controller by hand"),
    "make-tiny": ("llava_med.model.tiny", "build a random checkpoint: tiny, ~150M 'small' or the real '7b' shapes"),
    "eval": ("llava_med.eval.cli", "benchmarks: model_vqa, vqa_metrics, chat_judge, summarize_judge"),
    "convert": ("llava_med.model.convert", "convert an original LLaVA-Med checkpoint to the transformers Llava format"),
}


def _usage() -> str:
    lines = ["usage: llava-med SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<16}{desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", RESEARCH_ONLY_NOTICE]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"llava-med: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
