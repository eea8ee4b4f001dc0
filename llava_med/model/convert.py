"""Convert an original LLaVA-Med v1.5 checkpoint into the transformers-native Llava format.

The original release (``model_type: llava_mistral``, ``LlavaMistralForCausalLM``) is not an architecture that
transformers' ``LlavaForConditionalGeneration`` or vLLM can load. The converted folder is:

* ``config.json``: a ``LlavaConfig`` (``model_type: llava``) whose ``text_config`` is the release's Mistral config
  with one more vocabulary entry, whose ``vision_config`` is the CLIP tower's, ``vision_feature_layer`` /
  ``vision_feature_select_strategy`` from ``mm_vision_select_layer`` / ``mm_vision_select_feature``, and
  ``image_token_index`` = the old vocabulary size;
* the weights, renamed (``model.layers.*`` -> ``model.language_model.layers.*``, ``model.mm_projector.{0,2}`` ->
  ``model.multi_modal_projector.linear_{1,2}``, the CLIP tower under ``model.vision_tower.vision_model.*``), with
  the input embedding and the LM head grown by one row of zeros for ``<image>``. They are written shard by shard
  (one source shard in memory at a time) plus one shard for the vision tower;
* the tokenizer with ``<image>`` added as a special token (id = old vocabulary size), the CLIP image processor, a
  ``LlavaProcessor`` config and a chat template that renders ``mistral_instruct`` prompts;
* ``llava_med_conversion.json``: what the release's config said that the Llava format has no key for (prompt
  template, image aspect mode, context length) and where the folder came from.

The LM head row of ``<image>`` is zero, so its logit is 0: serving engines must forbid that token (the vLLM engine
gives it a logit bias of -100). Every written tensor is checked against a ``LlavaForConditionalGeneration`` built
on the meta device: a missing, unexpected or misshaped weight is an error naming it.

    llava-med convert /models/llava-med-v1.5-mistral-7b /models/llava-med-v1.5-mistral-7b-hf
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llava_med.constants import DEFAULT_IMAGE_TOKEN
from llava_med.errors import CheckpointError
from llava_med.model.cache import build_once

__all__ = ["CONVERSION_INFO", "FORMAT_VERSION", "convert_checkpoint", "conversion_info", "ensure_converted",
           "is_native_llava", "main"]

logger = logging.getLogger(__name__)

#: Bumped when the converted layout changes: cached conversions of an older version are made again.
FORMAT_VERSION = 1
#: File written next to the converted weights (what the release's config said, and the source).
CONVERSION_INFO = "llava_med_conversion.json"

_TEXT_PREFIX = "model.language_model."
_VISION_PREFIX = "model.vision_tower."
#: On disk the CLIP tower keeps its ``vision_model.`` level (vLLM's loader needs it; transformers 5, whose
#: ``CLIPVisionModel`` has no such level in memory, maps it on loading).
_VISION_DISK_PREFIX = "model.vision_tower.vision_model."
_PROJECTOR_NAMES = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
                    "model.mm_projector.2.": "model.multi_modal_projector.linear_2."}
_LLAVA_ONLY_PREFIXES = ("mm_", "image_aspect_ratio", "tokenizer_", "tune_", "freeze_", "use_mm_proj", "unfreeze_",
                        "image_grid_pinpoints")
_SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}

#: ``mistral_instruct`` as a chat template (LLaVA-Med v1.5's prompt layout, see llava_med/conversation.py): the
#: first user turn ``[INST] <image>\nQUESTION [/INST]``, answers `` ANSWER </s>``, an optional system message
#: wrapped in ``<<SYS>>``; BOS first. A message's images become one ``<image>\n`` each in front of its text.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set n = 0 -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}"
    "{%- set n = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if n > 0 -%}{%- set text = '<image>\\n' * n + (text | replace('<image>', '') | trim) -%}{%- endif -%}"
    "{%- if loop.first and ns.system -%}{%- set text = '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + text -%}"
    "{%- endif -%}"
    "{{- '[INST] ' + text + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + text + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def is_native_llava(config: Mapping[str, Any]) -> bool:
    """True for a transformers-native Llava config (``model_type: llava`` with a ``text_config``)."""
    return config.get("model_type") == "llava" and isinstance(config.get("text_config"), Mapping)


def conversion_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``llava_med_conversion.json`` of a converted folder (None when the folder has none)."""
    path = Path(folder) / CONVERSION_INFO
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _source_folder(model_path: str | None, local_files_only: bool) -> Path:
    from llava_med.model.builder import resolve_checkpoint
    from llava_med.model.tiny import ensure_checkpoint

    if model_path is None:
        return ensure_checkpoint("tiny")
    return resolve_checkpoint(model_path, local_files_only=local_files_only)


