"""Load a LLaVA-Med checkpoint (original LLaVA format) from a local folder or a hub id.

The format is recognised from ``config.json`` (``model_type``), never from the folder's or the model's name.
Every weight of the checkpoint must be used and every parameter of the model must be loaded: a missing, renamed
or unexpected weight is an error that names the keys (transformers alone only logs a warning and leaves the
parameter randomly initialised).

The vision tower comes, in this order, from ``LoadConfig.vision_tower`` (a folder or hub id), from the CLIP
weights embedded in the checkpoint (``model.vision_tower.vision_tower.vision_model.*``; the original code ignores
them and downloads ``mm_vision_tower``), or from ``mm_vision_tower``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from llava_med.errors import CheckpointError, MissingDependencyError
from llava_med.model.args import LoadConfig
from llava_med.model.cpu_packing import can_prepack, prepack_linears
from llava_med.model.dtypes import choose_dtype, resolve_device
from llava_med.model.preprocess import make_clip_image_processor
from llava_med.model.modeling import LlavaMedForCausalLM, build_projector
from llava_med.model.naming import model_name_from_path
from llava_med.model.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

EMBEDDED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
# Weights the language model does not own but the LLaVA checkpoint holds.
_MULTIMODAL_PREFIXES = (PROJECTOR_PREFIX, "model.vision_tower.")



def _text_model_classes(model_type: str):
    """Language-model classes for a LLaVA ``model_type`` (the format is decided by config, not by name)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    table = {
        "llava_mistral": (MistralConfig, MistralForCausalLM),
        "llava_llama": (LlamaConfig, LlamaForCausalLM),
        "llava": (LlamaConfig, LlamaForCausalLM),
    }
    if model_type not in table:
        raise CheckpointError(
            f"config.json has model_type {model_type!r}; this loader reads original LLaVA checkpoints "
            f"({', '.join(sorted(table))})"
        )
    return table[model_type]


@dataclass
class LoadedModel:
    """Everything the prompt, image and generation code needs about one loaded checkpoint."""

    tokenizer: Any
    model: LlavaMedForCausalLM
    image_processor: Any
    context_len: int
    config: Mapping[str, Any]
    model_path: str
    model_name: str
    vision_source: str
    image_aspect_ratio: str = "pad"
    quantization: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.device


