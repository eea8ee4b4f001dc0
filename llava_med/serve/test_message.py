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

from llava_med.chat import Message
from llava_med.constants import DEFAULT_CONTROLLER_URL
from llava_med.conversation import template_names
from llava_med.sampling import CHAT_DEFAULTS
from llava_med.serve.client import ClientError, LlavaMedClient
from llava_med.serve.protocol import default_auth_token

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_med.serve.test_message", description=__doc__.split("\n")[0])
    p.add_argument("--controller-address", type=str, default=DEFAULT_CONTROLLER_URL)
    p.add_argument("--worker-address", type=str, default=None, help="talk to this worker directly")
    p.add_argument("--model-name", type=str, default=None, help="default: the first model the controller lists")
    p.add_argument("--max-new-tokens", type=int, default=CHAT_DEFAULTS.max_new_tokens)
    p.add_argument("--temperature", type=float, default=CHAT_DEFAULTS.temperature)
    p.add_argument("--top-p", type=float, default=CHAT_DEFAULTS.top_p)
    p.add_argument("--conv-mode", type=str, default=None, choices=template_names(),
                   help="prompt template (default: the one the worker reports)")
    p.add_argument("--message", type=str, default="Tell me a story with more than 1000 words.")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for each answer from a server")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    client = LlavaMedClient(args.controller_address, args.worker_address, timeout=args.timeout,
                            auth_token=default_auth_token())
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
        with LlavaMedClient(worker_url=worker_addr, timeout=args.timeout) as direct:
            _, rendered = direct.render(model, [Message("user", args.message)], conv_mode=args.conv_mode)
            print(rendered.prompt, flush=True)
            output = direct.generate(model, rendered.prompt, temperature=args.temperature, top_p=args.top_p,
                                     max_new_tokens=args.max_new_tokens, stop=list(rendered.stop))
        print(output.strip(), flush=True)
        return 0
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
