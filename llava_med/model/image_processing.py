"""The only image code of the project: decoding with limits, DICOM, aspect handling and CLIP preprocessing.

Everything a user can send (PIL images, raw bytes, file paths, base64 text, ``data:`` URLs and, only when
explicitly enabled, ``http(s)://`` URLs) goes through :func:`load_image`, which returns an RGB
:class:`PIL.Image.Image` or raises one of the typed errors of :mod:`llava_med.errors`:

* :class:`~llava_med.errors.ImageError` - the input is not a decodable image (bad base64, text, random bytes,
  truncated or corrupt files, URLs while URL fetching is disabled, ...);
* :class:`~llava_med.errors.ImageTooLargeError` - byte, pixel or side limits (:class:`ImageLimits`) exceeded,
  decompression bombs included; pixel limits are checked on the header size, before any pixel is decoded;
* :class:`~llava_med.errors.UnsupportedImageError` - a colour mode or DICOM encoding that cannot be decoded here;
* :class:`~llava_med.errors.MissingDependencyError` - pydicom / requests / transformers missing.

Model-side preprocessing (:func:`process_images`) turns RGB images into the ``[N, 3, H, W]`` float32 tensor the
vision tower expects, for the three aspect modes ``pad`` (LLaVA's ``expand2square``, deterministic and centred
here), ``resize`` and ``crop``.

torch, transformers, pydicom and requests are imported lazily, so processes that only decode or validate images
(web UI, controller, client) do not pay for them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import stat
import struct
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_med.errors import (
    BadRequestError,
    ImageError,
    ImageTooLargeError,
    MissingDependencyError,
    UnsupportedImageError,
)

if TYPE_CHECKING:
    import torch
    from pydicom.dataset import Dataset
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

logger = logging.getLogger(__name__)

__all__ = [
    "ASPECT_MODES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageLimits",
    "decode_image_bytes",
    "dicom_to_image",
    "encode_image_base64",
    "expand2square",
    "image_sha256",
    "load_image",
    "make_clip_image_processor",
    "normalize_aspect_mode",
    "process_images",
]

#: Normalisation constants of OpenAI CLIP (identical to ``transformers.image_utils.OPENAI_CLIP_MEAN/STD``).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: The aspect modes :func:`process_images` understands.
ASPECT_MODES: tuple[str, ...] = ("pad", "resize", "crop")

# Spellings accepted by normalize_aspect_mode (web UI names are matched case-insensitively).
_ASPECT_ALIASES: Mapping[str, str] = MappingProxyType(
    # The original LLaVA pads only for "pad"; every other config value ("square" too) goes through the
    # processor as is: shortest-edge resize and centre crop.
    {"pad": "pad", "resize": "resize", "square": "crop", "crop": "crop"}
)

# Formats PIL may try on untrusted bytes. Deliberately excludes EPS (runs Ghostscript), and exotic or
# scientific containers nobody sends to a chat model. MPO (multi-picture JPEG from phones) opens through JPEG.
_SAFE_PIL_FORMATS: tuple[str, ...] = (
    "PNG",
    "JPEG",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "WEBP",
    "PPM",
    "JPEG2000",
    "TGA",
    "ICO",
    "AVIF",
)
_SUPPORTED_FORMATS_TEXT = "PNG, JPEG, GIF, BMP, TIFF, WebP, PPM, JPEG 2000, TGA, ICO, AVIF or DICOM"

# What PIL raises on malformed data (UnidentifiedImageError is an OSError and is handled before these).
_PIL_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)

# What pydicom raises on malformed files or pixel data.
_DICOM_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    struct.error,
    NotImplementedError,
    RuntimeError,
)

_HIGH_BIT_DEPTH_GRAY_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16LS", "I;16BS"})
_MAX_PATH_CHARS = 4096
_URL_CHUNK_BYTES = 64 * 1024
_DEFAULT_WINDOW_PERCENTILES = (0.5, 99.5)


# --------------------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------------------


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
    max_pixels: int = 50_000_000
    max_side: int = 20_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ImageLimits.{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"ImageLimits.{name} must be positive, got {value}")


def _check_byte_count(n_bytes: int, limits: ImageLimits, what: str) -> None:
    if n_bytes > limits.max_bytes:
        raise ImageTooLargeError(f"{what} is {n_bytes} bytes, over the limit of {limits.max_bytes} bytes")


def _check_dimensions(width: int, height: int, limits: ImageLimits, what: str) -> None:
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


def _preview(text: str, n: int = 60) -> str:
    """A short, repr-quoted preview of user text for error messages."""
    return repr(text if len(text) <= n else text[:n] + "...")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_image(
    source: Any,
    *,
    limits: ImageLimits | None = None,
    allow_url: bool = False,
    url_timeout: float = 10.0,
    allow_path: bool = True,
) -> Image.Image:
    """Load an image from any supported source and return it as a new RGB image.

    Args:
        source: one of
            * a :class:`PIL.Image.Image` (checked against the pixel limits, EXIF-oriented, converted to RGB);
            * ``bytes`` / ``bytearray`` / ``memoryview`` with an encoded image or DICOM file;
            * a ``str`` or :class:`os.PathLike` naming an existing file;
            * a base64 ``str`` (whitespace and missing ``=`` padding tolerated), optionally as a
              ``data:<mime>;base64,<payload>`` URL;
            * an ``http://`` / ``https://`` URL, fetched only when ``allow_url`` is true.
            A string that is an existing file path is read as a file; otherwise it must be valid base64.
        limits: size limits (default :class:`ImageLimits()`).
        allow_url: fetch ``http(s)`` URLs. Off by default: a server that fetches user-given URLs can be made
            to reach internal hosts, so it must be enabled explicitly.
        url_timeout: seconds allowed for connecting, for each read, and for the whole download.
        allow_path: read strings and path objects naming local files. Servers pass False, so a request can never
            make them read (or probe for) files on their own disk: strings are then only base64 or data URLs.

    Returns:
        A new RGB image, independent of any file.

    Raises:
        ImageError, ImageTooLargeError, UnsupportedImageError, MissingDependencyError.
    """
    limits = ImageLimits() if limits is None else limits
    if isinstance(source, Image.Image):
        return _finish_pil_image(source, limits, f"PIL image (mode {source.mode})")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(source, limits, f"image of {len(source)} bytes")
    if isinstance(source, str):
        return _load_from_string(source, limits, allow_url=allow_url, url_timeout=url_timeout,
                                 allow_path=allow_path)
    if isinstance(source, os.PathLike):
        if not allow_path:
            raise ImageError("local image files are not accepted here; send the image as base64")
        data = _read_file(source, limits)
        return _decode_bytes(data, limits, f"image file {os.fspath(source)!r}")
    raise ImageError(
        f"unsupported image source of type {type(source).__name__}; expected a PIL image, bytes, a file path, "
        "base64 text or a data URL"
    )


def _load_from_string(text: str, limits: ImageLimits, *, allow_url: bool, url_timeout: float,
                      allow_path: bool = True) -> Image.Image:
    stripped = text.strip()
    if not stripped:
        raise ImageError("image string is empty")
    head = stripped[:16].lower()
    if head.startswith(("http://", "https://")):
        if not allow_url:
            raise ImageError(
                f"image URLs are disabled (got {_preview(stripped, 80)}); send the image as base64 or bytes, or "
                "enable URL fetching explicitly (load_image(..., allow_url=True), or the server's option for it)"
            )
        data = _fetch_url(stripped, limits, url_timeout)
        return _decode_bytes(data, limits, f"image from URL {_preview(stripped, 80)}")
    if head.startswith("data:"):
        data = _decode_data_url(stripped, limits)
        return _decode_bytes(data, limits, f"data URL image of {len(data)} bytes")
    if not allow_path:
        data = _b64decode(stripped, limits, "image string")
        if data is None:
            raise ImageError(f"image string {_preview(text)} is not valid base64 (send images as base64 or a "
                             "data URL)")
        return _decode_bytes(data, limits, f"base64 image of {len(data)} bytes")
    if _is_existing_path(text):
        data = _read_file(text, limits)
        return _decode_bytes(data, limits, f"image file {text!r}")
    data = _b64decode(stripped, limits, "image string")
    if data is None:
        if _looks_like_path(text) and os.path.isdir(text):
            raise ImageError(f"image path {text!r} is a directory, not a file")
        if _looks_like_path(text) and ("/" in text or os.sep in text or os.path.splitext(text)[1]):
            raise ImageError(f"image file {text!r} does not exist (and the string is not valid base64 either)")
        raise ImageError(f"image string {_preview(text)} is not a file path and not valid base64")
    try:
        return _decode_bytes(data, limits, f"base64 image of {len(data)} bytes")
    except ImageError as exc:
        # A short path-like string that happens to be valid base64 (e.g. '/data/scan01'): say both.
        if type(exc) is ImageError and len(text) < 256 and ("/" in text or os.sep in text):
            raise ImageError(
                f"image string {_preview(text)} is not an existing file, and decoded as base64 it is not an "
                f"image either ({exc})"
            ) from exc
        raise


def _looks_like_path(text: str) -> bool:
    return 0 < len(text) <= _MAX_PATH_CHARS and "\x00" not in text and "\n" not in text


def _is_existing_path(text: str) -> bool:
    if not _looks_like_path(text):
        return False
    try:
        return os.path.isfile(text)
    except (OSError, ValueError):
        return False


def _read_file(path: str | os.PathLike[Any], limits: ImageLimits) -> bytes:
    """Read a file, refusing it by its size before reading when it is over the byte limit."""
    shown = repr(os.fspath(path))
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"image path {shown} is a directory, not a file")
        _check_byte_count(info.st_size, limits, f"image file {shown}")
        with open(path, "rb") as fh:
            data = fh.read(limits.max_bytes + 1)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image file {shown} does not exist") from None
    except PermissionError:
        raise ImageError(f"image file {shown} cannot be read (permission denied)") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"image file {shown} cannot be read: {exc}") from exc
    _check_byte_count(len(data), limits, f"image file {shown}")
    return data


def _b64decode(text: str, limits: ImageLimits, what: str) -> bytes | None:
    """Strict base64 decoding (standard alphabet); ``None`` when ``text`` is not base64.

    Whitespace (line breaks of MIME-style base64) is ignored and missing ``=`` padding is added. The decoded
    size is estimated and checked against ``limits.max_bytes`` before decoding.
    """
    compact = "".join(text.split())
    if not compact:
        return None
    estimated = len(compact) * 3 // 4
    if estimated > limits.max_bytes:
        raise ImageTooLargeError(
            f"{what} of {len(compact)} characters would decode to about {estimated} bytes, over the limit of "
            f"{limits.max_bytes} bytes"
        )
    remainder = len(compact) % 4
    if remainder == 1:
        return None
    if remainder:
        compact += "=" * (4 - remainder)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data or None


def _decode_data_url(url: str, limits: ImageLimits) -> bytes:
    """Payload of a ``data:[<mime>][;params];base64,<payload>`` URL."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("data URL has no ',' separating its header from the data")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    if "base64" not in params[1:]:
        raise ImageError(f"data URL {_preview(header)} is not base64-encoded (';base64' missing)")
    mime = params[0]
    if mime and not (mime.startswith("image/") or mime in ("application/dicom", "application/octet-stream")):
        logger.debug("data URL declares media type %r; decoding it by its content", mime)
    data = _b64decode(payload, limits, "data URL payload")
    if data is None:
        raise ImageError("data URL payload is not valid base64")
    return data


