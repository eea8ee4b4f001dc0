"""A decode batch whose members join and leave between steps (iteration-level, "continuous" batching).

Each request is prefilled alone (its image features spliced into its embeddings) into its own KV cache, then its
cache joins the running batch: every row is left-padded to a common length and an attention mask hides the padding,
so each step appends one token per row at the same column. Rows leave by index; columns that are padding in every
remaining row are dropped, so the cache never grows beyond the longest live row.

transformers' own continuous batching takes token ids only and ignores ``pixel_values``, so it cannot serve images;
this works on embeddings and a stock ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from llava_med.model.modeling import LlavaMedForCausalLM


def _layers(cache) -> list:
    return list(cache.layers)


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
    def prefill(self, embeds: torch.Tensor):
        """Run one prompt (``[L, hidden]`` embeddings) alone; returns ``(last-position logits [V], cache)``."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=embeds.unsqueeze(0), cache=cache, logits_to_keep=1)
        return out.logits[0, -1], cache

    def add(self, row_id: Hashable, cache, length: int) -> None:
        """Append a prefilled request (its cache holds ``length`` positions) as the last row."""
        device = self.model.device
        row_mask = torch.ones(1, length, dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask = cache, row_mask
        else:
            target = max(self.length, length)
            pad_batch, pad_row = target - self.length, target - length
            for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, pad_batch), _left_pad(theirs.keys, pad_row)], dim=0)
                mine.values = torch.cat([_left_pad(mine.values, pad_batch), _left_pad(theirs.values, pad_row)], dim=0)
            self.mask = torch.cat([F.pad(self.mask, (pad_batch, 0)), F.pad(row_mask, (pad_row, 0))], dim=0)
        self.row_ids.append(row_id)
        self.positions.append(length)

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
        for layer in _layers(self.cache):
            idx = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
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
