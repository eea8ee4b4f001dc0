"""Display names of checkpoints (kept free of torch imports: the controller-side tools use it too)."""

from __future__ import annotations


def model_name_from_path(model_path: str) -> str:
    """The original ``get_model_name_from_path``: the last path component, ``parent_checkpoint-N`` for
    training checkpoints."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]