def _fetch_url(url: str, limits: ImageLimits, timeout: float) -> bytes:
    """Download ``url`` with the byte limit enforced while streaming and an overall deadline of ``timeout``."""
    try:
        import requests
    except ImportError as exc:
        raise MissingDependencyError("fetching image URLs needs 'requests' (pip install requests)") from exc
    shown = _preview(url, 80)
    deadline = time.monotonic() + timeout
    buf = bytearray()
    try:
        with requests.get(url, stream=True, timeout=timeout, headers={"Accept": "image/*, */*;q=0.5"}) as resp:
            if resp.status_code >= 400:
                raise ImageError(f"could not fetch image URL {shown}: HTTP {resp.status_code} {resp.reason}")
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageTooLargeError(
                    f"image at URL {shown} is {int(declared)} bytes, over the limit of {limits.max_bytes} bytes"
                )
            for chunk in resp.iter_content(chunk_size=_URL_CHUNK_BYTES):
                buf += chunk
                if len(buf) > limits.max_bytes:
                    raise ImageTooLargeError(
                        f"image at URL {shown} is over the limit of {limits.max_bytes} bytes "
                        f"(stopped reading at {len(buf)} bytes)"
                    )
                if time.monotonic() > deadline:
                    raise ImageError(f"downloading image URL {shown} took longer than {timeout:g} s")
    except requests.RequestException as exc:
        raise ImageError(f"could not fetch image URL {shown}: {exc}") from exc
    logger.debug("fetched %d bytes from %s", len(buf), shown)
    return bytes(buf)


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


