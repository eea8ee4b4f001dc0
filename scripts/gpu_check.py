"""GPU check of the transformers engine: what a machine with an NVIDIA card runs once (about two minutes). It runs on
a CPU too (``--device cpu``), where the CUDA-only parts say so.

1. **dtype**: the compute dtype chosen for this device and why (bf16 only with native support, fp16 for 8-bit).
2. **padded prefill**: prompts of 1, 37 and ~600 tokens (one with an image) prefilled together and decoded as rows of
   different lengths: every logit finite, and in fp32 the tokens equal each prompt's single run. For the record:
   whether this device's attention returns NaN for a fully masked row (what left padding used to produce).
3. **host syncs** (CUDA): decode steps (model and sampling) under ``torch.cuda.set_sync_debug_mode("error")``; only
   the copy of the sampled tokens afterwards may synchronise.
4. **memory**: the KV pool's size, and ``torch.cuda.max_memory_allocated`` around the admission of 16 long image
   requests through the engine (on a CPU: the process's peak RSS).
5. **speed**: decode tokens/s at batch 1 and 16 through the engine.

The model: ``--model-path``, else LLaVA-Med v1.5 7B when it is in the local Hugging Face cache, else the ~150M
"small" random checkpoint (``--preset``). The figures are printed and appended to benchmarks/RESULTS.md; the exit
status is 1 when a check fails.

    python scripts/gpu_check.py                          # auto device
    python scripts/gpu_check.py --device cpu --preset tiny --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import os
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from bench_results import RESULTS, publish  # scripts/, this script's folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from llava_med.engine.base import EngineRequest  # noqa: E402
from llava_med.engine.hf import BatchingConfig, HFEngine  # noqa: E402
from llava_med.errors import CheckpointError  # noqa: E402
from llava_med.model.args import LoadConfig  # noqa: E402
from llava_med.model.batching import DecodeBatch, KVPool, PoolLayout, format_bytes  # noqa: E402
from llava_med.model.builder import load_pretrained_model, resolve_checkpoint  # noqa: E402
from llava_med.model.dtypes import choose_dtype, resolve_device  # noqa: E402
from llava_med.model.generation import (  # noqa: E402
    SamplingPlan,
    TokenSampler,
    generate_stream,
    prepare_prompt,
    sample_tokens,
)
from llava_med.model.tiny import ensure_checkpoint  # noqa: E402
from llava_med.sampling import SamplingParams  # noqa: E402

REAL_MODEL = "microsoft/llava-med-v1.5-mistral-7b"
IMAGE_PROMPT = "[INST] <image>\nDescribe the lesion in this scan, case {i}. [/INST]"


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (check, PASS/FAIL/INFO, figures)

    def add(self, check: str, ok: bool | None, detail: str) -> None:
        status = "INFO" if ok is None else "PASS" if ok else "FAIL"
        self.rows.append((check, status, detail))
        print(f"[{status}] {check}: {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for _, status, _ in self.rows)


def _image_b64(seed: int) -> str:
    """A distinct noise image per seed (no vision-feature cache hits between requests)."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (336, 336), rng.randbytes(336 * 336 * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _model_path(args: argparse.Namespace) -> tuple[str, str]:
    if args.model_path:
        return args.model_path, args.model_path
    if not args.preset:
        try:
            return str(resolve_checkpoint(REAL_MODEL, local_files_only=True)), REAL_MODEL
        except CheckpointError:
            pass
    preset = args.preset or "small"
    return str(ensure_checkpoint(preset)), f"{preset} random checkpoint (7B not in the local cache)"


def check_dtype(report: Report, cfg: LoadConfig, device: str) -> None:
    dtype, why = choose_dtype(cfg, device)
    if device != "cuda":
        report.add("dtype", None, f"{str(dtype).removeprefix('torch.')} ({why})")
        return
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    native = bool(torch.version.hip) or all(major >= 8 for major, _ in capabilities)
    eight_bit = choose_dtype(LoadConfig(device="cuda", load_8bit=True), "cuda")[0]
    expected = cfg.dtype is not None or cfg.load_8bit or dtype == (torch.bfloat16 if native else torch.float16)
    report.add("dtype", bool(expected and eight_bit == torch.float16),
               f"{str(dtype).removeprefix('torch.')} ({why}); --load-8bit would compute in "
               f"{str(eight_bit).removeprefix('torch.')}")


