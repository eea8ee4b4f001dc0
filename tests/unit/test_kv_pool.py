"""The KV pool and the decode batch on the tiny real model: masks that never leave a row with nothing to attend to,
memory allocated once, rows that move without copying the cache, sizing, and vectorised sampling equal to the
row-by-row sampler it replaced."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from llava_med.constants import ErrorCode
from llava_med.errors import LlavaMedError
from llava_med.model.batching import DecodeBatch, KVPool, PoolLayout, pool_slots
from llava_med.model.generation import SamplingPlan, TokenSampler, sample_tokens
from llava_med.sampling import SamplingParams

_REAL_SDPA = torch.nn.functional.scaled_dot_product_attention


def _cuda_like_sdpa(query, key, value, attn_mask=None, **kwargs):
    """SDPA as some CUDA kernels behave (torch 2.13): a query row whose mask hides every key comes out as NaN (the
    CPU kernels return zeros, which is why this never showed on CPUs)."""
    out = _REAL_SDPA(query, key, value, attn_mask=attn_mask, **kwargs)
    if attn_mask is not None:
        visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min
        out = out.masked_fill(~visible.any(dim=-1, keepdim=True), float("nan"))
    return out


def _embeds(loaded, n: int, seed: int) -> torch.Tensor:
    ids = random.Random(seed).choices(range(3, loaded.model.config.vocab_size), k=n)
    return loaded.model.embed_prompt(ids, [])


def _pool(loaded, slots: int = 4) -> KVPool:
    return KVPool(PoolLayout.of(loaded.model, loaded.context_len), slots)


def _greedy_alone(loaded, embeds: torch.Tensor, steps: int) -> list[int]:
    batch = DecodeBatch(loaded.model, _pool(loaded, 1))
    prefilled = batch.prefill([embeds])
    batch.add(["alone"], prefilled)
    tokens = [int(prefilled.logits[0].argmax())]
    for _ in range(steps):
        tokens.append(int(batch.step([tokens[-1]])[0].argmax()))
    return tokens


def test_cuda_like_attention_breaks_left_padding_but_not_the_pool(tiny_loaded, monkeypatch):
    """The fully masked case forced: one prompt of 1 token prefilled with one of 40, then decoded together."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _cuda_like_sdpa)
    model = tiny_loaded.model
    short, long = _embeds(tiny_loaded, 1, 1), _embeds(tiny_loaded, 40, 2)

    # What the engine did before: left padding and a 2-D mask. The pad queries of the short row see nothing, come
    # out as NaN under this attention, and the NaN reaches the real token through the next layer.
    padded = torch.stack([torch.cat([short.new_zeros(39, short.shape[1]), short]), long])
    mask = torch.tensor([[0] * 39 + [1], [1] * 40])
    with torch.inference_mode():
        old = model(inputs_embeds=padded, attention_mask=mask, logits_to_keep=1).logits[:, -1]
    assert torch.isnan(old[0]).all(), "the emulation must reproduce the failure it guards against"

    batch = DecodeBatch(model, _pool(tiny_loaded))
    batch.cache.for_prefill(0, 2)  # what DecodeBatch.prefill does, keeping the logits of every position
    right_padded = torch.stack([torch.cat([short, short.new_zeros(39, short.shape[1])]), long])
    with torch.inference_mode():
        every_position = model.logits(model.hidden_states(inputs_embeds=right_padded, cache=batch.cache))
    assert torch.isfinite(every_position).all(), "right padding: every query row, pads included, sees a key"

    prefilled = batch.prefill([short, long])
    assert torch.isfinite(prefilled.logits).all()
    batch.add(["short", "long"], prefilled)
    tokens = [[int(t)] for t in prefilled.logits.argmax(dim=-1)]
    for _ in range(6):  # rows of different lengths: the 4-D decode mask is in use
        logits = batch.step([t[-1] for t in tokens])
        assert torch.isfinite(logits).all()
        for row, t in zip(tokens, logits.argmax(dim=-1)):
            row.append(int(t))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _REAL_SDPA)
    assert tokens == [_greedy_alone(tiny_loaded, short, 6), _greedy_alone(tiny_loaded, long, 6)]


