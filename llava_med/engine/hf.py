"""The transformers engine: one loaded LLaVA-Med model serving every request of a worker, batched per step.

A scheduler thread owns the model. Each iteration it admits waiting requests (prefill: vision tower for images not
seen before, projector, prompt; bounded by a prompt-token budget), then runs one decode step for the whole running
batch (:class:`llava_med.model.batching.DecodeBatch`). A request joins the batch right after its prefill and leaves
as soon as it finishes, is stopped or is cancelled; each row samples with its own temperature, top-p, seed and stop
strings (:class:`llava_med.model.generation.SequenceState`). ``max_batch_size=1`` runs one request at a time.

The event loop never waits on the model: requests are prepared (images decoded, prompt tokenised) in a worker
thread, handed to the scheduler through a locked deque, and their outputs come back through
``loop.call_soon_threadsafe``. An exception while prefilling a request fails that request only.

torch and the model code are imported when the engine starts, so that declaring this engine's flags (every
worker does, through the registry) costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llava_med.constants import ErrorCode
from llava_med.conversation import conv_mode_for_config
from llava_med.engine.base import Engine, EngineRequest, GenerationOutput
from llava_med.errors import LlavaMedError
from llava_med.images.decode import ImageLimits
from llava_med.model.args import LoadConfig, load_config_from_args
from llava_med.model.naming import model_name_from_path

if TYPE_CHECKING:
    import torch

    from llava_med.model.builder import LoadedModel
    from llava_med.model.generation import PreparedPrompt, SequenceState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    """Scheduler limits (worker flags ``--max-batch-size``, ``--max-queue``, ``--max-prefill-tokens``, ...)."""

    max_batch_size: int = 16
    max_queue: int = 256
    max_prefill_tokens: int = 4096
    image_cache_size: int = 64
    allow_image_urls: bool = False
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    # A request's text is handed to the worker at most this often (its first token and its end always at once):
    # text is cumulative, so a reader loses nothing, and the event loop is not flooded with one chunk per token.
    stream_min_interval: float = 0.025

    def __post_init__(self) -> None:
        if self.stream_min_interval < 0:
            raise ValueError(f"stream_min_interval must be >= 0, got {self.stream_min_interval}")
        for name in ("max_batch_size", "max_queue", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_cache_size < 0:
            raise ValueError(f"image_cache_size must be >= 0, got {self.image_cache_size}")


class EngineBusyError(LlavaMedError):
    code = ErrorCode.ENGINE_OVERLOADED


class EngineStoppedError(LlavaMedError):
    code = ErrorCode.INTERNAL_ERROR


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



@dataclass
class EngineStats:
    """Counters for tests and benchmarks."""

    steps: int = 0
    prefills: int = 0
    prefill_calls: int = 0
    vision_images_encoded: int = 0
    vision_cache_hits: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    max_running: int = 0
    # (request id, finish reason, decode steps taken, generated token ids) of the latest finished requests.
    recent: deque = field(default_factory=lambda: deque(maxlen=1000))


class FeatureCache:
    """Bounded LRU of projected image features, keyed by a hash of the preprocessed pixels."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _length_groups(reqs: list, embeds: list[torch.Tensor], max_waste: float = 0.25) -> list[list[int]]:
    """Split prompts (sorted by length) into groups prefilled together, so that left padding adds at most
    ``max_waste`` of extra positions to a group."""
    order = sorted(range(len(embeds)), key=lambda i: embeds[i].shape[0])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            cand = groups[-1] + [i]
            longest = max(embeds[j].shape[0] for j in cand)
            real = sum(embeds[j].shape[0] for j in cand)
            if longest * len(cand) <= (1 + max_waste) * real:
                groups[-1] = cand
                continue
        groups.append([i])
    return groups