def check_padded_prefill(report: Report, loaded) -> None:
    model = loaded.model
    image = Image.open(io.BytesIO(base64.b64decode(_image_b64(0))))
    prompts = [("[INST] [/INST]", []), ("[INST] " + "Is the heart enlarged? " * 6 + "[/INST]", []),
               (IMAGE_PROMPT.format(i=0), [image])]
    prepared = [prepare_prompt(loaded, p, imgs) for p, imgs in prompts]
    embeds = []
    for prep in prepared:
        feats = [] if prep.pixel_values is None else list(model.encode_images(prep.pixel_values))
        embeds.append(model.embed_prompt(prep.input_ids, feats))
    lengths = [int(e.shape[0]) for e in embeds]

    # For the record: what this device's attention does with the fully masked rows of left padding.
    longest = max(lengths)
    padded = torch.stack([torch.cat([e.new_zeros(longest - e.shape[0], e.shape[1]), e]) for e in embeds])
    mask = torch.stack([torch.cat([torch.zeros(longest - n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
                        for n in lengths]).to(model.device)
    with torch.inference_mode():
        old = model(inputs_embeds=padded, attention_mask=mask, logits_to_keep=1).logits[:, -1]
    hazard = "NaN" if torch.isnan(old).any() else "finite"
    del old, padded

    steps = 12
    batch = DecodeBatch(model, KVPool(PoolLayout.of(model, loaded.context_len), len(embeds)))
    prefilled = batch.prefill(embeds)
    batch.add(list(range(len(embeds))), prefilled)
    finite = bool(torch.isfinite(prefilled.logits).all())
    tokens = [[t] for t in prefilled.logits.argmax(dim=-1).tolist()]
    for _ in range(steps):
        logits = batch.step([t[-1] for t in tokens])
        finite &= bool(torch.isfinite(logits).all())
        for row, t in zip(tokens, logits.argmax(dim=-1).tolist()):
            row.append(t)
    params = SamplingParams(temperature=0, max_new_tokens=steps + 1, ignore_eos=True)
    alone = [list(list(generate_stream(loaded, p, params))[-1].token_ids) for p in prepared]
    same = sum(a == b for a, b in zip(alone, tokens))
    fp32 = model.embed_tokens.weight.dtype == torch.float32
    report.add("padded prefill", finite and (same == len(tokens) or not fp32),
               f"prompts of {lengths} tokens prefilled together and decoded {steps} steps: every logit "
               f"{'finite' if finite else 'NOT finite'}; {same}/{len(tokens)} rows equal their single run"
               f"{'' if fp32 else ' (not required outside fp32)'}. Left padding with a 2-D mask gives {hazard} "
               "logits on this device")


def check_host_syncs(report: Report, loaded, device: str) -> None:
    if device != "cuda":
        report.add("host syncs", None, "CUDA only (tests/unit/test_kv_pool.py checks the host reads on CPU)")
        return
    model = loaded.model
    batch = DecodeBatch(model, KVPool(PoolLayout.of(model, loaded.context_len), 3))
    embeds = [model.embed_prompt(list(range(5, 5 + n)), []) for n in (4, 30, 17)]
    prefilled = batch.prefill(embeds)
    batch.add([0, 1, 2], prefilled)
    samplers = [TokenSampler(SamplingParams(temperature=0)), TokenSampler(SamplingParams(temperature=0.8, seed=1)),
                TokenSampler(SamplingParams(temperature=0.7, top_p=0.9, seed=2))]
    plan = SamplingPlan(samplers, prefilled.logits.device)
    tokens = sample_tokens(prefilled.logits, samplers, plan).tolist()

    error = None
    for _ in range(4):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = batch.step(tokens, lambda logits: sample_tokens(logits, samplers, plan))
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
            break
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens = out.tolist()
    report.add("host syncs", error is None,
               "4 decode steps of ragged greedy/sampled/top-p rows ran with set_sync_debug_mode('error')"
               if error is None else f"a decode step synchronised: {error}")


def _engine_run(engine: HFEngine, reqs: list[EngineRequest]) -> tuple[float, list]:
    """Run requests through a started engine (each call on its own event loop; the engine is not bound to one)."""
    async def one(req):
        final = None
        async for out in engine.generate_stream(req):
            final = out
        return final

    async def main():
        start = time.perf_counter()
        results = await asyncio.gather(*[one(r) for r in reqs], return_exceptions=True)
        return time.perf_counter() - start, results

    return asyncio.run(main())


def check_memory_and_speed(report: Report, loaded, device: str, new_tokens: int) -> None:
    engine = HFEngine(LoadConfig(), loaded=loaded, batching=BatchingConfig(max_batch_size=16))
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what the checks above cached goes back before the engine sizes its pool
        weights = torch.cuda.memory_allocated()
    asyncio.run(engine.start())
    try:
        pool = engine.pool
        warm = EngineRequest("[INST] Warm up. [/INST]", (), SamplingParams(temperature=0, max_new_tokens=4))
        _engine_run(engine, [warm])
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        images = [EngineRequest(IMAGE_PROMPT.format(i=i), (_image_b64(100 + i),),
                                SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)) for i in range(16)]
        seconds, results = _engine_run(engine, images)
        errors = [r for r in results if isinstance(r, BaseException)]
        prompt_tokens = results[0].num_prompt_tokens if not errors else 0
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            detail = (f"KV pool {pool.describe()}; weights {format_bytes(weights)}; 16 image requests of "
                      f"{prompt_tokens} tokens admitted in {seconds:.1f} s: peak allocated {format_bytes(peak)} "
                      f"(+{format_bytes(peak - before)} over the loaded engine) of {format_bytes(total)}")
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            detail = (f"KV pool {pool.describe()}; 16 image requests of {prompt_tokens} tokens admitted in "
                      f"{seconds:.1f} s; peak RSS {format_bytes(rss)} (+{format_bytes(rss - rss_before)}); "
                      "max_memory_allocated is CUDA only")
        ok = not errors and engine.stats.out_of_memory == 0
        report.add("memory", ok, detail + (f"; {len(errors)} failed: {errors[0]}" if errors else ""))

        speeds, failures = [], []
        for batch in (1, 16):
            reqs = [EngineRequest(f"[INST] Describe the scan of case {i:03d}. [/INST]", (),
                                  SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True))
                    for i in range(batch)]
            seconds, results = _engine_run(engine, reqs)
            failures += [r for r in results if isinstance(r, BaseException)]
            speeds.append(f"batch {batch}: {batch * new_tokens / seconds:.1f} tok/s")
        report.add("decode speed", False if failures else None,
                   f"{'; '.join(speeds)} ({new_tokens} new tokens each, greedy, through the engine)"
                   + (f"; {len(failures)} failed: {failures[0]}" if failures else ""))
    finally:
        asyncio.run(engine.shutdown())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--model-path", default=None, help="a LLaVA-Med checkpoint (default: see above)")
    parser.add_argument("--preset", default=None, choices=["tiny", "small"],
                        help="use this random checkpoint (default: the 7B if cached, else small)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device)
    path, described = _model_path(args)
    cfg = LoadConfig(model_path=path, device=device, dtype=args.dtype, load_8bit=args.load_8bit,
                     load_4bit=args.load_4bit, local_files_only=True)
    name = torch.cuda.get_device_name(torch.cuda.current_device()) if device == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), model {described}", flush=True)
    report = Report()
    check_dtype(report, cfg, device)
    t0 = time.perf_counter()
    loaded = load_pretrained_model(cfg)
    report.add("load", None, f"{described} in {time.perf_counter() - t0:.1f} s as "
                             f"{str(loaded.model.embed_tokens.weight.dtype).removeprefix('torch.')}")
    check_padded_prefill(report, loaded)
    check_host_syncs(report, loaded, device)
    check_memory_and_speed(report, loaded, device, args.new_tokens)
    elapsed = time.perf_counter() - started
    header = (f"## GPU check, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}: {device} ({name})\n\n"
              f"`python scripts/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`; model "
              f"{described}; torch {torch.__version__}"
              f"{', CUDA ' + str(torch.version.cuda) if device == 'cuda' else ''}, {os.cpu_count()} CPUs. "
              f"Run time {elapsed:.0f} s. {'FAILED' if report.failed else 'All checks passed'}.\n")
    table = "\n".join(["| check | result | figures |", "|---|---|---|"]
                      + [f"| {c} | {s} | {d.replace('|', '/')} |" for c, s, d in report.rows])
    publish(None if args.no_write else args.results, header, table)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
