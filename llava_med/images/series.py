"""A stack of DICOM slices: the frames of a multi-frame file, or a series uploaded as several files or one ``.zip``.

The number of files and their sizes are checked before anything is read or decoded (a ``.zip`` by its directory:
member count, declared sizes, encryption). Slices are ordered along the patient axis (Image Position projected on
the slice normal, else Slice Location, else Instance Number, else the file name); one slice is rendered at a time,
through :func:`llava_med.images.dicom.render_dicom` with the chosen window. Torch-free.
"""

from __future__ import annotations

import io
import logging
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from llava_med.errors import ImageError, ImageTooLargeError
from llava_med.images.common import ImageLimits
from llava_med.images.dicom import (
    DicomInfo,
    DicomOptions,
    has_dicom_magic,
    looks_like_headerless_dicom,
    read_dicom_info,
    render_dicom,
)

logger = logging.getLogger(__name__)

__all__ = ["DicomStack", "SeriesLimits", "Slice", "format_bytes", "is_dicom_bytes", "is_zip_bytes", "open_stack",
           "read_zip"]


@dataclass(frozen=True)
class SeriesLimits:
    """Bounds of a series upload: how many files, and how many bytes in all (uncompressed)."""

    max_files: int = 1000
    max_total_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_files < 1 or self.max_total_bytes < 1:
            raise ValueError("SeriesLimits must be positive")

    def check(self, count: int, total: int, what: str) -> None:
        """Refuse ``count`` files of ``total`` bytes over the limits (before any of them is read)."""
        if count > self.max_files:
            raise ImageTooLargeError(f"{what} holds {count} files; the limit is {self.max_files}")
        if total > self.max_total_bytes:
            raise ImageTooLargeError(f"{what} is {format_bytes(total)} in all; the limit is "
                                     f"{format_bytes(self.max_total_bytes)}")


@dataclass(frozen=True)
class Slice:
    """One image of a stack: a file's bytes and the frame to render (None: the file's only or middle frame)."""

    name: str
    data: bytes
    frame: int | None
    info: DicomInfo


class DicomStack:
    """Slices in anatomical order; :meth:`render` draws one with a window. ``note`` says what was left out."""

    def __init__(self, slices: Sequence[Slice], *, limits: ImageLimits, note: str | None = None) -> None:
        if not slices:
            raise ImageError("no DICOM image to show")
        self.slices = list(slices)
        self.limits = limits
        self.note = note

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def middle(self) -> int:
        return len(self.slices) // 2

    def clamp(self, index: int | None) -> int:
        return self.middle if index is None else min(max(int(index), 0), len(self.slices) - 1)

    def info(self, index: int) -> DicomInfo:
        return self.slices[self.clamp(index)].info

    def render(self, index: int | None = None, window: str | None = None) -> Image.Image:
        """Slice ``index`` (default: the middle one) as an RGB image, with ``window`` (see :class:`DicomOptions`)."""
        item = self.slices[self.clamp(index)]
        return render_dicom(item.data, self.limits, f"DICOM slice {item.name}",
                            options=DicomOptions(window=window, frame=item.frame))


def is_zip_bytes(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def is_dicom_bytes(data: bytes) -> bool:
    """Whether ``data`` is (very likely) a DICOM file: the ``DICM`` marker, or a header-less one that parses."""
    if has_dicom_magic(data):
        return True
    if not looks_like_headerless_dicom(data):
        return False
    try:
        info = read_dicom_info(data)
    except ImageError:
        return False
    return bool(info.rows and info.columns)


def read_zip(data: bytes, name: str, *, limits: ImageLimits, series: SeriesLimits) -> list[tuple[str, bytes]]:
    """The files of a ``.zip`` (folders, hidden files and ``__MACOSX`` left out), refused by their count and declared
    sizes before any is extracted; each member is read with a bound, whatever its header claims."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise ImageError(f"{name} is not a readable .zip file") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and not _hidden(m.filename)]
        series.check(len(members), sum(m.file_size for m in members), name)
        too_big = next((m for m in members if m.file_size > limits.max_bytes), None)
        if too_big is not None:
            raise ImageTooLargeError(f"{too_big.filename} in {name} is {format_bytes(too_big.file_size)}; the limit "
                                     f"for one file is {format_bytes(limits.max_bytes)}")
        if any(m.flag_bits & 0x1 for m in members):
            raise ImageError(f"{name} is encrypted; upload an unencrypted .zip")
        files = []
        for member in members:
            try:
                with archive.open(member) as fh:
                    content = fh.read(member.file_size + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, zlib.error, OSError, EOFError):
                raise ImageError(f"{member.filename} in {name} is damaged or compressed in a way that cannot be "
                                 "read here") from None
            if len(content) > member.file_size:
                raise ImageError(f"{member.filename} in {name} is larger than the .zip says")
            files.append((member.filename, content))
    return files


def open_stack(files: Sequence[tuple[str, bytes]], *, limits: ImageLimits, source: str = "the upload") -> DicomStack:
    """The slices of DICOM ``files``: one multi-frame file gives its frames; several files give one slice each (or
    each frame of multi-frame ones). Files that are not DICOM images are left out (and counted in the note); when
    the files hold several series, the largest is shown. Raises :class:`ImageError` when no DICOM image remains."""
    infos: list[tuple[str, bytes, DicomInfo]] = []
    skipped = 0
    for name, data in files:
        try:
            info = read_dicom_info(data)  # refuses what is not DICOM
        except ImageError:
            info = None
        if info is None or not (info.rows and info.columns):
            skipped += 1
            continue
        infos.append((name, data, info))
    if not infos:
        raise ImageError(f"{source} holds no DICOM image")
    groups: dict[str | None, list[tuple[str, bytes, DicomInfo]]] = {}
    for item in infos:
        groups.setdefault(item[2].series_uid, []).append(item)
    chosen = max(groups.values(), key=len)
    notes = []
    if len(groups) > 1:
        notes.append(f"{source} holds {len(groups)} series; showing the largest ({len(chosen)} files)")
    if skipped:
        notes.append(f"{skipped} file(s) that are not DICOM images were left out")
    chosen.sort(key=_slice_order)
    slices: list[Slice] = []
    for name, data, info in chosen:
        if info.frames > 1:
            slices.extend(Slice(name, data, frame, info) for frame in range(info.frames))
        else:
            slices.append(Slice(name, data, None, info))
    return DicomStack(slices, limits=limits, note="; ".join(notes) or None)


def _slice_order(item: tuple[str, bytes, DicomInfo]) -> tuple:
    name, _, info = item
    if info.position is not None and info.orientation is not None:
        r, c = info.orientation[:3], info.orientation[3:]
        normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        return (0, sum(p * n for p, n in zip(info.position, normal)), name)
    if info.slice_location is not None:
        return (1, info.slice_location, name)
    if info.instance_number is not None:
        return (2, float(info.instance_number), name)
    return (3, 0.0, name)


def _hidden(path: str) -> bool:
    parts = path.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts if p)


def format_bytes(n_bytes: int) -> str:
    """``1.5 MB`` (from 1 MiB on) or ``12,345 bytes``."""
    return f"{n_bytes / (1024 * 1024):.1f} MB" if n_bytes >= 1024 * 1024 else f"{n_bytes:,} bytes"
