"""Fixtures for tests that run the tiny real checkpoint (loaded as a pytest plugin from conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from llava_med.model.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint):
    """The tiny checkpoint in fp32, whatever a device's default dtype: batched == alone is exact in fp32 only."""
    from llava_med.model.builder import LoadConfig, load_pretrained_model

    return load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), dtype="float32"))
