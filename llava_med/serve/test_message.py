"""Send one test message to a model, as the original ``llava.serve.test_message`` did.

    python -m llava_med.serve.test_message --controller-address http://localhost:21001 \
        --model-name llava-med-v1.5-mistral-7b --message "What is shown in this image?"

With ``--worker-address`` the controller is skipped. Prints the models, the worker, the prompt and the answer;
exits with status 1 (and the cause on stderr) when anything fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llava_med.constants import DEFAULT_CONTROLLER_URL
from llava_med.serve.client import ClientError, LlavaMedClient

__all__ = ["build_prompt", "main", "parse_args"]

DEFAULT_CONV_MODE = "mistral_instruct"


def build_prompt(message: str, conv_mode: str = DEFAULT_CONV_MODE) -> tuple[str, str | None]:
    """The templated prompt for one user message, and the template's stop string."""
    try:
        from llava_med.conversation import get_conv_template
    except ImportError:  # pragma: no cover - the conversation module ships with the package
        return f"[INST] {message} [/INST]", "</s>"
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], message)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt(), conv.stop_str


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_med.serve.test_message", description=__doc__.split("\n")[0])
    p.add_argument("--controller-address", type=str, default=DEFAULT_CONTROLLER_URL)
    p.add_argument("--worker-address", type=str, default=None, help="talk to this worker directly")
    p.add_argument("--model-name", type=str, default=None, help="default: the first model the controller lists")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--conv-mode", type=str, default=DEFAULT_CONV_MODE)
    p.add_argument("--message", type=str, default="Tell me a story with more than 1000 words.")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for each answer from a server")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    client = LlavaMedClient(args.controller_address, args.worker_address, timeout=args.timeout)
    try:
        model = args.model_name
        if args.worker_address:
            worker_addr = args.worker_address
        else:
            client.refresh_all_workers()
            models = client.list_models()
            print(f"Models: {models}")
            if model is None:
                if not models:
                    print("error: the controller has no workers", file=sys.stderr)
                    return 1
                model = models[0]
            worker_addr = client.get_worker_address(model)
            print(f"worker_addr: {worker_addr}")
        prompt, stop = build_prompt(args.message, args.conv_mode)
        print(prompt, flush=True)
        direct = LlavaMedClient(worker_url=worker_addr, timeout=args.timeout)
        output = ""
        for chunk in direct.generate_stream(model, prompt, temperature=args.temperature,
                                            max_new_tokens=args.max_new_tokens, stop=stop):
            output = chunk.output
        print(output.strip(), flush=True)
        return 0
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
