"""Load test of the relay: many concurrent streaming clients through a controller to two fake-engine workers.

Starts a controller and two ``--engine fake`` workers of one model as real processes on 127.0.0.1 (free ports),
then runs ``--clients`` concurrent clients, each sending ``--requests`` streaming requests through the controller's
``/worker_generate_stream`` (the original protocol), and reports errors, throughput, latency and time to first
token, how the requests were shared between the workers, and each server's peak memory. Everything is bounded:
a fixed number of requests, a deadline for the whole run, loopback only.

    python scripts/load_test.py                       # 64 clients x 4 requests, appended to benchmarks/RESULTS.md
    python scripts/load_test.py --clients 8 --requests 2 --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench_results import RESULTS, append_results, percentile  # scripts/, this script's folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_med.serve.processes import ManagedProcess, free_port, peak_rss_bytes  # noqa: E402
from llava_med.serve.protocol import iter_chunks  # noqa: E402

MODEL = "load-test-fake"


@dataclass
class Report:
    clients: int
    requests: int
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    served: dict[str, int] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return len(self.latencies)

    def summary(self) -> str:
        return (f"{self.completed}/{self.requests} requests, {len(self.errors)} errors, "
                f"{self.completed / self.seconds:.1f} req/s, {self.tokens / self.seconds:.0f} tok/s, latency p50 "
                f"{percentile(self.latencies, 0.5):.2f} s p95 {percentile(self.latencies, 0.95):.2f} s, TTFT p50 "
                f"{percentile(self.ttfts, 0.5):.3f} s p95 {percentile(self.ttfts, 0.95):.3f} s, served {self.served}")


def _one(client: httpx.Client, url: str, i: int, new_tokens: int, report: Report, lock: threading.Lock) -> None:
    body = {"model": MODEL, "prompt": f"[INST] request {i}: describe the finding in detail [/INST]",
            "max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0.7}
    started = time.perf_counter()
    first = None
    last = None
    try:
        with client.stream("POST", url + "/worker_generate_stream", json=body) as resp:
            resp.raise_for_status()
            for chunk in iter_chunks(resp.iter_bytes()):
                if chunk.error_code:
                    raise RuntimeError(f"error chunk {chunk.error_code}: {chunk.text[:200]}")
                if first is None:
                    first = time.perf_counter() - started
                last = chunk
        if last is None or last.finish_reason is None:
            raise RuntimeError("the stream ended without a final chunk")
    except (httpx.HTTPError, RuntimeError) as exc:
        with lock:
            report.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
        return
    with lock:
        report.latencies.append(time.perf_counter() - started)
        report.ttfts.append(first or 0.0)
        report.tokens += int((last.usage or {}).get("completion_tokens", 0))


def run_load(clients: int = 64, requests_per_client: int = 4, new_tokens: int = 64, token_delay: float = 0.005,
             deadline: float = 300.0, log_dir: Path | None = None) -> Report:
    """Start the stack, run the load, stop everything; returns the report (bounded by ``deadline`` seconds)."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="load-test-"))
    env = {**os.environ, "LLAVA_MED_WORKER_HEART_BEAT_INTERVAL": "1", "NO_PROXY": "127.0.0.1,localhost"}
    cport = free_port()
    ctrl_url = f"http://127.0.0.1:{cport}"
    py = [sys.executable, "-m"]
    procs = [ManagedProcess("controller", [*py, "llava_med.serve.controller", "--host", "127.0.0.1", "--port",
                                           str(cport), "--log-level", "warning"], log_dir / "controller.log",
                            f"{ctrl_url}/health", env)]
    worker_urls = []
    for i in range(2):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        worker_urls.append(url)
        procs.append(ManagedProcess(
            f"worker-{i}", [*py, "llava_med.serve.model_worker", "--host", "127.0.0.1", "--port", str(port),
                            "--worker-address", url, "--controller-address", ctrl_url, "--engine", "fake",
                            "--model-name", MODEL, "--fake-token-delay", str(token_delay),
                            "--limit-model-concurrency", str(clients), "--log-level", "warning"],
            log_dir / f"worker-{i}.log", f"{url}/health", env))
    report = Report(clients, clients * requests_per_client)
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_healthy(60)
        with httpx.Client(trust_env=False, timeout=10) as http:
            end = time.monotonic() + 20
            while len(http.get(ctrl_url + "/list_workers").json()["workers"]) < 2:
                if time.monotonic() > end:
                    raise RuntimeError("the workers did not register within 20 s")
                time.sleep(0.1)
        lock = threading.Lock()
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        timeout = httpx.Timeout(deadline, connect=10)
        started = time.perf_counter()
        with httpx.Client(trust_env=False, timeout=timeout, limits=limits) as client, \
                ThreadPoolExecutor(max_workers=clients) as pool:
            futures = [pool.submit(_one, client, ctrl_url, i, new_tokens, report, lock)
                       for i in range(report.requests)]
            for future in futures:
                future.result(timeout=max(1.0, deadline - (time.perf_counter() - started)))
        report.seconds = time.perf_counter() - started
        with httpx.Client(trust_env=False, timeout=10) as http:
            for i, url in enumerate(worker_urls):
                metrics = http.get(url + "/metrics").text
                count = next(float(line.split()[-1]) for line in metrics.splitlines()
                             if line.startswith("llava_med_worker_requests_total"))
                report.served[f"worker-{i}"] = int(count)
        for proc in procs:
            report.peak_rss_mib[proc.name] = round((peak_rss_bytes(proc.pid) or 0) / 2**20, 1)
    finally:
        for proc in reversed(procs):
            proc.stop(10)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--token-delay", type=float, default=0.005, help="seconds per token of the fake engine")
    p.add_argument("--deadline", type=float, default=300, help="seconds the whole load may take")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    report = run_load(args.clients, args.requests, args.new_tokens, args.token_delay, args.deadline)
    print(report.summary())
    for error in report.errors[:10]:
        print("  " + error)
    if not args.no_write:
        table = "\n".join([
            "| clients | requests | errors | req/s | tok/s | latency p50 / p95 (s) | TTFT p50 / p95 (s) | "
            "served (worker 0 / 1) | peak RSS controller / workers (MiB) |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {args.clients} | {report.requests} | {len(report.errors)} | {report.completed / report.seconds:.1f} | "
            f"{report.tokens / report.seconds:.0f} | {percentile(report.latencies, 0.5):.2f} / "
            f"{percentile(report.latencies, 0.95):.2f} | {percentile(report.ttfts, 0.5):.3f} / "
            f"{percentile(report.ttfts, 0.95):.3f} | {report.served.get('worker-0')} / {report.served.get('worker-1')} "
            f"| {report.peak_rss_mib.get('controller')} / {report.peak_rss_mib.get('worker-0')}, "
            f"{report.peak_rss_mib.get('worker-1')} |",
        ])
        header = (f"## Relay load test, {dt.datetime.now():%Y-%m-%d %H:%M}\n\n`python scripts/load_test.py --clients "
                  f"{args.clients} --requests {args.requests} --new-tokens {args.new_tokens} --token-delay "
                  f"{args.token_delay}`; machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
                  f"{platform.python_version()}. {args.clients} concurrent streaming clients through the controller's "
                  f"relay to two fake-engine workers of one model (each request {args.new_tokens} tokens at "
                  f"{args.token_delay * 1000:g} ms per token), clients and servers on the same machine.\n")
        append_results(args.results, header, table)
    return 0 if not report.errors and report.completed == report.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
