"""Example images for the chat: real biomedical images found at run time in installed packages (never bundled),
or drawn by code."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from llava_med.serve.web.chat_log import write_atomic

@dataclasses.dataclass(frozen=True)
class Example:
    path: str
    question: str
    source: str
    thumbnail: str | None = None  # a small PNG of the image as the model sees it (DICOM rendered)


def draw_chest_xray(size: int = 512, seed: int = 0) -> Image.Image:
    """A synthetic frontal chest radiograph (drawn by code: no patient data, no third-party file)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.06, np.float32)
    thorax = ((x - 0.5) / 0.46) ** 2 + ((y - 0.62) / 0.55) ** 2 < 1
    img[thorax] = 0.52 + 0.08 * (1 - np.abs(x[thorax] - 0.5) * 2)
    for cx, tilt in ((0.31, 1.0), (0.69, -1.0)):  # lung fields, darker towards the apex and the sides
        lung = ((x - cx) / 0.155) ** 2 + ((y - 0.52 - 0.02 * tilt * (x - cx)) / 0.31) ** 2 < 1
        lung &= y < 0.80 - 0.05 * np.abs(x - cx) / 0.15
        img[lung] = 0.16 + 0.10 * (y[lung] - 0.25)
    heart = ((x - 0.56) / 0.15) ** 2 + ((y - 0.66) / 0.13) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.58)
    spine = np.abs(x - 0.5) < 0.035
    img[spine & thorax] = np.maximum(img[spine & thorax], 0.70)
    ribs = np.zeros_like(img)
    for k in range(9):  # posterior ribs: arcs descending laterally
        for side in (-1, 1):
            dx = np.abs(x - 0.5)
            d = dx - 0.04
            arc = 0.20 + 0.056 * k + 0.55 * d - 0.75 * d ** 2
            band = (np.abs(y - arc) < 0.009) & (dx > 0.04) & (dx < 0.40) & (np.sign(x - 0.5) == side)
            ribs[band] = 0.16
    img += ribs * thorax
    for side in (-1, 1):  # clavicles
        cl = (np.abs(y - (0.24 - 0.08 * (np.abs(x - 0.5) - 0.05))) < 0.012) & (np.abs(x - 0.5) > 0.04)
        cl &= (np.abs(x - 0.5) < 0.30) & (np.sign(x - 0.5) == side)
        img[cl] = 0.80
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "L")
    return pil.filter(ImageFilter.GaussianBlur(2.2)).convert("RGB")


def draw_histology(size: int = 512, seed: int = 1) -> Image.Image:
    """A synthetic H&E-stained tissue section: pink stroma and purple nuclei (drawn by code)."""
    rng = np.random.default_rng(seed)
    base = np.empty((size, size, 3), np.float32)
    base[...] = (236, 176, 204)
    noise = rng.normal(0, 1, (size // 16, size // 16)).astype(np.float32)
    texture = np.asarray(Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC))
    base += texture[..., None] * np.array([6, 14, 10], np.float32)
    pil = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(40):  # fibres
        x0, y0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(60, 180)
        draw.line([(x0, y0), (x0 + length * np.cos(angle), y0 + length * np.sin(angle))],
                  fill=(221, 140, 178), width=int(rng.integers(2, 5)))
    for _ in range(260):  # nuclei
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(4, 9), rng.uniform(3, 7)
        shade = rng.uniform(-20, 20)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry],
                     fill=(int(95 + shade), int(60 + shade), int(150 + shade)))
    return pil.filter(ImageFilter.GaussianBlur(0.8))


