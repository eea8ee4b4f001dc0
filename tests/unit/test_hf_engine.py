"""The continuous-batching engine on the tiny real model: parity with single runs, cancellation, seeds, caching."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import pytest
import torch
from PIL import Image, ImageDraw

from llava_med.constants import ErrorCode
from llava_med.engine.base import EngineRequest
from llava_med.engine.hf import BatchingConfig, EngineBusyError, EngineStoppedError, HFEngine
from llava_med.errors import LlavaMedError
from llava_med.model.builder import LoadConfig
from llava_med.model.generation import generate_stream, prepare_prompt
from llava_med.sampling import SamplingParams

DEADLINE = 60.0


def ereq(prompt: str, images=(), stop=("</s>",), **params) -> EngineRequest:
    """An engine request as the worker builds it (the template's stop string unless ``stop`` says otherwise)."""
    return EngineRequest(prompt, tuple(images), SamplingParams(stop=tuple(stop), **params))


def _b64_image(seed: int) -> str:
    img = Image.new("RGB", (90 + 7 * seed, 70 + 3 * seed), (20 * seed % 255, 120, 200 - 10 * seed))
    ImageDraw.Draw(img).ellipse((10, 10, 50 + seed, 40 + seed), fill=(230, 220, 40 * seed % 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mixed_requests(n: int = 8, **overrides) -> list[EngineRequest]:
    reqs = []
    for i in range(n):
        base = {"temperature": 0.0, "max_new_tokens": 12 + 3 * i, "ignore_eos": True}
        base.update(overrides)
        if i % 2 == 0:
            reqs.append(ereq("[INST] <image>\n" + "Describe the finding. " * (1 + i) + "[/INST]",
                                        images=[_b64_image(i)], **base))
        else:
            reqs.append(ereq("[INST] " + "Is the heart enlarged? " * (2 * i) + "[/INST]", **base))
    return reqs


def _alone(loaded, engine: HFEngine, req: EngineRequest) -> tuple[str, tuple[int, ...]]:
    prepared = prepare_prompt(loaded, req.prompt, req.images)
    final = list(generate_stream(loaded, prepared, req.params))[-1]
    return final.text, final.token_ids


async def _collect(engine: HFEngine, req: EngineRequest, delay: float = 0.0):
    await asyncio.sleep(delay)
    outputs = [o async for o in engine.generate_stream(req)]
    return outputs


def _run(coro_fn, loaded, **batching):
    async def main():
        engine = HFEngine(LoadConfig(), loaded=loaded, batching=BatchingConfig(**batching))
        await engine.start()
        try:
            return await asyncio.wait_for(coro_fn(engine), DEADLINE)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


def test_batched_greedy_equals_each_request_alone(tiny_loaded):
    reqs = _mixed_requests(8)

    async def body(engine):
        # Arrivals 5 ms apart: later ones join a running batch, and all overlap even on a fast machine.
        results = await asyncio.gather(*[_collect(engine, r, delay=0.005 * i) for i, r in enumerate(reqs)])
        return engine, results

    engine, results = _run(body, tiny_loaded, max_batch_size=8)
    assert engine.stats.max_running >= 4, "requests really ran together"
    for req, outputs in zip(reqs, results):
        final = outputs[-1]
        text, tokens = _alone(tiny_loaded, engine, req)
        assert final.finish_reason == "length"
        assert final.token_ids == tokens
        assert final.text == text
        texts = [o.text for o in outputs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_max_batch_size_one_runs_one_at_a_time(tiny_loaded):
    reqs = _mixed_requests(3)

    async def body(engine):
        return engine, await asyncio.gather(*[_collect(engine, r) for r in reqs])

    engine, results = _run(body, tiny_loaded, max_batch_size=1)
    assert engine.stats.max_running == 1
    for req, outputs in zip(reqs, results):
        assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1]


def test_cancelled_request_leaves_within_one_step_others_unchanged(tiny_loaded):
    reqs = _mixed_requests(4)
    # Long enough that it cannot finish on its own while the test looks away, even on a loaded machine.
    victim = ereq("[INST] Describe everything. [/INST]", temperature=0.0, max_new_tokens=1900,
                             ignore_eos=True)

    async def body(engine):
        others = [asyncio.create_task(_collect(engine, r)) for r in reqs]
        stream = engine.generate_stream(victim)
        async for _ in stream:
            break  # the victim is running
        with engine._lock:
            running = next(r for r in list(engine._running.values()) if r.state.params.max_new_tokens == 1900)
        with engine._lock:  # flag it exactly as a disconnect does, and note how many steps it took so far
            running.cancelled = True
            steps_at_cancel = running.steps
        await stream.aclose()
        results = await asyncio.gather(*others)
        return engine, steps_at_cancel, results

    engine, steps_at_cancel, results = _run(body, tiny_loaded, max_batch_size=8)
    cancelled = [r for r in engine.stats.recent if r[1] == "cancelled"]
    assert len(cancelled) == 1
    _, _, victim_steps, victim_tokens = cancelled[0]
    # At most the step already in flight when the flag was set still includes it.
    assert victim_steps <= steps_at_cancel + 1
    assert len(victim_tokens) < 1900
    for req, outputs in zip(reqs, results):
        assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1]
    assert engine.queue_length() == 0


def test_seeded_sampling_same_alone_and_batched(tiny_loaded):
    sampled = _mixed_requests(6, temperature=0.8, top_p=0.9, seed=1234)

    async def body(engine):
        return engine, await asyncio.gather(*[_collect(engine, r, 0.01 * i) for i, r in enumerate(sampled)])

    engine, results = _run(body, tiny_loaded, max_batch_size=6)
    for req, outputs in zip(sampled, results):
        assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1]
    greedy_tokens = _alone(tiny_loaded, engine, _mixed_requests(1)[0])[1]
    assert results[0][-1].token_ids != greedy_tokens, "sampling really sampled"


def test_same_image_reuses_vision_features(tiny_loaded):
    image = _b64_image(3)
    first = ereq("[INST] <image>\nWhat is it? [/INST]", images=[image], temperature=0,
                            max_new_tokens=4)
    later_turn = ereq("[INST] <image>\nWhat is it? [/INST] A scan. </s>[INST] Where? [/INST]",
                                 images=[image], temperature=0, max_new_tokens=4)
    other = ereq("[INST] <image>\nWhat is it? [/INST]", images=[_b64_image(4)], temperature=0,
                            max_new_tokens=4)

    async def body(engine):
        await _collect(engine, first)
        encoded_after_first = engine.stats.vision_images_encoded
        await _collect(engine, later_turn)
        encoded_after_second = engine.stats.vision_images_encoded
        await _collect(engine, other)
        return engine, encoded_after_first, encoded_after_second

    engine, a, b = _run(body, tiny_loaded)
    assert a == 1
    assert b == 1, "the second request with the same image must not run the vision tower"
    assert engine.stats.vision_cache_hits == 1
    assert engine.stats.vision_images_encoded == 2


def test_full_queue_answers_busy_and_keeps_serving(tiny_loaded):
    long = ereq("[INST] hello [/INST]", temperature=0, max_new_tokens=400, ignore_eos=True)
    short = ereq("[INST] hi [/INST]", temperature=0, max_new_tokens=3)

    async def body(engine):
        running = engine.generate_stream(long)
        await running.__anext__()  # the long request is in the batch
        waiting = asyncio.create_task(_collect(engine, short))
        deadline = time.monotonic() + DEADLINE
        while engine.queue_length() < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineBusyError, match="busy") as info:
            await _collect(engine, short)
        assert info.value.code == ErrorCode.ENGINE_OVERLOADED
        await running.aclose()
        result = await waiting
        assert result[-1].finish_reason in ("stop", "length")
        return True

    assert _run(body, tiny_loaded, max_batch_size=1, max_queue=1)