def test_pool_is_allocated_once_and_rows_move_one_at_a_time(tiny_loaded, monkeypatch):
    pool = _pool(tiny_loaded, 4)
    pointers = [t.data_ptr() for t in (*pool.keys, *pool.values)]
    moves = []
    real_move = pool.move
    monkeypatch.setattr(pool, "move", lambda src, dst, n: (moves.append((src, dst, n)), real_move(src, dst, n)))
    batch = DecodeBatch(tiny_loaded.model, pool)
    prompts = {name: _embeds(tiny_loaded, n, i) for i, (name, n) in enumerate([("a", 5), ("b", 9), ("c", 7)])}
    tokens: dict[str, list[int]] = {}
    for name, embeds in prompts.items():
        prefilled = batch.prefill([embeds])
        batch.add([name], prefilled)
        tokens[name] = [int(prefilled.logits[0].argmax())]
    for step in range(5):
        logits = batch.step([tokens[n][-1] for n in batch.row_ids])
        for name, t in zip(list(batch.row_ids), logits.argmax(dim=-1)):
            tokens[name].append(int(t))
        if step == 1:
            batch.remove(["a"])  # the last row, c, moves into a's slot; b stays where it is
            assert batch.row_ids == ["c", "b"] and moves == [(2, 0, 7 + 2)]
    assert batch.free_slots == 2 and batch.tokens == (7 + 5) + (9 + 5)
    with pytest.raises(RuntimeError, match="free KV-cache slots"):
        batch.prefill([prompts["a"]] * 3)
    assert [t.data_ptr() for t in (*pool.keys, *pool.values)] == pointers, "no buffer was reallocated"
    assert tokens["b"] == _greedy_alone(tiny_loaded, prompts["b"], 5)
    assert tokens["c"] == _greedy_alone(tiny_loaded, prompts["c"], 5)
    assert tokens["a"] == _greedy_alone(tiny_loaded, prompts["a"], 2)


def test_rows_that_end_at_their_prefill_leave_no_gap(tiny_loaded):
    batch = DecodeBatch(tiny_loaded.model, _pool(tiny_loaded, 4))
    group = [_embeds(tiny_loaded, 6, 10), _embeds(tiny_loaded, 6, 11), _embeds(tiny_loaded, 7, 12)]
    prefilled = batch.prefill(group)
    batch.add(["x", "y", "z"], prefilled, keep=[0, 2])  # y finished at its first token
    assert batch.row_ids == ["x", "z"] and batch.lengths == [6, 7]
    first = [int(t) for t in prefilled.logits.argmax(dim=-1)]
    logits = batch.step([first[0], first[2]])
    assert [first[0], int(logits[0].argmax())] == _greedy_alone(tiny_loaded, group[0], 1)
    assert [first[2], int(logits[1].argmax())] == _greedy_alone(tiny_loaded, group[2], 1)


class _HostReads(TorchFunctionMode):
    """Records the tensor operations that read device memory from the host (each one is a sync on a GPU)."""

    READS = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prompts", [("[INST] hi [/INST]", "[INST] Is the heart enlarged at all? [/INST]",
                                      "[INST] Describe it. [/INST]"),
                                     ("[INST] Case 1. [/INST]", "[INST] Case 2. [/INST]", "[INST] Case 3. [/INST]")],
                         ids=["ragged-rows", "equal-rows"])
def test_an_engine_decode_step_reads_the_device_once(tiny_loaded, prompts):
    """The engine's decode steps (with the 4-D mask for ragged rows, without a mask for equal ones; greedy, plain and
    top-p rows sampled together): the one copy of the sampled tokens is the only read of device memory (on a GPU,
    the only sync). transformers' own mask code would read: it checks whether a 2-D mask is all ones."""
    from llava_med.engine.base import EngineRequest
    from llava_med.engine.hf import BatchingConfig, HFEngine
    from llava_med.model.args import LoadConfig

    kinds = [dict(temperature=0), dict(temperature=0.8, seed=1), dict(temperature=0.7, top_p=0.9, seed=2)]
    reqs = [EngineRequest(p, (), SamplingParams(max_new_tokens=12, ignore_eos=True, **k)) for p, k in zip(prompts, kinds)]
    reads: list[list[str]] = []
    lengths: list[tuple[int, ...]] = []

    async def main():
        engine = HFEngine(LoadConfig(), loaded=tiny_loaded, batching=BatchingConfig(stream_min_interval=0))
        await engine.start()
        original_step, original_take = engine._step, engine._take_admissible

        def take(running):  # admit the three together
            return original_take(running) if len(engine._waiting) == 3 or engine._running else []

        def step(batch, admitted):
            if admitted or not len(batch):
                return original_step(batch, admitted)
            lengths.append(tuple(batch.lengths))
            with _HostReads() as mode:
                original_step(batch, admitted)
            reads.append(mode.reads)

        engine._step, engine._take_admissible = step, take
        try:
            async def run(req):
                return [o async for o in engine.generate_stream(req)]

            return await asyncio.wait_for(asyncio.gather(*[run(r) for r in reqs]), 60)
        finally:
            await engine.shutdown()

    results = asyncio.run(main())
    assert all(r[-1].num_generated_tokens == 12 for r in results)
    # 12 tokens: one from the prefill, one from the step of the same iteration, then 10 decode-only iterations.
    assert len(reads) == 10 and all(r == ["tolist"] for r in reads), reads
    assert (len(set(lengths[0])) > 1) == (prompts[0] == "[INST] hi [/INST]")


