"""Prompt tokenisation with image placeholders, and stop strings. Shared by the worker, the CLI and eval."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from llava_med.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_med.conversation import get_conv_template
from llava_med.errors import BadRequestError, ImageCountMismatchError


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Token ids of ``prompt`` with ``image_token_index`` where each ``<image>`` stands (as the original).

    Each text chunk is tokenised on its own (so the tokenizer never sees ``<image>``); the BOS token of the first
    chunk is kept once.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separator = [image_token_index] * (offset + 1)
    for i, chunk in enumerate(chunks):
        if i > 0:
            # The original inserts [image] (offset 0) or [image, image] and then drops one with chunk[offset:].
            input_ids.extend(separator[offset:])
        input_ids.extend(chunk[offset:])
    return input_ids


def count_image_tags(prompt: str) -> int:
    return prompt.count(DEFAULT_IMAGE_TOKEN)


def check_image_count(prompt: str, num_images: int) -> None:
    """Raise :class:`ImageCountMismatchError` unless the prompt has exactly one ``<image>`` per image."""
    tags = count_image_tags(prompt)
    if tags != num_images:
        raise ImageCountMismatchError(
            f"number of images ({num_images}) does not match number of {DEFAULT_IMAGE_TOKEN} tokens in the prompt "
            f"({tags})"
        )


def normalize_stop(stop: str | Iterable[str] | None, *defaults: str | None) -> tuple[str, ...]:
    """Stop strings of a request plus the template's, deduplicated, empty strings dropped."""
    items: list[str] = []
    if isinstance(stop, str):
        items.append(stop)
    elif stop is not None:
        for s in stop:
            if not isinstance(s, str):
                raise BadRequestError(f"stop must be a string or a list of strings, got an item {s!r}")
            items.append(s)
    items.extend(d for d in defaults if d)
    seen: dict[str, None] = {}
    for s in items:
        if s:
            seen.setdefault(s, None)
    return tuple(seen)


def build_single_turn_prompt(question: str, num_images: int, conv_mode: str) -> tuple[str, str | None]:
    """Prompt for one user question with ``num_images`` images, and the template's stop string."""
    conv = get_conv_template(conv_mode)
    text = re.sub(r"[ \t]{2,}", " ", question.replace(DEFAULT_IMAGE_TOKEN, "")).strip()
    message = text if num_images == 0 else (text, [None] * num_images, "Default")
    conv.append_message(conv.roles[0], message)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt(), conv.stop_str


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; returns the text and whether a stop string was found."""
    cut = len(text)
    for s in stop:
        idx = text.find(s)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut], cut != len(text)


def stop_holdback(text: str, stop: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string (not safe to stream yet)."""
    hold = 0
    for s in stop:
        tail = text[-(len(s) - 1):] if len(s) > 1 else ""
        for k in range(len(tail), hold, -1):  # longest first; shorter than the current hold cannot matter
            if s.startswith(tail[len(tail) - k:]):
                hold = k
                break
    return hold
