"""Real-shape benchmark: a 7B-shaped LLaVA-Med (random weights; the real model's shapes, key names, bf16 shards and
vocabulary) loaded and served on this machine in bf16 (weights packed for oneDNN, and unpacked), 8-bit and 4-bit,
beside the machine's memory bandwidth.

It is heavy (a ~15 GB checkpoint, ~15 GB of memory in bf16): run it alone, under the shared lock,

    flock /tmp/llava-med-heavy.lock python scripts/bench_real_shape.py            # writes benchmarks/RESULTS.md
    python scripts/bench_real_shape.py --checkpoint DIR --modes bf16 --no-write    # an existing checkpoint

One run, side by side:

1. Memory bandwidth: a copy of 1 GiB with torch (STREAM-style: bytes read + bytes written per second, best of 10)
   and a read-only pass (a sum), before the model runs and again after.
2. The 7B-shaped checkpoint is built (``llava-med make-tiny --preset 7b``) in a child process: time and peak RSS
   (weights are written shard by shard). ``--checkpoint`` uses an existing one instead.
3. For each mode a real worker process (``--no-register``) loads the checkpoint; requests go straight to its
   ``/worker_generate_stream`` (greedy, ``ignore_eos``): load time (process start to ``/health``), the first
   request (which pages in the weights), time to first token of a text and of an image prompt, decode tokens/s
   at concurrency 1 (one request) and 4 (four text requests started together: tokens after each request's first
   one, over the time from the earliest first token to the last end), and the worker's peak RSS (``VmHWM``).
4. The decode bound: the bytes a decode step reads (every weight of the language model but the embedding table,
   in the mode's storage format, plus the KV cache) divided by the copy bandwidth, and the share of it reached.
5. A CLI one-shot answer with an image (``llava-med chat --query ... --image-file ...``) on the bf16 model.

The table is printed and appended, with the date and machine, to benchmarks/RESULTS.md. A checkpoint built here is
deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageDraw
from bench_results import RESULTS, publish  # scripts/, this script's folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llava_med.model.tiny import PRESETS, checkpoint_bytes, default_cache_dir  # noqa: E402
from llava_med.serve.processes import ManagedProcess, free_port, peak_rss_bytes  # noqa: E402

from bench_worker import _one_request  # noqa: E402  (the batching benchmark's streaming client)

GIB = 2**30
#: bf16: the weights packed for oneDNN at load (the default on CPUs); bf16-unpacked: ``--no-cpu-prepack``, the
#: weights used as mapped from the shards, beside it for the ratio.
MODES = {"bf16": [], "bf16-unpacked": ["--no-cpu-prepack"], "8bit": ["--load-8bit"], "4bit": ["--load-4bit"]}
TEXT_PROMPT = "[INST] What are the common causes of a pleural effusion? Case {i}. [/INST]"
IMAGE_PROMPT = "[INST] <image>\nDescribe the lesion in this scan. [/INST]"


# ---------------------------------------------------------------------------------------------------- bandwidth
def memory_bandwidth(gib: float = 1.0, repeats: int = 10) -> dict[str, float]:
    """Copy (read + write) and read-only bandwidth in GB/s, best of ``repeats``, with torch's threads."""
    import torch

    n = int(gib * GIB) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    copy_s, read_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        float(src.sum())
        read_s.append(time.perf_counter() - start)
    nbytes = n * 4
    del src, dst
    return {"copy_gbs": 2 * nbytes / min(copy_s) / 1e9, "read_gbs": nbytes / min(read_s) / 1e9}