def decode_image_bytes(data: bytes | bytearray | memoryview, *, limits: ImageLimits | None = None) -> Image.Image:
    """Decode an encoded image (PNG, JPEG, ..., or DICOM) into a new RGB image.

    The byte limit is checked first; DICOM is recognised by ``DICM`` at offset 128 (or, for preamble-less
    files PIL cannot identify, by a plausible first DICOM tag); other images are opened with PIL, whose header
    size is checked against the pixel and side limits before any pixel is decoded. Multi-frame images give
    their first frame; EXIF orientation is applied; every colour mode becomes RGB (transparency composited on
    white, 16-bit/32-bit/float grayscale min-max scaled to 8 bits).
    """
    limits = ImageLimits() if limits is None else limits
    return _decode_bytes(data, limits, f"image of {len(data)} bytes")


def _decode_bytes(data: bytes | bytearray | memoryview, limits: ImageLimits, what: str) -> Image.Image:
    _check_byte_count(len(data), limits, what)
    if len(data) == 0:
        raise ImageError(f"{what} is empty")
    if _has_dicom_magic(data):
        return _dicom_to_image(data, limits, what.replace("image", "DICOM image", 1))
    try:
        img = Image.open(io.BytesIO(data), formats=_pil_formats())
    except UnidentifiedImageError:
        not_image = f"{what} is not an image (unrecognised format; expected {_SUPPORTED_FORMATS_TEXT})"
        if _looks_like_headerless_dicom(data):
            return _dicom_to_image(data, limits, what.replace("image", "DICOM image", 1), not_image=not_image)
        raise ImageError(not_image) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{what} is refused as a likely decompression bomb: {exc}") from exc
    except _PIL_DECODE_ERRORS as exc:
        raise _decode_failure(what, exc) from exc
    with img:
        width, height = img.size
        what = f"{img.format} {what}"
        _check_dimensions(width, height, limits, what)
        return _finish_pil_image(img, limits, what, checked=True)


