"""Conversation templates of LLaVA / LLaVA-Med, with their exact strings.

This is a port of ``llava/conversation.py`` from microsoft/LLaVA-Med (the v1.5 code, which adds the
``mistral_instruct`` template LLaVA-Med v1.5 was trained with) and haotian-liu/LLaVA. The template strings and
the prompt layout of every separator style are kept byte for byte: they decide what the model saw in training.

What differs from the original, on purpose:

* No mutable module state. :data:`conv_templates` is a read-only mapping and :func:`get_conv_template` always
  returns a fresh deep copy; :meth:`Conversation.copy` never shares message lists with the original.
* Several images per message. A user message may be ``(text, image_or_images, image_process_mode)``;
  :meth:`Conversation.get_images` returns the stored image objects as they are (PIL image, bytes or path):
  decoding lives in :mod:`llava_med.images`, padding and CLIP tensors in :mod:`llava_med.model.preprocess`.
* The template is picked from a checkpoint's ``config.json`` (:func:`conv_mode_for_config`), never from the
  model's name or path.
* Real bugs of the original are fixed (asserts turned into exceptions, ``plain`` crashing on an answered turn
  because its ``sep2`` is ``None``, ``dict()`` aliasing the live message list, ``copy()`` dropping
  ``skip_next``); no template string changed.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from enum import Enum, auto
from types import MappingProxyType
from typing import Any, Union

from llava_med.constants import DEFAULT_IMAGE_TOKEN
from llava_med.errors import BadRequestError, ImageCountMismatchError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONV_MODE",
    "Conversation",
    "MessageContent",
    "SeparatorStyle",
    "conv_mode_for_config",
    "conv_templates",
    "get_conv_template",
    "stop_str_for",
    "template_names",
]

#: A message: plain text, ``None`` for the assistant turn still to be generated, or a user message with images
#: ``(text, image_or_list_of_images, image_process_mode)``.
MessageContent = Union[str, tuple, None]

#: LLaVA-Med v1.5's template; what the original web server and CLI forced for every model.
DEFAULT_CONV_MODE = "mistral_instruct"

# The text the original puts in front of the first user message when it carries an image.
_IMAGE_PREFIX = DEFAULT_IMAGE_TOKEN + "\n"
# The exchange the original ``*_mmtag`` templates insert before the first user message.
_MMTAG_IMAGE = "<Image>" + DEFAULT_IMAGE_TOKEN + "</Image>"
_MMTAG_REPLY = "Received."


class SeparatorStyle(Enum):
    """How turns are joined into a prompt (the original's names)."""

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()
    # Present in LLaVA-Med v1.5's enum and ``get_prompt`` although no template of its own uses it.
    MISTRAL = auto()


def _split_images(content: tuple) -> tuple[str, list[Any], str]:
    """Unpack a ``(text, image_or_images, image_process_mode)`` message into text, image list and mode."""
    if len(content) != 3:
        raise BadRequestError(
            "a message with images must be a tuple (text, image_or_list_of_images, image_process_mode), "
            f"got a tuple of {len(content)} items"
        )
    text, images, mode = content
    if not isinstance(text, str):
        raise BadRequestError(f"the text of a message with images must be a str, got {type(text).__name__}")
    if not isinstance(mode, str):
        raise BadRequestError(f"image_process_mode must be a str, got {type(mode).__name__}")
    if images is None:
        image_list: list[Any] = []
    elif isinstance(images, (list, tuple)):
        image_list = list(images)
    else:
        image_list = [images]
    return text, image_list, mode


def _place_image_tags(text: str, n_images: int) -> str:
    """Return the user text with one ``<image>`` tag per image, as the prompt shows it.

    One image: the original rule, whatever the text holds: every ``<image>`` is removed, the text stripped and
    ``"<image>\\n"`` put in front. Several images: tags the text already has stay where the user put them and the
    missing ones go to the front, one ``"<image>\\n"`` each (for N=1 this is the same as the original rule when
    the text has no tag). More tags than images is an error.
    """
    if n_images == 0:
        return text
    if n_images == 1:
        return _IMAGE_PREFIX + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    n_tags = text.count(DEFAULT_IMAGE_TOKEN)
    if n_tags > n_images:
        raise ImageCountMismatchError(
            f"a message has {n_tags} {DEFAULT_IMAGE_TOKEN} tags but only {n_images} images"
        )
    return _IMAGE_PREFIX * (n_images - n_tags) + text.strip()


def _copy_content(content: MessageContent) -> MessageContent:
    """Copy a message's content so that no mutable container is shared (image objects themselves are)."""
    if isinstance(content, tuple) and len(content) == 3 and isinstance(content[1], list):
        return (content[0], list(content[1]), content[2])
    return content


@dataclasses.dataclass
class Conversation:
    """A conversation history and the template that turns it into a prompt.

    Fields are the original's. ``messages`` holds ``[role, content]`` pairs, where content is a str, ``None``
    (the turn to be generated) or ``(text, image_or_images, image_process_mode)`` for a user message with
    images. ``offset`` is the number of leading few-shot messages that are part of the template, not of the
    chat (skipped by :meth:`get_images` and :meth:`to_messages`).
    """

    system: str
    roles: tuple[str, str]
    messages: list[list[Any]] = dataclasses.field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    skip_next: bool = False

    def __post_init__(self) -> None:
        # The original templates are written with tuples; keep a list of fresh 2-item lists so that
        # ``append_message`` and ``messages[-1][-1] = ...`` (used by the original web server) work.
        self.roles = tuple(self.roles)  # type: ignore[assignment]
        if len(self.roles) != 2:
            raise ValueError(f"roles must be (user_role, assistant_role), got {self.roles!r}")
        self.messages = [[role, _copy_content(content)] for role, content in self.messages]
        if not isinstance(self.sep_style, SeparatorStyle):
            raise ValueError(f"sep_style must be a SeparatorStyle, got {self.sep_style!r}")

    # ------------------------------------------------------------------ building the prompt

    def _prompt_messages(self) -> list[tuple[str, str | None]]:
        """The ``(role, text)`` pairs the prompt is built from, images turned into ``<image>`` tags.

        As in the original, the first message, when it carries an image, has its tag moved to the front (or,
        for a version containing ``mmtag``, moved into an inserted ``<Image><image></Image>`` / ``Received.``
        exchange). Unlike the original, later user messages with images get the same front-tag rule (the
        original web server never let a later message carry an image), so the prompt always holds one tag per
        image returned by :meth:`get_images`.
        """
        out: list[tuple[str, str | None]] = []
        for index, (role, content) in enumerate(self.messages):
            if not isinstance(content, tuple):
                out.append((role, content))
                continue
            text, images, _mode = _split_images(content)
            if index == 0 and images and "mmtag" in self.version:
                out.append((self.roles[0], _MMTAG_IMAGE * len(images)))
                out.append((self.roles[1], _MMTAG_REPLY))
                out.append((role, text.replace(DEFAULT_IMAGE_TOKEN, "").strip()))
            else:
                out.append((role, _place_image_tags(text, len(images))))
        return out

    def get_prompt(self) -> str:
        """Return the prompt text for the whole conversation, exactly as the original built it."""
        messages = self._prompt_messages()
        style = self.sep_style

        if style == SeparatorStyle.SINGLE:
            ret = self.system + self.sep
            for role, message in messages:
                if message:
                    ret += role + ": " + message + self.sep
                else:
                    ret += role + ":"
            return ret

        if style == SeparatorStyle.TWO:
            # LLaVA-Med v1.5's variant: messages are stripped, an answered assistant turn ends with
            # ``sep2 + " "`` and the result is stripped. haotian-liu/LLaVA writes ``message + sep2`` instead,
            # so its multi-turn prompts read ``...</s>USER:`` where LLaVA-Med's read ``...</s> USER:``;
            # single-turn prompts are identical.
            sep2 = self.sep2 or ""
            ret = self.system + self.sep
            for i, (role, message) in enumerate(messages):
                if message:
                    sep = sep2 + " " if i % 2 == 1 and sep2 else self.sep
                    ret += role + ": " + message.strip() + sep
                else:
                    ret += role + ":"
            return ret.strip()

        if style == SeparatorStyle.MPT:
            ret = self.system + self.sep
            for role, message in messages:
                if message:
                    ret += role + message + self.sep
                else:
                    ret += role
            return ret

        if style == SeparatorStyle.LLAMA_2:
            self._check_first_message(messages)
            ret = ""
            for i, (_role, message) in enumerate(messages):
                if not message:
                    continue
                if i == 0:
                    message = self._wrap_llama_2_system(self.system) + message
                if i % 2 == 0:
                    ret += self.sep + "[INST] " + message + " [/INST]"
                else:
                    ret += " " + message + " " + (self.sep2 or "")
            # The original calls ``ret.lstrip(self.sep)``, which strips a *character set*; the prompt always
            # goes on with "[INST]", so removing the leading ``sep`` once is the same and says what is meant.
            return ret.removeprefix(self.sep) if self.sep else ret

        if style == SeparatorStyle.PLAIN:
            # conv_llava_plain has sep2=None; the original then crashed (str + None) on an answered turn.
            seps = [self.sep, self.sep2 or ""]
            ret = self.system
            for i, (_role, message) in enumerate(messages):
                if message:
                    ret += message + seps[i % 2]
            return ret

        if style == SeparatorStyle.MISTRAL:
            self._check_first_message(messages)
            ret = ""
            for i, (_role, message) in enumerate(messages):
                if not message:
                    continue
                if i == 0:
                    message = self.system + " " + message.strip()
                if i % 2 == 0:
                    ret += "[INST] " + message + " [/INST]"
                else:
                    ret += message + "</s>"
            return ret

        raise ValueError(f"Invalid style: {self.sep_style}")

    @staticmethod
    def _wrap_llama_2_system(system: str) -> str:
        """LLaVA-Med v1.5's ``wrap_sys``: the ``<<SYS>>`` block, or nothing for an empty system prompt."""
        return f"<<SYS>>\n{system}\n<</SYS>>\n\n" if len(system) > 0 else system

    def _check_first_message(self, messages: Sequence[tuple[str, str | None]]) -> None:
        """The original's asserts for the [INST] styles, as real errors (asserts vanish under ``-O``)."""
        if not messages:
            return
        role, message = messages[0]
        if not message:
            raise ValueError("first message should not be none")
        if role != self.roles[0]:
            raise ValueError("first message should come from user")

    # ------------------------------------------------------------------ editing

    def append_message(self, role: str, message: MessageContent) -> None:
        """Append a message; ``message`` is a str, ``None`` (turn to generate) or ``(text, image(s), mode)``."""
        if isinstance(message, tuple):
            _split_images(message)  # validate the shape now rather than when the prompt is built
            message = _copy_content(
                (message[0], list(message[1]), message[2]) if isinstance(message[1], tuple) else message
            )
        elif message is not None and not isinstance(message, str):
            raise BadRequestError(f"a message must be a str, None or a tuple, got {type(message).__name__}")
        self.messages.append([role, message])

    def update_last_message(self, message: str | None) -> None:
        """Replace the content of the last message (the streaming assistant answer)."""
        if not self.messages:
            raise IndexError("the conversation has no message to update")
        self.messages[-1][1] = message

    # ------------------------------------------------------------------ images

    def _image_messages(self) -> list[tuple[str, list[Any], str]]:
        """``(text, images, mode)`` of every message with images after ``offset``, in order."""
        found = []
        for _role, content in self.messages[self.offset :]:
            if isinstance(content, tuple):
                found.append(_split_images(content))
        return found

    def get_images(self) -> list[Any]:
        """Return the image objects of all messages, in order, exactly as they were stored (not processed)."""
        return [image for _text, images, _mode in self._image_messages() for image in images]

    def get_image_modes(self) -> list[str]:
        """Return each image's process mode ("Default", "Crop", "Resize", "Pad"), parallel to :meth:`get_images`."""
        return [mode for _text, images, mode in self._image_messages() for _image in images]

    # ------------------------------------------------------------------ views

    def to_messages(self) -> list[dict[str, Any]]:
        """Return the chat as ``[{"role": "user"|"assistant", "content": str, "images"?: n}]``.

        Messages after ``offset`` alternate user / assistant, as in the original's ``to_gradio_chatbot``.
        ``<image>`` tags are removed from the text and counted (with the images of a tuple message) in
        ``"images"``, present only when non-zero. The turn still to be generated (``None``) is left out.
        """
        out: list[dict[str, Any]] = []
        for i, (_role, content) in enumerate(self.messages[self.offset :]):
            if content is None:
                continue
            if isinstance(content, tuple):
                text, images, _mode = _split_images(content)
                n_images = max(len(images), text.count(DEFAULT_IMAGE_TOKEN))
            else:
                text = content
                n_images = text.count(DEFAULT_IMAGE_TOKEN)
            entry: dict[str, Any] = {
                "role": "user" if i % 2 == 0 else "assistant",
                "content": text.replace(DEFAULT_IMAGE_TOKEN, "").strip() if n_images else text,
            }
            if n_images:
                entry["images"] = n_images
            out.append(entry)
        return out

    def copy(self) -> Conversation:
        """Return an independent copy: its message lists are new (image objects are shared, not copied)."""
        return Conversation(
            system=self.system,
            roles=self.roles,
            messages=[[role, _copy_content(content)] for role, content in self.messages],
            offset=self.offset,
            sep_style=self.sep_style,
            sep=self.sep,
            sep2=self.sep2,
            version=self.version,
            skip_next=self.skip_next,
        )

    def dict(self) -> dict[str, Any]:
        """Return a JSON-able view (the original's keys); messages with images keep only their text."""
        return {
            "system": self.system,
            "roles": list(self.roles),
            "messages": [
                [role, content[0] if isinstance(content, tuple) else content] for role, content in self.messages
            ],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }

    @property
    def stop_str(self) -> str | None:
        """The string generation stops at for this template (``None``: only at the end-of-sequence token).

        The original web server's rule: ``sep`` for SINGLE and MPT, ``sep2`` otherwise. LLAMA_2 must use
        ``sep2``: ``mistral_instruct`` has ``sep=""`` and the original CLI's rule (``sep`` unless TWO) gave it
        an empty stop string; LLaVA-Med v1.5's answers end with ``</s>``. ``plain`` has no ``sep2``, so ``None``.
        """
        if self.sep_style in (SeparatorStyle.SINGLE, SeparatorStyle.MPT):
            return self.sep
        return self.sep2


# ---------------------------------------------------------------------- templates (original strings)

_conv_vicuna_v0 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("Human", "Assistant"),
    messages=[
        ["Human", "What are the key differences between renewable and non-renewable energy sources?"],
        [
            "Assistant",
            "Renewable energy sources are those that can be replenished naturally in a relatively "
            "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
            "Non-renewable energy sources, on the other hand, are finite and will eventually be "
            "depleted, such as coal, oil, and natural gas. Here are some key differences between "
            "renewable and non-renewable energy sources:\n"
            "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
            "energy sources are finite and will eventually run out.\n"
            "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
            "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
            "and other negative effects.\n"
            "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
            "have lower operational costs than non-renewable sources.\n"
            "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
            "locations than non-renewable sources.\n"
            "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
            "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
            "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
            "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
        ],
    ],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

_conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

_conv_llama_2 = Conversation(
    system="""You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.

If a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.""",  # noqa: E501
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

_conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

_conv_mpt = Conversation(
    system="""<|im_start|>system
A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.""",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

_conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

_conv_llava_v0 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("Human", "Assistant"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

_conv_llava_v0_mmtag = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language."  # noqa: E501
    "The visual content will be provided with the following format: <Image>visual content</Image>.",
    roles=("Human", "Assistant"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)

_conv_llava_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

_conv_llava_v1_mmtag = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language."  # noqa: E501
    "The visual content will be provided with the following format: <Image>visual content</Image>.",
    roles=("USER", "ASSISTANT"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)

# LLaVA-Med v1.5 (Mistral-7B): LLAMA_2 layout, no system prompt, no "<s>" between turns.
_conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)

#: The original ``conv_templates`` (names and aliases as in LLaVA-Med v1.5). Read-only; never hand these
#: objects out: use :func:`get_conv_template`, which returns a deep copy.
conv_templates: Mapping[str, Conversation] = MappingProxyType(
    {
        "default": _conv_vicuna_v0,
        "v0": _conv_vicuna_v0,
        "v1": _conv_vicuna_v1,
        "vicuna_v1": _conv_vicuna_v1,
        "llama_2": _conv_llama_2,
        "mistral_instruct": _conv_mistral_instruct,
        "plain": _conv_llava_plain,
        "v0_plain": _conv_llava_plain,
        "llava_v0": _conv_llava_v0,
        "v0_mmtag": _conv_llava_v0_mmtag,
        "llava_v1": _conv_llava_v1,
        "v1_mmtag": _conv_llava_v1_mmtag,
        "llava_llama_2": _conv_llava_llama_2,
        "mpt": _conv_mpt,
    }
)


def template_names() -> list[str]:
    """Return the known template names, sorted."""
    return sorted(conv_templates)


def _template(name: str) -> Conversation:
    """The shared template ``name`` (never to be modified); ``BadRequestError`` listing the names if unknown."""
    try:
        return conv_templates[name]
    except (KeyError, TypeError):
        raise BadRequestError(
            f"unknown conversation template {name!r}; known templates: {', '.join(template_names())}"
        ) from None


def get_conv_template(name: str) -> Conversation:
    """Return a fresh, independent copy of the template ``name``; ``BadRequestError`` listing the names if unknown."""
    return _copy.deepcopy(_template(name))


def stop_str_for(conv_mode: str | None) -> str | None:
    """The stop string of template ``conv_mode`` (None for no template, or a template without one); read from the
    shared template, no copy (the worker asks for it on every request)."""
    return _template(conv_mode).stop_str if conv_mode else None


# model_type of a checkpoint's config.json -> template the checkpoint was trained with.
_MODEL_TYPE_TO_CONV_MODE: Mapping[str, str] = MappingProxyType(
    {
        "llava_mistral": "mistral_instruct",
        "llava_llama": "llava_v1",
        "llava": "llava_v1",
        "llava_mpt": "mpt",
    }
)


def conv_mode_for_config(config: Mapping[str, Any]) -> str:
    """Pick the conversation template from a checkpoint's ``config.json`` dict (never from its name or path).

    An explicit ``conv_mode`` key wins (it must name a known template); otherwise ``model_type`` decides:
    ``llava_mistral`` -> ``mistral_instruct``, ``llava_llama`` / ``llava`` -> ``llava_v1``, ``llava_mpt`` ->
    ``mpt``. Anything else raises ``ValueError`` asking for ``--conv-mode``.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (config.json contents), got {type(config).__name__}")
    explicit = config.get("conv_mode")
    if explicit is not None and explicit != "":
        if not isinstance(explicit, str) or explicit not in conv_templates:
            raise ValueError(
                f"config.json has conv_mode={explicit!r}, which is not a known template; "
                f"known templates: {', '.join(template_names())}"
            )
        return explicit
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in _MODEL_TYPE_TO_CONV_MODE:
        return _MODEL_TYPE_TO_CONV_MODE[model_type]
    raise ValueError(
        f"cannot tell the conversation template from config.json (model_type={model_type!r}); "
        f"pass --conv-mode with one of: {', '.join(template_names())}"
    )