def fingerprint(folder: Path, vision_tower: str | None = None) -> str:
    """A short hash of what a conversion depends on: the folder, its config, index and weight files (names,
    sizes, modification times), the vision tower override and :data:`FORMAT_VERSION`."""
    h = hashlib.sha256(f"{FORMAT_VERSION}\0{folder.resolve()}\0{vision_tower}\0".encode())
    for path in sorted(folder.iterdir()):
        if path.is_file():
            st = path.stat()
            h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if path.suffix == ".json":
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _text_key(key: str) -> str | None:
    """The native name of a language-model or projector weight of the release (None: not one)."""
    for old, new in _PROJECTOR_NAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("model.mm_projector."):
        raise CheckpointError(f"unexpected projector weight {key} (the Llava format has linear_1 and linear_2)")
    if key.startswith("model.vision_tower."):
        return None  # the vision tower is written from the loaded tower
    if key.startswith("model."):
        return _TEXT_PREFIX + key[len("model."):]
    if key.startswith("lm_head."):
        return key
    raise CheckpointError(f"unexpected weight {key} in the checkpoint")


def _grow(tensor, rows: int = 1):
    import torch

    return torch.cat([tensor, tensor.new_zeros((rows, *tensor.shape[1:]))], dim=0).contiguous()


def _native_config(config: Mapping[str, Any], vision_config, dtype_name: str | None):
    from transformers import LlavaConfig

    from llava_med.model.builder import build_text_config

    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {projector!r} has no Llava equivalent (only mlp2x_gelu)")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in _SELECT_STRATEGY:
        raise CheckpointError(f"unsupported mm_vision_select_feature {select!r} (patch or cls_patch)")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise CheckpointError("checkpoints with mm_use_im_start_end / mm_use_im_patch_token are not supported")
    text_config = build_text_config(config).to_dict()
    # The release's config mixes the language model's keys with LLaVA's training and multimodal ones.
    text_config = {k: v for k, v in text_config.items() if not k.startswith(_LLAVA_ONLY_PREFIXES)}
    old_vocab = int(text_config["vocab_size"])
    text_config["vocab_size"] = old_vocab + 1
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    native = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config.to_dict(),
        image_token_index=old_vocab,
        image_seq_length=patches + (1 if select == "cls_patch" else 0),
        projector_hidden_act="gelu",
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=_SELECT_STRATEGY[select],
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    native.architectures = ["LlavaForConditionalGeneration"]
    if dtype_name:
        native.dtype = dtype_name
        native.text_config.dtype = dtype_name
    return native, old_vocab


def _disk_name(name: str) -> str:
    """The name a weight of ``LlavaForConditionalGeneration`` (as transformers 5 names it in memory) has on disk."""
    if name.startswith(_VISION_PREFIX) and not name.startswith(_VISION_DISK_PREFIX):
        return _VISION_DISK_PREFIX + name[len(_VISION_PREFIX):]
    return name