def resolve_checkpoint(model_path: str, *, local_files_only: bool = False) -> Path:
    """A local folder as is; otherwise a hub id fetched (or found in the cache) with huggingface_hub."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"--model-path {model_path!r} is a file; give the checkpoint folder")
    if model_path.startswith((".", "/", "~")) or os.sep in model_path.strip("/").replace("/", "", 1):
        raise CheckpointError(f"--model-path {model_path!r}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                model_path,
                local_files_only=local_files_only,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "tokenizer.model", "*.txt"],
            )
        )
    except Exception as exc:  # huggingface_hub raises many types: offline, not found, gated, network
        raise CheckpointError(
            f"could not get {model_path!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "download it where there is network and pass the local folder as --model-path"
        ) from exc


def read_config(folder: Path) -> dict[str, Any]:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a model checkpoint folder")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc


class CheckpointTensors:
    """Reads named tensors from a checkpoint's safetensors (sharded with an index, or single) or .bin files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._key_to_file: dict[str, str] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = folder / index_name
            if index.is_file():
                self._key_to_file = dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if (folder / single).is_file():
                    self._key_to_file = {k: single for k in self._keys_of(folder / single)}
                    break
        if not self._key_to_file:
            raise CheckpointError(f"{folder} holds no weights (no *.safetensors or pytorch_model.bin files)")
        missing_files = sorted({f for f in self._key_to_file.values() if not (folder / f).is_file()})
        if missing_files:
            raise CheckpointError(f"{folder}: the weight index names missing shard file(s): {missing_files}")

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as fh:
                return list(fh.keys())
        return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True).keys())

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def files(self) -> dict[str, list[str]]:
        """Weight file name -> its keys, in the index's order (for streaming a checkpoint file by file)."""
        out: dict[str, list[str]] = {}
        for key, fname in self._key_to_file.items():
            out.setdefault(fname, []).append(key)
        return out

    @property
    def safetensors_only(self) -> bool:
        return all(name.endswith(".safetensors") for name in self._key_to_file.values())

    @contextlib.contextmanager
    def slices(self, keys: Iterable[str]):
        """Lazy safetensors slices of ``keys`` read with ``pread`` (not mmap): a tensor is read when it is
        materialised, into its own memory, and the checkpoint's file pages never count in this process's RSS."""
        from safetensors import safe_open

        handles: dict[str, Any] = {}
        try:
            out = {}
            for key in keys:
                fname = self._key_to_file[key]
                if fname not in handles:
                    handles[fname] = safe_open(str(self.folder / fname), framework="pt", backend="pread")
                out[key] = handles[fname].get_slice(key)
            yield out
        finally:
            for handle in handles.values():
                handle.__exit__(None, None, None)

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._key_to_file[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for fname, names in by_file.items():
            path = self.folder / fname
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as fh:
                    for n in names:
                        out[n] = fh.get_tensor(n)
            else:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for n in names:
                    out[n] = data[n]
        return out


def _quantization_config(cfg: LoadConfig, dtype: torch.dtype):
    if not (cfg.load_8bit or cfg.load_4bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "--load-8bit/--load-4bit need bitsandbytes: pip install 'llava-med-serve[quant]' (or bitsandbytes)"
        ) from exc
    from transformers import BitsAndBytesConfig

    if cfg.load_8bit:
        # bitsandbytes logs its fp16 cast on every int8 matmul of a non-fp16 model (224 lines per forward of a 7B).
        _log_first_only("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
    )


class _FirstOnly(logging.Filter):
    """Lets the first record whose message starts with ``prefix`` through and drops its repeats."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _log_first_only(logger_name: str, prefix: str) -> None:
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, _FirstOnly) and f.prefix == prefix for f in target.filters):
        target.addFilter(_FirstOnly(prefix))


def _device_map(cfg: LoadConfig, device: str) -> tuple[Any, dict | None]:
    if device == "cuda" and cfg.num_gpus > 1:
        available = torch.cuda.device_count()
        if available < cfg.num_gpus:
            raise ValueError(f"--num-gpus {cfg.num_gpus} but torch sees {available} CUDA device(s)")
        if cfg.max_gpu_memory:
            max_memory = {i: cfg.max_gpu_memory for i in range(cfg.num_gpus)}
        else:
            max_memory = {i: f"{math.floor(torch.cuda.get_device_properties(i).total_memory / 2**30 * 0.9)}GiB"
                          for i in range(cfg.num_gpus)}
        return "auto", max_memory
    if device == "cuda":
        return {"": f"cuda:{torch.cuda.current_device()}"}, None
    return {"": device}, None


def weights_mismatch(what: str, *, missing: list[str] = (), unexpected: list[str] = (), wrong_shape: list[str] = (),
                     errors: Any = None) -> CheckpointError | None:
    """The error naming the weights that do not match ``what`` (None when everything matches)."""
    problems = []
    if missing:
        problems.append(f"missing weights (would be random): {_short_list(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected weights (not used by the model): {_short_list(sorted(unexpected))}")
    if wrong_shape:
        problems.append(f"weights with the wrong shape: {_short_list(sorted(wrong_shape))}")
    if errors:
        problems.append(f"errors: {errors}")
    return CheckpointError(f"{what}: " + "; ".join(problems)) if problems else None


def _check_language_model_keys(info: Mapping[str, Any], tie_embeddings: bool) -> None:
    error = weights_mismatch(
        "the checkpoint does not match the model",
        missing=[k for k in info.get("missing_keys", ()) if not (tie_embeddings and k == "lm_head.weight")],
        unexpected=[k for k in info.get("unexpected_keys", ()) if not k.startswith(_MULTIMODAL_PREFIXES)],
        wrong_shape=[str(m) for m in info.get("mismatched_keys", ())],
        errors=info.get("error_msgs"),
    )
    if error is not None:
        raise error


def _short_list(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def build_text_config(config: Mapping[str, Any]):
    """The language model's transformers config (MistralConfig, LlamaConfig) from a LLaVA ``config.json``."""
    config_cls, _ = _text_model_classes(config.get("model_type", ""))
    skip = {"model_type", "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"}
    return config_cls.from_dict({k: v for k, v in config.items() if k not in skip})


def _load_language_model(folder: Path, config: dict, cfg: LoadConfig, device: str, dtype: torch.dtype,
                         tensors: CheckpointTensors):
    _, model_cls = _text_model_classes(config.get("model_type", ""))
    text_config = build_text_config(config)
    device_map, max_memory = _device_map(cfg, device)
    quant = _quantization_config(cfg, dtype)
    kwargs: dict[str, Any] = {
        "config": text_config,
        "dtype": dtype,
        "device_map": device_map,
        "output_loading_info": True,
        "local_files_only": True,
    }
    if max_memory:
        kwargs["max_memory"] = max_memory
    if quant is not None:
        kwargs["quantization_config"] = quant
    # transformers prints a long table of the multimodal keys it does not own; we check them ourselves below.
    with _quiet_transformers():
        if quant is not None and device == "cpu" and tensors.safetensors_only:
            # Quantised weights are converted, never used in place: read each one with pread. transformers' mmap
            # would leave every page of the bf16 checkpoint mapped until the end of loading (measured on the
            # 7B-shaped checkpoint in 4-bit on a CPU: 19 GB peak RSS instead of the ~6 GB the model occupies).
            del kwargs["local_files_only"]
            text_keys = [k for k in tensors.keys() if not k.startswith(_MULTIMODAL_PREFIXES)]
            with tensors.slices(text_keys) as state_dict:
                model, info = model_cls.from_pretrained(None, state_dict=state_dict, **kwargs)
        else:
            model, info = model_cls.from_pretrained(str(folder), **kwargs)
    _check_language_model_keys(info, bool(config.get("tie_word_embeddings", False)))
    return model


def _cpu_prepack_plan(cfg: LoadConfig, device: str, dtype: torch.dtype) -> bool:
    """Whether to pack the language model's bf16 weights for oneDNN (see :mod:`llava_med.model.cpu_packing`)."""
    if device != "cpu" or cfg.load_4bit or cfg.load_8bit or dtype != torch.bfloat16:
        return False
    if not cfg.cpu_prepack:
        logger.info("bf16 weights on the CPU left unpacked (--no-cpu-prepack): decoding is slower")
        return False
    why_not = can_prepack()
    if why_not is not None:
        logger.warning("bf16 weights on the CPU left unpacked, decoding is slower: %s", why_not)
    return why_not is None


def _prepack_from_checkpoint(model: torch.nn.Module, tensors: CheckpointTensors) -> int:
    """Pack the language model's linear weights (:func:`prepack_linears`), each read from the checkpoint with pread:
    the mapped weights are never paged in, so the memory peak is the packed model plus one matrix (packing from the
    mapped weights instead, measured on the 7B shapes: a 24 GB peak, 17.5 GB afterwards, for a 14.6 GB model)."""
    keys = set(tensors.keys()) if tensors.safetensors_only else set()

    with tensors.slices(keys) as slices:
        def weight_of(name: str, linear: torch.nn.Linear) -> torch.Tensor:
            found = slices.get(f"{name}.weight")
            if found is None or tuple(found.get_shape()) != tuple(linear.weight.shape):
                return linear.weight.detach()  # not stored under the model's own name: pack the loaded weight
            return found[:].to(linear.weight.dtype)

        return prepack_linears(model, weight_of=weight_of, after_each=_release_freed_memory)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere; looked up once (``find_library`` runs ``ldconfig -p`` each call)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def _release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere). Weights converted in
    place free blocks of tens of MB that glibc keeps in its heap otherwise."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@torch.inference_mode()
