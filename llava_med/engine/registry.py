"""``--engine`` names and the classes behind them: the one list the worker and the launcher read.

Engines are imported only when asked for by name, so choosing ``fake`` never imports torch. Adding a backend is
one module with an :class:`~llava_med.engine.base.Engine` subclass and one line here.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from types import MappingProxyType

from llava_med.engine.base import Engine

__all__ = ["DEFAULT_ENGINE", "ENGINES", "add_engine_args", "build_engine", "engine_class", "engine_names"]

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


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and every engine's own flags."""
    parser.add_argument("--engine", choices=engine_names(), default=DEFAULT_ENGINE, help=ENGINE_HELP)
    for name in ENGINES:
        engine_class(name).add_cli_args(parser)


def build_engine(args: argparse.Namespace) -> Engine:
    """The engine named by ``args.engine``, built from the parsed flags."""
    return engine_class(args.engine).from_args(args)