def _pil_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(fmt for fmt in _SAFE_PIL_FORMATS if fmt in Image.OPEN)


def _decode_failure(what: str, exc: BaseException) -> ImageError:
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if isinstance(exc, EOFError) or "truncated" in lowered or "broken data stream" in lowered:
        return ImageError(f"{what} is truncated: the data ends before the image does ({text})")
    return ImageError(f"{what} is corrupt and cannot be decoded ({type(exc).__name__}: {text})")


def _finish_pil_image(img: Image.Image, limits: ImageLimits, what: str, *, checked: bool = False) -> Image.Image:
    """Check limits, decode pixels (first frame), apply EXIF orientation and convert to a new RGB image."""
    if not checked:
        _check_dimensions(img.width, img.height, limits, what)
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{what} is refused as a likely decompression bomb: {exc}") from exc
    except _PIL_DECODE_ERRORS as exc:
        raise _decode_failure(what, exc) from exc
    try:
        oriented = ImageOps.exif_transpose(img)
    except _PIL_DECODE_ERRORS as exc:
        logger.warning("%s: ignoring unreadable EXIF orientation (%s: %s)", what, type(exc).__name__, exc)
        oriented = img.copy()
    if oriented is None:  # only with in_place=True; kept for type checkers
        oriented = img.copy()
    rgb = _to_rgb(oriented, what)
    return rgb if rgb is not img else img.copy()


def _to_rgb(img: Image.Image, what: str = "image") -> Image.Image:
    """Convert any PIL mode to RGB: alpha/transparency over white, high bit depth grayscale min-max scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_BIT_DEPTH_GRAY_MODES:
        values = np.asarray(img, dtype=np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        gray = _linear_to_uint8(np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo), lo, hi)
        return Image.fromarray(gray, mode="L").convert("RGB")
    try:
        if img.has_transparency_data:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageError(f"{what} has colour mode {mode}, which cannot be converted to RGB") from exc


def _linear_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto ``[0, 255]`` (clipped); a flat range gives zeros."""
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------------


def _has_dicom_magic(data: bytes | bytearray | memoryview) -> bool:
    return len(data) >= 132 and bytes(data[128:132]) == b"DICM"