def test_failure_in_one_request_fails_only_that_request(tiny_loaded, monkeypatch):
    reqs = _mixed_requests(3)
    bad = ereq("[INST] BOOM please [/INST]", temperature=0, max_new_tokens=5)

    async def body(engine):
        original = engine._embed

        def flaky(batch_reqs):
            for req in batch_reqs:
                if "BOOM" in engine.loaded.tokenizer.decode([t for t in req.prepared.input_ids if t >= 0]):
                    raise RuntimeError("injected prefill failure")
            return original(batch_reqs)

        monkeypatch.setattr(engine, "_embed", flaky)
        tasks = [asyncio.create_task(_collect(engine, r)) for r in reqs]
        # Submitted together, so the bad request is likely embedded in the same call as good ones.
        with pytest.raises(LlavaMedError, match="injected prefill failure"):
            await _collect(engine, bad)
        return engine, await asyncio.gather(*tasks)

    engine, results = _run(body, tiny_loaded, max_batch_size=4)
    assert engine.stats.failed == 1
    for req, outputs in zip(reqs, results):
        assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1]


def test_bad_inputs_raise_typed_errors(tiny_loaded, tmp_path):
    local_png = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(local_png)

    async def body(engine):
        cases = [
            (ereq("[INST] <image>\nhi [/INST]"), ErrorCode.IMAGE_COUNT_MISMATCH),
            (ereq("[INST] <image>\nhi [/INST]", images=["bm90IGFuIGltYWdl"]), ErrorCode.BAD_IMAGE),
            (ereq("[INST] " + "lung " * 3000 + "[/INST]"), ErrorCode.CONTEXT_OVERFLOW),
            # A request can never make the worker read a local file: image strings are base64 only.
            (ereq("[INST] <image>\nhi [/INST]", images=[str(local_png)]), ErrorCode.BAD_IMAGE),
        ]
        for req, code in cases:
            with pytest.raises(LlavaMedError) as info:
                await _collect(engine, req)
            assert info.value.code == code
        ok = await _collect(engine, ereq("[INST] hi [/INST]", temperature=0, max_new_tokens=3))
        return ok

    ok = _run(body, tiny_loaded)
    assert ok[-1].finish_reason in ("stop", "length")