def _expected_shapes(native_config) -> dict[str, tuple[int, ...]]:
    """Every weight name and shape ``LlavaForConditionalGeneration`` expects (built on the meta device)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(native_config)
    shapes = {_disk_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if native_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _check_written(written: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    from llava_med.model.builder import weights_mismatch

    error = weights_mismatch(
        "the converted checkpoint would not match LlavaForConditionalGeneration",
        missing=list(set(expected) - set(written)),
        unexpected=list(set(written) - set(expected)),
        wrong_shape=[f"{k} {written[k]} (expected {expected[k]})" for k in set(written) & set(expected)
                     if tuple(written[k]) != tuple(expected[k])],
    )
    if error is not None:
        raise error


def _save_tokenizer_and_processor(source: Path, out: Path, image_processor, native_config, old_vocab: int) -> None:
    from tokenizers import AddedToken
    from transformers import LlavaProcessor

    from llava_med.model.builder import _quiet_transformers
    from llava_med.model.tokenizer import load_tokenizer

    with _quiet_transformers():  # it warns that ``llava_mistral`` is not a model type it knows
        # The loader's tokenizer (it encodes as sentencepiece did in training); the saved tokenizer.json keeps that.
        tokenizer = load_tokenizer(source)
    if len(tokenizer) != old_vocab:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {old_vocab}: "
                              f"{DEFAULT_IMAGE_TOKEN} could not take id {old_vocab}")
    tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if image_id != old_vocab:
        raise CheckpointError(f"{DEFAULT_IMAGE_TOKEN} got id {image_id}, expected {old_vocab}")
    vision = native_config.vision_config
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=native_config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        image_token=DEFAULT_IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    image_processor.save_pretrained(str(out))  # preprocessor_config.json, for loading the image processor alone


def convert_checkpoint(model_path: str | os.PathLike | None, out: str | os.PathLike, *,
                       vision_tower: str | None = None, local_files_only: bool = False) -> Path:
    """Write the native Llava form of the checkpoint ``model_path`` (a folder or hub id; None: the embedded tiny
    checkpoint) into the folder ``out``, which must not exist or be empty. Returns ``out``."""
    from llava_med.model.builder import read_config

    source = _source_folder(None if model_path is None else str(model_path), local_files_only)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty folder")
    return _convert(source, read_config(source), out, model_path, vision_tower, local_files_only)


def _convert(source: Path, config: Mapping[str, Any], out: Path, model_path, vision_tower: str | None,
             local_files_only: bool) -> Path:
    """:func:`convert_checkpoint` of the resolved folder ``source`` (the checkpoint ``model_path``) and its
    ``config``, into the empty or absent folder ``out``."""
    from llava_med.model.args import LoadConfig
    from llava_med.model.builder import CheckpointTensors, load_vision_tower

    if is_native_llava(config):
        raise CheckpointError(f"{source} is already in the transformers Llava format; serve it as it is")
    if "mm_hidden_size" not in config:
        raise CheckpointError(f"{source}/config.json has no mm_* keys (model_type {config.get('model_type')!r}): "
                              "not an original LLaVA checkpoint")
    tensors = CheckpointTensors(source)
    load_cfg = LoadConfig(model_path=str(source), vision_tower=vision_tower, local_files_only=local_files_only)
    vision_model, image_processor, vision_source = load_vision_tower(source, config, tensors, load_cfg)
    dtype_name = config.get("torch_dtype") or config.get("dtype")
    native, old_vocab = _native_config(config, vision_model.config, dtype_name)
    expected = _expected_shapes(native)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_converted(source, out, config, tensors, native, old_vocab, expected, vision_model, image_processor,
                         vision_source, model_path)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-written folder (it was empty or absent)
        raise
    logger.info("converted %s into %s", source, out)
    return out


def _write_converted(source: Path, out: Path, config: Mapping[str, Any], tensors, native, old_vocab: int,
                     expected: Mapping[str, tuple[int, ...]], vision_model, image_processor, vision_source: str,
                     model_path) -> None:
    """The body of :func:`convert_checkpoint`: weights shard by shard, then configs, tokenizer and processor."""
    from safetensors.torch import save_file

    from llava_med.conversation import conv_mode_for_config
    from llava_med.model.builder import context_length

    # Source files holding language-model or projector weights (the vision tower gets its own last shard).
    plan = [(fname, names) for fname, keys in tensors.files().items()
            if (names := {key: new for key in keys if (new := _text_key(key)) is not None})]
    num_shards = len(plan) + 1
    weight_map: dict[str, str] = {}
    written: dict[str, tuple[int, ...]] = {}
    total = 0
    grown = {_TEXT_PREFIX + "embed_tokens.weight", "lm_head.weight"}
    weight_dtype = None
    for index, (fname, names) in enumerate(plan, start=1):
        shard: dict[str, Any] = {}
        for key, tensor in tensors.load(names).items():  # one source file in memory at a time
            if names[key] in grown:
                if tensor.shape[0] != old_vocab:
                    raise CheckpointError(f"{key} has {tensor.shape[0]} rows, the config's vocab_size is {old_vocab}")
                tensor = _grow(tensor)
            weight_dtype = weight_dtype or tensor.dtype
            shard[names[key]] = tensor.contiguous()
        shard_name = f"model-{index:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, str(out / shard_name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = shard_name
            written[key] = tuple(tensor.shape)
            total += tensor.numel() * tensor.element_size()
        logger.info("converted %s -> %s (%d tensors)", fname, shard_name, len(shard))
        del shard
    vision_name = f"model-{num_shards:05d}-of-{num_shards:05d}.safetensors"
    vision_state = {_disk_name(_VISION_PREFIX + k): v.to(weight_dtype or v.dtype).contiguous()
                    for k, v in vision_model.state_dict().items() if not k.endswith("position_ids")}
    save_file(vision_state, str(out / vision_name), metadata={"format": "pt"})
    for key, tensor in vision_state.items():
        weight_map[key] = vision_name
        written[key] = tuple(tensor.shape)
        total += tensor.numel() * tensor.element_size()
    del vision_state, vision_model
    _check_written(written, expected)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        + "\n", encoding="utf-8")
    native.save_pretrained(str(out))
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    _save_tokenizer_and_processor(source, out, image_processor, native, old_vocab)
    try:
        conv_mode = conv_mode_for_config(config)
    except ValueError:
        conv_mode = None
    info = {
        "format_version": FORMAT_VERSION,
        "source": str(model_path) if model_path is not None else "embedded tiny checkpoint",
        "source_folder": str(source.resolve()),
        "source_model_type": config.get("model_type"),
        "conv_mode": conv_mode,
        "image_aspect_ratio": config.get("image_aspect_ratio") or "pad",
        "context_length": context_length(config),
        "image_token": DEFAULT_IMAGE_TOKEN,
        "image_token_id": old_vocab,
        "vision_source": vision_source,
    }
    (out / CONVERSION_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def default_converted_dir() -> Path:
    """Where :func:`ensure_converted` keeps conversions (``<cache>/converted``; ``LLAVA_MED_CACHE_DIR`` moves
    the cache)."""
    from llava_med.model.tiny import default_cache_dir

    return default_cache_dir() / "converted"


def ensure_converted(model_path: str | None, *, cache_dir: str | os.PathLike | None = None,
                     vision_tower: str | None = None, local_files_only: bool = False) -> Path:
    """A folder in the native Llava format for ``model_path``: the folder itself when it already is one,
    otherwise its conversion, made on first use in the cache (atomically: a concurrent process sees the whole
    conversion or none) and reused while the source is unchanged."""
    from llava_med.model.builder import read_config
    from llava_med.model.naming import model_name_from_path

    source = _source_folder(model_path, local_files_only)
    config = read_config(source)
    if is_native_llava(config):
        return source
    base = Path(cache_dir) if cache_dir is not None else default_converted_dir()
    name = model_name_from_path(str(model_path) if model_path else source.name)

    def build(folder: Path) -> None:
        logger.info("converting %s into the transformers Llava format (first use)", source)
        _convert(source, config, folder, model_path, vision_tower, local_files_only)

    return build_once(base / f"{name}-{fingerprint(source, vision_tower)}", CONVERSION_INFO, build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-med convert",
        description="Convert an original LLaVA-Med v1.5 checkpoint (llava_mistral) into the transformers Llava "
                    "format that LlavaForConditionalGeneration and vLLM load.",
    )
    parser.add_argument("src", help="the original checkpoint: a folder or hub id")
    parser.add_argument("out", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--vision-tower", default=None,
                        help="CLIP folder or hub id to use instead of the checkpoint's (embedded) vision tower")
    parser.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face hub")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = convert_checkpoint(args.src, args.out, vision_tower=args.vision_tower,
                                 local_files_only=args.local_files_only)
    except CheckpointError as exc:
        parser.exit(1, f"llava-med convert: {exc}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