def _looks_like_headerless_dicom(data: bytes | bytearray | memoryview) -> bool:
    """Whether bytes without the DICM preamble start like a DICOM data set (first tag in group 0002 or 0008)."""
    if len(data) < 8:
        return False
    head = bytes(data[:2])
    return head in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def dicom_to_image(data: bytes | bytearray | memoryview, *, limits: ImageLimits | None = None) -> Image.Image:
    """Render a DICOM file's pixel data as an 8-bit RGB image, as a viewer would show it by default.

    * Grayscale (MONOCHROME1/2): modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence, also from
      the functional groups of enhanced multi-frame files), then the first stored window (Window Center/Width
      with its VOI LUT Function, per DICOM PS3.3 C.11.2.1.2) or a stored VOI LUT; without either, a default
      window from the 0.5th to the 99.5th percentile of the pixel values (Pixel Padding Value excluded).
      MONOCHROME1 is inverted so that low values are white.
    * RGB and YBR_* colour are converted to RGB and scaled to 8 bits by Bits Stored; PALETTE COLOR goes
      through its palette.
    * Multi-frame files give the middle frame, index ``NumberOfFrames // 2`` (0-based).

    Rows x Columns are checked against the limits before any pixel is decoded.

    Raises:
        MissingDependencyError: pydicom is not installed.
        UnsupportedImageError: no pixel data, or a transfer syntax / photometric interpretation that cannot
            be decoded here (the message names the transfer syntax and the missing plugins).
        ImageTooLargeError, ImageError: limits exceeded; unparsable, truncated or corrupt files.
    """
    limits = ImageLimits() if limits is None else limits
    return _dicom_to_image(data, limits, f"DICOM image of {len(data)} bytes")