def _convert_4bit_for_cpu(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """bitsandbytes converts each 4-bit weight to its CPU kernel's layout on the module's first forward. Done then,
    during the first request, it fragments the heap (measured on the 7B-shaped checkpoint: +3 GiB RSS and a 20 s
    first request): do it now, one module at a time, returning the freed memory after each."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module(torch.zeros(1, module.in_features, dtype=dtype))
            _release_freed_memory()


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' warnings for one call whose outcome we check ourselves."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _infer_vision_config(state: Mapping[str, torch.Tensor]):
    """CLIP vision config from the shapes of embedded weights (used when ``mm_vision_tower`` is unreachable)."""
    from transformers import CLIPVisionConfig

    patch = state["embeddings.patch_embedding.weight"]
    hidden, _, patch_size, _ = patch.shape
    num_pos = state["embeddings.position_embedding.weight"].shape[0]
    image_size = int(round(math.sqrt(num_pos - 1))) * patch_size
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    intermediate = state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    # CLIP ViTs use 64-dimensional heads (ViT-L/14: 1024 / 64 = 16 heads).
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _resolve_vision_source(name: str, checkpoint: Path, local_files_only: bool, *, weights: bool = True
                           ) -> Path | None:
    """A folder for ``mm_vision_tower``/``--vision-tower`` (relative paths are tried against the checkpoint).

    ``weights=False`` fetches only the configs of a hub id (the weights are embedded in the checkpoint)."""
    for candidate in (checkpoint / name, Path(name).expanduser()):
        if candidate.is_dir():
            return candidate.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name,
                local_files_only=local_files_only,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"] if weights else ["*.json"],
            )
        )
    except Exception as exc:  # offline, unknown id, gated: the caller decides whether that is fatal
        logger.info("vision tower %r not available (%s: %s)", name, type(exc).__name__, exc)
        return None


def _image_processor_for(folder: Path | None, image_size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(str(folder))
    return make_clip_image_processor(image_size)


def load_vision_tower(folder: Path, config: Mapping[str, Any], tensors: CheckpointTensors, cfg: LoadConfig,
                      dtype: torch.dtype = torch.float32):
    """The checkpoint's CLIP vision tower (in ``dtype``, on the CPU) from ``--vision-tower``, the embedded weights or
    ``mm_vision_tower``, in that order. Returns ``(vision_model, image_processor, source_description)``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    mm_vision_tower = config.get("mm_vision_tower") or config.get("vision_tower")
    if cfg.vision_tower:
        source = _resolve_vision_source(cfg.vision_tower, folder, cfg.local_files_only)
        if source is None:
            raise CheckpointError(f"--vision-tower {cfg.vision_tower!r} is neither a folder nor an available hub id")
        return (*_load_vision_folder(source), str(source))

    embedded_keys = [k for k in tensors.keys() if k.startswith(EMBEDDED_VISION_PREFIX)]
    source = (_resolve_vision_source(mm_vision_tower, folder, cfg.local_files_only, weights=not embedded_keys)
              if mm_vision_tower else None)
    if embedded_keys:
        state = {k[len(EMBEDDED_VISION_PREFIX):]: v for k, v in tensors.load(embedded_keys).items()}
        if source is not None and (source / "config.json").is_file():
            vision_config = CLIPVisionConfig.from_pretrained(str(source))
        else:
            vision_config = _infer_vision_config(state)
            logger.warning("vision tower config inferred from the embedded weights (%s unavailable)", mm_vision_tower)
        # Built in the compute dtype: a float32 tower (1.2 GB for ViT-L) converted afterwards would leave its freed
        # float32 blocks in the heap.
        model = CLIPVisionModel._from_config(vision_config, dtype=dtype)
        state.pop("embeddings.position_ids", None)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                "the embedded vision tower does not match its config: "
                f"missing {_short_list(sorted(EMBEDDED_VISION_PREFIX + k for k in result.missing_keys))}; "
                f"unexpected {_short_list(sorted(EMBEDDED_VISION_PREFIX + k for k in result.unexpected_keys))}"
            )
        processor = _image_processor_for(source, vision_config.image_size)
        return model, processor, "embedded"
    if source is None:
        raise CheckpointError(
            f"the checkpoint embeds no vision tower and mm_vision_tower {mm_vision_tower!r} is not available; "
            "pass --vision-tower with a local CLIP folder"
        )
    return (*_load_vision_folder(source), str(source))


