"""The decode batch over a KV pool allocated once (iteration-level, "continuous" batching).

**Memory.** Keys and values live in a :class:`KVPool`: for each decoder layer, on that layer's device, one tensor
``[slots, kv_heads, slot_tokens, head_dim]`` allocated (zeroed) once, when the engine starts. A request holds one
slot (room for a whole context) from its prefill to its end, and the engine admits a request only when a slot is
free, so memory never grows with traffic. Live requests occupy slots ``0 .. B-1`` in batch order: when one leaves,
the last one moves into its slot (one request's keys and values are copied, never the whole cache), and each step
attends over the view ``[:B, :, :L]`` of the pool.

**Layout and masks.** A request's tokens sit at columns ``0 .. n-1`` of its slot, so its positions are its columns.
Prompts prefilled together are right-padded: under the causal mask no real token sees a pad, so no padding mask is
needed and no query row is ever left with nothing to attend to (a fully masked row comes out of some CUDA attention
kernels as NaN, which poisons that request's cache). A decode step writes each row's token at that row's column and
attends with a 4-D mask (``column <= position``), in which every row sees at least its own new token; when all rows
have the same length there is no mask at all.

**Host syncs.** A step takes the rows' tokens as host ints and copies them and the positions to the device
asynchronously (:func:`~llava_med.model.generation.device_tensor`); masks and cache writes are device operations and
the 4-D mask bypasses transformers' mask code (which reads the mask back to the host). Nothing in a step waits for
the device; the engine copies the sampled tokens back once per step.

transformers' own continuous batching takes token ids only and ignores ``pixel_values``, so it cannot serve images;
this works on embeddings, through a :class:`transformers.Cache` whose layers write into the pool.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from llava_med.constants import ErrorCode
from llava_med.errors import LlavaMedError
from llava_med.model.generation import device_tensor
from llava_med.model.modeling import LlavaMedForCausalLM

logger = logging.getLogger(__name__)

R = TypeVar("R")

GiB = 2**30


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _layer_device(layer: torch.nn.Module) -> torch.device:
    """Where a decoder layer computes (an accelerate hook's execution device when its weights are offloaded)."""
    device = next(layer.parameters()).device
    if device.type == "meta":
        hook_device = getattr(getattr(layer, "_hf_hook", None), "execution_device", None)
        if hook_device is not None:
            return torch.device(hook_device)
    return device


@dataclass(frozen=True)
class PoolLayout:
    """What one slot of the pool holds: every decoder layer's keys and values for ``slot_tokens`` positions."""

    devices: tuple[torch.device, ...]  # one per decoder layer
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    slot_tokens: int

    @classmethod
    def of(cls, model: LlavaMedForCausalLM, slot_tokens: int) -> PoolLayout:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        layers = model.language_model.get_decoder().layers
        # Keys and values come out of the projections in the dtype of the hidden states, i.e. of the embeddings
        # (quantised projections compute in it too).
        return cls(tuple(_layer_device(layer) for layer in layers), int(kv_heads), int(head_dim),
                   model.embed_tokens.weight.dtype, int(slot_tokens))

    @property
    def bytes_per_token(self) -> int:
        return len(self.devices) * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_slot(self) -> int:
        return self.bytes_per_token * self.slot_tokens

    def slot_bytes_by_device(self) -> dict[torch.device, int]:
        per_layer = 2 * self.kv_heads * self.head_dim * self.dtype.itemsize * self.slot_tokens
        out: dict[torch.device, int] = {}
        for device in self.devices:
            out[device] = out.get(device, 0) + per_layer
        return out


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (CUDA: free device memory; CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pool_slots(layout: PoolLayout, *, max_slots: int, memory: int | None = None, fraction: float = 0.9,
               free: Callable[[torch.device], int] = free_memory) -> tuple[int, str]:
    """How many slots the pool gets, and why: ``memory`` bytes in all (``--kv-cache-memory``), else ``fraction`` of
    the memory free on each device after loading; never more than ``max_slots`` (``--max-batch-size``)."""
    if memory is not None:
        slots = memory // layout.bytes_per_slot
        reason = f"--kv-cache-memory {format_bytes(memory)}"
    else:
        fits = []
        for device, per_slot in layout.slot_bytes_by_device().items():
            available = free(device)
            fits.append((int(available * fraction) // per_slot,
                         f"{fraction:g} of the {format_bytes(available)} free on {device}"))
        slots, reason = min(fits)
    if slots < 1:
        raise LlavaMedError(
            f"the KV cache has no room for one request: a request of the full context ({layout.slot_tokens} tokens) "
            f"needs {format_bytes(layout.bytes_per_slot)} and the budget is {reason}; give it more "
            "(--kv-cache-memory, --kv-cache-fraction) or use a smaller dtype or quantisation",
            code=ErrorCode.OUT_OF_MEMORY,
        )
    if slots >= max_slots:
        return max_slots, f"--max-batch-size {max_slots} (the budget, {reason}, would hold {slots})"
    return slots, reason


class KVPool:
    """Keys and values of ``slots`` requests, allocated once: per layer ``[slots, kv_heads, slot_tokens, head_dim]``
    on that layer's device. Zeroed, so that columns a mask hides never hold NaN (0 x NaN is NaN)."""

    def __init__(self, layout: PoolLayout, slots: int) -> None:
        self.layout = layout
        self.slots = slots
        shape = (slots, layout.kv_heads, layout.slot_tokens, layout.head_dim)
        try:
            self.keys = [torch.zeros(shape, dtype=layout.dtype, device=d) for d in layout.devices]
            self.values = [torch.zeros(shape, dtype=layout.dtype, device=d) for d in layout.devices]
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            self.keys = self.values = []
            raise LlavaMedError(
                f"allocating the KV cache ({slots} slots x {layout.slot_tokens} tokens, {format_bytes(self.nbytes)}) "
                f"failed: {type(exc).__name__}: {exc}; lower --kv-cache-memory, --kv-cache-fraction or "
                "--max-batch-size", code=ErrorCode.OUT_OF_MEMORY,
            ) from exc

    @property
    def nbytes(self) -> int:
        return self.slots * self.layout.bytes_per_slot

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``, in every layer."""
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]

    def describe(self) -> str:
        devices = sorted({str(d) for d in self.layout.devices})
        return (f"{self.slots} slots x {self.layout.slot_tokens} tokens, {format_bytes(self.nbytes)} "
                f"({format_bytes(self.layout.bytes_per_token)} per token, {str(self.layout.dtype).removeprefix('torch.')}"
                f", on {', '.join(devices)})")


def _pool_cache_class():
    """A transformers ``Cache`` whose layers write into the pool (defined lazily: transformers is imported late)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class PoolLayer(CacheLayerMixin):
        is_sliding = False

        def __init__(self, cache: PoolCache, index: int) -> None:
            super().__init__()
            self.cache, self.index = cache, index
            self.keys, self.values = cache.pool.keys[index], cache.pool.values[index]
            self.device = self.keys.device
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            return self.cache.write(self.index, key_states, value_states)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.cache.past + query_length, 0

        def get_seq_length(self) -> int:
            return self.cache.past

        def get_max_length(self) -> int:
            return self.cache.pool.layout.slot_tokens

    class PoolCache(Cache):
        """Set up for one forward by :meth:`for_prefill` or :meth:`for_decode`."""

        def __init__(self, pool: KVPool) -> None:
            self.pool = pool
            super().__init__(layers=[PoolLayer(self, i) for i in range(len(pool.keys))])
            self.first, self.rows, self.past, self.kv_length = 0, 0, 0, 0
            self.column: int | None = None  # decode: the one column every row writes at, when they all do
            self.positions: torch.Tensor | None = None
            self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def for_prefill(self, first: int, rows: int) -> None:
            self.first, self.rows, self.past, self.column, self.positions = first, rows, 0, None, None

        def for_decode(self, rows: int, positions: torch.Tensor, kv_length: int, column: int | None) -> None:
            self.first, self.rows, self.past, self.kv_length = 0, rows, kv_length - 1, kv_length
            self.column, self.positions = column, positions
            self._on_device = {}

        def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
            if device not in self._on_device:
                self._on_device[device] = (torch.arange(self.rows, device=device),
                                           self.positions.to(device, non_blocking=True))
            return self._on_device[device]

        def write(self, index: int, key_states: torch.Tensor, value_states: torch.Tensor):
            keys, values = self.pool.keys[index], self.pool.values[index]
            if self.positions is None:  # prefill: attention runs on the new states alone
                n = key_states.shape[-2]
                keys[self.first:self.first + self.rows, :, :n] = key_states
                values[self.first:self.first + self.rows, :, :n] = value_states
                return key_states, value_states
            if self.column is not None:
                keys[:self.rows, :, self.column:self.column + 1] = key_states
                values[:self.rows, :, self.column:self.column + 1] = value_states
            else:
                rows, positions = self._indices(keys.device)
                keys[rows, :, positions] = key_states[:, :, 0]
                values[rows, :, positions] = value_states[:, :, 0]
            return keys[:self.rows, :, :self.kv_length], values[:self.rows, :, :self.kv_length]

    return PoolCache


@dataclass
class Prefilled:
    """Result of :meth:`DecodeBatch.prefill`: last-position logits ``[k, V]`` of prompts written into slots
    ``first .. first+k-1``, and their lengths."""

    logits: torch.Tensor
    first: int
    lengths: list[int]


class DecodeBatch:
    """The running batch: row ids, and the number of tokens each row holds in its slot (= its next position)."""

    def __init__(self, model: LlavaMedForCausalLM, pool: KVPool) -> None:
        self.model = model
        self.device = model.device  # where token ids and positions go (the embeddings' device)
        self.pool = pool
        self.cache = _pool_cache_class()(pool)
        self.row_ids: list[Hashable] = []
        self.lengths: list[int] = []
        # sdpa takes a boolean mask; eager adds the mask to the scores.
        self._additive_mask = model.config._attn_implementation != "sdpa"
        if model.config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"the decode batch needs sdpa or eager attention, not "
                             f"{model.config._attn_implementation!r}")

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def free_slots(self) -> int:
        return self.pool.slots - len(self.row_ids)

    @property
    def tokens(self) -> int:
        """Positions held by live rows."""
        return sum(self.lengths)

    @torch.inference_mode()
    def prefill(self, embeds: Sequence[torch.Tensor]) -> Prefilled:
        """Run prompts (each ``[L_i, hidden]`` embeddings) together, right-padded, writing their keys and values into
        the next free slots; :meth:`add` then makes them rows. Returns their last real positions' logits."""
        first, k = len(self), len(embeds)
        if k > self.free_slots:
            raise RuntimeError(f"{k} prompts for {self.free_slots} free KV-cache slots")
        lengths = [int(e.shape[0]) for e in embeds]
        longest = max(lengths)
        if longest > self.pool.layout.slot_tokens:
            raise ValueError(f"a prompt of {longest} tokens does not fit a KV-cache slot of "
                             f"{self.pool.layout.slot_tokens}")
        padded = torch.stack([F.pad(e, (0, 0, 0, longest - e.shape[0])) for e in embeds])
        self.cache.for_prefill(first, k)
        hidden = self.model.hidden_states(inputs_embeds=padded, cache=self.cache)
        if k == 1:
            last = hidden[:, -1]
        else:
            last = hidden[torch.arange(k, device=hidden.device), device_tensor([n - 1 for n in lengths],
                                                                               hidden.device)]
        return Prefilled(self.model.logits(last), first, lengths)

    def add(self, row_ids: Sequence[Hashable], prefilled: Prefilled, keep: Sequence[int] | None = None) -> None:
        """Make prefilled prompts rows (``keep``: indices of those that go on; default all)."""
        if prefilled.first != len(self):
            raise RuntimeError("prefilled slots were taken by another prefill")
        keep = list(range(len(row_ids))) if keep is None else list(keep)
        for j in keep:
            slot = len(self)
            if prefilled.first + j != slot:  # a request before it finished at once: close the gap
                self.pool.move(prefilled.first + j, slot, prefilled.lengths[j])
            self.row_ids.append(row_ids[j])
            self.lengths.append(prefilled.lengths[j])

    def remove(self, row_ids: Sequence[Hashable]) -> None:
        """Drop rows (finished, stopped or cancelled requests): the last rows move into the freed slots."""
        gone = set(row_ids)
        keep = [i for i, rid in enumerate(self.row_ids) if rid not in gone]
        if len(keep) == len(self.row_ids):
            return
        size = len(keep)
        holes = [i for i in range(size) if self.row_ids[i] in gone]
        movers = [i for i in keep if i >= size]
        for hole, mover in zip(holes, movers, strict=True):
            self.pool.move(mover, hole, self.lengths[mover])
            self.row_ids[hole], self.lengths[hole] = self.row_ids[mover], self.lengths[mover]
        del self.row_ids[size:], self.lengths[size:]

    def clear(self) -> None:
        self.row_ids, self.lengths = [], []

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], then: Callable[[torch.Tensor], R] = lambda logits: logits) -> R:
        """Feed one token per row (in row order) and return ``then(logits)`` (``[B, V]`` next-token logits, on the
        device: nothing here waits for it). The rows advance only when ``then`` returns, so a step that fails (out of
        memory in the forward or in sampling) can be run again."""
        rows = len(self.row_ids)
        if len(tokens) != rows:
            raise ValueError(f"{len(tokens)} tokens for a batch of {rows} rows")
        kv_length = max(self.lengths) + 1
        if kv_length > self.pool.layout.slot_tokens:
            raise RuntimeError(f"a row would grow past its KV-cache slot ({self.pool.layout.slot_tokens} tokens)")
        input_ids = device_tensor(tokens, self.device).unsqueeze(1)
        positions = device_tensor(self.lengths, self.device)
        uniform = min(self.lengths) == kv_length - 1
        mask = None if uniform else self._decode_mask(positions, kv_length)
        self.cache.for_decode(rows, positions, kv_length, kv_length - 1 if uniform else None)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions.unsqueeze(1),
                         cache=self.cache)
        result = then(out.logits[:, -1])
        self.lengths = [n + 1 for n in self.lengths]
        return result

    def _decode_mask(self, positions: torch.Tensor, kv_length: int) -> torch.Tensor:
        """``[B, 1, 1, L]``: row ``b`` sees columns ``0 .. positions[b]`` (its past and its new token)."""
        visible = torch.arange(kv_length, device=positions.device) <= positions.unsqueeze(1)
        visible = visible[:, None, None, :]
        if not self._additive_mask:
            return visible
        dtype = self.pool.layout.dtype
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
            ~visible, torch.finfo(dtype).min)
