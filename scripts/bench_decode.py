"""Decode-loop benchmark of the transformers engine: this tree against another revision, side by side in one run.

The engine is driven directly (no HTTP): for each batch size, that many text requests of equal length are submitted at
once and decode ``--new-tokens`` tokens each (``ignore_eos``), greedy and with seeded top-p sampling. Then sampling
alone, at the chat defaults over a 32,000-word vocabulary (the tiny model's is 1,000), one step of each batch size. Each revision runs
in its own process (its ``llava_med`` extracted with ``git archive``, first on ``PYTHONPATH``), alternating
``--repeats`` times so that both see the same machine; the median is reported. The table is printed and appended to
benchmarks/RESULTS.md.

    python scripts/bench_decode.py                          # this tree vs the merge base with main, tiny model
    python scripts/bench_decode.py --baseline HEAD~3 --models tiny,small --threads 1 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from bench_results import RESULTS, publish  # scripts/, this script's folder

ROOT = Path(__file__).resolve().parent.parent
MODES = {"greedy": {"temperature": 0.0}, "top-p": {"temperature": 0.7, "top_p": 0.9}}


def measure(models: list[str], batches: list[int], new_tokens: int, threads: int | None) -> list[dict]:
    """Run in a child process whose ``llava_med`` is the revision under test."""
    import torch

    import llava_med
    from llava_med.engine.base import EngineRequest
    from llava_med.engine.hf import BatchingConfig, HFEngine
    from llava_med.model.builder import LoadConfig, load_pretrained_model
    from llava_med.model.tiny import ensure_checkpoint
    from llava_med.sampling import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    rows = []
    for model in models:
        config = LoadConfig(model_path=str(ensure_checkpoint(model)), dtype="float32")
        loaded = load_pretrained_model(config)

        async def run(engine, reqs):
            async def one(req):
                async for _ in engine.generate_stream(req):
                    pass

            steps = engine.stats.steps
            start = time.perf_counter()
            await asyncio.gather(*[one(r) for r in reqs])
            return time.perf_counter() - start, engine.stats.steps - steps

        async def main():
            out = []
            engine = HFEngine(config, loaded=loaded, batching=BatchingConfig(max_batch_size=max(batches)))
            await engine.start()
            try:
                warm = SamplingParams(max_new_tokens=8, ignore_eos=True, seed=0, **MODES["top-p"])
                await run(engine, [EngineRequest("[INST] Warm up. [/INST]", (), warm)] * 2)
                for mode, sampling in MODES.items():
                    for batch in batches:
                        reqs = [EngineRequest(f"[INST] Describe the scan of case {i:03d}. [/INST]", (),
                                              SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=i,
                                                             **sampling)) for i in range(batch)]
                        seconds, steps = await run(engine, reqs)
                        out.append({"model": model, "mode": mode, "batch": batch, "seconds": seconds,
                                    "steps": steps, "tokens": batch * new_tokens})
            finally:
                await engine.shutdown()
            return out

        rows += asyncio.run(main())
    rows += [measure_sampler(batch) for batch in batches]
    print(f"llava_med from {Path(llava_med.__file__).parent}", file=sys.stderr)
    return rows


def measure_sampler(batch: int, vocab: int = 32000, steps: int = 30) -> dict:
    """Sampling alone, at the chat defaults (temperature 0.2, top-p 0.7) over LLaVA-Med's 32,000-word vocabulary:
    the revision's batch sampler if it has one, else its row-by-row sampler."""
    import torch

    from llava_med.model import generation
    from llava_med.sampling import CHAT_DEFAULTS

    samplers = [generation.TokenSampler(CHAT_DEFAULTS.replace(seed=i)) for i in range(batch)]
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3
    if hasattr(generation, "sample_tokens"):
        plan = generation.SamplingPlan(samplers, logits.device)

        def sample():
            return generation.sample_tokens(logits, samplers, plan).tolist()
    else:
        def sample():
            return [sampler(row) for sampler, row in zip(samplers, logits)]
    sample()
    start = time.perf_counter()
    for _ in range(steps):
        sample()
    return {"model": f"sampler alone, vocabulary {vocab}", "mode": "top-p 0.7", "batch": batch,
            "seconds": time.perf_counter() - start, "steps": steps, "tokens": batch * steps}


def _extract(revision: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "llava_med"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _child(source: Path, args: argparse.Namespace) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(source))
    out = subprocess.run([sys.executable, __file__, "--child", "--models", args.models, "--batch", args.batch,
                          "--new-tokens", str(args.new_tokens), "--threads", str(args.threads or 0)], env=env, check=True, capture_output=True, text=True,
                         timeout=1800)
    used = [line for line in out.stderr.splitlines() if line.startswith("llava_med from ")]
    if not used or Path(used[-1].removeprefix("llava_med from ")).parent != source:
        raise RuntimeError(f"the child did not import llava_med from {source}: {used}")
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None,
                        help="git revision to compare with (default: the merge base of HEAD and main)")
    parser.add_argument("--models", default="tiny", help="comma-separated presets (tiny, small)")
    parser.add_argument("--batch", default="1,16", help="batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each run (default: torch's own; 1 keeps a busy shared machine from "
                             "slowing multi-threaded operations down unevenly)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batch.split(",")]
    if args.child:
        print(json.dumps(measure(models, batches, args.new_tokens, args.threads or None)))
        return 0

    baseline = args.baseline or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True,
                                               capture_output=True, text=True).stdout.strip()
    label = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", baseline], check=True,
                           capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "llava_med"], check=True,
                           capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    sources = {"baseline": _extract(baseline, tmp / "baseline"), "this": ROOT}
    runs: dict[str, list[list[dict]]] = {"baseline": [], "this": []}
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    for r in range(args.repeats):
        for name, source in sources.items():  # alternate, so that both see the same machine
            runs[name].append(_child(source, args))
            print(f"  repeat {r + 1}/{args.repeats}: {name} done", flush=True)

    def median(name: str, i: int, key: str) -> float:
        return statistics.median(run[i][key] for run in runs[name])

    lines = ["| model | sampling | batch | baseline tok/s | this tok/s | ratio | ms/step baseline / this |",
             "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(runs["this"][0]):
        old, new = median("baseline", i, "seconds"), median("this", i, "seconds")
        steps_old, steps_new = median("baseline", i, "steps"), median("this", i, "steps")
        lines.append(f"| {row['model']} | {row['mode']} | {row['batch']} | {row['tokens'] / old:.0f} | "
                     f"{row['tokens'] / new:.0f} | **{old / new:.2f}x** | {1000 * old / steps_old:.2f} / "
                     f"{1000 * new / steps_new:.2f} |")
    table = "\n".join(lines)
    import torch

    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    header = (
        f"## Decode loop, this tree vs {label}, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`python scripts/bench_decode.py --models {args.models} --batch {args.batch} --new-tokens "
        f"{args.new_tokens} --repeats {args.repeats}{f' --threads {args.threads}' if args.threads else ''}` at {head}{' + uncommitted changes' if dirty else ''}; "
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
        f"{torch.__version__}, device cpu, fp32, {args.threads or torch.get_num_threads()} torch thread(s), {load}. "
        f"The engine driven directly (no HTTP): per batch size, that many text "
        f"requests of equal length submitted at once, {args.new_tokens} new tokens each; then sampling alone (chat "
        f"defaults, 32,000 words; ms/step is per sampled batch); median of {args.repeats} alternating runs per "
        f"revision; ratio > 1 means this tree is faster. Run time "
        f"{time.perf_counter() - started:.0f} s.\n"
    )
    publish(None if args.no_write else args.results, header, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
