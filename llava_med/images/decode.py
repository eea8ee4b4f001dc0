"""Decoding of every image a user can send, with limits checked before the work: the one entry point is
:func:`load_image`.

Sources: PIL images, raw bytes, file paths, base64 text, ``data:`` URLs and, only when explicitly enabled,
``http(s)://`` URLs. The result is an RGB :class:`PIL.Image.Image`, or one of the typed errors of
:mod:`llava_med.errors`:

* :class:`~llava_med.errors.ImageError` - the input is not a decodable image (bad base64, text, random bytes,
  truncated or corrupt files, URLs while URL fetching is disabled, ...);
* :class:`~llava_med.errors.ImageTooLargeError` - byte, pixel or side limits (:class:`ImageLimits`) exceeded,
  decompression bombs included; pixel limits are checked on the header size, before any pixel is decoded;
* :class:`~llava_med.errors.UnsupportedImageError` - a colour mode or DICOM encoding that cannot be decoded here;
* :class:`~llava_med.errors.MissingDependencyError` - pydicom / requests missing.

DICOM files are rendered by :mod:`llava_med.images.dicom`. Model-side preprocessing (aspect modes, CLIP tensors)
is :mod:`llava_med.model.preprocess`. Torch-free: the web UI, the controller and clients decode without it.
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
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_med.errors import ImageError, ImageTooLargeError, MissingDependencyError, UnsupportedImageError
from llava_med.images.common import ImageLimits, check_byte_count, check_dimensions, linear_to_uint8, preview
from llava_med.images.dicom import (
    DicomOptions,
    dicom_to_image,
    has_dicom_magic,
    looks_like_headerless_dicom,
    render_dicom,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ImageLimits",
    "SUPPORTED_FORMATS_TEXT",
    "decode_image_bytes",
    "dicom_to_image",
    "encode_image_base64",
    "fetch_url",
    "image_sha256",
    "load_image",
    "to_rgb",
]

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
SUPPORTED_FORMATS_TEXT = "PNG, JPEG, GIF, BMP, TIFF, WebP, PPM, JPEG 2000, TGA, ICO, AVIF or DICOM"

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
_HIGH_BIT_DEPTH_GRAY_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16LS", "I;16BS"})
_MAX_PATH_CHARS = 4096
_URL_CHUNK_BYTES = 64 * 1024


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
    dicom: DicomOptions | None = None,
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
        dicom: window and frame of a DICOM image (:class:`~llava_med.images.dicom.DicomOptions`); other images
            ignore them.

    Returns:
        A new RGB image, independent of any file.

    Raises:
        ImageError, ImageTooLargeError, UnsupportedImageError, MissingDependencyError.
    """
    limits = ImageLimits() if limits is None else limits
    if isinstance(source, Image.Image):
        return _finish_pil_image(source, limits, f"PIL image (mode {source.mode})")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(source, limits, f"image of {len(source)} bytes", dicom)
    if isinstance(source, str):
        return _load_from_string(source, limits, allow_url=allow_url, url_timeout=url_timeout,
                                 allow_path=allow_path, dicom=dicom)
    if isinstance(source, os.PathLike):
        if not allow_path:
            raise ImageError("local image files are not accepted here; send the image as base64")
        data = _read_file(source, limits)
        return _decode_bytes(data, limits, f"image file {os.fspath(source)!r}", dicom)
    raise ImageError(
        f"unsupported image source of type {type(source).__name__}; expected a PIL image, bytes, a file path, "
        "base64 text or a data URL"
    )