def _dicom_to_image(
    data: bytes | bytearray | memoryview, limits: ImageLimits, what: str, *, not_image: str | None = None
) -> Image.Image:
    """Implementation of :func:`dicom_to_image`.

    ``not_image`` is set when the bytes are only guessed to be DICOM (no ``DICM`` marker): if they do not parse
    as a DICOM image after all (or pydicom is missing), an :class:`ImageError` with that message is raised.
    """
    _check_byte_count(len(data), limits, what)
    try:
        import pydicom
        from pydicom.pixels import get_decoder
    except ImportError as exc:
        if not_image is not None:
            raise ImageError(not_image) from None
        raise MissingDependencyError("reading DICOM images needs 'pydicom' (pip install pydicom)") from exc

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except _DICOM_ERRORS as exc:
        if not_image is not None:
            raise ImageError(not_image) from None
        raise ImageError(f"{what} cannot be parsed as DICOM ({type(exc).__name__}: {exc})") from exc

    has_pixels = any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not has_pixels and not_image is not None:
        raise ImageError(not_image)
    if not has_pixels:
        kind = ds.get("Modality") or getattr(ds.get("SOPClassUID"), "name", None) or "unknown kind"
        raise UnsupportedImageError(f"{what} has no pixel data (a {kind} object, not an image)")

    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int):
        raise ImageError(f"{what} has pixel data but no valid Rows/Columns")
    _check_dimensions(columns, rows, limits, what)
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        n_frames = 1
    frame = max(n_frames, 1) // 2

    transfer_syntax = _ensure_transfer_syntax(ds)
    ts_text = f"transfer syntax {transfer_syntax.name} ({transfer_syntax})"
    if transfer_syntax.name == str(transfer_syntax):
        ts_text = f"unknown transfer syntax {transfer_syntax}"
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise UnsupportedImageError(
            f"{what} uses {ts_text}, which has no pixel data decoder; it cannot be read here"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise UnsupportedImageError(
            f"{what} is compressed with {ts_text} and no decoder for it is installed (needs one of: {missing})"
        )
    try:
        pixels, meta = decoder.as_array(ds, index=frame)
    except RuntimeError as exc:
        raise UnsupportedImageError(f"{what} ({ts_text}) could not be decoded here: {exc}") from exc
    except _DICOM_ERRORS as exc:
        raise _dicom_pixel_failure(what, exc) from exc

    photometric = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation") or "")
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            if pixels.ndim == 3 and pixels.shape[-1] == 1:
                pixels = pixels[..., 0]
            gray = _render_grayscale(pixels, ds, frame, what)
            if photometric == "MONOCHROME1":
                gray = 255 - gray
            return Image.fromarray(gray, mode="L").convert("RGB")
        rgb = _render_color(pixels, ds, photometric, meta, what)
    except ImageError:
        raise
    except _DICOM_ERRORS as exc:
        raise _dicom_pixel_failure(what, exc) from exc
    return Image.fromarray(rgb, mode="RGB")


def _dicom_pixel_failure(what: str, exc: BaseException) -> ImageError:
    text = str(exc) or type(exc).__name__
    if "less than expected" in text or "truncat" in text.lower():
        return ImageError(f"{what} is truncated: its pixel data is shorter than its header says ({text})")
    return ImageError(f"{what} has corrupt pixel data ({type(exc).__name__}: {text})")


def _ensure_transfer_syntax(ds: Dataset) -> Any:
    """The data set's transfer syntax UID; for files without file meta, the encoding pydicom read them with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if uid:
        return UID(str(uid))
    implicit, little = ds.original_encoding
    if implicit or implicit is None:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little or little is None else ExplicitVRBigEndian
    if file_meta is None:
        file_meta = FileMetaDataset()
        ds.file_meta = file_meta
    file_meta.TransferSyntaxUID = uid
    return uid


def _first_number(value: Any) -> float | None:
    """First value of a possibly multi-valued DICOM number, or None when absent or not a number."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (str, bytes))):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _functional_group_item(ds: Dataset, frame: int, sequence: str) -> Any:
    """First item of ``sequence`` for ``frame`` in the per-frame, else shared, functional groups (or None)."""
    for groups_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if groups is None or len(groups) <= index:
            continue
        inner = groups[index].get(sequence)
        if inner is not None and len(inner) > 0:
            return inner[0]
    return None


def _apply_modality(pixels: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield units)."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    source: Any = ds if ("RescaleSlope" in ds or "RescaleIntercept" in ds) else None
    if source is None:
        source = _functional_group_item(ds, frame, "PixelValueTransformationSequence")
    values = pixels.astype(np.float64)
    if source is None:
        return values
    slope = _first_number(source.get("RescaleSlope"))
    intercept = _first_number(source.get("RescaleIntercept"))
    if slope is not None and slope != 0 and slope != 1:
        values *= slope
    if intercept:
        values += intercept
    return values


def _stored_window(ds: Dataset, frame: int) -> tuple[float, float, str] | None:
    """(center, width, VOI LUT function) of the first stored window, or None."""
    for source in (ds, _functional_group_item(ds, frame, "FrameVOILUTSequence")):
        if source is None:
            continue
        center = _first_number(source.get("WindowCenter"))
        width = _first_number(source.get("WindowWidth"))
        if center is not None and width is not None:
            function = str(source.get("VOILUTFunction") or ds.get("VOILUTFunction") or "LINEAR").upper()
            return center, width, function
    return None


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 255]; None when the width is invalid for the function."""
    y_range = 255.0
    if function == "SIGMOID":
        if width <= 0:
            return None
        out = y_range / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            return None
        out = ((values - center) / width + 0.5) * y_range
    else:  # LINEAR (default; unknown functions are treated as LINEAR)
        if width < 1:
            return None
        if width == 1:
            out = np.where(values <= center - 0.5, 0.0, y_range)
        else:
            out = ((values - (center - 0.5)) / (width - 1) + 0.5) * y_range
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _render_grayscale(pixels: np.ndarray, ds: Dataset, frame: int, what: str) -> np.ndarray:
    if pixels.ndim != 2:
        raise UnsupportedImageError(f"{what} has grayscale pixel data of unexpected shape {pixels.shape}")
    values = _apply_modality(pixels, ds, frame)

    window = _stored_window(ds, frame)
    if window is not None:
        out = _apply_window(values, *window)
        if out is not None:
            return out
        logger.warning("%s: ignoring invalid stored window (center %s, width %s, %s)", what, *window)
    elif "VOILUTSequence" in ds:
        out = _apply_voi_lut_sequence(values, ds, what)
        if out is not None:
            return out

    mask = np.isfinite(values)
    padding = _first_number(ds.get("PixelPaddingValue"))
    if padding is not None:
        mask &= pixels != padding
    sample = values[mask] if mask.any() else values[np.isfinite(values)]
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = (float(v) for v in np.percentile(sample, _DEFAULT_WINDOW_PERCENTILES))
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
    return _linear_to_uint8(np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo), lo, hi)


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset, what: str) -> np.ndarray | None:
    """Apply the first VOI LUT of the VOI LUT Sequence, scaled by the LUT's largest output value."""
    from pydicom.pixels import apply_voi

    try:
        lut_max = max(int(v) for v in np.asarray(ds.VOILUTSequence[0].LUTData).ravel())
        out = np.asarray(apply_voi(values, ds, index=0), dtype=np.float64)
    except _DICOM_ERRORS as exc:
        logger.warning("%s: ignoring unusable VOI LUT Sequence (%s: %s)", what, type(exc).__name__, exc)
        return None
    return _linear_to_uint8(out, 0.0, float(lut_max)) if lut_max > 0 else None


