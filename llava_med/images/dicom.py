"""DICOM files rendered as a viewer shows them (modality LUT, stored window or VOI LUT, MONOCHROME1, colour spaces,
multi-frame), with the image size checked before any pixel is decoded; window presets and frame selection
(:class:`DicomOptions`); the tags a researcher needs to know what an image is (:func:`read_dicom_info`), never the
patient-identifying ones. Torch-free; pydicom is imported on first use.

Window presets are in Hounsfield units, for CT: soft tissue (centre 40, width 400), lung (-600, 1500), bone
(400, 1800), brain (40, 80); ``stored`` is the file's own window (the default; a 0.5-99.5 percentile window when the
file has none), ``auto`` always the percentile window, ``C,W`` any centre and width. The web chat, the CLI
(``--dicom-window``, ``--dicom-frame``) and the wire protocol (``dicom_window``, ``dicom_frame``) all render through
:func:`render_dicom` with these options, so they give the same pixels.
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from llava_med.errors import ImageError, MissingDependencyError, UnsupportedImageError
from llava_med.images.common import ImageLimits, check_byte_count, check_dimensions, linear_to_uint8

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "WINDOW_CHOICES",
    "WINDOW_LABELS",
    "WINDOW_PRESETS",
    "DicomInfo",
    "DicomOptions",
    "dicom_to_image",
    "has_dicom_magic",
    "looks_like_headerless_dicom",
    "normalize_window",
    "read_dicom_info",
    "render_dicom",
]

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

#: CT window presets: name -> (centre, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
#: Every named window: the presets, the file's own (``stored``) and the percentile window (``auto``).
WINDOW_CHOICES: tuple[str, ...] = (*WINDOW_PRESETS, "stored", "auto")
WINDOW_LABELS: dict[str, str] = {"soft_tissue": "Soft tissue", "lung": "Lung", "bone": "Bone", "brain": "Brain",
                                 "stored": "Stored", "auto": "Auto"}
_CUSTOM_WINDOW = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*[,/:]\s*(\d+(?:\.\d+)?)\s*$")
_MAX_FRAME = 1_000_000


def normalize_window(value: str | None) -> str | None:
    """The canonical name of a window: a preset, ``stored``, ``auto`` or ``"C,W"`` (numbers); None stays None.

    Spellings are forgiving (``Soft tissue``, ``soft-tissue``, ``SOFT_TISSUE``; ``40/400``). Raises ValueError naming
    the choices for anything else.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"a DICOM window must be a string, got {type(value).__name__}")
    name = re.sub(r"[\s\-]+", "_", value.strip().lower())
    if name in WINDOW_CHOICES:
        return name
    match = _CUSTOM_WINDOW.match(value)
    if match:
        center, width = float(match.group(1)), float(match.group(2))
        if width >= 1 and math.isfinite(center) and math.isfinite(width) and abs(center) <= 1e6 and width <= 1e6:
            return f"{center:g},{width:g}"
    raise ValueError(f"unknown DICOM window {value!r}; use one of {', '.join(WINDOW_CHOICES)} or CENTER,WIDTH "
                     "(e.g. 40,400; width >= 1)")


@dataclass(frozen=True)
class DicomOptions:
    """How to render a DICOM image: ``window`` (see :func:`normalize_window`; None: the stored window, else auto)
    and ``frame`` (0-based frame of a multi-frame file; None: the middle one). Colour images ignore the window."""

    window: str | None = None
    frame: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", normalize_window(self.window))
        if self.frame is not None:
            if isinstance(self.frame, bool) or not isinstance(self.frame, int):
                raise ValueError(f"a DICOM frame must be an integer, got {self.frame!r}")
            if not 0 <= self.frame <= _MAX_FRAME:
                raise ValueError(f"a DICOM frame must be between 0 and {_MAX_FRAME}, got {self.frame}")

    @classmethod
    def of(cls, window: str | None = None, frame: int | None = None) -> DicomOptions | None:
        """Options, or None when both are unset (the default rendering)."""
        return None if window is None and frame is None else cls(window, frame)

    def fixed_window(self) -> tuple[float, float] | None:
        """(centre, width) of a preset or custom window; None for ``stored``, ``auto`` and the default."""
        if self.window in WINDOW_PRESETS:
            return WINDOW_PRESETS[self.window]
        if self.window and "," in self.window:
            center, width = self.window.split(",")
            return float(center), float(width)
        return None


def has_dicom_magic(data: bytes | bytearray | memoryview) -> bool:
    return len(data) >= 132 and bytes(data[128:132]) == b"DICM"


