"""Per-browser-session chat state, the uploaded image as it is sent, and the prompt for the next answer."""

from __future__ import annotations

import base64
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from llava_med.chat import ChatPrompt, Message, render_chat
from llava_med.images.decode import encode_image_base64, image_sha256
from llava_med.serve.web.chat_log import save_once
from llava_med.serve.web.config import (
    DEFAULT_IMAGE_PROCESS_MODE,
    MAX_SEND_SIDE,
    TURN_DONE,
    TURN_STOPPED,
    TURN_STREAMING,
)


@dataclasses.dataclass(frozen=True)
class SessionImage:
    """The image of a conversation, as it is sent to the model: a PNG without metadata."""

    sha256: str  # of the PNG bytes sent (the name of the saved file)
    b64: str  # base64 PNG, what the worker receives
    width: int
    height: int
    path: str | None = None  # the saved copy (shown in the chat)
    details: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)  # logs and exports
    fields: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)  # optional request fields

    def saved(self, images_dir: Path) -> SessionImage:
        """This image with ``path`` set: saved once, as ``<images_dir>/<sha256>.png``."""
        if self.path is not None:
            return self
        path = save_once(images_dir / f"{self.sha256}.png", base64.b64decode(self.b64))
        return dataclasses.replace(self, path=str(path))


@dataclasses.dataclass
class Turn:
    """One question and its answer."""

    user: str
    answer: str = ""
    status: str = TURN_STREAMING  # streaming | done | stopped | error
    error: str | None = None
    model: str | None = None
    conv_mode: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None


@dataclasses.dataclass
class ChatSession:
    """What one browser tab chats about (kept in ``gr.State``; mutated in place by the handlers)."""

    conv_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    turns: list[Turn] = dataclasses.field(default_factory=list)
    image: SessionImage | None = None
    image_process_mode: str = DEFAULT_IMAGE_PROCESS_MODE
    stop_requested: bool = False
    voted: bool = False
    streaming: bool = False  # a handler is streaming an answer for this session (set and cleared by it)

    @property
    def generating(self) -> bool:
        return bool(self.turns) and self.turns[-1].status == TURN_STREAMING

    @property
    def can_regenerate(self) -> bool:
        """Whether the last question has an answer to replace (not while answering, not after an error)."""
        return bool(self.turns) and self.turns[-1].status in (TURN_DONE, TURN_STOPPED)

    def history_turns(self) -> list[Turn]:
        """The answered turns that go into the next prompt (failed turns and empty answers are left out)."""
        return [t for t in self.turns if t.status in (TURN_DONE, TURN_STOPPED) and t.answer.strip()]

    def to_messages(self) -> list[dict[str, Any]]:
        """The chat as JSON-able messages (for the logs): the image is referred to by its hash."""
        out: list[dict[str, Any]] = []
        for i, turn in enumerate(self.turns):
            user: dict[str, Any] = {"role": "user", "content": turn.user}
            if i == 0 and self.image is not None:
                user["image"] = self.image.sha256
            out.append(user)
            assistant: dict[str, Any] = {"role": "assistant", "content": turn.answer, "status": turn.status}
            if turn.error:
                assistant["error"] = turn.error
            out.append(assistant)
        return out


def build_prompt(conv_mode: str, session: ChatSession, question_turn: Turn | None = None) -> ChatPrompt:
    """The prompt for the last turn of ``session`` (or ``question_turn``), rendered by :func:`llava_med.chat.render_chat`.

    The history is the session's answered turns (failed turns are left out), the question is the last turn; the
    image goes with the first user message, as LLaVA-Med was trained.
    """
    turn = question_turn if question_turn is not None else session.turns[-1]
    history = [t for t in session.history_turns() if t is not turn]
    image = (session.image.b64,) if session.image is not None else ()
    messages: list[Message] = []
    for i, past in enumerate([*history, turn]):
        messages.append(Message("user", past.user, image if i == 0 else ()))
        if past is not turn:
            messages.append(Message("assistant", past.answer))
    return render_chat(messages, conv_mode, image_process_mode=session.image_process_mode)


def encode_for_model(image: Image.Image) -> SessionImage:
    """The PNG sent to the model for ``image`` (downscaled to :data:`MAX_SEND_SIDE`; no metadata is written)."""
    if max(image.size) > MAX_SEND_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SEND_SIDE, MAX_SEND_SIDE), Image.Resampling.LANCZOS)
    b64 = encode_image_base64(image)
    return SessionImage(sha256=image_sha256(base64.b64decode(b64)), b64=b64, width=image.width, height=image.height)
