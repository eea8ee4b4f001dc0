"""Prompt tokenisation with image placeholders, and stop-string matching. Shared by the engine and the CLI."""

from __future__ import annotations

from collections.abc import Sequence

from llava_med.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_med.errors import ContextOverflowError, ImageCountMismatchError


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


def prompt_positions(input_ids: Sequence[int], tokens_per_image: int,
                     image_token_index: int = IMAGE_TOKEN_INDEX) -> int:
    """Positions a tokenised prompt takes in the model: each image placeholder becomes its image's tokens."""
    return len(input_ids) + list(input_ids).count(image_token_index) * (tokens_per_image - 1)


def check_fits_context(num_tokens: int, num_images: int, tokens_per_image: int, context: int) -> int:
    """Raise :class:`ContextOverflowError` unless a prompt of ``num_tokens`` positions leaves room for at least one
    new token in a ``context`` of that many tokens; returns the room left."""
    if num_tokens >= context:
        raise ContextOverflowError(
            f"the prompt is {num_tokens} tokens ({num_images} image(s) x {tokens_per_image} tokens included) but "
            f"the model's context is {context} tokens; shorten the conversation or start a new one"
        )
    return context - num_tokens


def check_prompt_chars(prompt: str, limit: int, context: int) -> None:
    """Refuse a prompt longer than ``limit`` characters before tokenising it (a 30 MB prompt costs nothing)."""
    if len(prompt) > limit:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} characters, more than can fit in the model's context of {context} tokens "
            f"(at most {limit} characters); shorten the conversation or start a new one"
        )


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