def _load_from_string(text: str, limits: ImageLimits, *, allow_url: bool, url_timeout: float,
                      allow_path: bool = True, dicom: DicomOptions | None = None) -> Image.Image:
    stripped = text.strip()
    if not stripped:
        raise ImageError("image string is empty")
    head = stripped[:16].lower()
    if head.startswith(("http://", "https://")):
        if not allow_url:
            raise ImageError(
                f"image URLs are disabled (got {preview(stripped, 80)}); send the image as base64 or bytes, or "
                "enable URL fetching explicitly (load_image(..., allow_url=True), or the server's option for it)"
            )
        data = fetch_url(stripped, limits, url_timeout)
        return _decode_bytes(data, limits, f"image from URL {preview(stripped, 80)}", dicom)
    if head.startswith("data:"):
        data = _decode_data_url(stripped, limits)
        return _decode_bytes(data, limits, f"data URL image of {len(data)} bytes", dicom)
    if not allow_path:
        data = _b64decode(stripped, limits, "image string")
        if data is None:
            raise ImageError(f"image string {preview(text)} is not valid base64 (send images as base64 or a "
                             "data URL)")
        return _decode_bytes(data, limits, f"base64 image of {len(data)} bytes", dicom)
    if _is_existing_path(text):
        data = _read_file(text, limits)
        return _decode_bytes(data, limits, f"image file {text!r}", dicom)
    data = _b64decode(stripped, limits, "image string")
    if data is None:
        if _looks_like_path(text) and os.path.isdir(text):
            raise ImageError(f"image path {text!r} is a directory, not a file")
        if _looks_like_path(text) and ("/" in text or os.sep in text or os.path.splitext(text)[1]):
            raise ImageError(f"image file {text!r} does not exist (and the string is not valid base64 either)")
        raise ImageError(f"image string {preview(text)} is not a file path and not valid base64")
    try:
        return _decode_bytes(data, limits, f"base64 image of {len(data)} bytes", dicom)
    except ImageError as exc:
        # A short path-like string that happens to be valid base64 (e.g. '/data/scan01'): say both.
        if type(exc) is ImageError and len(text) < 256 and ("/" in text or os.sep in text):
            raise ImageError(
                f"image string {preview(text)} is not an existing file, and decoded as base64 it is not an "
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
        check_byte_count(info.st_size, limits, f"image file {shown}")
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
    check_byte_count(len(data), limits, f"image file {shown}")
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
        raise ImageError(f"data URL {preview(header)} is not base64-encoded (';base64' missing)")
    mime = params[0]
    if mime and not (mime.startswith("image/") or mime in ("application/dicom", "application/octet-stream")):
        logger.debug("data URL declares media type %r; decoding it by its content", mime)
    data = _b64decode(payload, limits, "data URL payload")
    if data is None:
        raise ImageError("data URL payload is not valid base64")
    return data


def fetch_url(url: str, limits: ImageLimits, timeout: float) -> bytes:
    """Download ``url`` with the byte limit enforced while streaming and an overall deadline of ``timeout``.

    Only for servers where an operator enabled image URLs explicitly (``--allow-image-urls``)."""
    try:
        import requests
    except ImportError as exc:
        raise MissingDependencyError("fetching image URLs needs 'requests' (pip install requests)") from exc
    shown = preview(url, 80)
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


def _decode_bytes(data: bytes | bytearray | memoryview, limits: ImageLimits, what: str,
                  dicom: DicomOptions | None = None) -> Image.Image:
    check_byte_count(len(data), limits, what)
    if len(data) == 0:
        raise ImageError(f"{what} is empty")
    if has_dicom_magic(data):
        return render_dicom(data, limits, what.replace("image", "DICOM image", 1), options=dicom)
    if bytes(data[:4]) == _ICO_MAGIC:
        _check_ico_entries(data, limits, what)
    try:
        img = Image.open(io.BytesIO(data), formats=_pil_formats())
    except UnidentifiedImageError:
        not_image = f"{what} is not an image (unrecognised format; expected {SUPPORTED_FORMATS_TEXT})"
        if looks_like_headerless_dicom(data):
            return render_dicom(data, limits, what.replace("image", "DICOM image", 1), not_image=not_image,
                                options=dicom)
        raise ImageError(not_image) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{what} is refused as a likely decompression bomb: {exc}") from exc
    except _PIL_DECODE_ERRORS as exc:
        raise _decode_failure(what, exc) from exc
    with img:
        width, height = img.size
        what = f"{img.format} {what}"
        check_dimensions(width, height, limits, what)
        return _finish_pil_image(img, limits, what, checked=True)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ICO_MAGIC = b"\x00\x00\x01\x00"


def _check_ico_entries(data: bytes | bytearray | memoryview, limits: ImageLimits, what: str) -> None:
    """An ICO's directory states each image's size, but an embedded PNG or BMP may be far larger than stated (a
    directory saying 256x256 over a 12,000x12,000 PNG), and PIL decodes the largest one when it opens the file:
    read every embedded image's own header first."""
    raw = memoryview(data)
    count = struct.unpack("<H", raw[4:6])[0] if len(raw) >= 6 else 0
    for i in range(count):
        entry = bytes(raw[6 + 16 * i:22 + 16 * i])
        if len(entry) < 16:
            raise ImageError(f"{what} is truncated: its directory lists {count} images")
        offset = struct.unpack("<I", entry[12:16])[0]
        head = bytes(raw[offset:offset + 32])
        if head[:8] == _PNG_SIGNATURE and len(head) >= 24:
            width, height = struct.unpack(">II", head[16:24])
        elif len(head) >= 12:  # a BMP without its file header: the DIB header; the height counts the AND mask too
            width, height = struct.unpack("<ii", head[4:12])
            width, height = abs(width), abs(height) // 2
        else:
            raise ImageError(f"{what} is truncated: image {i} of its directory ends before its header")
        check_dimensions(width or 256, height or 256, limits, f"ICO {what} (image {i} it holds)")


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
        check_dimensions(img.width, img.height, limits, what)
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
    rgb = to_rgb(oriented, what)
    return rgb if rgb is not img else img.copy()


def to_rgb(img: Image.Image, what: str = "image") -> Image.Image:
    """Convert any PIL mode to RGB: alpha/transparency over white, high bit depth grayscale min-max scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_BIT_DEPTH_GRAY_MODES:
        values = np.asarray(img, dtype=np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        gray = linear_to_uint8(np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo), lo, hi)
        return Image.fromarray(gray, mode="L").convert("RGB")
    try:
        if img.has_transparency_data:
            # Pasted onto white through the alpha channel: the same pixels as alpha-compositing onto opaque white,
            # in about half the memory (a large palette image with transparency is 9 bytes a pixel, not 16).
            rgba = img.convert("RGBA")
            out = Image.new("RGB", img.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageError(f"{what} has colour mode {mode}, which cannot be converted to RGB") from exc


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
        img = to_rgb(img)
    buffer = io.BytesIO()
    try:
        img.save(buffer, format=fmt)
    except (KeyError, ValueError, OSError) as exc:
        raise ImageError(f"cannot encode a {img.mode} image as {format!r}: {exc}") from exc
    return base64.b64encode(buffer.getvalue()).decode("ascii")