def looks_like_headerless_dicom(data: bytes | bytearray | memoryview) -> bool:
    """Whether bytes without the DICM preamble start like a DICOM data set (first tag in group 0002 or 0008)."""
    if len(data) < 8:
        return False
    head = bytes(data[:2])
    return head in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def dicom_to_image(data: bytes | bytearray | memoryview, *, limits: ImageLimits | None = None,
                   options: DicomOptions | None = None) -> Image.Image:
    """Render a DICOM file's pixel data as an 8-bit RGB image, as a viewer would show it by default.

    * Grayscale (MONOCHROME1/2): modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence, also from
      the functional groups of enhanced multi-frame files), then the first stored window (Window Center/Width
      with its VOI LUT Function, per DICOM PS3.3 C.11.2.1.2) or a stored VOI LUT; without either, a default
      window from the 0.5th to the 99.5th percentile of the pixel values (Pixel Padding Value excluded).
      MONOCHROME1 is inverted so that low values are white.
    * RGB and YBR_* colour are converted to RGB and scaled to 8 bits by Bits Stored; PALETTE COLOR goes
      through its palette.
    * Multi-frame files give the middle frame, index ``NumberOfFrames // 2`` (0-based).
    * ``options`` choose another window (a CT preset, ``auto``, ``C,W``) or frame (:class:`DicomOptions`).

    Rows x Columns are checked against the limits before any pixel is decoded.

    Raises:
        MissingDependencyError: pydicom is not installed.
        UnsupportedImageError: no pixel data, or a transfer syntax / photometric interpretation that cannot
            be decoded here (the message names the transfer syntax and the missing plugins).
        ImageTooLargeError, ImageError: limits exceeded; unparsable, truncated or corrupt files.
    """
    limits = ImageLimits() if limits is None else limits
    return render_dicom(data, limits, f"DICOM image of {len(data)} bytes", options=options)


def render_dicom(
    data: bytes | bytearray | memoryview, limits: ImageLimits, what: str, *, not_image: str | None = None,
    options: DicomOptions | None = None,
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
    n_frames = max(n_frames, 1)
    frame = n_frames // 2
    if options is not None and options.frame is not None:
        if options.frame >= n_frames:
            raise ImageError(f"{what} has {n_frames} frame(s), numbered 0 to {n_frames - 1}; there is no frame "
                             f"{options.frame}")
        frame = options.frame

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
            gray = _render_grayscale(pixels, ds, frame, what, options)
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


def _render_grayscale(pixels: np.ndarray, ds: Dataset, frame: int, what: str,
                      options: DicomOptions | None = None) -> np.ndarray:
    if pixels.ndim != 2:
        raise UnsupportedImageError(f"{what} has grayscale pixel data of unexpected shape {pixels.shape}")
    values = _apply_modality(pixels, ds, frame)

    fixed = options.fixed_window() if options is not None else None
    if fixed is not None:  # a preset or custom window (widths are >= 1, so it always applies)
        out = _apply_window(values, fixed[0], fixed[1], "LINEAR")
        if out is not None:
            return out
    if options is None or options.window != "auto":  # the stored window, else the percentile window
        out = _stored_rendering(values, ds, frame, what)
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


def _stored_rendering(values: np.ndarray, ds: Dataset, frame: int, what: str) -> np.ndarray | None:
    """The file's own window (Window Center/Width, else a VOI LUT Sequence); None when it has no usable one."""
    window = _stored_window(ds, frame)
    if window is not None:
        out = _apply_window(values, *window)
        if out is None:
            logger.warning("%s: ignoring invalid stored window (center %s, width %s, %s)", what, *window)
        return out
    if "VOILUTSequence" in ds:
        return _apply_voi_lut_sequence(values, ds, what)
    return None


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



# --------------------------------------------------------------------------------------------------------------
# What the image is (never who)

#: The only tags :func:`read_dicom_info` reads: what a researcher needs to know what the image shows.
_INFO_TAGS = (
    "Modality", "BodyPartExamined", "SeriesDescription", "SliceLocation", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceThickness", "PixelSpacing", "Rows", "Columns", "NumberOfFrames",
    "InstanceNumber", "WindowCenter", "WindowWidth", "VOILUTSequence", "PhotometricInterpretation",
    "SeriesInstanceUID",
)
#: Identifying tags: read only to withhold free text that repeats them, never returned, shown or logged.
_IDENTIFYING_TAGS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientAddress",
    "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "AccessionNumber", "PatientMotherBirthName",
)
WITHHELD_TEXT = "(withheld: it repeats identifying details)"


