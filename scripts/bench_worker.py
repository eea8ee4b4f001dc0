"""Batching benchmark: a real worker process, batching on vs ``--max-batch-size 1``, side by side in one run.

For each model (the tiny checkpoint, and the ~100M-parameter "small" one built by the same builder) and each
mode, a worker is started (``--no-register``), then requests are sent straight to ``/worker_generate_stream`` at
concurrency 1, 4 and 16: half of them with an image, each generating exactly ``--new-tokens`` tokens
(``ignore_eos``). Reported: aggregate output tokens/s, time to first token p50/p95 (client side), and the worker's
peak RSS. The table is printed and appended, with the date and machine, to benchmarks/RESULTS.md.

    python scripts/bench_worker.py                 # both models, writes benchmarks/RESULTS.md
    python scripts/bench_worker.py --models tiny --no-write
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_med.model.tiny import ensure_checkpoint  # noqa: E402
from llava_med.serve.processes import ManagedProcess, free_port, peak_rss_bytes  # noqa: E402
from llava_med.serve.protocol import iter_chunks  # noqa: E402


@dataclass
class Result:
    model: str
    mode: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    ttft: list[float]
    rss: int | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.ttft)
        return data[min(len(data) - 1, round(q * (len(data) - 1)))]


def _image_b64(i: int) -> str:
    img = Image.new("RGB", (320, 256), (15, 15, 15))
    draw = ImageDraw.Draw(img)
    k = i % 97  # distinct images for distinct i (no vision-feature cache hits between requests)
    draw.ellipse((40 + k, 30, 280, 230 - k), fill=(200, 190, 180))
    draw.rectangle((150, 60 + k, 190, 100 + k), fill=(90, 40 + i % 200, 40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _payload(i: int, new_tokens: int) -> dict:
    if i % 2 == 0:  # every other request has an image (a different one each time: no feature-cache hits)
        prompt = f"[INST] <image>\nDescribe the lesion in this scan, case {i}. [/INST]"
        images = [_image_b64(i)]
    else:
        prompt = f"[INST] What are the common causes of a pleural effusion? Case {i}. [/INST]"
        images = []
    return {"model": "bench", "prompt": prompt, "images": images, "temperature": 0.0, "max_new_tokens": new_tokens,
            "ignore_eos": True, "echo": False}


def _one_request(url: str, payload: dict) -> tuple[float, int]:
    start = time.perf_counter()
    ttft = None
    last = None
    with httpx.stream("POST", f"{url}/worker_generate_stream", json=payload, timeout=600.0) as resp:
        resp.raise_for_status()
        for chunk in iter_chunks(resp.iter_bytes()):
            if chunk.error_code:
                raise RuntimeError(f"worker error: {chunk.text}")
            if ttft is None and chunk.text:
                ttft = time.perf_counter() - start
            last = chunk
    usage = (last.usage if last is not None else None) or {}
    generated = int(usage.get("completion_tokens", payload["max_new_tokens"]))
    return (ttft if ttft is not None else time.perf_counter() - start), generated


def _measure(url: str, concurrency: int, new_tokens: int, offset: int) -> tuple[int, float, list[float], int]:
    n = max(4, 2 * concurrency)
    payloads = [_payload(offset + i, new_tokens) for i in range(n)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: _one_request(url, p), payloads))
    seconds = time.perf_counter() - start
    return n, seconds, [r[0] for r in results], sum(r[1] for r in results)


def _run_mode(model: str, ckpt: Path, mode: str, batch: int, concurrencies: list[int], new_tokens: int,
              log_dir: Path) -> list[Result]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "llava_med.serve.model_worker", "--host", "127.0.0.1", "--port", str(port),
            "--worker-address", url, "--no-register", "--model-path", str(ckpt), "--model-name", "bench",
            "--limit-model-concurrency", "64", "--max-batch-size", str(batch), "--log-level", "warning"]
    proc = ManagedProcess(f"worker-{model}-{mode}", argv, log_dir / f"worker-{model}-{mode}.log",
                          health_url=f"{url}/health")
    proc.start()
    results = []
    try:
        proc.wait_healthy(300)
        _measure(url, 2, 4, offset=1000)  # warm-up: first-call costs stay out of the figures
        for c in concurrencies:
            n, seconds, ttft, tokens = _measure(url, c, new_tokens, offset=100 * c)
            results.append(Result(model, mode, c, n, tokens, seconds, ttft, peak_rss_bytes(proc.pid)))
            print(f"  {model:5s} {mode:8s} c={c:<3d} {tokens / seconds:8.1f} tok/s  ttft p50 "
                  f"{results[-1].pct(0.5):.3f}s p95 {results[-1].pct(0.95):.3f}s", flush=True)
    finally:
        proc.stop()
    return results


def _table(results: list[Result], concurrencies: list[int]) -> str:
    lines = [
        "| model | concurrency | batched tok/s | batch=1 tok/s | speed-up | TTFT p50 / p95 batched (s) | "
        "TTFT p50 / p95 batch=1 (s) | peak RSS batched / batch=1 (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r.model, r.mode, r.concurrency): r for r in results}
    for model in dict.fromkeys(r.model for r in results):
        for c in concurrencies:
            b, s = by[(model, "batched", c)], by[(model, "batch1", c)]
            rss = "/".join(f"{(x.rss or 0) / 2**20:.0f}" for x in (b, s))
            lines.append(
                f"| {model} | {c} | {b.tokens_per_s:.1f} | {s.tokens_per_s:.1f} | "
                f"**{b.tokens_per_s / s.tokens_per_s:.2f}x** | {b.pct(0.5):.3f} / {b.pct(0.95):.3f} | "
                f"{s.pct(0.5):.3f} / {s.pct(0.95):.3f} | {rss} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated presets (tiny, small)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16, help="batch size of the 'batched' mode")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    print(f"worker logs in {log_dir}", flush=True)
    results: list[Result] = []
    started = time.perf_counter()
    for model in models:
        ckpt = ensure_checkpoint(model)
        for mode, batch in (("batched", args.max_batch_size), ("batch1", 1)):
            results += _run_mode(model, ckpt, mode, batch, concurrencies, args.new_tokens, log_dir)
    table = _table(results, concurrencies)
    import torch

    header = (
        f"## Worker batching benchmark, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`python scripts/bench_worker.py --models {','.join(models)} --concurrency {args.concurrency} "
        f"--new-tokens {args.new_tokens}`; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"device cpu. Requests go straight to one worker; half carry an image (576 image tokens); each generates "
        f"{args.new_tokens} tokens. Batched: --max-batch-size {args.max_batch_size}. Run time "
        f"{time.perf_counter() - started:.0f} s.\n"
    )
    print()
    print(header)
    print(table)
    if not args.no_write:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
        path.write_text(existing.rstrip("\n") + "\n\n" + header + "\n" + table + "\n", encoding="utf-8")
        print(f"\nappended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