def _old_sampler(params: SamplingParams, generator: torch.Generator, logits: torch.Tensor) -> int:
    """The row-by-row CPU sampler the engine used before (verbatim), as the reference for the same seeds."""
    scaled = logits.detach().float().cpu() / params.temperature
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def test_vectorised_sampling_draws_what_the_row_by_row_sampler_drew():
    """Same seeds, same tokens, in fp32 with a 32,000-word vocabulary, rows of every kind mixed in one batch."""
    kinds = [dict(temperature=0.7, top_p=0.9), dict(temperature=1.0), dict(temperature=0.2, top_p=0.7),
             dict(temperature=0.0), dict(temperature=1.3, top_p=0.5), dict(temperature=0.9, top_p=1.0)]
    params = [SamplingParams(seed=100 + i, **kinds[i % len(kinds)]) for i in range(12)]
    samplers = [TokenSampler(p) for p in params]
    references = [torch.Generator().manual_seed(p.seed) for p in params]
    gen = torch.Generator().manual_seed(0)
    plan = SamplingPlan(samplers, "cpu")
    for step in range(10):
        logits = torch.randn(len(params), 32000, generator=gen) * (1 + step % 4)
        got = sample_tokens(logits, samplers, plan).tolist()
        want = [int(row.argmax()) if p.greedy else _old_sampler(p, g, row)
                for p, g, row in zip(params, references, logits)]
        assert got == want
    alone = TokenSampler(params[0])  # one row at a time (the CLI) draws the same as inside the batch
    again = [alone(torch.randn(32000, generator=torch.Generator().manual_seed(k))) for k in range(5)]
    reference = torch.Generator().manual_seed(params[0].seed)
    assert again == [_old_sampler(params[0], reference, torch.randn(32000, generator=torch.Generator().manual_seed(k)))
                     for k in range(5)]


def test_rows_that_cannot_be_sampled_are_marked():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    logits[0, 7] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, :50] = float("-inf")  # masked words are fine: the row still has finite ones
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.9, seed=1)):
        tokens = sample_tokens(logits, [TokenSampler(params) for _ in range(5)]).tolist()
        assert tokens[:3] == [-1, -1, -1] and 50 <= tokens[3] < 100 and tokens[4] >= 0
    from llava_med.model.generation import NonFiniteLogitsError

    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
        TokenSampler(SamplingParams(temperature=0))(logits[0])


def test_pool_size_from_memory_or_free_memory(tiny_loaded):
    layout = PoolLayout.of(tiny_loaded.model, 2048)
    # tiny: 2 layers x (K, V) x 2 heads x 16 dims x 4 bytes = 512 bytes per token, 1 MiB per slot of 2048 tokens.
    assert layout.bytes_per_token == 512 and layout.bytes_per_slot == 2**20
    assert pool_slots(layout, max_slots=16, memory=3 * 2**20 + 5)[0] == 3
    assert pool_slots(layout, max_slots=2, memory=3 * 2**20)[0] == 2
    slots, why = pool_slots(layout, max_slots=64, fraction=0.5, free=lambda device: 20 * 2**20)
    assert slots == 10 and "0.5 of the 20.00 MiB free on cpu" in why
    with pytest.raises(LlavaMedError, match="no room for one request") as info:
        pool_slots(layout, max_slots=16, memory=2**19)
    assert info.value.code == ErrorCode.OUT_OF_MEMORY


def test_kv_cache_memory_flag_takes_sizes(capsys):
    from llava_med.engine.hf import HFEngine
    from llava_med.serve.launch import build_parser, config_from_args
    from llava_med.serve.model_worker import parse_args

    for text, size in (("6GiB", 6 * 2**30), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("4096", 4096)):
        args = parse_args(["--kv-cache-memory", text, "--kv-cache-fraction", "0.5"])
        engine = HFEngine.from_args(args)
        assert (engine.batching.kv_cache_memory, engine.batching.kv_cache_fraction) == (size, 0.5)
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-memory", "lots"])
    assert "'lots' is not a size" in capsys.readouterr().err
    launched = config_from_args(build_parser().parse_args(["--kv-cache-memory", "2GiB", "--device", "cpu"]))
    assert parse_args(launched.worker_args).kv_cache_memory == 2 * 2**30  # passed on to every worker


def test_a_pool_that_cannot_be_allocated_says_so(tiny_loaded, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(torch, "zeros", no_memory)
    with pytest.raises(LlavaMedError, match="allocating the KV cache .*--kv-cache-memory") as info:
        _pool(tiny_loaded, 4)
    assert info.value.code == ErrorCode.OUT_OF_MEMORY
