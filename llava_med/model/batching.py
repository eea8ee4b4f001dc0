"""A decode batch whose members join and leave between steps (iteration-level, "continuous" batching).

Requests are prefilled (their image features spliced into their embeddings) alone or several together, left-padded,
into a KV cache that then joins the running batch: every row is left-padded to a common length and an attention
mask hides the padding, so each step appends one token per row at the same column. Rows leave by index; columns that are padding in every
remaining row are dropped, so the cache never grows beyond the longest live row.

transformers' own continuous batching takes token ids only and ignores ``pixel_values``, so it cannot serve images;
this works on embeddings and a stock ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_med.model.modeling import LlavaMedForCausalLM


@dataclass
class Prefilled:
    """Result of :meth:`DecodeBatch.prefill`: logits ``[k, V]``, their KV cache, mask ``[k, L]``, real lengths."""

    logits: torch.Tensor
    cache: object
    mask: torch.Tensor
    lengths: list[int]


def _layers(cache) -> list:
    return list(cache.layers)


SPARE_POSITIONS = 64


def _roomy_layer_class():
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values sit in a buffer with spare positions at the end, so a decode step
        writes its token in place instead of copying the whole cache (``torch.cat``) in every layer."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE_POSITIONS) -> None:
            super().__init__()
            self.device = keys.device
            self.is_initialized = True
            self._length = int(keys.shape[-2])
            self._k = self._with_room(keys, self._length + spare)
            self._v = self._with_room(values, self._length + spare)
            self._expose()

        @staticmethod
        def _with_room(t: torch.Tensor, capacity: int) -> torch.Tensor:
            buf = t.new_empty(*t.shape[:-2], capacity, t.shape[-1])
            buf[..., : t.shape[-2], :] = t
            return buf

        def _expose(self) -> None:
            self.keys = self._k[..., : self._length, :]
            self.values = self._v[..., : self._length, :]

        def update(self, key_states, value_states, *args, **kwargs):
            n = int(key_states.shape[-2])
            if self._length + n > self._k.shape[-2]:
                capacity = max(2 * self._k.shape[-2], self._length + n + SPARE_POSITIONS)
                self._k = self._with_room(self.keys, capacity)
                self._v = self._with_room(self.values, capacity)
            self._k[..., self._length : self._length + n, :] = key_states
            self._v[..., self._length : self._length + n, :] = value_states
            self._length += n
            self._expose()
            return self.keys, self.values

    return RoomyLayer


def _set_layers(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace every layer of ``cache`` with roomy layers holding ``kv``."""
    roomy = _roomy_layer_class()
    cache.layers = [roomy(k, v) for k, v in kv]


