"""DICOM files rendered as a viewer shows them by default (modality LUT, stored window or VOI LUT, MONOCHROME1,
colour spaces, multi-frame), with the image size checked before any pixel is decoded. Torch-free; pydicom is
imported on first use.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from llava_med.errors import ImageError, MissingDependencyError, UnsupportedImageError
from llava_med.images.common import ImageLimits, check_byte_count, check_dimensions, linear_to_uint8

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

__all__ = ["dicom_to_image", "has_dicom_magic", "looks_like_headerless_dicom", "render_dicom"]

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
_DEFAULT_WINDOW_PERCENTILES = (0.5, 99.5)


def has_dicom_magic(data: bytes | bytearray | memoryview) -> bool:
    return len(data) >= 132 and bytes(data[128:132]) == b"DICM"


def looks_like_headerless_dicom(data: bytes | bytearray | memoryview) -> bool:
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
    return render_dicom(data, limits, f"DICOM image of {len(data)} bytes")


def render_dicom(
    data: bytes | bytearray | memoryview, limits: ImageLimits, what: str, *, not_image: str | None = None
) -> Image.Image:
    """Implementation of :func:`dicom_to_image` (``what`` names the input in error messages).

    ``not_image`` is set when the bytes are only guessed to be DICOM (no ``DICM`` marker): if they do not parse
    as a DICOM image after all (or pydicom is missing), an :class:`ImageError` with that message is raised.
    """
    check_byte_count(len(data), limits, what)
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
    check_dimensions(columns, rows, limits, what)
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
    return linear_to_uint8(np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo), lo, hi)


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset, what: str) -> np.ndarray | None:
    """Apply the first VOI LUT of the VOI LUT Sequence, scaled by the LUT's largest output value."""
    from pydicom.pixels import apply_voi

    try:
        lut_max = max(int(v) for v in np.asarray(ds.VOILUTSequence[0].LUTData).ravel())
        out = np.asarray(apply_voi(values, ds, index=0), dtype=np.float64)
    except _DICOM_ERRORS as exc:
        logger.warning("%s: ignoring unusable VOI LUT Sequence (%s: %s)", what, type(exc).__name__, exc)
        return None
    return linear_to_uint8(out, 0.0, float(lut_max)) if lut_max > 0 else None


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
    return linear_to_uint8(values, 0.0, float(2 ** max(bits, 1) - 1))

