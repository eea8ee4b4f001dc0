"""What the chat shows: the conversation as Gradio messages, and errors in plain words naming their cause."""

from __future__ import annotations

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

def _answer_markdown(turn: Turn) -> str:
    if turn.status == TURN_ERROR:
        return f"⚠️ {turn.error or 'unknown error'}"
    if turn.status == TURN_STREAMING:
        return turn.answer + STREAMING_CURSOR
    if turn.status == TURN_STOPPED:
        return (turn.answer + "\n\n" if turn.answer else "") + "*(stopped)*"
    return turn.answer


def chatbot_messages(session: ChatSession | None) -> list[dict[str, Any]]:
    """The session as Gradio ``Chatbot`` messages (``{"role", "content"}``); the image is shown once, first."""
    if session is None:
        return []
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(session.turns):
        if i == 0 and session.image is not None and session.image.path:
            messages.append({"role": "user", "content": {"path": session.image.path,
                                                         "orig_name": session.image.name}})
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": _answer_markdown(turn)})
    return messages


def describe_error(exc: BaseException, *, model: str | None = None, controller_url: str | None = None) -> str:
    """A one-paragraph Markdown message naming the cause of a failed answer (shown in the chat)."""
    where = f" at {controller_url}" if controller_url else ""
    if isinstance(exc, NoWorkerError):
        return (f"**No worker is serving model `{model}`.** {_sentence(exc.message)} Start a worker for it, or pick "
                "another model and press ↻ to refresh the list.")
    if isinstance(exc, WorkerError):
        code = exc.error_code
        name = code.name if isinstance(code, ErrorCode) else "UNKNOWN"
        hints = {
            ErrorCode.BAD_IMAGE: ("The worker could not use the image", f" Upload a {SUPPORTED_IMAGES_TEXT} file."),
            ErrorCode.IMAGE_COUNT_MISMATCH: ("The prompt and the images do not match", ""),
            ErrorCode.CONTEXT_OVERFLOW: ("The conversation is too long for the model",
                                         (" Press **Clear** to start a new conversation, or lower *Max output "
                                          "tokens*.")),
            ErrorCode.ENGINE_OVERLOADED: ("The worker is busy", " Try again in a moment."),
            ErrorCode.BAD_REQUEST: ("The worker refused the request", ""),
            ErrorCode.PARAM_OUT_OF_RANGE: ("A parameter is out of range", ""),
            ErrorCode.INVALID_MODEL: ("Unknown model", " Press ↻ to refresh the model list."),
            ErrorCode.OUT_OF_MEMORY: ("The worker ran out of memory",
                                      " Try a shorter conversation or fewer output tokens."),
            ErrorCode.WORKER_UNREACHABLE: ("The worker cannot be reached", " It may have stopped; try again."),
            ErrorCode.CONTROLLER_WORKER_TIMEOUT: ("The worker did not answer in time", ""),
            ErrorCode.CONTROLLER_NO_WORKER: (f"No worker is serving model `{model}`", ""),
        }
        title, hint = hints.get(code, ("The worker reported an error", "")) if isinstance(code, ErrorCode) else (
            "The worker reported an error", "")
        return f"**{title}** (error {int(exc.code)} {name}): {_sentence(exc.message)}{hint}"
    if isinstance(exc, ClientTimeoutError):
        return f"**The server did not answer in time**: {exc}. The model may be overloaded; try again."
    if isinstance(exc, ClientConnectionError):
        return f"**Cannot reach the server{where}**: {exc}. Is the controller running?"
    if isinstance(exc, ImageTooLargeError):
        return f"**The image is too large**: {exc}."
    if isinstance(exc, ImageError):
        return f"**The image cannot be read**: {exc}. Upload a {SUPPORTED_IMAGES_TEXT} file."
    if isinstance(exc, (ClientError, LlavaMedError)):
        return f"**Error**: {exc}"
    return f"**Unexpected error** ({type(exc).__name__}): {exc}"


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."

