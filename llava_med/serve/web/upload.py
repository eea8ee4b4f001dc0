"""The image panel: what was uploaded (an image, a DICOM file, a multi-frame file or a series of slices), how it is
rendered (window, slice), the image the model will see, and upload problems in plain words.

Sizes and file counts are checked before any file is read; DICOM goes through :mod:`llava_med.images.dicom` and
:mod:`llava_med.images.series` (the renderer the worker and the CLI use), every other image through
:func:`llava_med.images.decode.load_image`. The panel keeps the uploaded bytes in memory only (never on disk): the
copy Gradio stored while uploading is deleted as soon as it is read, so no patient data stays behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_med.errors import ImageError, ImageTooLargeError, MissingDependencyError, UnsupportedImageError
from llava_med.images.decode import load_image
from llava_med.images.dicom import WINDOW_LABELS, WINDOW_PRESETS, DicomInfo, DicomOptions, read_dicom_info
from llava_med.images.series import DicomStack, format_bytes, is_dicom_bytes, is_zip_bytes, open_stack, read_zip
from llava_med.serve.web.config import SUPPORTED_IMAGES_TEXT, WebConfig
from llava_med.serve.web.messages import sentence
from llava_med.serve.web.session import SessionImage, encode_for_model

logger = logging.getLogger(__name__)

__all__ = ["PanelImage", "UploadProblem", "describe_upload_error", "discard_upload", "read_upload"]


class UploadProblem(ImageError):
    """An upload refused with a message already in plain words (shown as it is)."""


@dataclasses.dataclass(frozen=True)
class PanelImage:
    """What the image panel holds: the source, how it is rendered, and the image the model will see."""

    name: str
    image: SessionImage
    data: bytes | None = None  # one image or single-frame DICOM file
    stack: DicomStack | None = None  # a multi-frame file or a series
    info: DicomInfo | None = None  # DICOM: of the slice shown
    window: str | None = None  # DICOM grayscale: the window applied
    index: int | None = None  # stacks: the slice shown (0-based)
    note: str | None = None  # what was left out of a series

    @property
    def is_dicom(self) -> bool:
        return self.info is not None

    @property
    def slices(self) -> int:
        return len(self.stack) if self.stack is not None else 1

    def window_choices(self) -> list[tuple[str, str]]:
        """(label, value) of the windows offered: the CT presets for CT, the stored window when the file has one,
        and auto; empty for colour images and non-DICOM ones."""
        if self.info is None or not self.info.grayscale:
            return []
        names = [*WINDOW_PRESETS] if self.info.is_ct else []
        if self.info.has_stored_window:
            names.append("stored")
        names.append("auto")
        return [(WINDOW_LABELS[n], n) for n in names] if len(names) > 1 else []

    def wire_options(self) -> dict[str, Any]:
        """The optional request fields that say how the image was rendered (the worker applies the same ones to
        DICOM it receives; the PNG sent here already has them)."""
        if not self.is_dicom:
            return {}
        fields: dict[str, Any] = {}
        if self.window is not None:
            fields["dicom_window"] = self.window
        if self.stack is not None and self.stack.slices[self.index].frame is not None:
            fields["dicom_frame"] = self.stack.slices[self.index].frame
        return fields

    def description(self) -> dict[str, Any]:
        """What the logs and exports say about the image: size, hash, the DICOM tags shown and the rendering."""
        out: dict[str, Any] = {"sha256": self.image.sha256, "width": self.image.width, "height": self.image.height}
        if self.info is not None:
            out["dicom"] = {**self.info.to_dict(), "window": self.window,
                            "slice": None if self.stack is None else self.index + 1,
                            "slices": self.slices}
        return out

    def rerender(self, *, window: str | None = None, index: int | None = None,
                 config: WebConfig) -> PanelImage:
        """The same source with another window and/or slice."""
        window = self.window if window is None else window
        index = self.index if index is None else index
        return _rendered(self.name, config, data=self.data, stack=self.stack, info=self.info, window=window,
                         index=index, note=self.note)


def read_upload(paths: Sequence[str | os.PathLike[str]], config: WebConfig) -> PanelImage:
    """Read the uploaded file(s) into a :class:`PanelImage`: one image, one DICOM file (its middle frame when it
    has several), or a series (several DICOM files or a .zip; its middle slice). Counts and sizes are checked
    before anything is read. Raises :class:`ImageError` (see :func:`describe_upload_error`)."""
    paths = [Path(p) for p in paths if p]
    if not paths:
        raise UploadProblem("No file was received; choose the file again.")
    series = config.series_limits
    if len(paths) > series.max_files:
        raise UploadProblem(f"{len(paths)} files were dropped; a series may have at most {series.max_files}.")
    sizes = []
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            raise UploadProblem(f"{path.name} could not be read; upload it again.") from None
        limit = series.max_total_bytes if path.suffix.lower() == ".zip" else config.max_image_bytes
        if size > limit:
            raise UploadProblem(f"{path.name} is {format_bytes(size)}; the limit is {format_bytes(limit)}.")
        sizes.append(size)
    if sum(sizes) > series.max_total_bytes:
        raise UploadProblem(f"These {len(paths)} files are {format_bytes(sum(sizes))} in all; the limit is "
                            f"{format_bytes(series.max_total_bytes)}.")
    files = [(path.name, _read(path)) for path in paths]
    name = files[0][0] if len(files) == 1 else f"{len(files)} files"
    if len(files) == 1 and not is_zip_bytes(files[0][1]):
        data = files[0][1]
        if not is_dicom_bytes(data):
            return _rendered(name, config, data=data)
        info = read_dicom_info(data)
        if info.frames <= 1:
            return _rendered(name, config, data=data, info=info, window=_default_window(info))
        files = [(name, data)]
    members: list[tuple[str, bytes]] = []
    try:
        for file_name, data in files:
            if is_zip_bytes(data):
                members += read_zip(data, file_name, limits=config.image_limits, series=series)
            else:
                members.append((file_name, data))
        series.check(len(members), sum(len(d) for _, d in members), name)
        stack = open_stack(members, limits=config.image_limits, source=name)
    except UnsupportedImageError:
        raise
    except ImageError as exc:  # the series module's messages are written for people
        raise UploadProblem(sentence(str(exc))) from exc
    info = stack.info(stack.middle)
    return _rendered(name, config, stack=stack, info=info, window=_default_window(info), index=stack.middle,
                     note=stack.note)


def discard_upload(paths: Sequence[str | os.PathLike[str] | None]) -> None:
    """Delete the copies Gradio stored while uploading (only files inside its upload folder)."""
    try:
        from gradio.utils import get_upload_folder

        folder = Path(get_upload_folder()).resolve()
    except ImportError:  # pragma: no cover - the web UI needs gradio
        return
    for path in paths:
        if not path:
            continue
        try:
            resolved = Path(path).resolve()
            if folder in resolved.parents:
                resolved.unlink(missing_ok=True)
                if not any(resolved.parent.iterdir()):
                    resolved.parent.rmdir()
        except OSError:
            logger.debug("cannot delete the uploaded copy %s", path, exc_info=True)


def describe_upload_error(exc: BaseException, name: str, config: WebConfig) -> str:
    """One plain sentence or two for the upload panel: what is wrong with the file and what to do."""
    if isinstance(exc, UploadProblem):
        return str(exc)
    if isinstance(exc, ImageTooLargeError):
        return (f"{name} is too large to use here: the limits are {format_bytes(config.max_image_bytes)} per file and "
                f"{config.max_image_pixels / 1e6:g} megapixels.")
    if isinstance(exc, UnsupportedImageError):
        text = str(exc)
        if "no pixel data" in text:
            return f"{name} is a DICOM file without an image (a report or another kind of object)."
        return (f"{name} is encoded in a way this server cannot decode (for example a compressed DICOM whose decoder "
                "is not installed). Save it uncompressed or as PNG, and upload it again.")
    if isinstance(exc, MissingDependencyError):
        return "DICOM files cannot be read here: the server lacks pydicom (pip install pydicom)."
    if isinstance(exc, ImageError) and "truncated" in str(exc):
        return f"{name} is incomplete: the file ends before the image does. Upload it again."
    if isinstance(exc, ImageError) and "corrupt" in str(exc):
        return f"{name} is damaged: its image data cannot be decoded."
    return f"{name} is not an image this chat can read. Upload {SUPPORTED_IMAGES_TEXT}."


def _rendered(name: str, config: WebConfig, *, data: bytes | None = None, stack: DicomStack | None = None,
              info: DicomInfo | None = None, window: str | None = None, index: int | None = None,
              note: str | None = None) -> PanelImage:
    if stack is not None:
        index = stack.clamp(index)
        info = stack.info(index)
        pil = stack.render(index, window)
    else:
        options = DicomOptions(window=window) if info is not None and window is not None else None
        pil = load_image(data, limits=config.image_limits, dicom=options)
    return PanelImage(name=name, image=encode_for_model(pil), data=data, stack=stack, info=info, window=window,
                      index=index, note=note)


def _default_window(info: DicomInfo) -> str | None:
    if not info.grayscale:
        return None
    return "stored" if info.has_stored_window else "auto"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise UploadProblem(f"{path.name} could not be read; upload it again.") from None