def _render_color(
    pixels: np.ndarray, ds: Dataset, photometric: str, meta: Mapping[str, Any], what: str
) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(pixels, ds))
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor is not None and len(descriptor) > 2 else 8 * rgb.dtype.itemsize
        return _scale_bits(rgb, bits)
    if photometric.startswith("YBR_FULL"):
        pixels = convert_color_space(pixels, photometric, "RGB")
    elif photometric != "RGB":
        raise UnsupportedImageError(f"{what} has photometric interpretation {photometric!r}, which is not supported")
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise UnsupportedImageError(f"{what} has colour pixel data of unexpected shape {pixels.shape}")
    bits = int(meta.get("bits_stored") or ds.get("BitsStored") or 8 * pixels.dtype.itemsize)
    return _scale_bits(pixels, bits)


def _scale_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Scale unsigned ``bits``-bit values to 8 bits."""
    if bits == 8 and values.dtype == np.uint8:
        return np.ascontiguousarray(values)
    return _linear_to_uint8(values, 0.0, float(2 ** max(bits, 1) - 1))


# --------------------------------------------------------------------------------------------------------------
# Aspect handling and model preprocessing
# --------------------------------------------------------------------------------------------------------------


def expand2square(img: Image.Image, background_color: tuple[int, int, int]) -> Image.Image:
    """Pad ``img`` to a square of ``background_color``, centred and deterministic.

    Like LLaVA's ``expand2square`` but the image is pasted at ``((side - w) // 2, (side - h) // 2)`` (the
    original used a random 0-1 pixel offset). A square input is returned unchanged (the same object); a non-RGB
    input is converted to RGB first.
    """
    if len(background_color) != 3 or not all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in background_color
    ):
        raise ValueError(f"background_color must be three ints in 0..255, got {background_color!r}")
    width, height = img.size
    if width == height:
        return img
    rgb = _to_rgb(img)
    side = max(width, height)
    result = Image.new("RGB", (side, side), tuple(int(c) for c in background_color))
    result.paste(rgb, ((side - width) // 2, (side - height) // 2))
    return result


def normalize_aspect_mode(mode: str | None, default: str | None) -> str:
    """Resolve an aspect mode name to one of :data:`ASPECT_MODES`.

    Accepts the original web UI names ``Pad``, ``Resize``, ``Crop`` and ``Default`` in any case. ``Default``
    (or ``None`` / ``""``) means ``default``, normally the checkpoint config's ``image_aspect_ratio``;
    ``square`` means ``resize``; a ``default`` of ``None`` (a config without ``image_aspect_ratio``) means
    ``crop``, which is what the original LLaVA did for any value other than ``pad``.

    Raises:
        BadRequestError: ``mode`` is unknown (a :class:`ValueError`).
        ValueError: ``default`` is unknown.
    """
    key = "" if mode is None else str(mode).strip().lower()
    if key in ("", "default"):
        default_key = "crop" if default is None else str(default).strip().lower()
        resolved = _ASPECT_ALIASES.get(default_key)
        if resolved is None:
            raise ValueError(
                f"unsupported default image aspect mode {default!r} (from the checkpoint config's "
                f"image_aspect_ratio); expected one of pad, resize, square, crop"
            )
        return resolved
    resolved = _ASPECT_ALIASES.get(key)
    if resolved is None:
        raise BadRequestError(
            f"unknown image aspect mode {mode!r}; expected one of Pad, Resize, Crop or Default"
        )
    return resolved


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if value else None


def _processor_output_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) of the processor's output: its crop size, else its fixed resize size."""
    crop = getattr(image_processor, "crop_size", None)
    height, width = _size_field(crop, "height"), _size_field(crop, "width")
    if height and width and getattr(image_processor, "do_center_crop", True):
        return height, width
    size = getattr(image_processor, "size", None)
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if height and width:
        return height, width
    edge = _size_field(size, "shortest_edge")
    if edge:
        return edge, edge
    raise ValueError(f"cannot tell the output size of image processor {type(image_processor).__name__}")


