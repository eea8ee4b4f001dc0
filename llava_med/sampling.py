"""What a generation asks for (:class:`SamplingParams`) and what it yields (:class:`GenerationOutput`).

The one set of sampling limits and defaults of the project, used by the wire protocol, the Python client, the CLI,
the web UI and every engine. Torch-free, so that clients and servers that never load a model can use it.

Defaults (stated once, here and in the README):

* :data:`WIRE_DEFAULTS`: what a worker applies to a ``/worker_generate_stream`` request that leaves a field out,
  as the original LLaVA worker did: temperature 1.0, top-p 1.0, 256 new tokens.
* :data:`CHAT_DEFAULTS`: what the interactive front ends send (the original web UI's sliders): temperature 0.2,
  top-p 0.7, 512 new tokens. The web UI, the CLI, ``test_message`` and :class:`~llava_med.serve.client.LlavaMedClient`
  use them.

Temperatures at or below :data:`GREEDY_TEMPERATURE` mean greedy decoding (the original worker's rule).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from llava_med.constants import ErrorCode
from llava_med.errors import BadRequestError

__all__ = [
    "CHAT_DEFAULTS",
    "GREEDY_TEMPERATURE",
    "MAX_NEW_TOKENS_LIMIT",
    "MAX_SEED",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "MAX_TEMPERATURE",
    "MIN_TOP_P",
    "WIRE_DEFAULTS",
    "GenerationOutput",
    "SamplingParams",
    "normalize_stop",
]

#: At or below this temperature decoding is greedy (as the original worker).
GREEDY_TEMPERATURE = 1e-3
#: Smaller top-p values count as this one (it keeps only the most likely token); a top-p below float32's range
#: would otherwise drop every token.
MIN_TOP_P = 1e-6
#: Highest temperature a request may ask for; higher values only produce noise.
MAX_TEMPERATURE = 5.0
#: Absurd ``max_new_tokens`` values are refused; sane ones above a worker's cap are capped like the original.
MAX_NEW_TOKENS_LIMIT = 1_000_000
#: Bounds that keep one request from slowing down a whole batch (stop strings are checked on every token).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


def _out_of_range(message: str) -> BadRequestError:
    return BadRequestError(message, code=ErrorCode.PARAM_OUT_OF_RANGE)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalize_stop(stop: str | Iterable[str] | None, *defaults: str | None) -> tuple[str, ...]:
    """Stop strings of a request plus defaults (a template's), deduplicated in order, empty strings dropped."""
    items: list[str] = []
    if isinstance(stop, str):
        items.append(stop)
    elif stop is not None:
        for s in stop:
            if not isinstance(s, str):
                raise BadRequestError(f"stop must be a string or a list of strings, got an item {s!r}")
            items.append(s)
    items.extend(d for d in defaults if d)
    return tuple(dict.fromkeys(s for s in items if s))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, validated on construction (:class:`BadRequestError` naming the field)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_number(self.temperature):
            raise BadRequestError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise _out_of_range(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature}")
        if not _is_number(self.top_p):
            raise BadRequestError(f"top_p must be a number, got {self.top_p!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise _out_of_range(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_p < MIN_TOP_P:
            object.__setattr__(self, "top_p", MIN_TOP_P)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise BadRequestError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise _out_of_range(f"max_new_tokens must be >= 1 and at most {MAX_NEW_TOKENS_LIMIT}, got "
                                f"{self.max_new_tokens}")
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple):
            raise BadRequestError(f"stop must be a tuple of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _out_of_range(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str):
                raise BadRequestError(f"stop strings must be strings, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise _out_of_range(f"stop strings are limited to {MAX_STOP_CHARS} characters, got one of {len(s)}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise BadRequestError(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise _out_of_range(f"seed must be between 0 and 2**63 - 1, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def capped(self, max_new_tokens: int) -> SamplingParams:
        """A copy whose ``max_new_tokens`` is at most ``max_new_tokens`` (a worker's cap, like the original 1024)."""
        return self if self.max_new_tokens <= max_new_tokens else self.replace(max_new_tokens=max_new_tokens)


#: A worker's defaults for fields a request leaves out (the original worker's).
WIRE_DEFAULTS = SamplingParams()
#: What the interactive front ends send by default (the original web UI's sliders).
CHAT_DEFAULTS = SamplingParams(temperature=0.2, top_p=0.7, max_new_tokens=512)


@dataclass
class GenerationOutput:
    """One streamed state of a request, the record every engine yields.

    ``text`` is cumulative and never holds the prompt; ``finish_reason`` is None while streaming, then ``"stop"``
    (end of sequence or a stop string), ``"length"`` (``max_new_tokens`` or the context is full) or
    ``"cancelled"``. ``token_ids`` holds every generated token id on the final output (engines that have them).
    """

    text: str
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    token_ids: tuple[int, ...] = ()

    def usage(self) -> dict[str, int]:
        """OpenAI-style token counts."""
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_generated_tokens,
            "total_tokens": self.num_prompt_tokens + self.num_generated_tokens,
        }
