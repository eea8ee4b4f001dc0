"""The interface a model worker drives: one engine serves every concurrent request of a worker.

Implementations: :class:`llava_med.serve.fake_engine.FakeEngine` (scripted, for tests and ``--engine fake``) and
``llava_med.serve.hf_engine.HFEngine`` (transformers, continuous batching).

Contract of :meth:`Engine.generate_stream`:

* it returns an async iterator of :class:`GenerateOutput`; ``text`` is cumulative and never holds the prompt;
  the last output has ``finish_reason`` set (``"stop"`` or ``"length"``);
* bad input raises a :class:`llava_med.errors.LlavaMedError` subclass whose ``code`` names the cause (bad image,
  image count mismatch, context overflow, ...), possibly before the first output;
* closing the iterator early (``aclose()``, or cancelling the task consuming it) cancels the request and frees its
  slot at once. Cleanup code should not need to ``await`` (the consumer may be inside a cancelled scope).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llava_med.serve.protocol import GenerateRequest

__all__ = ["Engine", "GenerateOutput"]


@dataclass
class GenerateOutput:
    text: str  # cumulative generated text, WITHOUT the prompt
    finish_reason: str | None = None  # None while streaming; "stop" | "length" at the end
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    token_ids: tuple[int, ...] = ()  # every generated token id, on the final output (engines that have them)


class Engine(abc.ABC):
    """Loads a model and streams generations for many concurrent requests."""

    model_names: list[str]

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
    def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream the generation of one request (see the module docstring for the contract)."""

    @property
    def conv_mode(self) -> str | None:
        """Name of the conversation template the served model was trained with (``/worker_get_conv_template``).

        None when the engine does not know it (clients then use their default, ``mistral_instruct``).
        """
        return None

    def count_tokens(self, prompt: str) -> int:
        """Number of prompt tokens (used by ``/count_token``); engines without a tokenizer may not override it."""
        raise NotImplementedError(f"{type(self).__name__} does not count tokens")
