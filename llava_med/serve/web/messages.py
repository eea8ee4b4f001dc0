"""What the chat shows: the conversation as Gradio messages (the user's question with a thumbnail of their image,
answers as Markdown with any HTML shown as text), and every problem in plain words, once, where the user looks:
answer problems in the chat, controller problems in the banner (:func:`controller_banner`)."""

from __future__ import annotations

import re
from typing import Any

from llava_med.constants import ErrorCode
from llava_med.errors import ImageError, ImageTooLargeError, LlavaMedError
from llava_med.serve.client import ClientConnectionError, ClientError, ClientTimeoutError, NoWorkerError, WorkerError
from llava_med.serve.web.config import (
    STREAMING_CURSOR,
    SUPPORTED_IMAGES_TEXT,
    TURN_ERROR,
    TURN_STOPPED,
    TURN_STREAMING,
)
from llava_med.serve.web.session import ChatSession, Turn

__all__ = ["chatbot_messages", "controller_banner", "describe_error", "safe_markdown", "sentence"]

# Fenced code blocks (closed, or still open while streaming) and inline code spans: Markdown shows them as text.
_CODE = re.compile(r"(```.*?(?:```|\Z)|`[^`\n]+`)", re.DOTALL)


def safe_markdown(text: str) -> str:
    """``text`` as Markdown in which HTML is shown, never rendered: ``<`` outside code becomes ``&lt;`` (code spans
    and blocks already show their text as it is)."""
    parts = _CODE.split(text)
    return "".join(part if i % 2 else part.replace("&", "&amp;").replace("<", "&lt;") for i, part in enumerate(parts))


def _answer_markdown(turn: Turn) -> str:
    if turn.status == TURN_ERROR:
        return f"⚠️ {turn.error or 'Something went wrong.'}"
    if turn.status == TURN_STREAMING:
        return safe_markdown(turn.answer) + STREAMING_CURSOR
    if turn.status == TURN_STOPPED:
        return (safe_markdown(turn.answer) + "\n\n" if turn.answer else "") + "*(stopped)*"
    return safe_markdown(turn.answer)


def chatbot_messages(session: ChatSession | None) -> list[dict[str, Any]]:
    """The session as Gradio ``Chatbot`` messages: the first question carries a thumbnail of the image."""
    if session is None:
        return []
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(session.turns):
        question = safe_markdown(turn.user)
        if i == 0 and session.image is not None and session.image.path:
            content: Any = [{"path": session.image.path, "alt_text": "the image asked about"}, question]
        else:
            content = question
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": _answer_markdown(turn)})
    return messages


def controller_banner(controller_url: str, *, reachable: bool) -> str:
    """The banner shown when the chat cannot work: the controller is down, or no worker is registered."""
    if not reachable:
        return (f"**Cannot reach the controller at {controller_url}.** Start it (`llava-med controller`, or "
                "`llava-med launch` for the whole stack) or check `--controller-url`, then retry.")
    return (f"**No model is available:** the controller at {controller_url} has no worker registered. Start a "
            "worker (`llava-med worker --model-path ...`), then retry.")


def describe_error(exc: BaseException, *, model: str | None = None) -> str:
    """A short Markdown message naming the cause of a failed answer, for the chat (no library text)."""
    if isinstance(exc, NoWorkerError):
        return f"**No worker is serving model `{model}`.** Pick another model, or press ↻ to refresh the list."
    if isinstance(exc, WorkerError):
        code = exc.error_code
        hints = {
            ErrorCode.BAD_IMAGE: ("The worker could not use the image", f" Upload a {SUPPORTED_IMAGES_TEXT} file."),
            ErrorCode.IMAGE_COUNT_MISMATCH: ("The prompt and the images do not match", ""),
            ErrorCode.CONTEXT_OVERFLOW: ("The conversation is too long for the model",
                                         " Press **Clear** to start a new one, or lower *Max output tokens*."),
            ErrorCode.ENGINE_OVERLOADED: ("The worker is busy", " Try again in a moment."),
            ErrorCode.BAD_REQUEST: ("The worker refused the request", ""),
            ErrorCode.PARAM_OUT_OF_RANGE: ("A parameter is out of range", ""),
            ErrorCode.INVALID_MODEL: ("Unknown model", " Press ↻ to refresh the model list."),
            ErrorCode.OUT_OF_MEMORY: ("The worker ran out of memory",
                                      " Try a shorter conversation or fewer output tokens."),
            ErrorCode.WORKER_UNREACHABLE: ("The worker cannot be reached", " It may have stopped; try again."),
            ErrorCode.CONTROLLER_WORKER_TIMEOUT: ("The worker did not answer in time", " Try again."),
            ErrorCode.CONTROLLER_NO_WORKER: (f"No worker is serving model `{model}`", ""),
        }
        title, hint = hints.get(code, ("The worker reported an error", "")) if isinstance(code, ErrorCode) else (
            "The worker reported an error", "")
        return f"**{title}**: {sentence(exc.message)}{hint}"
    if isinstance(exc, ClientTimeoutError):
        return "**The worker did not answer in time.** It may be overloaded; try again."
    if isinstance(exc, ClientConnectionError):
        return "**The connection to the worker broke during the answer.** The worker may have stopped; try again."
    if isinstance(exc, ImageTooLargeError):
        return "**The image is too large** for this server."
    if isinstance(exc, ImageError):
        return f"**The image cannot be read.** Upload a {SUPPORTED_IMAGES_TEXT} file."
    if isinstance(exc, (ClientError, LlavaMedError)):
        return f"**Error**: {sentence(str(exc))}"
    return "**Something went wrong while answering.** The details are in the web server's log; try again."


def sentence(text: str) -> str:
    """``text`` as a sentence: capitalised, ending with a full stop."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
