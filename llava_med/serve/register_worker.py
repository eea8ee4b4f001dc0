"""Register a worker with a controller by hand (the controller asks the worker for its status).

    python -m llava_med.serve.register_worker --controller-address http://localhost:21001 \
        --worker-name http://localhost:21002 [--check-heart-beat]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llava_med.constants import DEFAULT_CONTROLLER_URL
from llava_med.serve.client import ClientError, LlavaMedClient
from llava_med.serve.protocol import default_auth_token

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llava_med.serve.register_worker", description=__doc__.split("\n")[0])
    p.add_argument("--controller-address", type=str, default=DEFAULT_CONTROLLER_URL)
    p.add_argument("--worker-name", type=str, required=True, help="the worker's URL, e.g. http://localhost:21002")
    p.add_argument("--check-heart-beat", action="store_true",
                   help="drop the worker when its heartbeats stop (only for workers that send them)")
    p.add_argument("--auth-token", type=str, default=None, help="the controller's shared secret, if it has one")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    client = LlavaMedClient(args.controller_address, auth_token=args.auth_token or default_auth_token())
    try:
        answer = client.register_worker(args.worker_name, args.check_heart_beat, None)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"registered {args.worker_name}: {answer.get('worker_status', answer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
