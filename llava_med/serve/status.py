"""``llava-med status``: the workers a controller knows, their models, queues and health, as a table.

    llava-med status --controller-url http://localhost:21001
    llava-med status --json          # the same, as JSON, for scripts

Exit status: 0 when every worker answers ``/health`` with 200, 1 when one does not, 2 when the controller cannot be
reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from llava_med.constants import DEFAULT_CONTROLLER_URL
from llava_med.serve.protocol import WorkerListResponse

__all__ = ["collect", "main", "render_table"]

TIMEOUT = 5.0


def _health(session: requests.Session, url: str) -> str:
    try:
        resp = session.get(url.rstrip("/") + "/health", timeout=TIMEOUT)
    except requests.RequestException as exc:
        return f"unreachable ({type(exc).__name__})"
    try:
        status = resp.json().get("status", "?")
    except ValueError:
        status = "?"
    return status if resp.status_code == 200 else f"{status} (HTTP {resp.status_code})"


def collect(controller_url: str, session: requests.Session | None = None) -> list[dict[str, Any]]:
    """Every worker of ``controller_url`` with its health (asked of each worker in parallel)."""
    session = session or requests.Session()
    session.trust_env = False
    resp = session.get(controller_url.rstrip("/") + "/list_workers", timeout=TIMEOUT)
    resp.raise_for_status()
    workers = [w.model_dump() for w in WorkerListResponse.model_validate(resp.json()).workers]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for worker, health in zip(workers, pool.map(lambda w: _health(session, w["address"]), workers)):
            worker["health"] = health
    return workers


def render_table(workers: list[dict[str, Any]]) -> str:
    header = ("WORKER", "MODELS", "QUEUE", "SPEED", "HEALTH", "LAST SEEN", "HEARTBEATS")
    rows = [header] + [(
        w["address"] + (f" (+{len(w['aliases'])} alias)" if w.get("aliases") else ""),
        ", ".join(w["model_names"]) or "-",
        str(w["queue_length"]),
        f"{w['speed']:g}",
        w["health"],
        f"{w['seconds_since_seen']:.1f} s ago",
        "yes" if w["check_heart_beat"] else "no (polled)",
    ) for w in workers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if not workers:
        lines.append("(no worker is registered)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-med status", description=__doc__.splitlines()[0])
    p.add_argument("--controller-url", "--controller-address", dest="controller_url", default=DEFAULT_CONTROLLER_URL,
                   help="default %(default)s")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    try:
        workers = collect(args.controller_url)
    except requests.ConnectionError:
        print(f"llava-med status: cannot ask the controller at {args.controller_url}: nothing answers there (is it "
              "running, and is the address right?)", file=sys.stderr)
        return 2
    except (requests.RequestException, ValueError) as exc:
        print(f"llava-med status: cannot ask the controller at {args.controller_url}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(workers, indent=2) if args.json else render_table(workers))
    return 0 if all(w["health"] == "ok" for w in workers) else 1


if __name__ == "__main__":
    raise SystemExit(main())