def test_requests_prefilled_together_match_alone(tiny_loaded):
    """Requests arriving at once are prefilled in left-padded groups; each still gets its single-run tokens."""
    reqs = _mixed_requests(8)
    reqs += [ereq("[INST] Is the heart enlarged? [/INST]", temperature=0.0, max_new_tokens=9,
                             ignore_eos=True),
             ereq("[INST] Is the liver enlarged today? [/INST]", temperature=0.0,
                             max_new_tokens=9, ignore_eos=True)]

    async def body(engine):
        return engine, await asyncio.gather(*[_collect(engine, r) for r in reqs])

    engine, results = _run(body, tiny_loaded, max_batch_size=16)
    assert engine.stats.prefill_calls < engine.stats.prefills, "some requests were prefilled together"
    for req, outputs in zip(reqs, results):
        assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1]


def test_cancelled_waiting_requests_free_their_queue_slots(tiny_loaded):
    """Clients that leave while queued stop counting at once: the next request is not refused as busy."""
    long = ereq("[INST] hello [/INST]", temperature=0, max_new_tokens=1500, ignore_eos=True)
    short = ereq("[INST] hi [/INST]", temperature=0, max_new_tokens=3)

    async def body(engine):
        running = engine.generate_stream(long)
        await running.__anext__()
        waiting = [asyncio.create_task(_collect(engine, short)) for _ in range(2)]
        deadline = time.monotonic() + DEADLINE
        while engine.queue_length() < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.queue_length() == 3
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert engine.queue_length() == 1, "only the running request still counts"
        assert len(engine._waiting) == 0
        ok = asyncio.create_task(_collect(engine, short))  # queue has room again: not refused as busy
        await asyncio.sleep(0.05)
        await running.aclose()
        return await ok

    result = _run(body, tiny_loaded, max_batch_size=1, max_queue=2)
    assert result[-1].finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------------------------------------------
# Memory: a KV pool allocated once, admission by free slots, failures that stay with their request.

def _hold_admission_until(engine: HFEngine, waiting: int) -> None:
    """Let the scheduler admit nothing until ``waiting`` requests are queued, so that they are prefilled together."""
    original = engine._take_admissible

    def take(running):
        if len(engine._waiting) < waiting and not engine._running:
            return []
        engine._take_admissible = original
        return original(running)

    engine._take_admissible = take


