"""Tests of llava_med.images (decoding with limits, DICOM) and llava_med.model.preprocess (aspect modes, CLIP).

Only images drawn here and pydicom's bundled sample files are used (no downloads); the URL tests talk to a
throw-away HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import http.server
import io
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from sample_images import window_reference

from llava_med.constants import ErrorCode
from llava_med.errors import (
    BadRequestError,
    ImageError,
    ImageTooLargeError,
    MissingDependencyError,
    UnsupportedImageError,
)
from llava_med.images.decode import (
    ImageLimits,
    decode_image_bytes,
    dicom_to_image,
    encode_image_base64,
    image_sha256,
    load_image,
)
from llava_med.model.preprocess import (
    ASPECT_MODES,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    expand2square,
    make_clip_image_processor,
    normalize_aspect_mode,
    process_images,
    resize_for_vision_tower,
)

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _pattern(width: int = 48, height: int = 32) -> Image.Image:
    """An RGB image with distinct quadrants, so orientation and cropping are visible."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[: height // 2, : width // 2] = (255, 0, 0)
    arr[: height // 2, width // 2 :] = (0, 255, 0)
    arr[height // 2 :, : width // 2] = (0, 0, 255)
    arr[height // 2 :, width // 2 :] = (255, 255, 255)
    return Image.fromarray(arr, "RGB")


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` RGB pixels (almost no pixel data follows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _dicom_bytes(ds: object) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)  # type: ignore[attr-defined]
    return buf.getvalue()


def _sample(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom sample {name} is not bundled with this pydicom")
    return path


@pytest.fixture(scope="module")
def processor_336():  # noqa: ANN201 - transformers type
    return make_clip_image_processor(336)


@pytest.fixture(scope="module")
def processor_small():  # noqa: ANN201
    return make_clip_image_processor(32)


# ---------------------------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------------------------


def test_image_limits_defaults_and_validation() -> None:
    limits = ImageLimits()
    assert (limits.max_bytes, limits.max_pixels, limits.max_side) == (32 * 1024 * 1024, 25_000_000, 20_000)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        ImageLimits(max_pixels=0)
    with pytest.raises(ValueError, match="max_bytes must be an int"):
        ImageLimits(max_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_side must be an int"):
        ImageLimits(max_side=True)
    with pytest.raises(AttributeError):
        limits.max_bytes = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------
# round trips from every source
# ---------------------------------------------------------------------------------------------------------------


def test_png_round_trip_from_bytes_path_base64_and_data_url(tmp_path: Path) -> None:
    img = _pattern()
    data = _encode(img, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [
        data,
        bytearray(data),
        memoryview(data),
        str(path),
        path,
        b64,
        "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),  # MIME-style line breaks
        b64.rstrip("="),  # missing padding
        f"data:image/png;base64,{b64}",
        f"  DATA:image/png;base64,{b64}  ",
        img,
    ]
    for source in sources:
        out = load_image(source)
        assert out.mode == "RGB" and out.size == img.size, type(source)
        assert out.tobytes() == img.tobytes(), type(source)
    assert decode_image_bytes(data).tobytes() == img.tobytes()


def test_jpeg_round_trip_is_close() -> None:
    img = _pattern(64, 64)
    out = load_image(_encode(img, "JPEG", quality=95))
    assert out.mode == "RGB" and out.size == (64, 64)
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(img, dtype=int))
    assert diff.mean() < 4


def test_returned_image_is_a_new_rgb_image() -> None:
    img = _pattern()
    out = load_image(img)
    assert out is not img
    out.putpixel((0, 0), (1, 2, 3))
    assert img.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP", "WEBP"])
def test_other_formats_decode(fmt: str) -> None:
    img = _pattern()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = load_image(_encode(img, fmt, **kwargs))
    assert out.mode == "RGB" and out.size == img.size
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(img, dtype=int)).max() <= 2


def test_multi_frame_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert load_image(data).getpixel((4, 4)) == (255, 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# colour modes and orientation
# ---------------------------------------------------------------------------------------------------------------


def test_rgba_is_composited_on_white() -> None:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red ...
    arr[:, :2, 3] = 0  # left half fully transparent
    arr[:, 2:, 3] = 255  # right half opaque
    img = Image.fromarray(arr, "RGBA")
    for source in (img, _encode(img, "PNG")):
        out = load_image(source)
        assert out.mode == "RGB"
        assert out.getpixel((0, 0)) == (255, 255, 255)
        assert out.getpixel((3, 0)) == (255, 0, 0)


def test_half_transparent_la_blends_with_white() -> None:
    img = Image.new("LA", (2, 2), (0, 128))
    assert load_image(img).getpixel((0, 0)) == (127, 127, 127)


def test_palette_with_transparency() -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    data = _encode(img, "PNG", transparency=0)
    out = load_image(data)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (10, 20, 30)
    assert load_image(_encode(img, "PNG")).getpixel((0, 0)) == (0, 0, 0)  # without transparency: as drawn


def test_16_bit_grayscale_is_scaled_to_8_bit() -> None:
    arr = np.linspace(1000, 3000, 64, dtype=np.uint16).reshape(8, 8)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    for source in (img, _encode(img, "PNG")):
        out = np.asarray(load_image(source))
        assert out.shape == (8, 8, 3)
        assert out[..., 0].min() == 0 and out[..., 0].max() == 255
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        assert (np.diff(out[..., 0].ravel().astype(int)) >= 0).all()  # monotonic, not clipped


def test_float_and_int32_grayscale() -> None:
    flat = load_image(Image.new("F", (3, 3), 7.5))
    assert flat.getpixel((1, 1)) == (0, 0, 0)
    ramp = load_image(Image.fromarray(np.arange(9, dtype=np.int32).reshape(3, 3) * 1000))
    assert ramp.getpixel((0, 0)) == (0, 0, 0) and ramp.getpixel((2, 2)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "LAB", "HSV", "P", "I;16", "I", "F", "LA", "PA"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    out = load_image(Image.new(mode, (5, 3)))
    assert out.mode == "RGB" and out.size == (5, 3)


def test_exif_orientation_is_applied() -> None:
    img = _pattern(40, 20)  # red top-left, green top-right, blue bottom-left, white bottom-right
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    out = load_image(_encode(img, "PNG", exif=exif.tobytes()))
    assert out.size == (20, 40)
    # After a clockwise rotation the stored left column becomes the top row: blue top-left, red top-right.
    assert out.getpixel((2, 2)) == (0, 0, 255)
    assert out.getpixel((17, 2)) == (255, 0, 0)
    assert out.getpixel((2, 37)) == (255, 255, 255)
    jpeg = load_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert jpeg.size == (20, 40)
    # Without the tag nothing is rotated.
    assert load_image(_encode(img, "PNG")).size == (40, 20)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"hello, this is a text file\n" * 20, np.random.default_rng(0).bytes(2000), b"\x00" * 300],
    ids=["text", "random", "zeros"],
)
def test_non_image_bytes(data: bytes) -> None:
    with pytest.raises(ImageError, match="not an image \\(unrecognised format"):
        load_image(data)


def test_text_file_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image at all\n" * 10)
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(str(path))
    assert "notes.txt" in str(info.value)
    assert info.value.code == ErrorCode.BAD_IMAGE


def test_empty_bytes_and_strings() -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image("   ")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images(fmt: str) -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    data = _encode(img, fmt)
    for cut in (len(data) // 2, 60):
        with pytest.raises(ImageError, match="truncated"):
            load_image(data[:cut])


def test_corrupt_png_bytes() -> None:
    data = bytearray(_encode(_pattern(), "PNG"))
    data[40:80] = b"\xff" * 40  # inside the compressed stream
    with pytest.raises(ImageError) as info:
        load_image(bytes(data))
    assert not isinstance(info.value, ImageTooLargeError)


def test_invalid_base64_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a file path and not valid base64"):
        load_image("this is not base64!!")
    with pytest.raises(ImageError, match=r"missing\.png' does not exist"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ImageError, match="not an existing file"):
        load_image("/no/such/scan01")  # valid base64 by accident
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(str(tmp_path))
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="not an image"):
        load_image(base64.b64encode(b"plain text, not an image").decode())


def test_data_url_errors() -> None:
    with pytest.raises(ImageError, match="not base64-encoded"):
        load_image("data:image/png,abcd")
    with pytest.raises(ImageError, match="payload is not valid base64"):
        load_image("data:image/png;base64,***")
    with pytest.raises(ImageError, match="no ','"):
        load_image("data:image/png;base64")


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match="unsupported image source of type int"):
        load_image(42)


def test_bytes_that_only_look_like_headerless_dicom() -> None:
    for data in (b"\x08\x00" + b"garbage that is not DICOM" * 4, b"\x08\x00\x20\x00DA\x08\x0020240101"):
        with pytest.raises(ImageError, match="not an image \\(unrecognised format"):
            load_image(data)


def test_pil_globals_are_untouched() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with pytest.raises(ImageError):
        load_image(_encode(_pattern(), "PNG")[:100])
    with pytest.raises(ImageTooLargeError):
        load_image(_png_header_only(8000, 8000))
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_eps_is_not_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not an image"):
        load_image(eps)


# ---------------------------------------------------------------------------------------------------------------
# limits: bytes, pixels, sides, decompression bombs
# ---------------------------------------------------------------------------------------------------------------


def test_byte_limit_for_every_source(tmp_path: Path) -> None:
    data = _encode(_pattern(64, 64), "PNG")
    limits = ImageLimits(max_bytes=100)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for source in (data, str(path), path, b64, f"data:image/png;base64,{b64}"):
        with pytest.raises(ImageTooLargeError, match="over the limit of 100 bytes"):
            load_image(source, limits=limits)
    with pytest.raises(ImageTooLargeError, match=f"{len(data)} bytes, over the limit of 100 bytes"):
        decode_image_bytes(data, limits=limits)


def test_pixel_and_side_limits() -> None:
    data = _encode(_pattern(100, 100), "PNG")
    with pytest.raises(ImageTooLargeError, match="100x100 = 10000 pixels, over the limit of 9999 pixels"):
        load_image(data, limits=ImageLimits(max_pixels=9999))
    with pytest.raises(ImageTooLargeError, match="side of 100 pixels is over the limit of 99"):
        load_image(data, limits=ImageLimits(max_side=99))
    with pytest.raises(ImageTooLargeError, match="100x100 = 10000 pixels"):
        load_image(_pattern(100, 100), limits=ImageLimits(max_pixels=9999))
    assert load_image(data, limits=ImageLimits(max_pixels=10000, max_side=100)).size == (100, 100)


def _forbid_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)


def test_huge_header_is_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_pixel_decoding(monkeypatch)
    # Over our limit but under PIL's own bomb threshold: refused by our header check.
    with pytest.raises(ImageTooLargeError, match="8000x8000 = 64000000 pixels, over the limit of 25000000"):
        load_image(_png_header_only(8000, 8000))
    with pytest.raises(ImageTooLargeError, match="side of 25000 pixels is over the limit of 20000"):
        load_image(_png_header_only(25000, 10))
    # Far over PIL's threshold: PIL's DecompressionBombError, reported as ImageTooLargeError.
    start = time.monotonic()
    with pytest.raises(ImageTooLargeError) as info:
        load_image(_png_header_only(100_000, 100_000))
    assert time.monotonic() - start < 1.0
    assert "10000000000" in str(info.value) or "100000x100000" in str(info.value)


def test_compressible_bomb_png_is_refused_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(Image.new("1", (8000, 8000), 0), "PNG")  # 64 M pixels in a small file
    assert len(data) < 2 * 1024 * 1024
    _forbid_pixel_decoding(monkeypatch)
    start = time.monotonic()
    with pytest.raises(ImageTooLargeError, match="64000000 pixels"):
        load_image(data)
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------------------------


def test_urls_refused_by_default() -> None:
    for url in ("http://example.com/x.png", "https://example.com/x.png", "  HTTPS://EXAMPLE.COM/x.png"):
        with pytest.raises(ImageError, match="image URLs are disabled.*allow_url=True"):
            load_image(url)


@pytest.fixture()
def image_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, bytes]]:
    """A loopback HTTP server: /ok.png (a PNG), /big (2 MB, no Content-Length), anything else 404."""
    png = _encode(_pattern(), "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path == "/big":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                try:
                    for _ in range(32):
                        self.wfile.write(b"\x00" * 65536)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True
            else:
                self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", png
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_url_fetch_when_enabled(image_server: tuple[str, bytes]) -> None:
    base, png = image_server
    out = load_image(f"{base}/ok.png", allow_url=True, url_timeout=5)
    assert out.tobytes() == _pattern().tobytes()
    with pytest.raises(ImageTooLargeError, match="over the limit of 100 bytes"):
        load_image(f"{base}/ok.png", allow_url=True, limits=ImageLimits(max_bytes=100))
    with pytest.raises(ImageTooLargeError, match="stopped reading"):
        load_image(f"{base}/big", allow_url=True, limits=ImageLimits(max_bytes=100_000))
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(f"{base}/missing.png", allow_url=True)


# ---------------------------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------------------------


def test_dicom_ct_small_default_window() -> None:
    path = _sample("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds  # so the default (percentile) window is used
    for out in (load_image(path), dicom_to_image(Path(path).read_bytes())):
        arr = np.asarray(out)
        assert out.mode == "RGB" and out.size == (128, 128)
        assert arr.min() == 0 and arr.max() == 255
        assert arr[..., 0].std() > 30 and len(np.unique(arr)) > 100
        assert (arr[..., 0] == arr[..., 2]).all()


def test_dicom_mr_small_stored_window_is_applied() -> None:
    path = _sample("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    values = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = window_reference(values, center, width)
    out = np.asarray(load_image(path))
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.std() > 30 and len(np.unique(out)) > 50
    # The same window through pydicom's own implementation (its output range rescaled to 0..255).
    voi = pydicom.pixels.apply_voi_lut(values, ds)
    bits = ds.BitsStored
    y_min, y_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    theirs = (voi - y_min) / (y_max - y_min) * 255
    assert np.abs(theirs - out[..., 0]).max() <= 1.0


def test_dicom_multi_valued_window_uses_first_and_monochrome1_inverts() -> None:
    ds = pydicom.dcmread(_sample("MR_small.dcm"))
    reference = np.asarray(load_image(_sample("MR_small.dcm")))
    ds.WindowCenter = [ds.WindowCenter, 10]
    ds.WindowWidth = [ds.WindowWidth, 20]
    np.testing.assert_array_equal(np.asarray(dicom_to_image(_dicom_bytes(ds))), reference)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_array_equal(np.asarray(dicom_to_image(_dicom_bytes(ds))), 255 - reference)


def test_dicom_rescale_then_window() -> None:
    ds = pydicom.dcmread(_sample("CT_small.dcm"))
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -1024
    ds.WindowCenter = 1000
    ds.WindowWidth = 2000
    values = ds.pixel_array.astype(np.float64) * 2 - 1024
    out = np.asarray(dicom_to_image(_dicom_bytes(ds)))
    np.testing.assert_array_equal(out[..., 0], window_reference(values, 1000, 2000))


def test_dicom_without_preamble() -> None:
    ds = pydicom.dcmread(_sample("CT_small.dcm"))
    reference = np.asarray(load_image(_sample("CT_small.dcm")))
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00"
    np.testing.assert_array_equal(np.asarray(load_image(raw)), reference)


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "SC_rgb_small_odd.dcm"])
def test_dicom_rgb(name: str) -> None:
    path = _sample(name)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "RGB"
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (ds.Columns, ds.Rows)
    np.testing.assert_array_equal(np.asarray(out), ds.pixel_array)


def test_dicom_ybr_and_palette() -> None:
    ybr = np.asarray(load_image(_sample("SC_ybr_full_422_uncompressed.dcm")))
    assert ybr.shape == (100, 100, 3) and ybr.std() > 30
    assert not (ybr[..., 0] == ybr[..., 1]).all()  # real colour, not gray
    palette = np.asarray(load_image(_sample("examples_palette.dcm")))
    assert palette.shape == (350, 800, 3) and palette.std() > 20
    assert not (palette[..., 0] == palette[..., 2]).all()


def test_dicom_multi_frame_gives_middle_frame() -> None:
    path = _sample("examples_ybr_color.dcm")  # 30 frames, JPEG baseline (decoded by Pillow)
    ds = pydicom.dcmread(path)
    n_frames = int(ds.NumberOfFrames)
    assert n_frames > 2
    out = np.asarray(load_image(path))
    frames = ds.pixel_array
    assert out.shape == frames.shape[1:]
    np.testing.assert_array_equal(out, frames[n_frames // 2])
    assert not np.array_equal(out, frames[0])


def test_dicom_pixel_limit_checked_before_decoding() -> None:
    with pytest.raises(ImageTooLargeError, match="128x128 = 16384 pixels, over the limit of 1000"):
        load_image(_sample("CT_small.dcm"), limits=ImageLimits(max_pixels=1000))


def test_dicom_unsupported_transfer_syntax() -> None:
    ds = pydicom.dcmread(_sample("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    with pytest.raises(UnsupportedImageError, match="1.2.3.4.5.6.7"):
        dicom_to_image(_dicom_bytes(ds))


def test_dicom_compressed_without_decoder() -> None:
    path = _sample("JPEGLSNearLossless_08.dcm")
    ds = pydicom.dcmread(path)
    decoder = pydicom.pixels.get_decoder(ds.file_meta.TransferSyntaxUID)
    if decoder.is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(UnsupportedImageError, match="JPEG-LS") as info:
        load_image(path)
    assert "1.2.840.10008.1.2.4.81" in str(info.value)


def test_dicom_without_pixel_data_and_truncated() -> None:
    with pytest.raises(UnsupportedImageError, match="no pixel data"):
        load_image(_sample("rtplan.dcm"))
    with pytest.raises(ImageError, match="truncated"):
        load_image(_sample("MR_truncated.dcm"))


def test_dicom_needs_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    data = Path(_sample("CT_small.dcm")).read_bytes()
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(MissingDependencyError, match="pydicom"):
        load_image(data)


# ---------------------------------------------------------------------------------------------------------------
# expand2square, aspect modes, process_images
# ---------------------------------------------------------------------------------------------------------------


def test_expand2square_is_centred_and_deterministic() -> None:
    background = (122, 116, 104)
    wide = Image.new("RGB", (10, 4), (255, 0, 0))
    square = expand2square(wide, background)
    assert square.size == (10, 10)
    arr = np.asarray(square)
    # Rows 0-2 and 7-9 are background ((10 - 4) // 2 = 3 above), rows 3-6 the image.
    assert (arr[:3] == background).all() and (arr[7:] == background).all()
    assert (arr[3:7] == (255, 0, 0)).all()
    assert expand2square(wide, background).tobytes() == square.tobytes()

    tall = Image.new("RGB", (3, 8), (0, 0, 255))
    arr = np.asarray(expand2square(tall, background))
    # (8 - 3) // 2 = 2 columns on the left, 3 on the right.
    assert (arr[:, :2] == background).all() and (arr[:, 5:] == background).all()
    assert (arr[:, 2:5] == (0, 0, 255)).all()

    same = Image.new("RGB", (5, 5))
    assert expand2square(same, background) is same
    with pytest.raises(ValueError, match="background_color"):
        expand2square(wide, (1, 2))  # type: ignore[arg-type]


def test_normalize_aspect_mode() -> None:
    assert ASPECT_MODES == ("pad", "resize", "crop")
    assert normalize_aspect_mode("Pad", "crop") == "pad"
    assert normalize_aspect_mode("Resize", "pad") == "resize"
    assert normalize_aspect_mode("CROP", "pad") == "crop"
    assert normalize_aspect_mode("Default", "pad") == "pad"
    assert normalize_aspect_mode("default", "square") == "crop"
    assert normalize_aspect_mode(None, "crop") == "crop"
    assert normalize_aspect_mode(" square ", "pad") == "crop"
    assert normalize_aspect_mode("Default", None) == "crop"
    with pytest.raises(BadRequestError, match="unknown image aspect mode 'stretch'"):
        normalize_aspect_mode("stretch", "pad")
    with pytest.raises(ValueError, match="anyres"):
        normalize_aspect_mode("Default", "anyres")


def test_clip_processor_helper(processor_336: object) -> None:
    from transformers.image_utils import OPENAI_CLIP_MEAN as HF_MEAN
    from transformers.image_utils import OPENAI_CLIP_STD as HF_STD

    assert tuple(OPENAI_CLIP_MEAN) == tuple(HF_MEAN) and tuple(OPENAI_CLIP_STD) == tuple(HF_STD)
    assert type(processor_336).__name__ == "CLIPImageProcessorPil"
    assert processor_336.crop_size["height"] == 336 and processor_336.crop_size["width"] == 336
    assert processor_336.size["shortest_edge"] == 336
    assert int(processor_336.resample) == int(Image.Resampling.BICUBIC)
    assert tuple(int(x * 255) for x in processor_336.image_mean) == (122, 116, 104)
    with pytest.raises(ValueError):
        make_clip_image_processor(0)


def test_process_images_shapes(processor_336: object) -> None:
    images = [_pattern(200, 100), _pattern(60, 90)]
    for mode in ASPECT_MODES:
        out = process_images(images, processor_336, mode)
        assert out.shape == (2, 3, 336, 336) and out.dtype.is_floating_point
        assert str(out.dtype) == "torch.float32"
    assert process_images([], processor_336, "pad").shape == (0, 3, 336, 336)


def test_resize_for_vision_tower_gives_process_images_pixels(processor_336: object) -> None:
    """The 8-bit images an engine with its own CLIP processor (vLLM) gets: already at the tower's size, so that
    processor's resize and crop change nothing and the pixels are exactly process_images'."""
    images = [_pattern(200, 100), _pattern(60, 90), _pattern(336, 336)]
    for mode in ASPECT_MODES:
        resized = resize_for_vision_tower(images, processor_336, mode)
        assert [im.size for im in resized] == [(336, 336)] * 3 and {im.mode for im in resized} == {"RGB"}
        again = process_images(resized, processor_336, "crop")
        assert (again - process_images(images, processor_336, mode)).abs().max().item() == 0.0
    assert resize_for_vision_tower([], processor_336, "pad") == []


def test_process_images_modes_differ_as_expected(processor_small: object) -> None:
    import torch

    img = Image.new("RGB", (64, 32), (255, 0, 0))
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    red = ((torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1) - mean) / std)[:, 0, 0]
    bg = ((torch.tensor([122, 116, 104]).view(3, 1, 1) / 255 - mean) / std)[:, 0, 0]

    pad = process_images([img], processor_small, "pad")[0]
    assert pad.shape == (3, 32, 32)
    assert torch.allclose(pad[:, 0, 0], bg, atol=1e-2)  # top rows are the mean-colour padding
    assert torch.allclose(pad[:, 16, 16], red, atol=1e-2)
    resize = process_images([img], processor_small, "Resize")[0]
    crop = process_images([img], processor_small, "crop")[0]
    assert torch.allclose(resize, red.view(3, 1, 1).expand(3, 32, 32), atol=1e-2)  # all red, no padding
    assert torch.allclose(crop, resize, atol=1e-2)
    # Deterministic: the same input gives bit-identical tensors.
    assert torch.equal(process_images([img], processor_small, "pad")[0], pad)


def test_process_images_matches_processor_for_crop(processor_small: object) -> None:
    import torch

    img = _pattern(80, 48)
    direct = processor_small(images=[img], return_tensors="pt")["pixel_values"]
    assert torch.equal(process_images([img], processor_small, "crop"), direct)
    pad = process_images([img], processor_small, "pad")
    direct_pad = processor_small(images=[expand2square(img, (122, 116, 104))], return_tensors="pt")["pixel_values"]
    assert torch.equal(pad, direct_pad)


def test_process_images_rejects_default_and_non_images(processor_small: object) -> None:
    with pytest.raises(ValueError, match="concrete aspect mode"):
        process_images([_pattern()], processor_small, "Default")
    with pytest.raises(BadRequestError):
        process_images([_pattern()], processor_small, "bogus")
    with pytest.raises(ImageError, match="not a PIL image"):
        process_images([b"abc"], processor_small, "pad")  # type: ignore[list-item]
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    assert process_images([rgba], processor_small, "pad").shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# hashing and encoding
# ---------------------------------------------------------------------------------------------------------------


def test_image_sha256() -> None:
    assert image_sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    data = _encode(_pattern(), "PNG")
    assert image_sha256(data) == image_sha256(bytearray(data)) == image_sha256(memoryview(data))
    assert image_sha256(data) != image_sha256(data + b"\x00")


def test_encode_image_base64_round_trip() -> None:
    img = _pattern()
    text = encode_image_base64(img)
    assert base64.b64decode(text)[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_image(text).tobytes() == img.tobytes()
    jpeg = encode_image_base64(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), format="jpg")
    assert base64.b64decode(jpeg)[:2] == b"\xff\xd8"
    assert load_image(jpeg).getpixel((4, 4)) == (255, 255, 255)
    with pytest.raises(ImageError):
        encode_image_base64(img, format="NOPE")


def test_paths_refused_when_not_allowed(tmp_path: Path) -> None:
    path = tmp_path / "local.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    assert load_image(str(path)).size == (4, 4)
    with pytest.raises(ImageError, match="not valid base64"):
        load_image(str(path), allow_path=False)
    with pytest.raises(ImageError, match="local image files are not accepted"):
        load_image(path, allow_path=False)
    encoded = base64.b64encode(path.read_bytes()).decode()
    assert load_image(encoded, allow_path=False).size == (4, 4)


def _ico(*embedded: tuple[int, int, bytes]) -> bytes:
    """An ICO file: a directory of (stated width, stated height, embedded image bytes)."""
    offset = 6 + 16 * len(embedded)
    directory, payload = b"", b""
    for width, height, data in embedded:
        directory += struct.pack("<BBBBHHII", width % 256, height % 256, 0, 0, 1, 32, len(data), offset + len(payload))
        payload += data
    return struct.pack("<HHH", 0, 1, len(embedded)) + directory + payload


def test_an_ico_stating_a_small_size_over_a_huge_png_is_refused_before_decoding(monkeypatch) -> None:
    huge = _png_header_only(12000, 12000)  # the directory says 256x256
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(ImageTooLargeError, match=r"ICO .*\(image 1 it holds\) is 12000x12000"):
        load_image(_ico((16, 16, _encode(Image.new("RGB", (16, 16)), "PNG")), (256, 256, huge)))
    with pytest.raises(ImageError, match="truncated"):
        load_image(_ico((16, 16, b"\x89PNG\r\n"))[:30])


def test_a_real_ico_still_decodes() -> None:
    small = Image.new("RGB", (32, 32), (10, 200, 30))
    assert load_image(_ico((32, 32, _encode(small, "PNG")))).getpixel((5, 5)) == (10, 200, 30)
    ico = io.BytesIO()
    small.save(ico, format="ICO", sizes=[(32, 32), (16, 16)])
    assert load_image(ico.getvalue()).size == (32, 32)


def test_a_large_palette_png_with_transparency_is_refused_by_its_header(monkeypatch) -> None:
    palette = Image.new("P", (7000, 7000))
    data = _encode(palette, "PNG", transparency=0)
    assert len(data) < 100_000  # a small file ...
    _forbid_pixel_decoding(monkeypatch)
    with pytest.raises(ImageTooLargeError, match="7000x7000 = 49000000 pixels"):  # ... that would decode to 49 MP
        load_image(data)