def draw_ct_volume(frames: int = 12, size: int = 256, seed: int = 2) -> np.ndarray:
    """A synthetic axial chest CT, in Hounsfield units (``frames`` x ``size`` x ``size`` int16), drawn by code: body
    and fat, lungs that grow and shrink from slice to slice, heart, aorta, spine and ribs. Every window preset shows
    something different in it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    volume = np.empty((frames, size, size), np.int16)
    for k in range(frames):
        t = (k + 0.5) / frames  # 0 (lower chest) .. 1 (apex)
        hu = np.full((size, size), -1000.0, np.float32)
        body = ((x - 0.5) / 0.44) ** 2 + ((y - 0.52) / 0.33) ** 2 < 1
        hu[body] = -90.0  # fat
        hu[((x - 0.5) / 0.41) ** 2 + ((y - 0.52) / 0.30) ** 2 < 1] = 55.0  # muscle and soft tissue
        lung_scale = 0.55 + 0.45 * np.sin(np.pi * min(max(t * 1.15, 0.05), 0.95))
        for cx in (0.32, 0.68):
            lung = ((x - cx) / (0.14 * lung_scale)) ** 2 + ((y - 0.50) / (0.22 * lung_scale)) ** 2 < 1
            hu[lung] = -840.0 + 40.0 * np.sin(40 * x[lung]) * np.cos(35 * y[lung])  # vessels in the lung
        if t < 0.7:  # the heart sits low in the chest
            heart = ((x - 0.54) / (0.13 * (1 - t))) ** 2 + ((y - 0.46) / (0.11 * (1 - t))) ** 2 < 1
            hu[heart] = 30.0
        hu[((x - 0.47) / 0.035) ** 2 + ((y - 0.62) / 0.035) ** 2 < 1] = 190.0  # aorta with contrast
        hu[((x - 0.5) / 0.05) ** 2 + ((y - 0.74) / 0.045) ** 2 < 1] = 650.0  # vertebral body
        hu[((x - 0.5) / 0.02) ** 2 + ((y - 0.80) / 0.04) ** 2 < 1] = 900.0  # spinous process
        ring = np.abs(((x - 0.5) / 0.40) ** 2 + ((y - 0.52) / 0.29) ** 2 - 1) < 0.06
        ribs = ring & (np.sin(np.arctan2(y - 0.52, x - 0.5) * 9 + k * 0.7) > 0.55)
        hu[ribs] = 800.0
        hu += rng.normal(0, 12, hu.shape).astype(np.float32)
        volume[k] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return volume


def ct_volume_dataset(volume: np.ndarray | None = None) -> Any:
    """A multi-frame CT DICOM data set (pydicom) of :func:`draw_ct_volume`: stored values with Rescale Intercept
    -1024, no stored window, and no patient data at all."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    volume = draw_ct_volume() if volume is None else volume
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("synthetic_ct_volume.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesDescription = "Synthetic chest CT (drawn by code)"
    ds.SliceThickness = 5.0
    ds.PixelSpacing = [1.4, 1.4]
    ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
    ds.NumberOfFrames = int(volume.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (volume.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    return ds


def _dataset_bytes(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _skimage_file(name: str) -> Path | None:
    """A scikit-image sample shipped inside the installed package (never downloaded)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "data" / name
        if candidate.is_file():
            return candidate
    return None


def _pydicom_file(name: str) -> Path | None:
    """A pydicom test file shipped with the package (never downloaded)."""
    try:
        from pydicom.data import get_testdata_file

        found = get_testdata_file(name, download=False)
    except Exception:  # noqa: BLE001 - optional sample; any failure means 'not available'
        return None
    return Path(found) if found and Path(found).is_file() else None


def prepare_examples(folder: str | os.PathLike[str]) -> list[Example]:
    """Example images for the UI, written to ``folder``: real samples found in installed packages (pydicom's CT
    and MR slices; scikit-image's IHC, retina and cell images when scikit-image is installed) and images drawn by
    code. Nothing is downloaded and no third-party file is bundled with this project."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []

    def keep(data: bytes, name: str) -> str:
        target = folder / name
        if not target.exists() or target.read_bytes() != data:
            write_atomic(target, data)
        return str(target)

    def copy(src: Path, name: str) -> str:
        return keep(src.read_bytes(), name)

    def drawn(image: Image.Image, name: str) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return keep(buf.getvalue(), name)

    examples.append(Example(drawn(draw_chest_xray(), "synthetic_chest_xray.png"),
                            "Describe the findings in this chest X-ray.", "drawn by code"))
    try:
        volume = keep(_dataset_bytes(ct_volume_dataset()), "synthetic_ct_volume.dcm")
    except ImportError:  # pydicom missing
        volume = None
    if volume is not None:
        examples.append(Example(volume, "Which structures are visible in this CT slice?", "drawn by code"))
    for name, question in (("CT_small.dcm", "What imaging modality is this, and which body region does it show?"),
                           ("MR_small.dcm", "What kind of MRI image is this?")):
        src = _pydicom_file(name)
        if src is not None:
            examples.append(Example(copy(src, name), question, "pydicom test data"))
    for name, question in (("ihc.png", "What staining technique was used, and what structures are visible?"),
                           ("retina.jpg", "Describe this fundus photograph. Are there signs of retinopathy?"),
                           ("cell.png", "What does this microscopy image show?")):
        src = _skimage_file(name)
        if src is not None:
            examples.append(Example(copy(src, f"skimage_{name}"), question, "scikit-image sample data"))
    if not any(e.source == "scikit-image sample data" for e in examples):
        examples.append(Example(drawn(draw_histology(), "synthetic_histology.png"),
                                "What staining technique was used, and what structures are visible?",
                                "drawn by code"))
    return [dataclasses.replace(e, thumbnail=drawn(_thumbnail(e.path), f"thumb_{Path(e.path).stem}.png"))
            for e in examples]


def _thumbnail(path: str, side: int = 256) -> Image.Image:
    from llava_med.images.decode import load_image

    image = load_image(Path(path).read_bytes())
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image

