"""Typed errors shared by the model layer and the servers.

Every error a user can cause carries an :class:`ErrorCode`, so the worker turns it into a stream chunk whose
``error_code`` names the cause and whose ``text`` says what happened.
"""

from __future__ import annotations

from llava_med.constants import ErrorCode


class LlavaMedError(Exception):
    """Base class; ``code`` is what a server reports for it."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class BadRequestError(LlavaMedError, ValueError):
    """A request field is missing, of the wrong type or out of range."""

    code = ErrorCode.BAD_REQUEST


class ImageError(LlavaMedError, ValueError):
    """An image could not be decoded or is not acceptable."""

    code = ErrorCode.BAD_IMAGE


class ImageTooLargeError(ImageError):
    """An image exceeds the byte or pixel limits (decompression bombs included)."""


class UnsupportedImageError(ImageError):
    """An image format or DICOM encoding that cannot be turned into pixels here."""


class ImageCountMismatchError(LlavaMedError, ValueError):
    """The number of images differs from the number of ``<image>`` tags in the prompt."""

    code = ErrorCode.IMAGE_COUNT_MISMATCH


class ContextOverflowError(LlavaMedError, ValueError):
    """The prompt (with its image tokens) does not fit in the model's context."""

    code = ErrorCode.CONTEXT_OVERFLOW


class CheckpointError(LlavaMedError):
    """A checkpoint is malformed: unknown format, missing or unexpected weights."""

    code = ErrorCode.INTERNAL_ERROR


class MissingDependencyError(LlavaMedError, ImportError):
    """An optional dependency (bitsandbytes, pydicom, ...) is needed but not installed."""

    code = ErrorCode.INTERNAL_ERROR
