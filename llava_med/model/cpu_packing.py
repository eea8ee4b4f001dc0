"""bf16 linear layers on a CPU with their weights packed once into oneDNN's blocked layout.

``F.linear`` on a bf16 CPU tensor hands the weight to oneDNN in its plain layout, which oneDNN reorders on every call.
Decoding one token is a matrix-vector product per weight, so that reorder is most of the time: on the 7B shapes
(one 14336x4096 matrix, this project's 2-core machine) ``F.linear`` reads the weight at ~23 GB/s, the packed weight
at ~40 GB/s, and a whole decode step falls from ~0.55-0.66 s to ~0.36 s with the same greedy tokens. The packed
weight is what PyTorch's own compiler (inductor with freezing) uses on CPUs:
``torch.ops.mkldnn._reorder_linear_weight`` once, then ``torch.ops.mkldnn._linear_pointwise`` per call.

Packing replaces each ``nn.Linear`` of the language model by :class:`PackedLinear`, one at a time, so the memory
peak is the model plus one matrix (the loader reads the weights into memory for this instead of mapping the files:
see ``builder._load_language_model``). GPUs, float32 (MKL's sgemm needs no reorder) and quantised weights are left
as they are; ``--no-cpu-prepack`` turns it off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

__all__ = ["PackedLinear", "can_prepack", "prepack_linears"]

logger = logging.getLogger(__name__)


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` (no grad) whose weight is held in oneDNN's packed layout; same outputs. ``weight``: the
    weight to pack when it is not the module's own (the same values, read from the checkpoint file)."""

    def __init__(self, linear: torch.nn.Linear, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach() if weight is None else weight
        # Not persistent: a state_dict of the model keeps no packed tensor (the checkpoint on disk is the source).
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_prepack() -> str | None:
    """None when bf16 weights can be packed here; else why not (logged by the loader)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN (mkldnn) linear kernels"
    try:  # a build or CPU whose oneDNN lacks bf16 kernels fails here, not in the middle of a request
        probe = torch.nn.Linear(8, 4, bias=True, dtype=torch.bfloat16)
        x = torch.ones(2, 8, dtype=torch.bfloat16)
        with torch.inference_mode():
            torch.testing.assert_close(PackedLinear(probe)(x), probe(x))
    except (RuntimeError, AssertionError) as exc:
        return f"oneDNN cannot run packed bf16 weights here ({type(exc).__name__}: {str(exc)[:120]})"
    return None


@torch.inference_mode()
def prepack_linears(model: torch.nn.Module, weight_of: Callable[[str, torch.nn.Linear], torch.Tensor] | None = None,
                    after_each: Callable[[], None] | None = None) -> int:
    """Replace every CPU ``nn.Linear`` below ``model`` by a :class:`PackedLinear`; returns how many.

    ``weight_of(name, linear)`` gives the weight to pack (default: the module's own); the loader reads it from the
    checkpoint with ``pread``, so the pages of the mapped file are never touched and never count in the process's
    memory. ``after_each`` runs after each replacement (the loader returns the freed memory to the OS there)."""
    # Names only, never the layers themselves: each replaced nn.Linear is freed at once, not when this returns.
    targets = [(parent, name, f"{parent_name}.{name}" if parent_name else name)
               for parent_name, parent in model.named_modules()
               for name, child in parent.named_children()
               if type(child) is torch.nn.Linear and child.weight.device.type == "cpu"]
    for parent, name, full in targets:
        child = getattr(parent, name)
        setattr(parent, name, PackedLinear(child, None if weight_of is None else weight_of(full, child)))
        del child
        if after_each is not None:
            after_each()
    return len(targets)
