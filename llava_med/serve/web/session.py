"""Per-browser-session chat state, the uploaded image as it is sent, and the prompt for the next answer."""

from __future__ import annotations

import base64
import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from llava_med.chat import ChatPrompt, Message, render_chat
from llava_med.errors import ImageError, ImageTooLargeError
from llava_med.images.decode import ImageLimits, encode_image_base64, image_sha256, load_image
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
    """The image of a conversation, as it is sent to the model."""

    sha256: str  # of the PNG bytes sent (the name of the saved file)
    source_sha256: str  # of the uploaded file's bytes (tells a new upload from the same one)
    b64: str  # base64 PNG, what the worker receives
    name: str  # the uploaded file's name
    width: int
    height: int
    path: str | None = None  # the saved copy (shown in the chat)


@dataclasses.dataclass
class Turn:
    """One question and its answer."""

    user: str
    answer: str = ""
    status: str = TURN_STREAMING  # streaming | done | stopped | error
    error: str | None = None
    model: str | None = None
    conv_mode: str | None = None
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


def prepare_image(path: str | os.PathLike[str], *, limits: ImageLimits | None = None,
                  images_dir: Path | None = None) -> SessionImage:
    """Decode an uploaded file (any supported image, DICOM included) into the PNG that is sent to the model.

    Raises :class:`ImageError` (or a subclass) with a message naming the problem. With ``images_dir`` the PNG is
    saved there once, as ``<sha256>.png``.
    """
    limits = limits or ImageLimits()
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"{path.name} is {size} bytes, over the limit of {limits.max_bytes} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read the uploaded file {path.name}: {exc}") from exc
    image = load_image(data, limits=limits)
    if max(image.size) > MAX_SEND_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SEND_SIDE, MAX_SEND_SIDE), Image.Resampling.LANCZOS)
    b64 = encode_image_base64(image)
    png = base64.b64decode(b64)
    sha = image_sha256(png)
    saved = None
    if images_dir is not None:
        saved = str(save_once(images_dir / f"{sha}.png", png))
    return SessionImage(sha256=sha, source_sha256=image_sha256(data), b64=b64, name=path.name,
                        width=image.width, height=image.height, path=saved)

