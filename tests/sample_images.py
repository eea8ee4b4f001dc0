"""The one place tests draw their images (deterministic, drawn by code: no files, no downloads).

    scan()                 a dark square with a bright ellipse, like a slice (PIL image)
    scan(seed=3)           a different one for each seed (distinct pixels: no vision-feature cache hits)
    png_bytes(img), png_b64(img), png_file(path, img)
    ct_dicom()             pydicom's bundled CT slice (a path), skipped if pydicom has no test data
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image, ImageDraw


def scan(seed: int = 0, size: tuple[int, int] = (240, 200)) -> Image.Image:
    """A synthetic scan: a dark background and a bright ellipse whose shape and shade depend on ``seed``."""
    width, height = size
    img = Image.new("RGB", size, (12 + seed % 40, 12, 12))
    k = seed % 37
    ImageDraw.Draw(img).ellipse((width // 6 + k, height * 3 // 20, width * 5 // 6, height * 17 // 20 - k),
                                fill=(210, 205 - 3 * (seed % 20), 190))
    return img


def solid(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 32)) -> Image.Image:
    return Image.new("RGB", size, color)


def png_bytes(img: Image.Image | None = None) -> bytes:
    buf = io.BytesIO()
    (img or scan()).save(buf, "PNG")
    return buf.getvalue()


def png_b64(img: Image.Image | None = None) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")


def png_file(path: Path, img: Image.Image | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(img))
    return path


def ct_dicom() -> str:
    """Path of pydicom's bundled CT slice."""
    import pydicom.data

    return pydicom.data.get_testdata_file("CT_small.dcm")
