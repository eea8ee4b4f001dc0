"""The loader's settings (:class:`LoadConfig`) and flags, defined once for the CLI, the worker and the launcher
(names as in the original project).

Torch-free: processes that only parse flags (the launcher, a fake-engine worker) never import torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from llava_med.conversation import template_names

__all__ = ["DEVICES", "DTYPE_NAMES", "LoadConfig", "add_model_args", "default_dtype", "load_config_from_args"]

DEVICES = ("auto", "cuda", "cpu", "mps")
#: ``--dtype`` names (aliases accepted by :class:`LoadConfig`: fp32, fp16, bf16). ``auto``: bf16 (fp16 where bf16
#: is unsupported) on GPUs, fp16 on MPS, bf16 on a CPU with native bf16 instructions, else fp32.
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_ENV = "LLAVA_MED_DTYPE"


def default_dtype() -> str:
    """The dtype used when none is given: env ``LLAVA_MED_DTYPE`` (the test suite sets float32), else ``auto``."""
    return os.environ.get(DTYPE_ENV) or "auto"


@dataclass(frozen=True)
class LoadConfig:
    """How to load a model. ``model_path=None`` means the embedded tiny checkpoint."""

    model_path: str | None = None
    model_base: str | None = None
    model_name: str | None = None
    device: str = "auto"
    dtype: str | None = None
    load_8bit: bool = False
    load_4bit: bool = False
    num_gpus: int = 1
    max_gpu_memory: str | None = None
    vision_tower: str | None = None
    conv_mode: str | None = None
    local_files_only: bool = False
    cpu_prepack: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        given = self.dtype if self.dtype is not None else default_dtype()
        dtype = _DTYPE_ALIASES.get(given, given)
        if dtype not in DTYPE_NAMES:
            source = "" if self.dtype is not None else f" (from {DTYPE_ENV})"
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {given!r}{source}")
        object.__setattr__(self, "dtype", dtype)
        if self.load_8bit and self.load_4bit:
            raise ValueError("choose one of --load-8bit and --load-4bit")
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus}")
        if self.num_gpus > 1 and self.device not in ("auto", "cuda"):
            raise ValueError(f"--num-gpus {self.num_gpus} needs --device cuda, got {self.device!r}")


def add_model_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, paths: bool = True) -> None:
    """The loader's flags. ``paths=False`` leaves out ``--model-path``/``--model-base``/``--model-name`` (the
    launcher declares its own, repeatable ``--model-path``)."""
    group = parser.add_argument_group("model") if isinstance(parser, argparse.ArgumentParser) else parser
    if paths:
        group.add_argument("--model-path", default=None,
                           help="checkpoint folder or hub id (default: the embedded tiny random-weight checkpoint)")
        group.add_argument("--model-base", default=None,
                           help="accepted for compatibility; complete checkpoints ignore it")
        group.add_argument("--model-name", default=None, help="name to serve/show (default: the folder's name)")
    group.add_argument("--device", default="auto", choices=list(DEVICES))
    group.add_argument("--dtype", default=None, choices=list(DTYPE_NAMES),
                       help=f"default: ${DTYPE_ENV}, else auto: bfloat16 (or float16) on GPUs, float16 on MPS, "
                            "bfloat16 on a CPU with native bf16 (avx512_bf16, AMX), else float32")
    group.add_argument("--load-8bit", action="store_true", help="quantise the language model to 8 bits (bitsandbytes)")
    group.add_argument("--load-4bit", action="store_true", help="quantise the language model to 4-bit nf4 (bitsandbytes)")
    group.add_argument("--num-gpus", type=int, default=1, help="spread the model over this many GPUs")
    group.add_argument("--max-gpu-memory", default=None, help="per-GPU memory cap with --num-gpus, e.g. 13GiB")
    group.add_argument("--vision-tower", default=None,
                       help="CLIP folder or hub id to use instead of the checkpoint's vision tower")
    group.add_argument("--conv-mode", default=None, choices=template_names(),
                       help="prompt template (default: chosen from the checkpoint's config)")
    group.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face hub")
    group.add_argument("--no-cpu-prepack", dest="cpu_prepack", action="store_false",
                       help="on a CPU in bfloat16, keep the weights as loaded instead of packing them once for "
                            "oneDNN (packing: decoding 2-2.6x faster on the 7B shapes, weights read into memory "
                            "instead of mapped from the files)")


def load_config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        model_path=args.model_path,
        model_base=args.model_base,
        model_name=args.model_name,
        device=args.device,
        dtype=args.dtype,
        load_8bit=args.load_8bit,
        load_4bit=args.load_4bit,
        num_gpus=args.num_gpus,
        max_gpu_memory=args.max_gpu_memory,
        vision_tower=args.vision_tower,
        conv_mode=args.conv_mode,
        local_files_only=args.local_files_only,
        cpu_prepack=args.cpu_prepack,
    )