def process_images(images: Sequence[Image.Image], image_processor: Any, aspect_mode: str) -> torch.Tensor:
    """Preprocess images for the vision tower; returns a float32 tensor of shape ``[N, 3, H, W]``.

    Modes (see :func:`normalize_aspect_mode` to resolve user/config names):
        * ``pad``: :func:`expand2square` on the processor's mean colour
          (``tuple(int(x * 255) for x in image_processor.image_mean)``), then the processor;
        * ``resize``: bicubic resize to the processor's crop size (aspect ratio not kept), then the processor;
        * ``crop``: the processor as is (shortest-edge resize, centre crop).

    ``image_processor`` is a transformers image processor such as ``CLIPImageProcessorPil`` (see
    :func:`make_clip_image_processor`); it is called as ``image_processor(images=[...], return_tensors="pt")``.
    """
    import torch

    if aspect_mode is None or str(aspect_mode).strip().lower() in ("", "default"):
        raise ValueError(
            "process_images needs a concrete aspect mode; resolve 'Default' with normalize_aspect_mode(mode, "
            "config_default) first"
        )
    mode = normalize_aspect_mode(aspect_mode, default=None)
    height, width = _processor_output_size(image_processor)
    if len(images) == 0:
        return torch.empty((0, 3, height, width), dtype=torch.float32)

    prepared: list[Image.Image] = []
    for index, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ImageError(f"image {index} is a {type(img).__name__}, not a PIL image; decode it with load_image")
        img = _to_rgb(img, f"image {index}")
        if mode == "pad":
            background = tuple(int(x * 255) for x in image_processor.image_mean)
            img = expand2square(img, background)  # type: ignore[arg-type]
        elif mode == "resize":
            img = img.resize((width, height), Image.Resampling.BICUBIC)
        prepared.append(img)

    pixel_values = image_processor(images=prepared, return_tensors="pt")["pixel_values"]
    if isinstance(pixel_values, (list, tuple)):
        pixel_values = torch.stack([torch.as_tensor(p) for p in pixel_values])
    pixel_values = torch.as_tensor(pixel_values).to(torch.float32).contiguous()
    if pixel_values.ndim != 4 or pixel_values.shape[0] != len(prepared) or pixel_values.shape[1] != 3:
        raise ValueError(
            f"image processor returned pixel values of shape {tuple(pixel_values.shape)}, expected "
            f"[{len(prepared)}, 3, H, W]"
        )
    return pixel_values


def make_clip_image_processor(
    image_size: int,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> CLIPImageProcessorPil:
    """A CLIP image processor (PIL backend, deterministic, no torchvision) for square ``image_size`` inputs.

    Shortest-edge resize to ``image_size`` (bicubic), centre crop ``image_size x image_size``, rescale by 1/255,
    normalise with ``image_mean`` / ``image_std``, convert to RGB. Used by tests and for checkpoints without a
    preprocessor config.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    for name, values in (("image_mean", image_mean), ("image_std", image_std)):
        if len(values) != 3:
            raise ValueError(f"{name} must have 3 values (R, G, B), got {list(values)!r}")
    if any(float(s) <= 0 for s in image_std):
        raise ValueError(f"image_std values must be positive, got {list(image_std)!r}")
    try:
        from transformers.image_utils import PILImageResampling
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError as exc:
        raise MissingDependencyError(
            "the CLIP image processor needs 'transformers' >= 5 (pip install 'transformers>=5')"
        ) from exc
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(x) for x in image_mean],
        image_std=[float(x) for x in image_std],
        do_convert_rgb=True,
    )


# --------------------------------------------------------------------------------------------------------------
# Hashing and encoding
# --------------------------------------------------------------------------------------------------------------


def image_sha256(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of the encoded image bytes (cache key for vision features, file name for saved uploads)."""
    return hashlib.sha256(data).hexdigest()


def encode_image_base64(img: Image.Image, format: str = "PNG") -> str:  # noqa: A002 - mirrors PIL's name
    """Encode ``img`` as base64 text (PNG by default; JPEG inputs with alpha are flattened onto white first)."""
    fmt = format.strip().upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = _to_rgb(img)
    buffer = io.BytesIO()
    try:
        img.save(buffer, format=fmt)
    except (KeyError, ValueError, OSError) as exc:
        raise ImageError(f"cannot encode a {img.mode} image as {format!r}: {exc}") from exc
    return base64.b64encode(buffer.getvalue()).decode("ascii")