# ---------------------------------------------------------------------------------------------------- bytes/token
def decode_bytes_per_token(config: dict, mode: str, context: int) -> int:
    """Bytes one decode step of one sequence reads: the language model's weights but the embedding table (one row
    of it is read), in the mode's storage format, and the KV cache of ``context`` positions (bf16)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    kv = kv_heads * (h // heads)
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    rows = layers * (2 * h + 2 * kv + 2 * inter + h)  # output rows of those linears (int8 row scales)
    # Bytes per weight of a quantised linear layer (bitsandbytes): int8 with a float32 scale per output row; nf4 with
    # double quantisation (a uint8 absmax per 64 weights, a float32 per 256 of those). lm_head stays in bf16.
    per_weight = {"bf16": 2.0, "bf16-unpacked": 2.0, "8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}[mode]
    weights = linear * per_weight + (4 * rows if mode == "8bit" else 0)
    norms = (2 * layers + 1) * h * 2
    lm_head = vocab * h * 2
    kv_cache = 2 * layers * kv * context * 2
    return int(weights + norms + lm_head + kv_cache + h * 2)


# ---------------------------------------------------------------------------------------------------- requests
@dataclass
class Timing:
    start: float
    first: float
    end: float
    tokens: int

    @property
    def ttft(self) -> float:
        return self.first - self.start


def _image_b64() -> str:
    img = Image.new("RGB", (512, 400), (12, 12, 12))
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 40, 460, 370), fill=(190, 180, 170))
    draw.rectangle((230, 120, 300, 190), fill=(90, 50, 40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def stream(url: str, prompt: str, new_tokens: int, images: list[str] | None = None) -> Timing:
    payload = {"model": "bench", "prompt": prompt, "images": images or [], "temperature": 0.0,
               "max_new_tokens": new_tokens, "ignore_eos": True, "echo": False}
    start = time.perf_counter()
    ttft, tokens = _one_request(url, payload)
    return Timing(start, start + ttft, time.perf_counter(), tokens)


def prompt_positions(url: str, prompt: str) -> int:
    """Positions the prompt takes in the model (each image placeholder counts as its image's tokens)."""
    resp = httpx.post(f"{url}/count_token", json={"prompt": prompt}, timeout=60.0)
    resp.raise_for_status()
    return int(resp.json()["count"])


@dataclass
class ModeResult:
    mode: str
    load_s: float = 0.0
    first_request_s: float = 0.0
    ttft_text_s: float = 0.0
    ttft_image_s: float = 0.0
    image_prompt_tokens: int = 0
    decode_c1: float = 0.0
    decode_c4: float = 0.0
    peak_rss: int = 0
    bytes_per_token: int = 0
    bandwidth: float = 0.0  # copy GB/s measured just before this mode's decoding
    context: int = 0
    error: str | None = None


def run_mode(mode: str, ckpt: Path, config: dict, new_tokens: int, log_dir: Path, timeout: float) -> ModeResult:
    result = ModeResult(mode)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "llava_med.serve.model_worker", "--host", "127.0.0.1", "--port", str(port),
            "--worker-address", url, "--no-register", "--model-path", str(ckpt), "--model-name", "bench",
            "--dtype", "bfloat16", "--limit-model-concurrency", "8", "--max-batch-size", "4", *MODES[mode]]
    proc = ManagedProcess(f"worker-{mode}", argv, log_dir / f"worker-{mode}.log", health_url=f"{url}/health")
    start = time.perf_counter()
    proc.start()
    try:
        proc.wait_healthy(timeout)
        result.load_s = time.perf_counter() - start
        print(f"  {mode}: loaded in {result.load_s:.1f} s, peak RSS {peak_rss_bytes(proc.pid) / GIB:.2f} GiB",
              flush=True)
        warm = stream(url, TEXT_PROMPT.format(i=0), 2)
        result.first_request_s = warm.end - warm.start
        # The machine's bandwidth varies from minute to minute (a shared VM): measure it right before decoding.
        result.bandwidth = memory_bandwidth()["copy_gbs"]
        one = stream(url, TEXT_PROMPT.format(i=1), new_tokens)
        result.ttft_text_s = one.ttft
        result.decode_c1 = (one.tokens - 1) / (one.end - one.first)
        result.context = prompt_positions(url, TEXT_PROMPT.format(i=1)) + one.tokens // 2
        image = stream(url, IMAGE_PROMPT, 2, [_image_b64()])
        result.ttft_image_s = image.ttft
        result.image_prompt_tokens = prompt_positions(url, IMAGE_PROMPT)
        print(f"  {mode}: ttft text {result.ttft_text_s:.2f} s, image {result.ttft_image_s:.2f} s, "
              f"decode c=1 {result.decode_c1:.2f} tok/s", flush=True)
        with ThreadPoolExecutor(max_workers=4) as pool:
            four = list(pool.map(lambda i: stream(url, TEXT_PROMPT.format(i=10 + i), new_tokens), range(4)))
        window = max(t.end for t in four) - min(t.first for t in four)
        result.decode_c4 = sum(t.tokens - 1 for t in four) / window
        print(f"  {mode}: decode c=4 {result.decode_c4:.2f} tok/s", flush=True)
        result.bytes_per_token = decode_bytes_per_token(config, mode, result.context)
    except Exception as exc:  # one mode failing (e.g. out of memory) still reports the others
        result.error = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(f"  {mode}: FAILED {result.error}", flush=True)
    finally:
        result.peak_rss = peak_rss_bytes(proc.pid) or 0
        proc.stop(60)
    return result


# ---------------------------------------------------------------------------------------------------- children
def run_child(name: str, argv: list[str], log_dir: Path, timeout: float) -> tuple[int, float, int, str]:
    """Run a command to its end; returns (exit code, seconds, peak RSS sampled from VmHWM, stdout)."""
    log = log_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, peak_rss_bytes(proc.pid) or 0)
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            stop.set()
            sampler.join()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, time.perf_counter() - start, peak, out.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------------- report
