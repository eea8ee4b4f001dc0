"""The one place tests draw their images (deterministic, drawn by code: no files, no downloads).

    scan()                 a dark square with a bright ellipse, like a slice (PIL image)
    scan(seed=3)           a different one for each seed (distinct pixels: no vision-feature cache hits)
    png_bytes(img), png_b64(img), png_file(path, img)
    ct_dicom()             pydicom's bundled CT slice (a path), skipped if pydicom has no test data
    phi_ct_dicom()         a multi-frame CT carrying patient-identifying tags (PHI_VALUES)
    ct_series(n)           n single-frame CT slices of one series, shuffled
    window_reference(...)  the DICOM linear window, written out from the standard (the oracle for windowing tests)
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def window_reference(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window onto 0..255, written independently of llava_med.images.dicom."""
    lower = center - 0.5 - (width - 1) / 2
    upper = center - 0.5 + (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    out = np.where(values <= lower, 0, np.where(values > upper, 255, out))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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


#: Patient-identifying values written into :func:`phi_ct_dicom`; none of them may ever be shown, logged or saved.
PHI_VALUES = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "PID-7731-2245",
    "OtherPatientIDs": "MRN-55-4412",
    "PatientBirthDate": "19510317",
    "PatientAddress": "42 Wallaby Way, Sydney",
    "PatientTelephoneNumbers": "+61-2-5550-1234",
    "InstitutionName": "Springfield General Hospital",
    "InstitutionAddress": "742 Evergreen Terrace, Springfield",
    "ReferringPhysicianName": "Hibbert^Julius",
    "AccessionNumber": "ACC-99887766",
}


def phi_ct_dicom(frames: int = 5, size: int = 96, *, series_description: str | None = None, **tags: object) -> bytes:
    """A multi-frame CT DICOM (the web examples' synthetic chest volume) carrying every tag of
    :data:`PHI_VALUES`, built with pydicom."""
    from llava_med.serve.web.examples import ct_volume_dataset, draw_ct_volume

    ds = ct_volume_dataset(draw_ct_volume(frames=frames, size=size))
    for keyword, value in {**PHI_VALUES, **tags}.items():
        setattr(ds, keyword, value)
    if series_description is not None:
        ds.SeriesDescription = series_description
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ct_series(count: int = 5, size: int = 64) -> list[tuple[str, bytes]]:
    """``count`` single-frame CT slices of one series, as (name, bytes), in shuffled file order; slice k lies at
    z = 10 k mm and its pixels are the same value everywhere (-900 + 300 k HU), so each slice is recognisable."""
    import numpy as np
    from pydicom.uid import generate_uid

    from llava_med.serve.web.examples import ct_volume_dataset

    series_uid = generate_uid()
    files = []
    for k in range(count):
        ds = ct_volume_dataset(np.full((1, size, size), -900 + 300 * k, np.int16))
        del ds.NumberOfFrames
        ds.SeriesInstanceUID = series_uid
        ds.ImagePositionPatient = [0.0, 0.0, 10.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = count - k  # deliberately opposite to the positions
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((f"img{count - k:03d}.dcm", buf.getvalue()))  # names sort opposite to the positions too
    return files[1::2] + files[0::2]
