"""Builds small random-weight checkpoints in the exact LLaVA-Med v1.5 release format.

No weights can be downloaded on the machines this project is developed and tested on, so the tests and the demo
run the real loading and generation code on a checkpoint that this module writes in seconds:

* ``<root>/llava-med-<preset>-mistral/``: ``config.json`` with ``model_type: llava_mistral`` and every ``mm_*``
  key of microsoft/llava-med-v1.5-mistral-7b, ``generation_config.json``, sharded bf16 safetensors with
  ``model.safetensors.index.json``, a sentencepiece ``tokenizer.model``, ``tokenizer_config.json`` (LLaVA-Med
  v1.5's: BOS added, no EOS, ``<unk>`` as pad, right padding, max length 2048) and ``special_tokens_map.json``.
  Weights use the original names: Mistral keys, ``model.mm_projector.{0,2}.{weight,bias}`` and the CLIP tower
  embedded under ``model.vision_tower.vision_tower.vision_model.*``.
* ``<root>/clip-vit-<preset>-patch14-336/``: a full CLIP checkpoint (text and vision towers, like
  openai/clip-vit-large-patch14-336) with ``preprocessor_config.json``; the LLaVA config's ``mm_vision_tower``
  points to it by a path relative to the checkpoint folder. Its vision weights equal the embedded ones. The ``7b``
  preset writes only its configs (its vision weights are the embedded ones, as with the real checkpoint).

Tokenizers: ``toy`` (1,000 pieces, BPE with byte fallback, trained here from a fixed corpus; the ``tiny`` preset's,
which the test suite and its recorded streams use) or ``mistral-v1`` (the real 32,000-piece Mistral-7B v1
vocabulary of LLaVA-Med v1.5, copied from the ``mistral_common`` package and checked by SHA-256; the default of
``small`` and ``7b``).

Presets: ``tiny`` (seconds, for tests), ``small`` (~150M parameters, for benchmarks), ``7b`` (the real model's shapes:
Mistral-7B, CLIP ViT-L/14-336, ``mlp2x_gelu`` 1024->4096->4096; ~15 GB of bf16 in 4 shards). Weights are drawn and
written shard by shard: building never holds more than one shard (and the float32 draw of one tensor) in memory.

The same preset, tokenizer and seed always give the same bytes. Checkpoints are cached under ``~/.cache/llava_med``
(``LLAVA_MED_CACHE_DIR`` overrides) and built atomically, so concurrent processes never see half a checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors.torch import save_file

from llava_med.model.builder import EMBEDDED_VISION_PREFIX
from llava_med.model.cache import build_once
from llava_med.model.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

logger = logging.getLogger(__name__)

# 3: the real Mistral v1 tokenizer for ``small``, shards in generation order, the ``7b`` preset.
FORMAT_VERSION = 3
TOKENIZERS = ("toy", "mistral-v1")
TOY_VOCAB_SIZE = 1000
MISTRAL_VOCAB_SIZE = 32000


@dataclass(frozen=True)
class Preset:
    """Sizes of one random checkpoint. The real model: hidden 4096, 32 layers, CLIP ViT-L (1024, 24 layers)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    num_shards: int
    image_size: int = 336
    patch_size: int = 14
    tokenizer: str = "toy"
    #: Split shards by size (bytes, as ``save_pretrained``'s ``max_shard_size``) instead of into ``num_shards``.
    max_shard_bytes: int | None = None
    #: Write the separate CLIP folder's weights (``False``: its configs only; the embedded weights serve).
    clip_weights: bool = True


PRESETS = MappingProxyType(
    {
        # CLIP towers keep 64-dimensional heads, as every CLIP ViT does: the loader relies on it when it has to
        # infer a vision config from embedded weights.
        "tiny": Preset("tiny", TOY_VOCAB_SIZE, 64, 128, 2, 4, 2, 64, 128, 3, 1, 2),
        # About 150M parameters with the real vocabulary: used by the batching benchmark.
        "small": Preset("small", MISTRAL_VOCAB_SIZE, 768, 2560, 12, 12, 4, 384, 1536, 4, 6, 3, tokenizer="mistral-v1"),
        # microsoft/llava-med-v1.5-mistral-7b's shapes: Mistral-7B and CLIP ViT-L/14-336 (7.57B parameters).
        "7b": Preset("7b", MISTRAL_VOCAB_SIZE, 4096, 14336, 32, 32, 8, 1024, 4096, 24, 16, 4, tokenizer="mistral-v1",
                     max_shard_bytes=4_000_000_000, clip_weights=False),
    }
)


