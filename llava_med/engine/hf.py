"""The transformers engine: one loaded LLaVA-Med model serving every request of a worker, batched per step.

A scheduler thread owns the model. Each iteration it admits waiting requests while a KV-cache slot is free (prefill:
vision tower for images not seen before, projector, prompt; bounded by a prompt-token budget), then runs one decode
step for the whole running batch (:class:`llava_med.model.batching.DecodeBatch` over a
:class:`~llava_med.model.batching.KVPool` allocated once at start). A request joins the batch right after its
prefill and leaves as soon as it finishes, is stopped or is cancelled; each row samples with its own temperature,
top-p, seed and stop strings, all rows at once on the device (:func:`llava_med.model.generation.sample_tokens`),
and the step's tokens are the only thing copied back to the host. ``max_batch_size=1`` runs one request at a time.

The event loop never waits on the model: requests are prepared (images decoded, prompt tokenised) in a worker
thread, handed to the scheduler through a locked deque, and their outputs come back through
``loop.call_soon_threadsafe``.

Failures stay with the request that caused them: an exception while preparing or prefilling a request fails that
request only; out of memory while prefilling several requests together retries them one by one, and out of memory
in a decode step fails the newest request while the others go on. After any other device error the engine checks
that the device still computes; a sticky CUDA error (illegal memory access, device-side assert) stops the engine,
fails every request with the cause and turns ``/health`` unhealthy.

torch and the model code are imported when the engine starts, so that declaring this engine's flags (every
worker does, through the registry) costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llava_med.constants import ErrorCode
from llava_med.conversation import conv_mode_for_config
from llava_med.engine.base import Engine, EngineRequest, GenerationOutput
from llava_med.engine.hf_support import (
    BatchingConfig,
    EngineBusyError,
    EngineStats,
    EngineStoppedError,
    FeatureCache,
    deliver,
    is_out_of_memory,
    length_groups,
    pixel_key,
)
from llava_med.errors import LlavaMedError
from llava_med.model.args import LoadConfig, load_config_from_args
from llava_med.model.naming import model_name_from_path

if TYPE_CHECKING:
    import torch

    from llava_med.model.batching import DecodeBatch, KVPool
    from llava_med.model.builder import LoadedModel
    from llava_med.model.generation import PreparedPrompt, SamplingPlan, SequenceState

__all__ = ["BatchingConfig", "EngineBusyError", "EngineStoppedError", "HFEngine"]

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    rid: int
    prepared: PreparedPrompt
    state: SequenceState
    image_keys: list[str]
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    cancelled: bool = False
    steps: int = 0  # decode steps this request took part in
    last_post: float = float("-inf")  # monotonic time of the last update handed to the worker


class HFEngine(Engine):
    """Continuous-batching engine over :func:`llava_med.model.builder.load_pretrained_model`."""

    def __init__(
        self,
        load_config: LoadConfig,
        *,
        batching: BatchingConfig | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.load_config = load_config
        self.batching = batching or BatchingConfig()
        self._model_name = load_config.model_name
        self._conv_mode = load_config.conv_mode  # from the checkpoint's config once loaded, when not given
        self.loaded: LoadedModel | None = loaded
        self.stats = EngineStats()
        self._features = FeatureCache(self.batching.image_cache_size)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._preparing = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._outbox: list[tuple[_Request, Any]] = []  # scheduler thread only; delivered once per step
        self.pool: KVPool | None = None
        self._occupancy = (0, 0)  # (rows, tokens) in the pool, written by the scheduler thread after each step
        self._plan: tuple[tuple[int, ...], SamplingPlan] | None = None
        self._fatal: str | None = None  # set when the device is unusable (a sticky CUDA error)

    # ----- Engine interface -----
    @property
    def model_names(self) -> list[str]:  # type: ignore[override]
        if self._model_name:
            return [self._model_name]
        if self.loaded is not None:
            return [self.loaded.model_name]
        return [model_name_from_path(self.load_config.model_path or "llava-med-tiny-mistral")]

    @property
    def conv_mode(self) -> str | None:
        """The prompt template of the served checkpoint (from ``--conv-mode`` or its config), once loaded."""
        return self._conv_mode

    @property
    def ready(self) -> bool:
        return (self.loaded is not None and self._thread is not None and self._thread.is_alive()
                and self._fatal is None)

    @property
    def health_error(self) -> str | None:
        return self._fatal

    def kv_cache_status(self) -> dict[str, int] | None:
        if self.pool is None:
            return None
        rows, tokens = self._occupancy
        return {"slots": self.pool.slots, "slots_used": rows, "slot_tokens": self.pool.layout.slot_tokens,
                "tokens_used": tokens, "bytes": self.pool.nbytes}

    @property
    def context_length(self) -> int:
        return self.loaded.context_len if self.loaded is not None else 0

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("batching (--engine hf)")
        group.add_argument("--max-batch-size", type=int, default=16,
                           help="requests decoded together per step (1: one at a time, as the original worker)")
        group.add_argument("--max-queue", type=int, default=256,
                           help="requests allowed to wait; more get a clear 'busy' error")
        group.add_argument("--max-prefill-tokens", type=int, default=4096,
                           help="prompt tokens prefilled per scheduler step (at least one request)")
        group.add_argument("--image-cache-size", type=int, default=64,
                           help="images whose vision features are kept for reuse (0: off)")
        group.add_argument("--stream-min-interval", type=float, default=0.025,
                           help="seconds between two streamed updates of one request (0: every token); the text "
                                "is cumulative, so nothing is lost")
        group.add_argument("--kv-cache-fraction", type=float, default=0.9,
                           help="without --kv-cache-memory: the share of the memory free after loading that the KV "
                                "cache may take, on each device (default %(default)s); never more than "
                                "--max-batch-size requests")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HFEngine:
        batching = BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_prefill_tokens=args.max_prefill_tokens,
            image_cache_size=args.image_cache_size,
            allow_image_urls=args.allow_image_urls,
            stream_min_interval=args.stream_min_interval,
            kv_cache_memory=args.kv_cache_memory,
            kv_cache_fraction=args.kv_cache_fraction,
        )
        return cls(load_config_from_args(args), batching=batching)

    @property
    def max_concurrency(self) -> int:
        """Requests the engine holds at once (running and queued): the worker admits this many."""
        return self.batching.max_batch_size + self.batching.max_queue

    async def start(self) -> None:
        if self.loaded is None:
            from llava_med.model.builder import load_pretrained_model

            self.loaded = await asyncio.to_thread(load_pretrained_model, self.load_config)
            if self.load_config.model_path is None:
                logger.warning("serving the embedded tiny random-weight checkpoint (answers are noise); "
                               "pass --model-path for a real model")
        conv_mode = self._conv_mode or conv_mode_for_config(self.loaded.config)
        self._conv_mode = conv_mode
        self.pool = await asyncio.to_thread(self._allocate_pool)
        self._thread = threading.Thread(target=self._run, name="hf-engine-scheduler", daemon=True)
        self._thread.start()
        logger.info("engine ready: %s, max batch %d, conv template %s", self.model_names[0], self.pool.slots,
                    conv_mode)

    def _allocate_pool(self) -> KVPool:
        from llava_med.model.batching import KVPool, PoolLayout, pool_slots

        layout = PoolLayout.of(self.loaded.model, self.loaded.context_len)
        if any(device.type == "cuda" for device in layout.devices):
            import torch

            torch.cuda.empty_cache()  # blocks cached while loading count as free memory for the pool
        slots, reason = pool_slots(layout, max_slots=self.batching.max_batch_size,
                                   memory=self.batching.kv_cache_memory, fraction=self.batching.kv_cache_fraction)
        pool = KVPool(layout, slots)
        logger.info("KV cache: %s; requests at once: %d, from %s", pool.describe(), slots, reason)
        return pool

    async def shutdown(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.pool = None  # the KV cache's memory goes back

    def queue_length(self) -> int:
        with self._lock:
            return self._preparing + len(self._waiting) + len(self._running)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            running, waiting = len(self._running), len(self._waiting) + self._preparing
        s = self.stats
        return {"running_requests": running, "waiting_requests": waiting, "decode_steps": s.steps,
                "prefilled_requests": s.prefills, "vision_images_encoded": s.vision_images_encoded,
                "vision_cache_hits": s.vision_cache_hits, "finished_requests": s.finished,
                "cancelled_requests": s.cancelled, "failed_requests": s.failed}

    @property
    def max_prompt_chars(self) -> int:
        from llava_med.model.generation import max_prompt_chars

        return max_prompt_chars(self.loaded) if self.loaded is not None else super().max_prompt_chars

    def count_tokens(self, prompt: str) -> int:
        from llava_med.model.generation import sequence_length
        from llava_med.model.prompting import tokenizer_image_token

        if self.loaded is None:
            raise EngineStoppedError("the model is not loaded yet")
        return sequence_length(self.loaded, tokenizer_image_token(prompt, self.loaded.tokenizer))

    async def generate_stream(self, request: EngineRequest) -> AsyncIterator[GenerationOutput]:
        from llava_med.model.generation import SequenceState

        if not self.ready:
            raise EngineStoppedError(self._fatal or "the model is not loaded (or the engine stopped)")
        params = request.params
        with self._lock:
            if len(self._waiting) + self._preparing >= self.batching.max_queue:
                raise EngineBusyError(
                    f"the worker is busy: {len(self._waiting) + self._preparing} requests are already waiting "
                    f"(--max-queue {self.batching.max_queue}); try again shortly"
                )
            self._preparing += 1
        try:
            prepared, keys = await asyncio.to_thread(self._prepare, request)
        finally:
            with self._lock:
                self._preparing -= 1
        loop = asyncio.get_running_loop()
        req = _Request(next(self._ids), prepared, SequenceState(prepared, params, self.loaded.tokenizer), keys,
                       loop, asyncio.Queue())
        with self._wakeup:
            if self._stopping:
                raise EngineStoppedError(self._fatal or "the engine is shutting down")
            self._waiting.append(req)
            self._wakeup.notify_all()
        finished = False
        try:
            while True:
                item = await req.outputs.get()
                # Outputs are cumulative: when the consumer fell behind, only the newest one matters.
                while not isinstance(item, BaseException) and item.finish_reason is None and not req.outputs.empty():
                    item = req.outputs.get_nowait()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(req.rid)

    def cancel(self, rid: int) -> None:
        """Cancel a request: a waiting one frees its queue slot now, a running one leaves before the next step."""
        with self._wakeup:
            for req in list(self._waiting):
                if req.rid == rid:
                    self._waiting.remove(req)
                    req.state.cancel()
                    self.stats.cancelled += 1
                    self.stats.recent.append((req.rid, "cancelled", req.steps, ()))
            running = self._running.get(rid)
            if running is not None:
                running.cancelled = True
            self._wakeup.notify_all()

    # ----- scheduler thread -----
    def _prepare(self, request: EngineRequest) -> tuple[PreparedPrompt, list[str]]:
        from llava_med.model.generation import prepare_prompt

        prepared = prepare_prompt(
            self.loaded,
            request.prompt,
            request.images,
            image_mode=request.image_mode,
            dicom=request.dicom,
            limits=self.batching.image_limits,
            allow_url=self.batching.allow_image_urls,
            allow_path=False,
        )
        keys = [] if prepared.pixel_values is None else [pixel_key(p) for p in prepared.pixel_values]
        return prepared, keys

    def _run(self) -> None:
        from llava_med.model.batching import DecodeBatch

        batch = DecodeBatch(self.loaded.model, self.pool)
        while True:
            with self._wakeup:
                while not self._stopping and not self._waiting and not self._running:
                    self._wakeup.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible(len(batch))
            try:
                self._step(batch, admitted)
            except Exception as exc:  # a bug in the loop itself: fail everyone, start over, keep serving
                logger.exception("engine step failed")
                self._fail_all(batch, "engine step failed")
                self._check_device(exc)
            self._occupancy = (len(batch), batch.tokens)
            self._flush()
        reason = self._fatal or "the engine shut down"
        self._fail_all(batch, reason)
        with self._lock:
            for req in self._waiting:
                self._post(req, EngineStoppedError(reason))
            self._waiting.clear()
        self._occupancy = (0, 0)
        self._flush()

    def _post(self, req: _Request, item: Any) -> None:
        self._outbox.append((req, item))

    def _post_progress(self, req: _Request) -> None:
        """Hand over a running request's text, unless it was handed over less than ``stream_min_interval`` ago."""
        now = time.monotonic()
        if now - req.last_post >= self.batching.stream_min_interval:
            req.last_post = now
            self._post(req, req.state.update())

    def _flush(self) -> None:
        """Hand this step's outputs to their event loops: one wake-up per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for req, item in self._outbox:
            by_loop.setdefault(req.loop, []).append((req.outputs, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _take_admissible(self, running: int) -> list[_Request]:
        """Waiting requests that fit in a free KV-cache slot and this iteration's prefill budget (at least one)."""
        out: list[_Request] = []
        budget = self.batching.max_prefill_tokens
        while self._waiting and running + len(out) < self.pool.slots:
            nxt = self._waiting[0]
            if out and nxt.prepared.num_prompt_tokens > budget:
                break
            budget -= nxt.prepared.num_prompt_tokens
            out.append(self._waiting.popleft())
            self._running[nxt.rid] = nxt
        return out

    def _step(self, batch: DecodeBatch, admitted: list[_Request]) -> None:
        live = []
        for req in admitted:
            if req.cancelled:
                self._finish(req, cancelled=True)
            else:
                live.append(req)
        if live:
            self._prefill(batch, live)
        with self._lock:
            gone = [rid for rid in batch.row_ids if self._running[rid].cancelled]
            self.stats.max_running = max(self.stats.max_running, len(batch) - len(gone))
        for rid in gone:
            self._finish(self._running[rid], cancelled=True)
        batch.remove(gone)
        if not len(batch):
            return
        rows = [self._running[rid] for rid in batch.row_ids]
        try:
            tokens = batch.step([r.state.last_token for r in rows], lambda logits: self._sample(logits, rows))
        except Exception as exc:
            self._step_failed(batch, rows, exc)
            return
        self.stats.steps += 1
        self._take_tokens(batch, rows, tokens)

    def _take_tokens(self, batch: DecodeBatch, reqs: list[_Request], tokens: list[int], prefilled=None) -> None:
        """Hand each request its sampled token (-1: its logits were not finite); requests that end leave the batch
        (after a prefill: the others join it)."""
        keep, done = [], []
        for j, (req, token) in enumerate(zip(reqs, tokens, strict=True)):
            if prefilled is None:
                req.steps += 1
            try:
                if token < 0:
                    from llava_med.model.generation import NonFiniteLogitsError

                    raise NonFiniteLogitsError()
                going_on = req.state.accept(token)
            except Exception as exc:  # this request fails, not the batch
                logger.warning("request %d failed: %s", req.rid, exc)
                self._fail(req, exc)
                done.append(req.rid)
                continue
            if going_on:
                self._post_progress(req)
                keep.append(j)
            else:
                self._finish(req)
                done.append(req.rid)
        if prefilled is None:
            batch.remove(done)
        else:
            batch.add([r.rid for r in reqs], prefilled, keep)

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
        """Every row's next token, sampled on the logits' device (-1 for rows whose logits are not finite): the one
        copy to the host of a step."""
        from llava_med.model.generation import SamplingPlan, sample_tokens

        key = tuple(r.rid for r in reqs)
        samplers = [r.state.sampler for r in reqs]
        if self._plan is None or self._plan[0] != key or self._plan[1].device != logits.device:
            self._plan = (key, SamplingPlan(samplers, logits.device))
        return sample_tokens(logits, samplers, self._plan[1]).tolist()

    def _step_failed(self, batch: DecodeBatch, rows: list[_Request], exc: Exception) -> None:
        """Out of memory: the newest request fails and the others go on (the step runs again next iteration). Any
        other error fails the requests of the step; a device left unusable stops the engine."""
        if is_out_of_memory(exc):
            victim = max(rows, key=lambda r: r.rid)
            logger.warning("out of memory in a decode step of %d requests: request %d fails, the others go on",
                           len(rows), victim.rid)
            self._release_memory()
            self._fail(victim, exc)
            batch.remove([victim.rid])
            return
        logger.exception("decode step failed for %d requests", len(rows))
        for r in rows:
            self._fail(r, exc)
        batch.remove([r.rid for r in rows])
        self._check_device(exc)

    def _prefill(self, batch: DecodeBatch, reqs: list[_Request]) -> None:
        """Prefill admitted requests, several at a time when their lengths are close, and add them to the batch."""
        try:
            embeds = self._embed(reqs)
        except Exception:
            # Find the culprit: embed one by one so only the failing request fails.
            embeds = []
            for req in list(reqs):
                try:
                    embeds.append(self._embed([req])[0])
                except Exception as exc:
                    logger.exception("preparing the embeddings of request %d failed", req.rid)
                    self._fail(req, exc)
                    reqs.remove(req)
        for group in length_groups(embeds):
            self._prefill_group(batch, [reqs[i] for i in group], [embeds[i] for i in group])

    def _prefill_group(self, batch: DecodeBatch, reqs: list[_Request], embeds: list[torch.Tensor]) -> None:
        try:
            prefilled = batch.prefill(embeds)
            tokens = self._sample(prefilled.logits, reqs)
        except Exception as exc:
            if is_out_of_memory(exc) and len(reqs) > 1:  # together they did not fit: try each alone
                logger.warning("out of memory prefilling %d requests together: prefilling them one by one",
                               len(reqs))
                self._release_memory()
                for req, embed in zip(reqs, embeds, strict=True):
                    self._prefill_group(batch, [req], [embed])
                return
            logger.exception("prefill failed for requests %s", [r.rid for r in reqs])
            for req in reqs:
                self._fail(req, exc)
            if is_out_of_memory(exc):
                self._release_memory()
            else:
                self._check_device(exc)
            return
        self.stats.prefills += len(reqs)
        self.stats.prefill_calls += 1
        self._take_tokens(batch, reqs, tokens, prefilled)

    def _embed(self, reqs: list[_Request]) -> list[torch.Tensor]:
        """Prompt embeddings of each request; images not in the feature cache go through CLIP in one call."""
        import torch

        model = self.loaded.model
        feats = [[self._features.get(k) for k in req.image_keys] for req in reqs]
        missing = [(r, i) for r, fs in enumerate(feats) for i, f in enumerate(fs) if f is None]
        self.stats.vision_cache_hits += sum(len(fs) for fs in feats) - len(missing)
        if missing:
            pixels = torch.stack([reqs[r].prepared.pixel_values[i] for r, i in missing])
            encoded = model.encode_images(pixels)
            self.stats.vision_images_encoded += len(missing)
            for j, (r, i) in enumerate(missing):
                # A clone, so a cached entry holds its own features and not the whole batch's output.
                feats[r][i] = encoded[j].clone()
                self._features.put(reqs[r].image_keys[i], feats[r][i])
        return [model.embed_prompt(req.prepared.input_ids, fs) for req, fs in zip(reqs, feats, strict=True)]

    def _finish(self, req: _Request, *, cancelled: bool = False) -> None:
        if cancelled:
            req.state.cancel()
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        final = req.state.update()
        self.stats.recent.append((req.rid, final.finish_reason, req.steps, final.token_ids))
        self._post(req, final)
        with self._lock:
            self._running.pop(req.rid, None)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        self.stats.failed += 1
        if is_out_of_memory(exc):
            self.stats.out_of_memory += 1
            err: BaseException = LlavaMedError(f"out of memory while generating: {exc}", code=ErrorCode.OUT_OF_MEMORY)
        elif isinstance(exc, LlavaMedError):
            err = exc
        else:
            err = LlavaMedError(f"generation failed: {type(exc).__name__}: {exc}")
        self._post(req, err)
        with self._lock:
            self._running.pop(req.rid, None)

    def _fail_all(self, batch: DecodeBatch, reason: str) -> None:
        with self._lock:
            running = list(self._running.values())
        for req in running:
            self._fail(req, EngineStoppedError(reason))
        batch.clear()

    def _release_memory(self) -> None:
        import torch

        if self.loaded.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_device(self, exc: BaseException) -> None:
        """After an error, make sure the device still works; a sticky CUDA error (illegal memory access, device-side
        assert) leaves it unusable until the process restarts: the engine then stops and reports unhealthy."""
        broken = self._probe_device()
        if broken is None:
            return
        self._fatal = (f"the device failed ({type(exc).__name__}: {exc}; a check afterwards failed too: {broken}); "
                       "restart the worker")
        logger.error("%s", self._fatal)
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()

    def _probe_device(self) -> str | None:
        """None if a small computation on the model's device still succeeds, else what went wrong."""
        import torch

        device = self.loaded.model.device
        if device.type != "cuda":
            return None
        try:
            torch.cuda.synchronize(device)
            torch.ones(1, device=device).add_(1).item()
        except Exception as exc:  # noqa: BLE001 - any failure means the device is gone
            return f"{type(exc).__name__}: {exc}"
        return None