def _left_pad(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad the sequence axis (-2) of a ``[B, H, L, D]`` tensor on the left with zeros."""
    return F.pad(t, (0, 0, pad, 0)) if pad else t


class DecodeBatch:
    """The running batch: KV cache, attention mask and next position of every row, in row order."""

    def __init__(self, model: LlavaMedForCausalLM) -> None:
        self.model = model
        self.row_ids: list[Hashable] = []
        self.positions: list[int] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, L] of 0/1, on the embeddings' device

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def length(self) -> int:
        """Columns in the cache (the longest row plus its left padding)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    @torch.inference_mode()
    def prefill(self, embeds: Sequence[torch.Tensor]) -> Prefilled:
        """Run prompts (each ``[L_i, hidden]`` embeddings) together, left-padded to the longest.

        Returns their last-position logits ``[k, V]`` and a cache that :meth:`add` merges into the batch. A single
        prompt runs without padding or mask.
        """
        from transformers import DynamicCache

        device = self.model.device
        lengths = [int(e.shape[0]) for e in embeds]
        longest = max(lengths)
        cache = DynamicCache(config=self.model.config)
        if len(embeds) == 1:
            out = self.model(inputs_embeds=embeds[0].unsqueeze(0), cache=cache, logits_to_keep=1)
            mask = torch.ones(1, longest, dtype=torch.long, device=device)
            return Prefilled(out.logits[:, -1], cache, mask, lengths)
        padded = torch.stack([F.pad(e, (0, 0, longest - e.shape[0], 0)) for e in embeds])
        mask = torch.stack([
            F.pad(torch.ones(n, dtype=torch.long, device=device), (longest - n, 0)) for n in lengths
        ])
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=padded, attention_mask=mask, position_ids=position_ids, cache=cache,
                         logits_to_keep=1)
        return Prefilled(out.logits[:, -1], cache, mask, lengths)

    def add(self, row_ids: Sequence[Hashable], prefilled: Prefilled, keep: Sequence[int] | None = None) -> None:
        """Append prefilled requests as the last rows (``keep``: indices of the prefilled rows to add; default
        all)."""
        keep = list(range(len(row_ids))) if keep is None else list(keep)
        if not keep:
            return
        index = torch.tensor(keep, device=prefilled.mask.device)
        new_mask = prefilled.mask.index_select(0, index)
        layers = _layers(prefilled.cache)
        new_kv = []
        for layer in layers:
            idx = index.to(layer.keys.device)
            new_kv.append((layer.keys.index_select(0, idx), layer.values.index_select(0, idx)))
        # Drop columns that are padding in every kept row.
        live = torch.nonzero(new_mask.any(dim=0), as_tuple=False)
        start = int(live[0]) if live.numel() else 0
        new_mask = new_mask[:, start:]
        new_kv = [(k[:, :, start:], v[:, :, start:]) for k, v in new_kv]
        length = int(new_mask.shape[1])
        if self.cache is None:
            _set_layers(prefilled.cache, new_kv)
            self.cache, self.mask = prefilled.cache, new_mask
        else:
            target = max(self.length, length)
            pad_batch, pad_new = target - self.length, target - length
            merged = []
            for mine, (k, v) in zip(_layers(self.cache), new_kv, strict=True):
                merged.append((torch.cat([_left_pad(mine.keys, pad_batch), _left_pad(k, pad_new)], dim=0),
                               torch.cat([_left_pad(mine.values, pad_batch), _left_pad(v, pad_new)], dim=0)))
            _set_layers(self.cache, merged)
            self.mask = torch.cat([F.pad(self.mask, (pad_batch, 0)), F.pad(new_mask, (pad_new, 0))], dim=0)
        self.row_ids.extend(row_ids[i] for i in keep)
        self.positions.extend(prefilled.lengths[i] for i in keep)

    def remove(self, row_ids: Sequence[Hashable]) -> None:
        """Drop rows (finished, stopped or cancelled requests) and free their cache."""
        gone = set(row_ids)
        keep = [i for i, rid in enumerate(self.row_ids) if rid not in gone]
        if len(keep) == len(self.row_ids):
            return
        if not keep:
            self.row_ids, self.positions, self.cache, self.mask = [], [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row are dead weight: cut them.
        live = torch.nonzero(self.mask.any(dim=0), as_tuple=False)
        start = int(live[0]) if live.numel() else 0
        self.mask = self.mask[:, start:]
        kept = []
        for layer in _layers(self.cache):
            idx = index.to(layer.keys.device)
            kept.append((layer.keys.index_select(0, idx)[:, :, start:], layer.values.index_select(0, idx)[:, :, start:]))
        _set_layers(self.cache, kept)
        self.row_ids = [self.row_ids[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token per row (in row order); returns next-token logits ``[B, V]``."""
        if len(tokens) != len(self.row_ids):
            raise ValueError(f"{len(tokens)} tokens for a batch of {len(self.row_ids)} rows")
        device = self.model.device
        input_ids = torch.tensor(tokens, device=device).unsqueeze(1)
        self.mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=self.mask.dtype, device=device)], dim=1)
        position_ids = torch.tensor(self.positions, device=device).unsqueeze(1)
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=position_ids, cache=self.cache)
        self.positions = [p + 1 for p in self.positions]
        return out.logits[:, -1]
