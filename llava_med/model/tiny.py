"""Builds small random-weight checkpoints in the exact LLaVA-Med v1.5 release format.

No weights can be downloaded on the machines this project is developed and tested on, so the tests and the demo
run the real loading and generation code on a checkpoint that this module writes in seconds:

* ``<root>/llava-med-<preset>-mistral/``: ``config.json`` with ``model_type: llava_mistral`` and every ``mm_*``
  key of microsoft/llava-med-v1.5-mistral-7b, ``generation_config.json``, sharded safetensors with
  ``model.safetensors.index.json``, a sentencepiece ``tokenizer.model`` (BPE with byte fallback, trained here from a
  fixed corpus), ``tokenizer_config.json`` and ``special_tokens_map.json``. Weights use the original names:
  Mistral keys, ``model.mm_projector.{0,2}.{weight,bias}`` and the CLIP tower embedded under
  ``model.vision_tower.vision_tower.vision_model.*``.
* ``<root>/clip-vit-<preset>-patch14-336/``: a full CLIP checkpoint (text and vision towers, like
  openai/clip-vit-large-patch14-336) with ``preprocessor_config.json``; the LLaVA config's ``mm_vision_tower``
  points to it by a path relative to the checkpoint folder. Its vision weights equal the embedded ones.

The same preset and seed always give the same bytes. Checkpoints are cached under ``~/.cache/llava_med``
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
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors.torch import save_file

from llava_med.model.cache import build_once

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


PRESETS = MappingProxyType(
    {
        # CLIP towers keep 64-dimensional heads, as every CLIP ViT does: the loader relies on it when it has to
        # infer a vision config from embedded weights.
        "tiny": Preset("tiny", 1000, 64, 128, 2, 4, 2, 64, 128, 3, 1, 2),
        # About 100M parameters: used by the batching benchmark.
        "small": Preset("small", 1000, 768, 2560, 12, 12, 4, 384, 1536, 4, 6, 3),
    }
)

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
    """Deterministic initialiser: every tensor drawn from one seeded generator, in a fixed order."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    def linear(self, out_f: int, in_f: int) -> torch.Tensor:
        return self.normal(out_f, in_f, std=1.0 / math.sqrt(in_f))

    def bias(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.02)


def _text_weights(p: Preset, init: _Init) -> dict[str, torch.Tensor]:
    head_dim = p.hidden_size // p.num_heads
    kv = p.num_kv_heads * head_dim
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": init.normal(p.vocab_size, p.hidden_size, std=1.0)}
    for i in range(p.num_layers):
        pre = f"model.layers.{i}."
        w[pre + "self_attn.q_proj.weight"] = init.linear(p.hidden_size, p.hidden_size)
        w[pre + "self_attn.k_proj.weight"] = init.linear(kv, p.hidden_size)
        w[pre + "self_attn.v_proj.weight"] = init.linear(kv, p.hidden_size)
        w[pre + "self_attn.o_proj.weight"] = init.linear(p.hidden_size, p.hidden_size)
        w[pre + "mlp.gate_proj.weight"] = init.linear(p.intermediate_size, p.hidden_size)
        w[pre + "mlp.up_proj.weight"] = init.linear(p.intermediate_size, p.hidden_size)
        w[pre + "mlp.down_proj.weight"] = init.linear(p.hidden_size, p.intermediate_size)
        w[pre + "input_layernorm.weight"] = 1.0 + init.normal(p.hidden_size, std=0.05)
        w[pre + "post_attention_layernorm.weight"] = 1.0 + init.normal(p.hidden_size, std=0.05)
    w["model.norm.weight"] = 1.0 + init.normal(p.hidden_size, std=0.05)
    lm_head = init.linear(p.vocab_size, p.hidden_size) * 4.0
    # Keep </s> (id 2) unlikely so random weights produce text of the requested length; stop strings and
    # max_new_tokens end generation instead.
    lm_head[2] = 0.0
    w["lm_head.weight"] = lm_head
    return w


def _clip_encoder_weights(prefix: str, hidden: int, inter: int, layers: int, init: _Init) -> dict[str, torch.Tensor]:
    w: dict[str, torch.Tensor] = {}
    for i in range(layers):
        pre = f"{prefix}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            w[pre + f"self_attn.{proj}.weight"] = init.linear(hidden, hidden)
            w[pre + f"self_attn.{proj}.bias"] = init.bias(hidden)
        w[pre + "layer_norm1.weight"] = 1.0 + init.normal(hidden, std=0.05)
        w[pre + "layer_norm1.bias"] = init.bias(hidden)
        w[pre + "mlp.fc1.weight"] = init.linear(inter, hidden)
        w[pre + "mlp.fc1.bias"] = init.bias(inter)
        w[pre + "mlp.fc2.weight"] = init.linear(hidden, inter)
        w[pre + "mlp.fc2.bias"] = init.bias(hidden)
        w[pre + "layer_norm2.weight"] = 1.0 + init.normal(hidden, std=0.05)
        w[pre + "layer_norm2.bias"] = init.bias(hidden)
    return w