def resolve_preset(preset: str, tokenizer: str | None = None) -> Preset:
    """The preset, with another tokenizer (and its vocabulary size) when ``tokenizer`` is given."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    if tokenizer is None or tokenizer == p.tokenizer:
        return p
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {list(TOKENIZERS)}")
    return replace(p, tokenizer=tokenizer,
                   vocab_size=MISTRAL_VOCAB_SIZE if tokenizer == "mistral-v1" else TOY_VOCAB_SIZE)

# Words for the tokenizer corpus: enough to train a few hundred BPE merges of plausible biomedical text.
_WORDS = (
    "the a an of in on at to with and or is are was were be this that these there which what where how why "
    "no yes not image images picture shows shown seen visible see appears appear patient patients chest x-ray "
    "xray ct mri ultrasound scan scans slice lesion lesions tumor tumour mass masses nodule nodules normal "
    "abnormal left right upper lower lung lungs heart cardiac liver kidney kidneys brain bone bones fracture "
    "effusion pleural pneumonia pneumothorax consolidation opacity opacities cell cells tissue tissues stain "
    "stained staining histology histopathology pathology microscopy microscope slide arrow arrows region "
    "contrast axial sagittal coronal view views small large enlarged mild moderate severe acute chronic "
    "evidence finding findings diagnosis likely consistent suggest suggests suggestive infection inflammation "
    "carcinoma adenocarcinoma metastasis benign malignant cyst fluid blood vessel vessels artery vein wall "
    "density hyperdense hypodense signal intensity enhancement border margin irregular smooth round oval "
    "describe question answer organ organs abdomen pelvis spine skull retina fundus optic disc dermatology "
    "skin rash biopsy sample specimen nucleus nuclei cytoplasm membrane protein immunohistochemistry positive "
    "negative magnification scale bar panel figure shows demonstrates reveals indicates"
).split()


def default_cache_dir() -> Path:
    """Root folder for generated checkpoints (env ``LLAVA_MED_CACHE_DIR``, else ``~/.cache/llava_med``)."""
    env = os.environ.get("LLAVA_MED_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llava_med"


def checkpoint_dir_name(preset: str) -> str:
    return f"llava-med-{preset}-mistral"


def vision_dir_name(preset: str) -> str:
    return f"clip-vit-{preset}-patch14-336"


def _tokenizer_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ",", ":"]))
    lines += ["[INST] <image>\nWhat is shown in this image? [/INST] The image shows a chest x-ray. </s>"] * 20
    return lines


def _train_tokenizer(vocab_size: int, seed: int) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus(seed)),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return out.getvalue()


class _Init:
    """Deterministic initialiser: every tensor drawn from one seeded generator, in a fixed order.

    ``meta=True`` draws nothing and returns shape-only tensors (to plan shards before writing any)."""

    def __init__(self, seed: int, *, meta: bool = False) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.meta = meta

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        if self.meta:
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=self.gen) * std

    def linear(self, out_f: int, in_f: int) -> torch.Tensor:
        return self.normal(out_f, in_f, std=1.0 / math.sqrt(in_f))

    def bias(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.02)


Weights = Iterator[tuple[str, torch.Tensor]]


def _text_weights(p: Preset, init: _Init) -> Weights:
    head_dim = p.hidden_size // p.num_heads
    kv = p.num_kv_heads * head_dim
    yield "model.embed_tokens.weight", init.normal(p.vocab_size, p.hidden_size, std=1.0)
    for i in range(p.num_layers):
        pre = f"model.layers.{i}."
        yield pre + "self_attn.q_proj.weight", init.linear(p.hidden_size, p.hidden_size)
        yield pre + "self_attn.k_proj.weight", init.linear(kv, p.hidden_size)
        yield pre + "self_attn.v_proj.weight", init.linear(kv, p.hidden_size)
        yield pre + "self_attn.o_proj.weight", init.linear(p.hidden_size, p.hidden_size)
        yield pre + "mlp.gate_proj.weight", init.linear(p.intermediate_size, p.hidden_size)
        yield pre + "mlp.up_proj.weight", init.linear(p.intermediate_size, p.hidden_size)
        yield pre + "mlp.down_proj.weight", init.linear(p.hidden_size, p.intermediate_size)
        yield pre + "input_layernorm.weight", 1.0 + init.normal(p.hidden_size, std=0.05)
        yield pre + "post_attention_layernorm.weight", 1.0 + init.normal(p.hidden_size, std=0.05)
    yield "model.norm.weight", 1.0 + init.normal(p.hidden_size, std=0.05)
    lm_head = init.linear(p.vocab_size, p.hidden_size) * 4.0
    # Keep </s> (id 2) unlikely so random weights produce text of the requested length; stop strings and
    # max_new_tokens end generation instead.
    lm_head[2] = 0.0
    yield "lm_head.weight", lm_head


def _clip_encoder_weights(prefix: str, hidden: int, inter: int, layers: int, init: _Init) -> Weights:
    for i in range(layers):
        pre = f"{prefix}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield pre + f"self_attn.{proj}.weight", init.linear(hidden, hidden)
            yield pre + f"self_attn.{proj}.bias", init.bias(hidden)
        yield pre + "layer_norm1.weight", 1.0 + init.normal(hidden, std=0.05)
        yield pre + "layer_norm1.bias", init.bias(hidden)
        yield pre + "mlp.fc1.weight", init.linear(inter, hidden)
        yield pre + "mlp.fc1.bias", init.bias(inter)
        yield pre + "mlp.fc2.weight", init.linear(hidden, inter)
        yield pre + "mlp.fc2.bias", init.bias(hidden)
        yield pre + "layer_norm2.weight", 1.0 + init.normal(hidden, std=0.05)
        yield pre + "layer_norm2.bias", init.bias(hidden)


def _vision_weights(p: Preset, init: _Init) -> Weights:
    """CLIP vision tower weights with the original (transformers 4.x ``CLIPVisionTransformer``) names."""
    h = p.vision_hidden
    num_pos = (p.image_size // p.patch_size) ** 2 + 1
    yield "embeddings.class_embedding", init.normal(h, std=1.0)
    yield "embeddings.patch_embedding.weight", init.normal(h, 3, p.patch_size, p.patch_size, std=1.0 / p.patch_size)
    yield "embeddings.position_embedding.weight", init.normal(num_pos, h, std=0.5)
    yield "pre_layrnorm.weight", 1.0 + init.normal(h, std=0.05)
    yield "pre_layrnorm.bias", init.bias(h)
    yield from _clip_encoder_weights("", h, p.vision_intermediate, p.vision_layers, init)
    yield "post_layernorm.weight", 1.0 + init.normal(h, std=0.05)
    yield "post_layernorm.bias", init.bias(h)


def _projector_weights(p: Preset, init: _Init) -> Weights:
    h, mm_h = p.hidden_size, p.vision_hidden
    yield "model.mm_projector.0.weight", init.linear(h, mm_h)
    yield "model.mm_projector.0.bias", init.bias(h)
    yield "model.mm_projector.2.weight", init.linear(h, h)
    yield "model.mm_projector.2.bias", init.bias(h)


def _clip_text_weights(p: Preset, init: _Init) -> Weights:
    h = p.vision_hidden
    yield "text_model.embeddings.token_embedding.weight", init.normal(_CLIP_TEXT_VOCAB, h, std=0.02)
    yield "text_model.embeddings.position_embedding.weight", init.normal(_CLIP_TEXT_POS, h, std=0.01)
    yield from _clip_encoder_weights("text_model.", h, p.vision_intermediate, 1, init)
    yield "text_model.final_layer_norm.weight", torch.ones(h)
    yield "text_model.final_layer_norm.bias", torch.zeros(h)


def _checkpoint_weights(p: Preset, init: _Init) -> Weights:
    """The LLaVA checkpoint's tensors in bf16 (as the release stores them), in the order they are drawn and stored:
    language model, embedded CLIP vision tower, projector."""
    for name, t in _text_weights(p, init):
        yield name, t.to(torch.bfloat16)
    for name, t in _vision_weights(p, init):
        yield EMBEDDED_VISION_PREFIX + name, t.to(torch.bfloat16)
    for name, t in _projector_weights(p, init):
        yield name, t.to(torch.bfloat16)


def _clip_extra_weights(p: Preset, init: _Init) -> Weights:
    """The separate CLIP folder's tensors that the LLaVA checkpoint lacks (drawn after the checkpoint's)."""
    mm_h = p.vision_hidden
    yield from _clip_text_weights(p, init)
    yield "visual_projection.weight", init.linear(mm_h, mm_h)
    yield "text_projection.weight", init.linear(mm_h, mm_h)
    yield "logit_scale", torch.tensor(2.6592)


_CLIP_TEXT_VOCAB = 64
_CLIP_TEXT_POS = 16


def llava_config(p: Preset, vision_tower: str) -> dict:
    """The checkpoint's config.json: the keys of microsoft/llava-med-v1.5-mistral-7b, sized to the preset."""
    return {
        "_name_or_path": f"llava-med-{p.name}-mistral",
        "architectures": ["LlavaMistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": 32768,
        "mm_hidden_size": p.vision_hidden,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "model_type": "llava_mistral",
        "num_attention_heads": p.num_heads,
        "num_hidden_layers": p.num_layers,
        "num_key_value_heads": p.num_kv_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": p.vocab_size,
    }


def clip_config(p: Preset) -> dict:
    """config.json of the separate CLIP folder, shaped like openai/clip-vit-large-patch14-336's."""
    return {
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": p.vision_hidden,
        "text_config": {
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            "hidden_act": "quick_gelu",
            "hidden_size": p.vision_hidden,
            "intermediate_size": p.vision_intermediate,
            "max_position_embeddings": _CLIP_TEXT_POS,
            "model_type": "clip_text_model",
            "num_attention_heads": p.vision_heads,
            "num_hidden_layers": 1,
            "projection_dim": p.vision_hidden,
            "vocab_size": _CLIP_TEXT_VOCAB,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "vision_config": {
            "hidden_act": "quick_gelu",
            "hidden_size": p.vision_hidden,
            "image_size": p.image_size,
            "intermediate_size": p.vision_intermediate,
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": p.vision_heads,
            "num_channels": 3,
            "num_hidden_layers": p.vision_layers,
            "patch_size": p.patch_size,
            "projection_dim": p.vision_hidden,
        },
    }


def preprocessor_config(p: Preset) -> dict:
    return {
        "crop_size": p.image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
        "size": p.image_size,
    }


_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": True,
    "model_max_length": 2048,
    "pad_token": "<unk>",
    "padding_side": "right",
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}
_SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.2"}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensor_sizes(p: Preset) -> list[tuple[str, int]]:
    """Name and size in bytes of every tensor of the checkpoint, in storage order (a draw-free pass: shapes only)."""
    return [(name, _nbytes(t)) for name, t in _checkpoint_weights(p, _Init(0, meta=True))]


def plan_shards(p: Preset, sizes: list[tuple[str, int]] | None = None) -> dict[str, str]:
    """Shard file of every tensor of the checkpoint (``sizes``: :func:`tensor_sizes`, computed when not given):
    ``num_shards`` shards of equal tensor counts, or shards of at most ``max_shard_bytes``."""
    sizes = tensor_sizes(p) if sizes is None else sizes
    groups: list[list[str]] = []
    if p.max_shard_bytes is None:
        per_shard = math.ceil(len(sizes) / p.num_shards)
        groups = [[n for n, _ in sizes[i : i + per_shard]] for i in range(0, len(sizes), per_shard)]
    else:
        used = 0
        for name, size in sizes:
            if not groups or (used + size > p.max_shard_bytes and groups[-1]):
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += size
    total = len(groups)
    return {n: f"model-{s + 1:05d}-of-{total:05d}.safetensors" for s, names in enumerate(groups) for n in names}


def checkpoint_bytes(p: Preset) -> int:
    """Bytes of the checkpoint's tensors (what its index calls ``total_size``)."""
    return sum(size for _, size in tensor_sizes(p))


class _ShardWriter:
    """Writes tensors that arrive in storage order: each shard is saved, and dropped, as soon as it is complete."""

    def __init__(self, folder: Path, plan: dict[str, str]) -> None:
        self.folder = folder
        self.plan = plan
        self.left = Counter(plan.values())  # tensors still to come, per shard
        self.pending: dict[str, torch.Tensor] = {}
        self.shard: str | None = None
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard = self.plan[name]
        if shard != self.shard and self.pending:
            raise RuntimeError(f"{name} arrived before shard {self.shard} was complete")
        self.shard = shard
        self.pending[name] = tensor.contiguous()
        self.total += _nbytes(tensor)
        self.left[shard] -= 1
        if not self.left[shard]:
            save_file(self.pending, str(self.folder / shard), metadata={"format": "pt"})
            logger.debug("wrote %s (%d tensors)", shard, len(self.pending))
            self.pending = {}

    def finish(self) -> None:
        unwritten = sorted(shard for shard, left in self.left.items() if left)
        if unwritten:
            raise RuntimeError(f"shards never completed: {unwritten}")
        _write_json(self.folder / "model.safetensors.index.json",
                    {"metadata": {"total_size": self.total}, "weight_map": self.plan})


def tokenizer_model(p: Preset, seed: int = 0) -> bytes:
    """The sentencepiece model of the preset's tokenizer."""
    if p.tokenizer == "mistral-v1":
        from llava_med.model.tokenizer import mistral_v1_tokenizer_model

        return mistral_v1_tokenizer_model()
    return _train_tokenizer(p.vocab_size, seed)


def write_tokenizer(folder: Path, p: Preset, seed: int = 0) -> None:
    """The tokenizer files of a LLaVA-Med v1.5 checkpoint (also used alone by tests of the tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "tokenizer_config.json", _TOKENIZER_CONFIG)
    _write_json(folder / "special_tokens_map.json", _SPECIAL_TOKENS_MAP)
    (folder / "tokenizer.model").write_bytes(tokenizer_model(p, seed))


def write_checkpoint(root: Path, preset: str = "tiny", seed: int = 0, tokenizer: str | None = None) -> Path:
    """Write the checkpoint and its CLIP folder under ``root``; returns the checkpoint folder."""
    p = resolve_preset(preset, tokenizer)
    if p.hidden_size % p.num_heads or p.vision_hidden % p.vision_heads:
        raise ValueError(f"preset {preset!r}: hidden sizes must divide by the head counts")
    root = Path(root)
    ckpt = root / checkpoint_dir_name(preset)
    clip_dir = root / vision_dir_name(preset)
    ckpt.mkdir(parents=True, exist_ok=True)
    clip_dir.mkdir(parents=True, exist_ok=True)
    sizes = tensor_sizes(p)
    needed = sum(size for _, size in sizes)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise OSError(f"the {preset} checkpoint needs {needed / 2**30:.1f} GiB but {root} has "
                      f"{free / 2**30:.1f} GiB free")
    write_tokenizer(ckpt, p, seed)  # first: a missing mistral_common fails before any weight is drawn

    init = _Init(seed)
    writer = _ShardWriter(ckpt, plan_shards(p, sizes))
    clip_weights: dict[str, torch.Tensor] = {}
    for name, t in _checkpoint_weights(p, init):
        writer.add(name, t)
        if p.clip_weights and name.startswith(EMBEDDED_VISION_PREFIX):
            # The separate CLIP folder holds the same (bf16-rounded) vision weights in float32.
            clip_weights["vision_model." + name[len(EMBEDDED_VISION_PREFIX):]] = t.float()
    writer.finish()

    rel_vision = os.path.relpath(clip_dir, ckpt)
    _write_json(ckpt / "config.json", llava_config(p, rel_vision))
    _write_json(ckpt / "generation_config.json", _GENERATION_CONFIG)

    if p.clip_weights:
        clip_weights.update(_clip_extra_weights(p, init))
        save_file(clip_weights, str(clip_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(clip_dir / "config.json", clip_config(p))
    _write_json(clip_dir / "preprocessor_config.json", preprocessor_config(p))
    return ckpt


def cache_key(preset: str, seed: int = 0, tokenizer: str | None = None) -> str:
    """Folder name of a cached checkpoint; it changes whenever what the files hold changes (``FORMAT_VERSION``)."""
    p = resolve_preset(preset, tokenizer)
    suffix = "" if p.tokenizer == PRESETS[preset].tokenizer else f"-{p.tokenizer}"
    return f"v{FORMAT_VERSION}-{preset}{suffix}-seed{seed}"


def ensure_checkpoint(preset: str = "tiny", seed: int = 0, cache_dir: str | os.PathLike | None = None,
                      tokenizer: str | None = None) -> Path:
    """Return the cached checkpoint folder for ``preset``/``seed``/``tokenizer``, building it first if needed.

    The build goes to a temporary folder that is renamed into place, so a concurrent reader sees either nothing
    or the whole checkpoint.
    """
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final_root = base / cache_key(preset, seed, tokenizer)

    def build(folder: Path) -> None:
        logger.info("building the %s random checkpoint (seed %d) in %s", preset, seed, final_root)
        write_checkpoint(folder, preset, seed, tokenizer)

    build_once(final_root, f"{checkpoint_dir_name(preset)}/config.json", build)
    return final_root / checkpoint_dir_name(preset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a random-weight checkpoint in the LLaVA-Med v1.5 format.")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help="tiny (seconds), small (~150M parameters), 7b (the real shapes: ~15 GB on disk)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                        help="toy (1,000 pieces) or mistral-v1 (the real vocabulary, from mistral_common); "
                             "default: the preset's (tiny: toy, others: mistral-v1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", help="write here instead of the cache (the folder is created)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.output_dir:
        path = write_checkpoint(Path(args.output_dir), args.preset, args.seed, args.tokenizer)
    else:
        path = ensure_checkpoint(args.preset, args.seed, tokenizer=args.tokenizer)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
