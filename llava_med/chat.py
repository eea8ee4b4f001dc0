"""Chat messages -> the prompt a checkpoint was trained on: the one rendering every front end uses.

The web UI, the CLI, ``test_message`` and :meth:`LlavaMedClient.chat <llava_med.serve.client.LlavaMedClient.chat>`
turn a conversation into a prompt here, so the same conversation always gives the same prompt string::

    rendered = render_chat([Message("user", "What does this CT show?", images=(png_b64,))], "mistral_instruct")
    rendered.prompt   # '[INST] <image>\\nWhat does this CT show? [/INST]'
    rendered.images   # [png_b64], in the order of the prompt's <image> tags
    rendered.stop     # ('</s>',): the template's stop string

Rules (the original templates' own, see :mod:`llava_med.conversation`):

* ``system`` messages become the template's system prompt (several are joined by a blank line); the others
  alternate ``user`` / ``assistant`` (consecutive messages of one role are joined by a newline), start with a user
  message and end with the user message to answer.
* A user message carries zero or more images. One image goes in front of the text (``<image>\\n`` + text), as
  LLaVA-Med was trained; with several, ``<image>`` tags already in the text (:meth:`Message.from_parts` puts one
  where each image part stands) stay where they are and the missing ones go in front. A literal ``<image>`` in a
  message without images is removed (it would name an image that is not there).

Template resolution (:func:`resolve_conv_mode`): an explicit ``--conv-mode`` wins, else the template the serving
worker reports, else ``mistral_instruct`` (LLaVA-Med v1.5's).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llava_med.constants import DEFAULT_IMAGE_TOKEN
from llava_med.conversation import DEFAULT_CONV_MODE, get_conv_template, template_names
from llava_med.errors import BadRequestError, ImageCountMismatchError
from llava_med.sampling import normalize_stop

__all__ = ["ROLES", "ChatPrompt", "Message", "render_chat", "resolve_conv_mode"]

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_IMAGE_PREFIX = DEFAULT_IMAGE_TOKEN + "\n"


@dataclass(frozen=True)
class Message:
    """One chat message. ``images`` (user messages only) are kept as given: base64 strings, data URLs, PIL images,
    bytes or paths, whatever the caller's transport needs."""

    role: str
    text: str = ""
    images: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise BadRequestError(f"a message's role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise BadRequestError(f"a message's text must be a string, got {type(self.text).__name__}")
        if not isinstance(self.images, tuple):
            object.__setattr__(self, "images", tuple(self.images))
        if self.images and self.role != "user":
            raise BadRequestError(f"only user messages can carry images, not {self.role!r} ones")

    @classmethod
    def from_parts(cls, role: str, parts: Iterable[Any], *, is_image: Any = None) -> Message:
        """A message from content parts in order: ``str`` parts are text, anything else an image (or what
        ``is_image(part)`` says). Each image leaves an ``<image>`` tag where it stood; parts are joined by a
        newline."""
        texts: list[str] = []
        images: list[Any] = []
        for part in parts:
            image = is_image(part) if is_image is not None else not isinstance(part, str)
            if image:
                images.append(part)
                texts.append(DEFAULT_IMAGE_TOKEN)
            else:
                texts.append(part)
        return cls(role, "\n".join(t for t in texts if t), tuple(images))

    @classmethod
    def coerce(cls, value: Message | Mapping[str, Any]) -> Message:
        """A :class:`Message`, or a mapping ``{"role", "content" (or "text"), "images"?}``."""
        if isinstance(value, Message):
            return value
        if not isinstance(value, Mapping):
            raise BadRequestError(f"a message must be a Message or a mapping, got {type(value).__name__}")
        text = value.get("content", value.get("text", ""))
        return cls(value.get("role", ""), "" if text is None else text, tuple(value.get("images") or ()))


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: the templated prompt, its images in tag order, the template and its stop string."""

    prompt: str
    images: list[Any] = field(default_factory=list)
    conv_mode: str = DEFAULT_CONV_MODE
    stop_str: str | None = None

    @property
    def stop(self) -> tuple[str, ...]:
        """The stop strings to send with the prompt."""
        return normalize_stop(None, self.stop_str)


def _tagged_text(message: Message) -> str:
    """The message's text with one ``<image>`` tag per image (missing tags in front, one per line)."""
    tags = message.text.count(DEFAULT_IMAGE_TOKEN)
    n = len(message.images)
    if n == 0:
        return message.text.replace(DEFAULT_IMAGE_TOKEN, "") if tags else message.text
    if tags > n:
        raise ImageCountMismatchError(f"a message has {tags} {DEFAULT_IMAGE_TOKEN} tags but only {n} image(s)")
    return _IMAGE_PREFIX * (n - tags) + message.text if tags < n else message.text


def _turns(messages: Sequence[Message]) -> tuple[str, list[tuple[str, str, list[Any]]]]:
    """System prompt and the alternating ``(role, text, images)`` turns (same-role neighbours joined)."""
    system: list[str] = []
    turns: list[tuple[str, str, list[Any]]] = []
    for message in messages:
        if message.role == "system":
            if message.text.strip():
                system.append(message.text.strip())
            continue
        text = _tagged_text(message)
        if turns and turns[-1][0] == message.role:
            role, previous, images = turns[-1]
            turns[-1] = (role, f"{previous}\n{text}" if previous and text else previous or text,
                         images + list(message.images))
        else:
            turns.append((message.role, text, list(message.images)))
    return "\n\n".join(system), turns


def render_chat(messages: Iterable[Message | Mapping[str, Any]], conv_mode: str = DEFAULT_CONV_MODE, *,
                image_process_mode: str = "Default") -> ChatPrompt:
    """The prompt for answering the last (user) message of ``messages`` with template ``conv_mode``.

    Raises :class:`BadRequestError` for an empty conversation, one that does not start and end with a user message,
    an unknown template or role, and :class:`ImageCountMismatchError` for more ``<image>`` tags than images.
    """
    items = [Message.coerce(m) for m in messages]
    system, turns = _turns(items)
    if not turns:
        raise BadRequestError("the conversation has no user message")
    if turns[0][0] != "user":
        raise BadRequestError("the conversation must start with a user message (after any system message)")
    if turns[-1][0] != "user":
        raise BadRequestError("the last message must be the user's, the one to answer")
    conv = get_conv_template(conv_mode)
    if system:
        conv.system = system
    for role, text, images in turns:
        content: Any = (text, images, image_process_mode) if images else text
        conv.append_message(conv.roles[0] if role == "user" else conv.roles[1], content)
    conv.append_message(conv.roles[1], None)
    return ChatPrompt(prompt=conv.get_prompt(), images=conv.get_images(), conv_mode=conv_mode,
                      stop_str=conv.stop_str)


def resolve_conv_mode(explicit: str | None = None, reported: str | None = None, *, source: str = "the worker"
                      ) -> str:
    """The template to use: ``explicit`` (a ``--conv-mode``; must be known), else ``reported`` (what the serving
    worker says) when it is a known template, else :data:`~llava_med.conversation.DEFAULT_CONV_MODE`."""
    if explicit:
        if explicit not in template_names():
            raise BadRequestError(f"unknown conversation template {explicit!r}; known: {', '.join(template_names())}")
        return explicit
    if reported in template_names():
        return reported  # type: ignore[return-value]
    if reported:
        logger.warning("%s reports an unknown template %r; using %s", source, reported, DEFAULT_CONV_MODE)
    return DEFAULT_CONV_MODE