def _load_vision_folder(source: Path):
    from transformers import CLIPVisionModel

    with _quiet_transformers():
        model, info = CLIPVisionModel.from_pretrained(str(source), output_loading_info=True, dtype=torch.float32)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise CheckpointError(
            f"vision tower {source}: missing weights {_short_list(sorted(info.get('missing_keys', ())))} "
            f"mismatched {info.get('mismatched_keys')}"
        )
    return model, _image_processor_for(source, model.config.image_size)


def _load_projector(config: dict, tensors: CheckpointTensors, text_hidden: int) -> torch.nn.Module:
    projector = build_projector(config.get("mm_projector_type", "linear"), config["mm_hidden_size"], text_hidden)
    expected = {PROJECTOR_PREFIX + k for k in projector.state_dict()}
    present = {k for k in tensors.keys() if k.startswith(PROJECTOR_PREFIX)}
    if expected != present:
        raise CheckpointError(
            f"projector weights do not match mm_projector_type {config.get('mm_projector_type')!r}: "
            f"missing {_short_list(sorted(expected - present))}; unexpected {_short_list(sorted(present - expected))}"
        )
    state = {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.load(sorted(present)).items()}
    projector.load_state_dict(state, strict=True)
    return projector


def context_length(config: Mapping[str, Any]) -> int:
    """Tokens the model was trained to attend over (``tokenizer_model_max_length``, else 2048 as the original)."""
    for key in ("tokenizer_model_max_length", "max_sequence_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def load_pretrained_model(cfg: LoadConfig) -> LoadedModel:
    """Load tokenizer, model, image processor and context length for ``cfg``."""
    if cfg.model_path is None:
        from llava_med.model.tiny import ensure_checkpoint

        model_path = str(ensure_checkpoint("tiny"))
        logger.info("no --model-path given: using the embedded tiny random-weight checkpoint at %s", model_path)
    else:
        model_path = cfg.model_path
    folder = resolve_checkpoint(model_path, local_files_only=cfg.local_files_only)
    config = read_config(folder)
    if "mm_hidden_size" not in config:
        raise CheckpointError(
            f"{folder}/config.json has no mm_* keys (model_type {config.get('model_type')!r}): "
            "not a LLaVA checkpoint"
        )
    if cfg.model_base:
        logger.warning("--model-base %s is ignored: %s is a complete checkpoint", cfg.model_base, folder)
    tensors = CheckpointTensors(folder)
    device = resolve_device(cfg.device)
    dtype, why = choose_dtype(cfg, device)
    logger.info("loading %s on %s as %s (%s)%s", folder, device, str(dtype).removeprefix("torch."), why,
                ", language model in 8-bit" if cfg.load_8bit else ", language model in 4-bit nf4" if cfg.load_4bit
                else "")

    with _quiet_transformers():  # it warns that ``llava_mistral`` is not a model type it knows
        tokenizer = load_tokenizer(folder)
    pack = _cpu_prepack_plan(cfg, device, dtype)
    language_model = _load_language_model(folder, config, cfg, device, dtype, tensors)
    language_model.eval()
    if device == "cpu" and cfg.load_4bit:
        _convert_4bit_for_cpu(language_model, dtype)
    if device == "cpu" and (cfg.load_4bit or cfg.load_8bit):
        _release_freed_memory()  # what quantising while loading freed
    if pack:
        count = _prepack_from_checkpoint(language_model, tensors)
        logger.info("packed the %d linear weights of the language model for oneDNN (--no-cpu-prepack: off)", count)
    first_device = language_model.get_input_embeddings().weight.device
    vision_tower, image_processor, vision_source = load_vision_tower(folder, config, tensors, cfg, dtype)
    projector = _load_projector(config, tensors, language_model.config.hidden_size)
    # Vision tower and projector stay unquantised in the compute dtype, on the device of the text embeddings.
    vision_tower.to(device=first_device, dtype=dtype).eval()
    projector.to(device=first_device, dtype=dtype).eval()
    model = LlavaMedForCausalLM(
        language_model,
        vision_tower,
        projector,
        select_layer=int(config.get("mm_vision_select_layer", -2)),
        select_feature=config.get("mm_vision_select_feature", "patch"),
    )
    return LoadedModel(
        tokenizer=tokenizer,
        model=model,
        image_processor=image_processor,
        context_len=context_length(config),
        config=MappingProxyType(config),
        model_path=str(folder),
        model_name=cfg.model_name or model_name_from_path(model_path),
        vision_source=vision_source,
        image_aspect_ratio=config.get("image_aspect_ratio", "pad") or "pad",
        quantization="8bit" if cfg.load_8bit else "4bit" if cfg.load_4bit else None,
    )