@dataclass(frozen=True)
class DicomInfo:
    """What a DICOM image shows, from an allow-list of tags; patient-identifying tags are never part of it.

    Free-text tags (series description, body part) that repeat an identifying value of the same file (the
    patient's name or ID, an institution, ...) are replaced by :data:`WITHHELD_TEXT`.
    """

    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    slice_location: float | None = None  # mm along the patient axis (Slice Location, else Image Position z)
    slice_thickness: float | None = None
    pixel_spacing: tuple[float, float] | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int = 1
    instance_number: int | None = None
    photometric: str | None = None
    stored_window: tuple[float, float] | None = None
    has_voi_lut: bool = False
    series_uid: str | None = field(default=None, repr=False)  # groups files of one series; never shown
    position: tuple[float, ...] | None = field(default=None, repr=False)  # Image Position (Patient)
    orientation: tuple[float, ...] | None = field(default=None, repr=False)  # Image Orientation (Patient)

    @property
    def is_ct(self) -> bool:
        return (self.modality or "").upper() == "CT"

    @property
    def grayscale(self) -> bool:
        return (self.photometric or "MONOCHROME2").upper().startswith("MONOCHROME")

    @property
    def has_stored_window(self) -> bool:
        return self.stored_window is not None or self.has_voi_lut

    def summary(self) -> list[tuple[str, str]]:
        """(label, value) pairs for display, in reading order; absent tags are left out."""
        out: list[tuple[str, str]] = []
        if self.modality:
            out.append(("Modality", self.modality))
        if self.body_part:
            out.append(("Body part", self.body_part))
        if self.series_description:
            out.append(("Series", self.series_description))
        if self.slice_location is not None and self.frames == 1:  # a multi-frame file's is not each frame's
            out.append(("Slice position", f"{self.slice_location:g} mm"))
        if self.slice_thickness is not None:
            out.append(("Slice thickness", f"{self.slice_thickness:g} mm"))
        if self.rows and self.columns:
            size = f"{self.columns}×{self.rows}"
            if self.pixel_spacing:
                size += f" px, {self.pixel_spacing[1]:g}×{self.pixel_spacing[0]:g} mm/px"
            out.append(("Size", size))
        if self.frames > 1:
            out.append(("Frames", str(self.frames)))
        if self.stored_window is not None:
            out.append(("Stored window", f"centre {self.stored_window[0]:g}, width {self.stored_window[1]:g}"))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The shown tags as JSON-able values (for logs and exports)."""
        return {"modality": self.modality, "body_part": self.body_part, "series_description": self.series_description,
                "slice_location": self.slice_location, "slice_thickness": self.slice_thickness,
                "rows": self.rows, "columns": self.columns, "frames": self.frames}


def read_dicom_info(data: bytes | bytearray | memoryview) -> DicomInfo:
    """The :class:`DicomInfo` of a DICOM file's header (pixel data is not read). Raises :class:`ImageError` when the
    bytes do not parse as DICOM, :class:`MissingDependencyError` without pydicom."""
    if not (has_dicom_magic(data) or looks_like_headerless_dicom(data)):
        raise ImageError("the file is not a DICOM file")
    try:
        import pydicom
    except ImportError as exc:
        raise MissingDependencyError("reading DICOM images needs 'pydicom' (pip install pydicom)") from exc
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True,
                             specific_tags=list(_INFO_TAGS + _IDENTIFYING_TAGS))
        identifying = _identifying_values(ds)

        def text(keyword: str) -> str | None:
            value = ds.get(keyword)
            shown = " ".join(str(value).split())[:200] if value not in (None, "") else None
            if shown and any(v in shown.lower() for v in identifying):
                return WITHHELD_TEXT
            return shown or None

        position = _numbers(ds.get("ImagePositionPatient"), 3)
        location = _first_number(ds.get("SliceLocation"))
        if location is None and position is not None:
            location = position[2]
        spacing = _numbers(ds.get("PixelSpacing"), 2)
        center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
        frames = ds.get("NumberOfFrames")
        instance = _first_number(ds.get("InstanceNumber"))
        return DicomInfo(
            modality=text("Modality"), body_part=text("BodyPartExamined"),
            series_description=text("SeriesDescription"), slice_location=location,
            slice_thickness=_first_number(ds.get("SliceThickness")),
            pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
            rows=_int_or_none(ds.get("Rows")), columns=_int_or_none(ds.get("Columns")),
            frames=max(_int_or_none(frames) or 1, 1), instance_number=int(instance) if instance is not None else None,
            photometric=text("PhotometricInterpretation"),
            stored_window=(center, width) if center is not None and width is not None else None,
            has_voi_lut="VOILUTSequence" in ds, series_uid=str(ds.get("SeriesInstanceUID") or "") or None,
            position=position, orientation=_numbers(ds.get("ImageOrientationPatient"), 6),
        )
    except _DICOM_ERRORS as exc:
        raise ImageError(f"the file cannot be parsed as DICOM ({type(exc).__name__})") from exc


def _identifying_values(ds: Dataset) -> set[str]:
    """Lower-cased identifying values of ``ds`` (names split into their parts) to withhold from shown text."""
    values: set[str] = set()
    for keyword in _IDENTIFYING_TAGS:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for item in items:
            for part in re.split(r"[\^=]", str(item)) + [str(item)]:
                part = " ".join(part.split()).lower()
                if len(part) >= 3:
                    values.add(part)
    return values


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(n) for n in numbers) else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
