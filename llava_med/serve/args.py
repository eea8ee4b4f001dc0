"""Command-line flags shared by the CLI, the model worker, the launcher and eval (one definition each).

Kept free of torch imports so that parsing flags stays fast for processes that never load a model.
"""

from __future__ import annotations

import argparse

from llava_med.conversation import template_names


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Loader flags shared by the CLI, the model worker and eval (names as in the original project)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model-path", default=None,
                       help="checkpoint folder or hub id (default: the embedded tiny random-weight checkpoint)")
    group.add_argument("--model-base", default=None, help="accepted for compatibility; complete checkpoints ignore it")
    group.add_argument("--model-name", default=None, help="name to serve/show (default: the folder's name)")
    group.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    group.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="default: bfloat16 (or float16) on GPUs, float16 on MPS, float32 on CPU")
    group.add_argument("--load-8bit", action="store_true", help="quantise the language model to 8 bits (bitsandbytes)")
    group.add_argument("--load-4bit", action="store_true", help="quantise the language model to 4-bit nf4 (bitsandbytes)")
    group.add_argument("--num-gpus", type=int, default=1, help="spread the model over this many GPUs")
    group.add_argument("--max-gpu-memory", default=None, help="per-GPU memory cap with --num-gpus, e.g. 13GiB")
    group.add_argument("--vision-tower", default=None,
                       help="CLIP folder or hub id to use instead of the checkpoint's vision tower")
    group.add_argument("--conv-mode", default=None, choices=template_names(),
                       help="prompt template (default: chosen from the checkpoint's config)")
    group.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face hub")


def load_config_from_args(args: argparse.Namespace):
    from llava_med.model.builder import LoadConfig

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
    )


def add_batching_args(parser: argparse.ArgumentParser) -> None:
    """Batching flags of the worker (``--engine hf``)."""
    group = parser.add_argument_group("batching (--engine hf)")
    group.add_argument("--max-batch-size", type=int, default=16,
                       help="requests decoded together per step (1: one at a time, as the original worker)")
    group.add_argument("--max-queue", type=int, default=256,
                       help="requests allowed to wait; more get a clear 'busy' error")
    group.add_argument("--max-prefill-tokens", type=int, default=4096,
                       help="prompt tokens prefilled per scheduler step (at least one request)")
    group.add_argument("--image-cache-size", type=int, default=64,
                       help="images whose vision features are kept for reuse (0: off)")
    group.add_argument("--allow-image-urls", action="store_true",
                       help="let requests pass http(s) image URLs for the worker to fetch (off by default)")
    group.add_argument("--stream-min-interval", type=float, default=0.025,
                       help="seconds between two streamed updates of one request (0: every token); the text is "
                            "cumulative, so nothing is lost")