def pixel_key(pixels: torch.Tensor) -> str:
    """Content hash of one preprocessed image (same bytes and mode give the same key)."""
    return hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class HFEngine(Engine):
    """Continuous-batching engine over :func:`llava_med.model.builder.load_pretrained_model`."""

    def __init__(
        self,
        load_config: LoadConfig,
        *,
        model_name: str | None = None,
        conv_mode: str | None = None,
        batching: BatchingConfig | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.load_config = load_config
        self.batching = batching or BatchingConfig()
        self._model_name = model_name or load_config.model_name
        self._conv_mode = conv_mode or load_config.conv_mode
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
        return self.loaded is not None and self._thread is not None and self._thread.is_alive()

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
        group.add_argument("--allow-image-urls", action="store_true",
                           help="let requests pass http(s) image URLs for the worker to fetch (off by default)")
        group.add_argument("--stream-min-interval", type=float, default=0.025,
                           help="seconds between two streamed updates of one request (0: every token); the text "
                                "is cumulative, so nothing is lost")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HFEngine:
        batching = BatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            max_prefill_tokens=args.max_prefill_tokens,
            image_cache_size=args.image_cache_size,
            allow_image_urls=args.allow_image_urls,
            stream_min_interval=args.stream_min_interval,
        )
        return cls(load_config_from_args(args), model_name=args.model_name, conv_mode=args.conv_mode,
                   batching=batching)

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
        self._thread = threading.Thread(target=self._run, name="hf-engine-scheduler", daemon=True)
        self._thread.start()
        logger.info("engine ready: %s, max batch %d, conv template %s", self.model_names[0],
                    self.batching.max_batch_size, conv_mode)

    async def shutdown(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def queue_length(self) -> int:
        with self._lock:
            return self._preparing + len(self._waiting) + len(self._running)

    def count_tokens(self, prompt: str) -> int:
        from llava_med.model.generation import sequence_length
        from llava_med.model.prompting import tokenizer_image_token

        if self.loaded is None:
            raise EngineStoppedError("the model is not loaded yet")
        return sequence_length(self.loaded, tokenizer_image_token(prompt, self.loaded.tokenizer))

    async def generate_stream(self, request: EngineRequest) -> AsyncIterator[GenerationOutput]:
        from llava_med.model.generation import SequenceState

        if not self.ready:
            raise EngineStoppedError("the model is not loaded (or the engine stopped)")
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
                raise EngineStoppedError("the engine is shutting down")
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

        batch = DecodeBatch(self.loaded.model)
        while True:
            with self._wakeup:
                while not self._stopping and not self._waiting and not self._running:
                    self._wakeup.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible(len(batch))
            try:
                self._step(batch, admitted)
            except Exception:  # a bug in the loop itself: fail everyone, start over, keep serving
                logger.exception("engine step failed")
                self._fail_all(batch, "engine step failed")
                batch = DecodeBatch(self.loaded.model)
            self._flush()
        self._fail_all(batch, "the engine shut down")
        with self._lock:
            for req in self._waiting:
                self._post(req, EngineStoppedError("the engine shut down"))
            self._waiting.clear()
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
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _take_admissible(self, running: int) -> list[_Request]:
        """Waiting requests that fit in the batch and this iteration's prefill budget (at least one)."""
        out: list[_Request] = []
        budget = self.batching.max_prefill_tokens
        while self._waiting and running + len(out) < self.batching.max_batch_size:
            nxt = self._waiting[0]
            if out and nxt.prepared.num_prompt_tokens > budget:
                break
            budget -= nxt.prepared.num_prompt_tokens
            out.append(self._waiting.popleft())
            self._running[nxt.rid] = nxt
        return out

    def _step(self, batch, admitted: list[_Request]) -> None:
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
            logits = batch.step([r.state.last_token for r in rows]).float().cpu()
        except Exception as exc:  # e.g. out of memory: every row of this step fails, the engine goes on
            logger.exception("decode step failed for %d requests", len(rows))
            for r in rows:
                self._fail(r, exc)
            batch.remove([r.rid for r in rows])
            return
        self.stats.steps += 1
        argmax = logits.argmax(dim=-1).tolist()
        done = []
        for i, r in enumerate(rows):
            r.steps += 1
            try:
                going_on = r.state.advance(logits[i], argmax[i])
            except Exception as exc:  # e.g. sampling from non-finite logits: this request fails, not the batch
                logger.exception("sampling failed for request %d", r.rid)
                self._fail(r, exc)
                done.append(r.rid)
                continue
            if going_on:
                self._post_progress(r)
            else:
                done.append(r.rid)
                self._finish(r)
        batch.remove(done)

    def _prefill(self, batch, reqs: list[_Request]) -> None:
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
        for group in _length_groups(reqs, embeds):
            group_reqs = [reqs[i] for i in group]
            try:
                prefilled = batch.prefill([embeds[i] for i in group])
            except Exception as exc:
                logger.exception("prefill failed for requests %s", [r.rid for r in group_reqs])
                for req in group_reqs:
                    self._fail(req, exc)
                continue
            self.stats.prefills += len(group_reqs)
            self.stats.prefill_calls += 1
            logits = prefilled.logits.float().cpu()
            keep = []
            for j, req in enumerate(group_reqs):
                try:
                    going_on = req.state.advance(logits[j])
                except Exception as exc:  # this request fails, not its prefill group
                    logger.exception("sampling failed for request %d", req.rid)
                    self._fail(req, exc)
                    continue
                if going_on:
                    self._post_progress(req)
                    keep.append(j)
                else:
                    self._finish(req)
            batch.add([r.rid for r in group_reqs], prefilled, keep)

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
        import torch

        self.stats.failed += 1
        if isinstance(exc, torch.OutOfMemoryError):
            err: BaseException = LlavaMedError(f"out of memory while generating: {exc}", code=ErrorCode.OUT_OF_MEMORY)
        elif isinstance(exc, LlavaMedError):
            err = exc
        else:
            err = LlavaMedError(f"generation failed: {type(exc).__name__}: {exc}")
        self._post(req, err)
        with self._lock:
            self._running.pop(req.rid, None)

    def _fail_all(self, batch, reason: str) -> None:
        with self._lock:
            running = list(self._running.values())
        for req in running:
            self._fail(req, EngineStoppedError(reason))
        batch.remove(list(batch.row_ids))
