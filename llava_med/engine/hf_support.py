"""Settings, counters and helpers of the transformers engine's scheduler (:mod:`llava_med.engine.hf`).

Torch-free at import time, like the engine module itself: declaring the engine's flags imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llava_med.constants import ErrorCode
from llava_med.errors import LlavaMedError
from llava_med.images.decode import ImageLimits

if TYPE_CHECKING:
    import torch

__all__ = ["BatchingConfig", "EngineBusyError", "EngineStats", "EngineStoppedError", "FeatureCache",
           "deliver", "is_out_of_memory", "length_groups", "pixel_key"]

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
    # KV cache pool: this many bytes in all, else this fraction of the memory free after loading (per device).
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.stream_min_interval < 0:
            raise ValueError(f"stream_min_interval must be >= 0, got {self.stream_min_interval}")
        for name in ("max_batch_size", "max_queue", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_cache_size < 0:
            raise ValueError(f"image_cache_size must be >= 0, got {self.image_cache_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")


class EngineBusyError(LlavaMedError):
    code = ErrorCode.ENGINE_OVERLOADED


class EngineStoppedError(LlavaMedError):
    code = ErrorCode.INTERNAL_ERROR


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
    out_of_memory: int = 0
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


def deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    """Put outputs into their requests' queues (run on their event loop)."""
    for queue, item in items:
        queue.put_nowait(item)


def length_groups(embeds: list[torch.Tensor], max_waste: float = 0.25) -> list[list[int]]:
    """Split prompts (sorted by length) into groups prefilled together, so that padding adds at most
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


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure (CUDA or host), or our own out-of-memory error."""
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, LlavaMedError) and exc.code == ErrorCode.OUT_OF_MEMORY)