def _vision_weights(p: Preset, init: _Init) -> dict[str, torch.Tensor]:
    """CLIP vision tower weights with the original (transformers 4.x ``CLIPVisionTransformer``) names."""
    h = p.vision_hidden
    num_pos = (p.image_size // p.patch_size) ** 2 + 1
    w = {
        "embeddings.class_embedding": init.normal(h, std=1.0),
        "embeddings.patch_embedding.weight": init.normal(h, 3, p.patch_size, p.patch_size, std=1.0 / p.patch_size),
        "embeddings.position_embedding.weight": init.normal(num_pos, h, std=0.5),
        "pre_layrnorm.weight": 1.0 + init.normal(h, std=0.05),
        "pre_layrnorm.bias": init.bias(h),
    }
    w.update(_clip_encoder_weights("", h, p.vision_intermediate, p.vision_layers, init))
    w["post_layernorm.weight"] = 1.0 + init.normal(h, std=0.05)
    w["post_layernorm.bias"] = init.bias(h)
    return w


def _clip_text_weights(p: Preset, init: _Init) -> dict[str, torch.Tensor]:
    h = p.vision_hidden
    w = {
        "text_model.embeddings.token_embedding.weight": init.normal(_CLIP_TEXT_VOCAB, h, std=0.02),
        "text_model.embeddings.position_embedding.weight": init.normal(_CLIP_TEXT_POS, h, std=0.01),
    }
    w.update(_clip_encoder_weights("text_model.", h, p.vision_intermediate, 1, init))
    w["text_model.final_layer_norm.weight"] = torch.ones(h)
    w["text_model.final_layer_norm.bias"] = torch.zeros(h)
    return w


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


def _save_sharded(weights: dict[str, torch.Tensor], folder: Path, num_shards: int) -> None:
    names = list(weights)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(num_shards):
        shard_name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: weights[n].contiguous() for n in names[s * per_shard : (s + 1) * per_shard]}
        save_file(part, str(folder / shard_name), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = shard_name
            total += t.numel() * t.element_size()
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_checkpoint(root: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write the checkpoint and its CLIP folder under ``root``; returns the checkpoint folder."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    if p.hidden_size % p.num_heads or p.vision_hidden % p.vision_heads:
        raise ValueError(f"preset {preset!r}: hidden sizes must divide by the head counts")
    root = Path(root)
    ckpt = root / checkpoint_dir_name(preset)
    clip_dir = root / vision_dir_name(preset)
    ckpt.mkdir(parents=True, exist_ok=True)
    clip_dir.mkdir(parents=True, exist_ok=True)

    init = _Init(seed)
    text = _text_weights(p, init)
    vision = _vision_weights(p, init)
    h, mm_h = p.hidden_size, p.vision_hidden
    projector = {
        "model.mm_projector.0.weight": init.linear(h, mm_h),
        "model.mm_projector.0.bias": init.bias(h),
        "model.mm_projector.2.weight": init.linear(h, h),
        "model.mm_projector.2.bias": init.bias(h),
    }
    clip_text = _clip_text_weights(p, init)

    # The release stores bf16 tensors; round once so the embedded and separate CLIP weights are equal.
    vision = {k: v.to(torch.bfloat16) for k, v in vision.items()}
    weights = {k: v.to(torch.bfloat16) for k, v in {**text, **projector}.items()}
    weights.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in vision.items()})
    _save_sharded(weights, ckpt, p.num_shards)

    rel_vision = os.path.relpath(clip_dir, ckpt)
    _write_json(ckpt / "config.json", llava_config(p, rel_vision))
    _write_json(ckpt / "generation_config.json", _GENERATION_CONFIG)
    _write_json(ckpt / "tokenizer_config.json", _TOKENIZER_CONFIG)
    _write_json(ckpt / "special_tokens_map.json", _SPECIAL_TOKENS_MAP)
    (ckpt / "tokenizer.model").write_bytes(_train_tokenizer(p.vocab_size, seed))

    clip_weights = {f"vision_model.{k}": v.float() for k, v in vision.items()}
    clip_weights.update(clip_text)
    clip_weights["visual_projection.weight"] = init.linear(mm_h, mm_h)
    clip_weights["text_projection.weight"] = init.linear(mm_h, mm_h)
    clip_weights["logit_scale"] = torch.tensor(2.6592)
    save_file(clip_weights, str(clip_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(clip_dir / "config.json", clip_config(p))
    _write_json(clip_dir / "preprocessor_config.json", preprocessor_config(p))
    return ckpt


def ensure_checkpoint(preset: str = "tiny", seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached checkpoint folder for ``preset``/``seed``, building it first if needed.

    The build goes to a temporary folder that is renamed into place, so a concurrent reader sees either nothing
    or the whole checkpoint.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final_root = base / f"v{FORMAT_VERSION}-{preset}-seed{seed}"

    def build(folder: Path) -> None:
        logger.info("building the %s random checkpoint (seed %d) in %s", preset, seed, final_root)
        write_checkpoint(folder, preset, seed)

    build_once(final_root, f"{checkpoint_dir_name(preset)}/config.json", build)
    return final_root / checkpoint_dir_name(preset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a random-weight checkpoint in the LLaVA-Med v1.5 format.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", help="write here instead of the cache (the folder is created)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.output_dir:
        path = write_checkpoint(Path(args.output_dir), args.preset, args.seed)
    else:
        path = ensure_checkpoint(args.preset, args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
