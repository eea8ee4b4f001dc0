"""What every image module shares: the size limits and the checks made before any pixel is decoded.

Torch-free (numpy and Pillow only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llava_med.errors import ImageError, ImageTooLargeError

__all__ = ["ImageLimits", "check_byte_count", "check_dimensions", "linear_to_uint8", "preview"]


@dataclass(frozen=True)
class ImageLimits:
    """Size limits applied to every decoded image.

    Attributes:
        max_bytes: largest encoded input (file, decoded base64, download) accepted, in bytes.
        max_pixels: largest ``width * height`` accepted, checked on the header before decoding. PIL refuses
            images above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (~179 M pixels) on its own; those are reported as
            :class:`ImageTooLargeError` too, so a ``max_pixels`` above that has no further effect.
        max_side: largest width or height accepted, in pixels.
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_side: int = 20_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ImageLimits.{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"ImageLimits.{name} must be positive, got {value}")


def check_byte_count(n_bytes: int, limits: ImageLimits, what: str) -> None:
    if n_bytes > limits.max_bytes:
        raise ImageTooLargeError(f"{what} is {n_bytes} bytes, over the limit of {limits.max_bytes} bytes")


def check_dimensions(width: int, height: int, limits: ImageLimits, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has an invalid size of {width}x{height} pixels")
    if width > limits.max_side or height > limits.max_side:
        raise ImageTooLargeError(
            f"{what} is {width}x{height}; its longer side of {max(width, height)} pixels is over the limit "
            f"of {limits.max_side} pixels"
        )
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {pixels} pixels, over the limit of {limits.max_pixels} pixels"
        )


def preview(text: str, n: int = 60) -> str:
    """A short, repr-quoted preview of user text for error messages."""
    return repr(text if len(text) <= n else text[:n] + "...")



def linear_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto ``[0, 255]`` (clipped); a flat range gives zeros."""
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