def test_admission_is_bounded_by_the_kv_cache_memory(tiny_loaded):
    reqs = _mixed_requests(5)
    slot = 2**20  # tiny: 512 bytes per token x 2048 tokens

    async def body(engine):
        pointers = [t.data_ptr() for t in (*engine.pool.keys, *engine.pool.values)]
        status = engine.kv_cache_status()
        results = await asyncio.gather(*[_collect(engine, r) for r in reqs])
        return engine, pointers, status, results

    engine, pointers, status, results = _run(body, tiny_loaded, max_batch_size=16, kv_cache_memory=2 * slot + 1000)
    assert status == {"slots": 2, "slots_used": 0, "slot_tokens": 2048, "tokens_used": 0, "bytes": 2 * slot}
    assert engine.stats.max_running == 2, "two slots: the others waited for a free one"
    for req, outputs in zip(reqs, results):
        assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1]
    assert engine.pool is None, "shutdown gives the pool back"
    assert len(set(pointers)) == 4


def test_out_of_memory_in_a_joint_prefill_fails_only_the_request_that_caused_it(tiny_loaded, monkeypatch):
    from llava_med.model.batching import DecodeBatch

    good = [ereq("[INST] Is the heart enlarged? " + "Look closely. " * i + "[/INST]", temperature=0,
                 max_new_tokens=6, ignore_eos=True) for i in range(3)]
    bad = ereq("[INST] Is the heart enlarged? Look. Look. Look. Look. Look. [/INST]", temperature=0, max_new_tokens=6)
    group_sizes = []

    async def body(engine):
        marker = engine.count_tokens(bad.prompt)
        assert marker not in {engine.count_tokens(r.prompt) for r in good}
        original = DecodeBatch.prefill

        def prefill(batch, embeds):
            if any(int(e.shape[0]) == marker for e in embeds):
                group_sizes.append(len(embeds))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return original(batch, embeds)

        monkeypatch.setattr(DecodeBatch, "prefill", prefill)
        _hold_admission_until(engine, 4)
        tasks = [asyncio.create_task(_collect(engine, r)) for r in [*good, bad]]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        after = await _collect(engine, good[0])  # the engine keeps serving
        return engine, results, after

    engine, results, after = _run(body, tiny_loaded, max_batch_size=8)
    assert group_sizes[0] > 1 and group_sizes[-1] == 1, "tried together first, then alone"
    assert isinstance(results[-1], LlavaMedError) and results[-1].code == ErrorCode.OUT_OF_MEMORY
    assert "out of memory" in str(results[-1])
    for req, outputs in zip(good, results[:-1]):
        assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1]
    assert after[-1].token_ids == _alone(tiny_loaded, engine, good[0])[1]
    assert engine.stats.out_of_memory == 1 and engine.stats.failed == 1


def test_out_of_memory_in_a_decode_step_fails_the_newest_request(tiny_loaded, monkeypatch):
    from llava_med.model.batching import DecodeBatch

    reqs = [ereq(f"[INST] Describe case {i}. [/INST]", temperature=0, max_new_tokens=60 + i, ignore_eos=True)
            for i in range(3)]
    raised = []

    async def body(engine):
        original = DecodeBatch.step

        def step(batch, tokens, then=lambda logits: logits):
            if len(batch) == 3 and not raised:  # which request arrived last (the newest): its max_new_tokens
                raised.append(engine._running[max(batch.row_ids)].state.params.max_new_tokens - 60)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (simulated)")
            return original(batch, tokens, then)

        monkeypatch.setattr(DecodeBatch, "step", step)
        _hold_admission_until(engine, 3)
        results = await asyncio.gather(*[_collect(engine, r) for r in reqs], return_exceptions=True)
        after = await _collect(engine, ereq("[INST] hi [/INST]", temperature=0, max_new_tokens=3))
        return engine, results, after

    engine, results, after = _run(body, tiny_loaded, max_batch_size=8)
    assert raised, "the three requests ran together"
    newest = raised[0]
    for i, (req, outputs) in enumerate(zip(reqs, results)):
        if i == newest:
            assert isinstance(outputs, LlavaMedError) and outputs.code == ErrorCode.OUT_OF_MEMORY
        else:
            assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1], "the others went on unchanged"
    assert after[-1].finish_reason in ("stop", "length")


