"""Folders built once into the cache (generated checkpoints, conversions), atomically: a concurrent process sees
the whole folder or none."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["build_once"]

logger = logging.getLogger(__name__)


def build_once(final: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """``final``, built first by ``build(folder)`` unless ``final / marker`` exists.

    ``build`` writes into a temporary folder next to ``final`` that is then renamed into place; when another process
    renamed its own first, that one is kept. Returns ``final``.
    """
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():
                raise
            logger.debug("another process built %s first", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
