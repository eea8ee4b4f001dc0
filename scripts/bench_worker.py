"""Worker benchmark: real worker processes side by side in one run (hf batching vs batch=1, or --engine hf,vllm).

By default the hf engine batching against ``--max-batch-size 1``; with ``--engine hf,vllm`` the engines on the same
checkpoint.

For each model (the tiny checkpoint, and the ~150M-parameter "small" one built by the same builder) and each
mode, a worker is started (``--no-register``), then requests are sent straight to ``/worker_generate_stream`` at
concurrency 1, 4 and 16: half of them with an image (a different image for every request, so no vision or prefix
cache helps), each generating exactly ``--new-tokens`` tokens (``ignore_eos``). Reported: aggregate output
tokens/s and its ratio to the first mode, time to first token p50/p95 (client side), and the peak RSS of the
worker's processes. The table is printed and appended, with the date and machine, to benchmarks/RESULTS.md.

    python scripts/bench_worker.py                 # batching, both models, writes benchmarks/RESULTS.md
    python scripts/bench_worker.py --models tiny --no-write
    python scripts/bench_worker.py --engine hf,vllm --models small    # vLLM runs from .venv-vllm
    python scripts/bench_worker.py --engine hf,vllm --model-path /models/llava-med-v1.5-mistral-7b --dtype bfloat16

vLLM workers run with ``--vllm-python`` (default: .venv-vllm/bin/python, see scripts/setup_vllm_env.sh), a KV
cache of ``--kv-cache-memory`` and vLLM's defaults otherwise (torch.compile on CPUs, CUDA graphs on GPUs). The
tiny checkpoint cannot run in vLLM on CPUs (16-dimensional attention heads; its CPU kernels take 32 and up).
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from bench_results import RESULTS, percentile, publish  # scripts/, this script's folder

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
        return percentile(self.ttft, q)


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


@dataclass
class Mode:
    """One worker configuration of the comparison."""

    label: str
    engine: str
    python: str
    args: list[str] = field(default_factory=list)


def _modes(args: argparse.Namespace) -> list[Mode]:
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if engines == ["hf"]:
        return [Mode("batched", "hf", sys.executable, ["--max-batch-size", str(args.max_batch_size)]),
                Mode("batch=1", "hf", sys.executable, ["--max-batch-size", "1"])]
    modes = []
    for engine in engines:
        if engine == "hf":
            modes.append(Mode("hf", "hf", sys.executable, ["--max-batch-size", str(args.max_batch_size)]))
        elif engine == "vllm":
            modes.append(Mode("vllm", "vllm", args.vllm_python, ["--kv-cache-memory", args.kv_cache_memory]))
        else:
            raise SystemExit(f"--engine: unknown engine {engine!r} (hf, vllm)")
    return modes


def _tree_peak_rss(pid: int) -> int | None:
    """Sum of the peak RSS of a process and its descendants (vLLM runs its engine in child processes)."""
    total, found, todo = 0, False, [pid]
    while todo:
        current = todo.pop()
        rss = peak_rss_bytes(current)
        if rss is not None:
            total, found = total + rss, True
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return total if found else None


def _run_mode(model: str, ckpt: Path, mode: Mode, concurrencies: list[int], new_tokens: int, dtype: str,
              log_dir: Path) -> list[Result]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [mode.python, "-m", "llava_med.serve.model_worker", "--engine", mode.engine, "--host", "127.0.0.1",
            "--port", str(port), "--worker-address", url, "--no-register", "--model-path", str(ckpt), "--model-name",
            "bench", "--limit-model-concurrency", "64", "--dtype", dtype, "--log-level", "warning", *mode.args]
    name = f"worker-{model}-{mode.label}".replace("=", "")
    proc = ManagedProcess(name, argv, log_dir / f"{name}.log", health_url=f"{url}/health")
    proc.start()
    results = []
    try:
        proc.wait_healthy(900)
        _measure(url, 2, 4, offset=1000)  # warm-up: first-call costs stay out of the figures
        for c in concurrencies:
            n, seconds, ttft, tokens = _measure(url, c, new_tokens, offset=100 * c)
            results.append(Result(model, mode.label, c, n, tokens, seconds, ttft, _tree_peak_rss(proc.pid)))
            print(f"  {model:5s} {mode.label:8s} c={c:<3d} {tokens / seconds:8.1f} tok/s  ttft p50 "
                  f"{results[-1].pct(0.5):.3f}s p95 {results[-1].pct(0.95):.3f}s", flush=True)
    finally:
        proc.stop()
    return results


def _table(results: list[Result], concurrencies: list[int], modes: list[Mode]) -> str:
    base = modes[0].label
    lines = [
        f"| model | concurrency | mode | tok/s | vs {base} | TTFT p50 / p95 (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {(r.model, r.mode, r.concurrency): r for r in results}
    for model in dict.fromkeys(r.model for r in results):
        for c in concurrencies:
            first = by[(model, base, c)]
            for mode in modes:
                r = by[(model, mode.label, c)]
                rss = f"{r.rss / 2**20:.0f}" if r.rss else "?"
                lines.append(
                    f"| {model} | {c} | {mode.label} | {r.tokens_per_s:.1f} | "
                    f"**{r.tokens_per_s / first.tokens_per_s:.2f}x** | {r.pct(0.5):.3f} / {r.pct(0.95):.3f} | {rss} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="hf",
                        help="hf (batching vs batch=1, the default), or engines to compare, e.g. hf,vllm")
    parser.add_argument("--models", default=None,
                        help="comma-separated presets (tiny, small); default tiny,small, or small with vllm")
    parser.add_argument("--model-path", default=None, help="a checkpoint folder instead of the presets")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16, help="batch size of the hf engine")
    parser.add_argument("--dtype", default="float32", help="every worker's --dtype (default float32)")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                        help="python of the vLLM virtualenv (scripts/setup_vllm_env.sh)")
    parser.add_argument("--kv-cache-memory", default="512MiB", help="vLLM's KV cache (default 512MiB)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    modes = _modes(args)
    uses_vllm = any(m.engine == "vllm" for m in modes)
    if uses_vllm and not Path(args.vllm_python).exists():
        raise SystemExit(f"{args.vllm_python} does not exist: create it with bash scripts/setup_vllm_env.sh")
    if args.model_path:
        checkpoints = {Path(args.model_path).name: Path(args.model_path)}
    else:
        names = args.models or ("small" if uses_vllm else "tiny,small")
        models = [m.strip() for m in names.split(",") if m.strip()]
        if uses_vllm and "tiny" in models:
            raise SystemExit("the tiny checkpoint cannot run in vLLM on CPUs (16-dimensional attention heads); "
                             "use --models small")
        checkpoints = {m: ensure_checkpoint(m) for m in models}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    print(f"worker logs in {log_dir}", flush=True)
    results: list[Result] = []
    started = time.perf_counter()
    for model, ckpt in checkpoints.items():
        for mode in modes:
            results += _run_mode(model, ckpt, mode, concurrencies, args.new_tokens, args.dtype, log_dir)
    table = _table(results, concurrencies, modes)
    import torch

    command = " ".join(["python scripts/bench_worker.py", *(sys.argv[1:] if argv is None else argv)])
    described = "; ".join(f"{m.label}: --engine {m.engine} {' '.join(m.args)}".rstrip() for m in modes)
    header = (
        f"## Worker benchmark ({', '.join(m.label for m in modes)}), {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`{command}`; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"device cpu, --dtype {args.dtype}. Requests go straight to one worker; half carry an image (576 image "
        f"tokens, a different image each); each generates {args.new_tokens} tokens. Modes: {described}. "
        f"Peak RSS sums the worker's processes. Run time {time.perf_counter() - started:.0f} s.\n"
    )
    publish(None if args.no_write else args.results, header, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