def test_non_finite_logits_fail_only_their_request(tiny_loaded, monkeypatch):
    from llava_med.model.batching import DecodeBatch

    reqs = _mixed_requests(3)
    poisoned = ereq("[INST] poison [/INST]", temperature=0.7, top_p=0.9, seed=3, max_new_tokens=77, ignore_eos=True)

    async def body(engine):
        original = DecodeBatch.step

        def step(batch, tokens, then=lambda logits: logits):
            rows = [i for i, rid in enumerate(batch.row_ids) if rid in engine._running
                    and engine._running[rid].state.params.max_new_tokens == 77]

            def poison(logits):
                if rows and engine._running[batch.row_ids[rows[0]]].steps >= 2:
                    logits = logits.clone()
                    logits[rows[0], 5] = float("nan")
                return then(logits)

            return original(batch, tokens, poison)

        monkeypatch.setattr(DecodeBatch, "step", step)
        return engine, await asyncio.gather(*[_collect(engine, r) for r in [*reqs, poisoned]],
                                            return_exceptions=True)

    engine, results = _run(body, tiny_loaded, max_batch_size=8)
    assert isinstance(results[-1], LlavaMedError) and "non-finite logits" in str(results[-1])
    for req, outputs in zip(reqs, results[:-1]):
        assert outputs[-1].token_ids == _alone(tiny_loaded, engine, req)[1]


@pytest.mark.parametrize("device_broken", [False, True], ids=["device-still-works", "sticky-cuda-error"])
def test_a_device_error_fails_its_step_and_a_broken_device_stops_the_engine(tiny_loaded, monkeypatch, device_broken):
    from llava_med.model.batching import DecodeBatch

    message = "CUDA error: an illegal memory access was encountered"
    victim = ereq("[INST] hello [/INST]", temperature=0, max_new_tokens=50, ignore_eos=True)
    original = DecodeBatch.step
    failures = []

    def step(batch, tokens, then=lambda logits: logits):
        if not failures:
            failures.append(1)
            raise torch.AcceleratorError(message)
        return original(batch, tokens, then)

    async def body(engine):
        monkeypatch.setattr(DecodeBatch, "step", step)
        monkeypatch.setattr(engine, "_probe_device", lambda: message if device_broken else None)
        with pytest.raises(LlavaMedError, match="illegal memory access"):
            await _collect(engine, victim)
        if device_broken:
            deadline = time.monotonic() + DEADLINE
            while engine.ready and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            with pytest.raises(EngineStoppedError, match="restart the worker"):
                await _collect(engine, victim)
            return engine, (engine.ready, engine.health_error), None
        after = await _collect(engine, victim)
        return engine, (engine.ready, engine.health_error), after

    engine, (ready, health_error), after = _run(body, tiny_loaded)
    if device_broken:
        assert not ready and "illegal memory access" in health_error
    else:
        assert ready and health_error is None
        assert after[-1].token_ids == _alone(tiny_loaded, engine, victim)[1]


@pytest.fixture(scope="module")
def tiny_loaded_bf16(tiny_checkpoint):
    from llava_med.model.builder import load_pretrained_model

    return load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), dtype="bfloat16"))


def test_bf16_batched_stays_close_to_alone(tiny_loaded_bf16):
    """Batched == alone holds exactly in fp32 only (the tests above pin it). In bf16 the batch's other rows change
    kernel shapes and rounding, so a near-tie can flip and a row part from its single run after a few tokens
    (measured on the tiny model: 1 of these 8 requests at token 10; 5 of 16 between tokens 2 and 27). What bf16
    promises: every row starts like its single run, and most rows stay identical for their first 8 tokens."""
    reqs = _mixed_requests(8)

    async def body(engine):
        return engine, await asyncio.gather(*[_collect(engine, r) for r in reqs])

    engine, results = _run(body, tiny_loaded_bf16, max_batch_size=8)
    alone = [_alone(tiny_loaded_bf16, engine, r)[1] for r in reqs]
    batched = [outputs[-1].token_ids for outputs in results]
    assert all(a[:2] == b[:2] for a, b in zip(alone, batched))
    assert sum(a[:8] == b[:8] for a, b in zip(alone, batched)) >= 6