def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    try:
        import bitsandbytes

        bnb = f", bitsandbytes {bitsandbytes.__version__}"
    except ImportError:
        bnb = ""
    from llava_med.model.dtypes import cpu_native_bf16

    return (f"{cpu}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), {mem:.1f} GiB RAM, native bf16: "
            f"{cpu_native_bf16() or 'no'}; Linux {platform.release()}, Python {platform.python_version()}, torch "
            f"{torch.__version__}, transformers {transformers.__version__}{bnb}")


def report(args: argparse.Namespace, bw: list[dict], build: dict | None, results: list[ModeResult],
           cli: dict | None, seconds: float) -> str:
    copy = max([b["copy_gbs"] for b in bw] + [r.bandwidth for r in results])
    lines = [
        f"## Real-shape benchmark ({args.preset} preset of LLaVA-Med, random weights), "
        f"{dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"`{' '.join(['python', 'scripts/bench_real_shape.py', *sys.argv[1:]])}`; machine: " + machine()
        + f". Run time {seconds:.0f} s.",
        "",
        "Memory bandwidth (torch, 1 GiB buffers, best of 10; before the models / after them): copy (read + written) "
        + " / ".join(f"{b['copy_gbs']:.1f}" for b in bw) + " GB/s, read-only "
        + " / ".join(f"{b['read_gbs']:.1f}" for b in bw) + " GB/s. Each mode's decode bound uses the copy figure "
        f"measured just before its decoding; the last column uses the run's highest ({copy:.1f} GB/s).",
        "",
    ]
    if build:
        lines += [f"Checkpoint: built by `llava-med make-tiny --preset {args.preset}` in {build['seconds']:.0f} s with a "
                  f"peak RSS "
                  f"of {build['peak'] / GIB:.2f} GiB (shards written one at a time); {build['bytes'] / 1e9:.2f} GB "
                  f"of bf16 in {build['shards']} shards, {build['bytes'] / 2 / 1e9:.2f}B parameters.", ""]
    else:
        lines += [f"Checkpoint: {args.checkpoint} (not built by this run).", ""]
    lines += [
        "| mode | load (s) | first request (s) | peak RSS (GiB) | TTFT text (s) | TTFT image (s) | decode c=1 (tok/s) "
        "| decode c=4 (tok/s) | bytes read per token (GB) | copy bandwidth just before (GB/s) | decode bound (tok/s) "
        "| c=1 share of bound | share of the bound at the run's highest bandwidth |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.mode} | failed: {r.error} | | {r.peak_rss / GIB:.2f} | | | | | | | | | |")
            continue
        bound = r.bandwidth * 1e9 / r.bytes_per_token
        lines.append(
            f"| {r.mode} | {r.load_s:.1f} | {r.first_request_s:.1f} | {r.peak_rss / GIB:.2f} | {r.ttft_text_s:.2f} | "
            f"{r.ttft_image_s:.2f} | {r.decode_c1:.2f} | {r.decode_c4:.2f} | {r.bytes_per_token / 1e9:.2f} | "
            f"{r.bandwidth:.1f} | {bound:.2f} | **{r.decode_c1 / bound:.0%}** | "
            f"{r.decode_c1 * r.bytes_per_token / (copy * 1e9):.0%} |")
    lines += [
        "",
        f"Requests: greedy, `ignore_eos`, {args.new_tokens} new tokens for the decode figures; text prompt ~25 "
        f"tokens; image prompt {max((r.image_prompt_tokens for r in results), default=0)} tokens (576 of them the "
        "image). Load = worker process start to `/health` (bf16 reads the linear weights with pread and packs them "
        "for oneDNN while loading; bf16-unpacked maps the shards, so its first request pages the weights in; 8-bit "
        "and 4-bit read them with pread and quantise them while loading). Peak RSS = the worker's `VmHWM`.",
    ]
    if cli:
        lines += ["", f"CLI one-shot answer with an image on the bf16 model (`llava-med chat --query ... --image-file "
                  f"... --dtype bfloat16 --max-new-tokens 8 --temperature 0`): exit code {cli['rc']}, {cli['seconds']:.0f} s "
                  f"including loading, peak RSS {cli['peak'] / GIB:.2f} GiB; answer (noise: random weights) "
                  f"{json.dumps(cli['answer'][:120], ensure_ascii=False)}."]
    by = {r.mode: r for r in results if not r.error}
    checks = []
    if "bf16" in by:
        r = by["bf16"]
        share = r.decode_c1 * r.bytes_per_token / (r.bandwidth * 1e9)
        checks.append(f"bf16 peak RSS {r.peak_rss / GIB:.2f} GiB < 24 GiB: {'met' if r.peak_rss < 24 * GIB else 'MISSED'}")
        checks.append(f"bf16 decode at concurrency 1 reaches {share:.0%} of the bound (target 60%): "
                      f"{'met' if share >= 0.6 else 'MISSED'}")
    if "bf16" in by and "bf16-unpacked" in by:
        packed, plain = by["bf16"], by["bf16-unpacked"]
        checks.append(f"bf16 decode with packed weights {packed.decode_c1 / plain.decode_c1:.2f}x the unpacked at "
                      f"concurrency 1, {packed.decode_c4 / plain.decode_c4:.2f}x at 4 (side by side)")
    if "4bit" in by:
        r = by["4bit"]
        checks.append(f"4-bit peak RSS {r.peak_rss / GIB:.2f} GiB < 8 GiB: {'met' if r.peak_rss < 8 * GIB else 'MISSED'}")
    if cli:
        checks.append(f"CLI one-shot answer with an image: {'completed' if cli['rc'] == 0 else 'FAILED'}")
    if checks:
        lines += ["", "**Targets.** " + "; ".join(checks) + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="use this checkpoint folder (never deleted) instead of building one")
    parser.add_argument("--preset", default="7b", choices=list(PRESETS),
                        help="preset to build (7b; small for a quick trial of the script)")
    parser.add_argument("--work-dir", default=str(default_cache_dir() / "bench-real-shape"),
                        help="where the checkpoint is built")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint built here")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI one-shot answer")
    parser.add_argument("--load-timeout", type=float, default=1800.0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")

    t0 = time.perf_counter()
    work = Path(args.work_dir)
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print("memory bandwidth ...", flush=True)
    bw = [memory_bandwidth()]
    print(f"  copy {bw[0]['copy_gbs']:.1f} GB/s, read {bw[0]['read_gbs']:.1f} GB/s", flush=True)

    build = None
    built_root = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        need = checkpoint_bytes(PRESETS[args.preset])
        free = shutil.disk_usage(work).free
        if free < need * 1.05:
            print(f"not enough disk: the {args.preset} checkpoint needs {need / GIB:.1f} GiB, {work} has "
                  f"{free / GIB:.1f} GiB free", file=sys.stderr)
            return 2
        built_root = work / "checkpoint"
        shutil.rmtree(built_root, ignore_errors=True)
        print(f"building the {args.preset} checkpoint in {built_root} ...", flush=True)
        rc, seconds, peak, out = run_child(
            "build", [sys.executable, "-m", "llava_med.model.tiny", "--preset", args.preset, "--output-dir",
                      str(built_root)], log_dir, 3600)
        if rc != 0:
            print(f"building failed (exit {rc}); see {log_dir / 'build.log'}", file=sys.stderr)
            return 1
        ckpt = Path(out.strip().splitlines()[-1])
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        build = {"seconds": seconds, "peak": peak, "bytes": index["metadata"]["total_size"],
                 "shards": len(set(index["weight_map"].values()))}
        print(f"  built in {seconds:.0f} s, peak RSS {peak / GIB:.2f} GiB", flush=True)
    if not (ckpt / "config.json").is_file():
        parser.error(f"{ckpt} has no config.json")
    config = json.loads((ckpt / "config.json").read_text())

    results: list[ModeResult] = []
    cli = None
    try:
        for mode in modes:
            print(f"{mode} ...", flush=True)
            results.append(run_mode(mode, ckpt, config, args.new_tokens, log_dir, args.load_timeout))
        if not args.no_cli:
            image = work / "scan.png"
            image.write_bytes(base64.b64decode(_image_b64()))
            print("CLI one-shot answer with an image ...", flush=True)
            rc, seconds, peak, out = run_child(
                "cli", [sys.executable, "-m", "llava_med", "chat", "--model-path", str(ckpt), "--dtype", "bfloat16",
                        "--image-file", str(image), "--query", "Describe the lesion.", "--max-new-tokens", "8",
                        "--temperature", "0"], log_dir, args.load_timeout)
            cli = {"rc": rc, "seconds": seconds, "peak": peak, "answer": out.strip()}
            print(f"  exit {rc} in {seconds:.0f} s: {out.strip()[:80]!r}", flush=True)
        bw.append(memory_bandwidth())
    finally:
        if built_root is not None and not args.keep:
            shutil.rmtree(built_root, ignore_errors=True)
            print(f"deleted {built_root}", flush=True)
    text = report(args, bw, build, results, cli, time.perf_counter() - t0)
    publish(None if args.no_write else args.results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
