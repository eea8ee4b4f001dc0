"""The interface a model worker drives: one engine serves every concurrent request of a worker.

The worker turns a wire request into an :class:`EngineRequest` (prompt, images as sent, validated
:class:`~llava_med.sampling.SamplingParams`, image aspect mode); engines never see the wire model.

Contract of :meth:`Engine.generate_stream`:

* it returns an async iterator of :class:`~llava_med.sampling.GenerationOutput`; ``text`` is cumulative and never
  holds the prompt; the last output has ``finish_reason`` set (``"stop"`` or ``"length"``);
* bad input raises a :class:`llava_med.errors.LlavaMedError` subclass whose ``code`` names the cause (bad image,
  image count mismatch, context overflow, ...), possibly before the first output;
* closing the iterator early (``aclose()``, or cancelling the task consuming it) cancels the request and frees its
  slot at once. Cleanup code should not need to ``await`` (the consumer may be inside a cancelled scope).

A backend is one module with an :class:`Engine` subclass that declares its own flags (:meth:`Engine.add_cli_args`)
and builds itself from parsed flags (:meth:`Engine.from_args`), plus one line in :mod:`llava_med.engine.registry`.
"""

from __future__ import annotations

import abc
import argparse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llava_med.sampling import GenerationOutput, SamplingParams

if TYPE_CHECKING:
    from llava_med.images.dicom import DicomOptions

__all__ = ["Engine", "EngineRequest", "GenerationOutput"]


@dataclass(frozen=True)
class EngineRequest:
    """One generation: a templated ``prompt`` with one ``<image>`` per image, the images as sent (base64 strings
    or data URLs; engines decode them), the sampling settings, the image aspect mode (``Pad``, ``Resize``,
    ``Crop``, ``Default`` or None for the checkpoint's own) and how DICOM images are rendered (window, frame:
    :class:`~llava_med.images.dicom.DicomOptions`, or None for the default)."""

    prompt: str
    images: tuple[str, ...] = ()
    params: SamplingParams = SamplingParams()
    image_mode: str | None = None
    dicom: DicomOptions | None = None

    @property
    def num_images(self) -> int:
        return len(self.images)


class Engine(abc.ABC):
    """Loads a model and streams generations for many concurrent requests."""

    model_names: list[str]

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add this engine's own flags to the worker's (and the launcher's) parser. Flags shared by several
        engines (the loader's) are added by the worker itself."""

    @classmethod
    @abc.abstractmethod
    def from_args(cls, args: argparse.Namespace) -> Engine:
        """Build the engine from the worker's parsed flags (no model is loaded until :meth:`start`)."""

    # ----------------------------------------------------------------------------------------------- serving
    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once :meth:`start` has loaded the model."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Maximum number of tokens (prompt, image tokens and generated tokens) of one request."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model (blocking work in a thread, never on the event loop) and set :attr:`ready`."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop serving and release the model."""

    @abc.abstractmethod
    def queue_length(self) -> int:
        """Requests waiting and running inside the engine."""

    @abc.abstractmethod
    def generate_stream(self, request: EngineRequest) -> AsyncIterator[GenerationOutput]:
        """Stream the generation of one request (see the module docstring for the contract)."""

    @property
    def max_prompt_chars(self) -> int:
        """Longest prompt (in characters) that can fit in the context: longer ones are refused before any work.
        Engines with a tokenizer derive it from their vocabulary; this default assumes at most 64 characters per
        token."""
        return self.context_length * 64

    @property
    def max_concurrency(self) -> int | None:
        """Requests the engine can hold at once (running and queued); the worker admits this many by default.
        None: the engine does not say (the worker then admits 5 at a time, like the original)."""
        return None

    @property
    def conv_mode(self) -> str | None:
        """Name of the conversation template the served model was trained with (``/worker_get_conv_template``).

        None when the engine does not know it (clients then use their default, ``mistral_instruct``).
        """
        return None

    def metrics(self) -> dict[str, float]:
        """The engine's own figures for ``/metrics`` (running batch size, cache hits, ...); counters only grow."""
        return {}

    @property
    def health_error(self) -> str | None:
        """Why the engine can no longer serve after it started (e.g. a GPU left unusable by a CUDA error); None
        while it is healthy. The worker's ``/health`` then answers 503 with this text."""
        return None

    def kv_cache_status(self) -> dict[str, int] | None:
        """Size and occupancy of the engine's KV cache (``/worker_get_status``: ``kv_cache``); None if it has none to
        report."""
        return None

    def count_tokens(self, prompt: str) -> int:
        """Number of prompt tokens (used by ``/count_token``); engines without a tokenizer may not override it."""
        raise NotImplementedError(f"{type(self).__name__} does not count tokens")
