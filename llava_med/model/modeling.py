"""The LLaVA-Med model: a causal language model, a CLIP vision tower and a projector, spliced at ``<image>``.

This mirrors the original ``LlavaMistralForCausalLM``: CLIP ``hidden_states[mm_vision_select_layer]`` (``-2``),
the CLS token dropped (``mm_vision_select_feature: patch``), the projector (``mlp2x_gelu``: Linear-GELU-Linear),
and the projected patches put where the prompt's token ids hold the ``IMAGE_TOKEN_INDEX`` sentinel. The language
model is a stock transformers model (Mistral or Llama) that receives ``inputs_embeds``, so quantisation, device
maps and KV caches are transformers' own.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import torch
from torch import nn

from llava_med.constants import IMAGE_TOKEN_INDEX
from llava_med.errors import CheckpointError, ImageCountMismatchError


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """Build the projector named by ``mm_projector_type`` (as the original ``build_vision_projector``)."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if projector_type == "identity":
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match:
        depth = int(match.group(1))
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    raise CheckpointError(f"unsupported mm_projector_type {projector_type!r} (known: linear, identity, mlpNx_gelu)")


class LlavaMedForCausalLM(nn.Module):
    """Vision tower + projector + language model. ``forward`` takes embeddings; ``embed_prompt`` builds them."""

    def __init__(
        self,
        language_model: nn.Module,
        vision_tower: nn.Module,
        mm_projector: nn.Module,
        *,
        select_layer: int = -2,
        select_feature: str = "patch",
    ) -> None:
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise CheckpointError(f"unsupported mm_vision_select_feature {select_feature!r} (patch or cls_patch)")
        self.language_model = language_model
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.select_layer = select_layer
        self.select_feature = select_feature
        # transformers renamed ``past_key_values`` to ``cache`` in 5.2x; accept either version.
        params = inspect.signature(language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def config(self):
        """The language model's config (vocab size, hidden size, ...)."""
        return self.language_model.config

    @property
    def embed_tokens(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        """Device where the prompt's embeddings live (the first device of a multi-GPU map)."""
        return self.embed_tokens.weight.device

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image occupies in the sequence (576 for CLIP ViT-L/14 at 336 px with patch features)."""
        vc = self.vision_tower.config
        patches = (vc.image_size // vc.patch_size) ** 2
        return patches + (1 if self.select_feature == "cls_patch" else 0)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` pixels -> ``[N, num_image_tokens, hidden]`` projected features."""
        vision_device = next(self.vision_tower.parameters()).device
        out = self.vision_tower(
            pixel_values=pixel_values.to(device=vision_device, dtype=self.vision_dtype), output_hidden_states=True
        )
        features = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            features = features[:, 1:]
        proj_param = next(self.mm_projector.parameters(), None)
        if proj_param is not None:
            features = features.to(device=proj_param.device, dtype=proj_param.dtype)
        return self.mm_projector(features)

    @torch.inference_mode()
    def embed_prompt(self, input_ids: Sequence[int], image_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed token ids, putting each image's features where ``IMAGE_TOKEN_INDEX`` stands: ``[L, hidden]``."""
        positions = [i for i, t in enumerate(input_ids) if t == IMAGE_TOKEN_INDEX]
        if len(positions) != len(image_features):
            raise ImageCountMismatchError(
                f"the prompt has {len(positions)} image placeholder(s) but {len(image_features)} image(s) were given"
            )
        embed = self.embed_tokens
        device = embed.weight.device
        pieces: list[torch.Tensor] = []
        start = 0
        for pos, feats in zip(positions, image_features, strict=True):
            if pos > start:
                pieces.append(embed(torch.tensor(input_ids[start:pos], device=device)))
            pieces.append(feats.to(device=device, dtype=embed.weight.dtype))
            start = pos + 1
        if start < len(input_ids):
            pieces.append(embed(torch.tensor(input_ids[start:], device=device)))
        return torch.cat(pieces, dim=0)

    def hidden_states(self, *, cache=None, **kwargs) -> torch.Tensor:
        """Run the decoder alone (no LM head): last hidden states ``[B, L, hidden]``, extending ``cache`` in place.
        With :meth:`logits` the caller picks the positions it needs logits for (e.g. each padded row's last)."""
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
            kwargs.setdefault("use_cache", True)
        return self.language_model.get_decoder()(**kwargs).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states ``[..., hidden]``."""
        return self.language_model.get_output_embeddings()(hidden)

    def forward(self, *, cache=None, **kwargs):
        """Run the language model on ``inputs_embeds`` or ``input_ids`` (plus masks, positions), extending the
        KV ``cache`` (a transformers ``Cache``) in place."""
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
            kwargs.setdefault("use_cache", True)
        return self.language_model(**kwargs)
