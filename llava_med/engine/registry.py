"""``--engine`` names and the classes behind them: the one list the worker and the launcher read.

Engines are imported only when asked for by name, so choosing ``fake`` never imports torch. Adding a backend is
one module with an :class:`~llava_med.engine.base.Engine` subclass and one line here.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Mapping
from types import MappingProxyType

from llava_med.engine.base import Engine

__all__ = ["DEFAULT_ENGINE", "ENGINES", "add_engine_args", "build_engine", "engine_class", "engine_names",
           "parse_size"]

#: name -> "module:Class" (imported on first use)
ENGINES: Mapping[str, str] = MappingProxyType({
    "hf": "llava_med.engine.hf:HFEngine",
    "fake": "llava_med.engine.fake:FakeEngine",
    "vllm": "llava_med.engine.vllm:VLLMEngine",
})

#: What ``--engine`` defaults to: the transformers engine, which runs anywhere.
DEFAULT_ENGINE = "hf"

ENGINE_HELP = ("hf: the transformers engine (default); vllm: vLLM (GPUs; needs the vllm extra); fake: scripted "
               "text, for tests and demos")


def engine_names() -> list[str]:
    return list(ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The class registered as ``name``; ValueError naming the known engines otherwise."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"{target} is not an Engine subclass")
    return cls


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?(b)?|b)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A memory size flag: bytes (``4096``), or a number with a unit: ``KiB``/``MiB``/``GiB``/``TiB`` and the bare
    ``k``/``m``/``g``/``t`` are powers of 1024, ``kB``/``MB``/``GB``/``TB`` powers of 1000."""
    match = _SIZE.fullmatch(str(text))
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes or a number with a unit (6GiB, 512MiB)")
    number, unit, binary, byte = match.groups()
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    size = int(float(number) * ((1000 if byte and not binary else 1024) ** power))
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least one byte")
    return size


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """``--engine``, the flags every engine takes, and each engine's own flags."""
    parser.add_argument("--engine", choices=engine_names(), default=DEFAULT_ENGINE, help=ENGINE_HELP)
    common = parser.add_argument_group("every engine")
    common.add_argument("--kv-cache-memory", type=parse_size, default=None, metavar="SIZE",
                        help="memory of the KV cache, e.g. 6GiB (hf: allocated once at start, each request holds room "
                             "for a whole context and waits for a free one, default --kv-cache-fraction; vllm: "
                             "instead of --gpu-memory-utilization, on CPUs also VLLM_CPU_KVCACHE_SPACE=<GiB>)")
    common.add_argument("--allow-image-urls", action="store_true",
                        help="let requests pass http(s) image URLs for the worker to fetch (off by default)")
    for name in ENGINES:
        engine_class(name).add_cli_args(parser)


def build_engine(args: argparse.Namespace) -> Engine:
    """The engine named by ``args.engine``, built from the parsed flags."""
    return engine_class(args.engine).from_args(args)
