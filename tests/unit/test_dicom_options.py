"""DICOM window presets, frame selection, the tags shown (never the identifying ones) and series uploads
(llava_med.images.dicom and llava_med.images.series), and the same options through the wire model and the CLI."""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from sample_images import PHI_VALUES, ct_dicom, ct_series, phi_ct_dicom, window_reference  # noqa: E402

from llava_med.errors import BadRequestError, ImageError, ImageTooLargeError  # noqa: E402
from llava_med.images.common import ImageLimits  # noqa: E402
from llava_med.images.decode import load_image  # noqa: E402
from llava_med.images.dicom import (  # noqa: E402
    WINDOW_CHOICES,
    WINDOW_PRESETS,
    WITHHELD_TEXT,
    DicomOptions,
    dicom_to_image,
    normalize_window,
    read_dicom_info,
)
from llava_med.images.series import SeriesLimits, open_stack, read_zip  # noqa: E402
from llava_med.serve.protocol import GenerateRequest, parse_generate_request  # noqa: E402


def _hu(data: bytes, frame: int) -> np.ndarray:
    ds = pydicom.dcmread(io.BytesIO(data))
    return ds.pixel_array[frame].astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_window_names_are_forgiving_and_unknown_ones_name_the_choices() -> None:
    assert normalize_window("Soft tissue") == normalize_window("soft-tissue") == "soft_tissue"
    assert normalize_window("LUNG") == "lung" and normalize_window(None) is None
    assert normalize_window("40/400") == normalize_window(" 40 , 400 ") == "40,400"
    assert normalize_window("-600,1500") == "-600,1500"
    for bad in ("liver", "40,0", "40", "", "nan,400"):
        with pytest.raises(ValueError, match="soft_tissue, lung, bone, brain, stored, auto"):
            normalize_window(bad)
    with pytest.raises(ValueError, match="frame"):
        DicomOptions(frame=-1)
    assert DicomOptions.of() is None and DicomOptions.of("lung") == DicomOptions("lung", None)


@pytest.mark.parametrize("preset", sorted(WINDOW_PRESETS))
def test_ct_presets_apply_their_window_in_hounsfield_units(preset: str) -> None:
    data = phi_ct_dicom(frames=3)
    out = np.asarray(dicom_to_image(data, options=DicomOptions(preset)))
    np.testing.assert_array_equal(out[..., 0], window_reference(_hu(data, 1), *WINDOW_PRESETS[preset]))


def test_every_window_gives_different_pixels_and_stored_is_the_default() -> None:
    data = phi_ct_dicom(frames=3, WindowCenter=300, WindowWidth=2000)
    images = {w: np.asarray(dicom_to_image(data, options=DicomOptions(w))) for w in WINDOW_CHOICES}
    for a in WINDOW_CHOICES:
        for b in WINDOW_CHOICES:
            assert a == b or not np.array_equal(images[a], images[b]), (a, b)
    np.testing.assert_array_equal(images["stored"], np.asarray(dicom_to_image(data)))
    np.testing.assert_array_equal(images["stored"][..., 0], window_reference(_hu(data, 1), 300, 2000))
    custom = np.asarray(dicom_to_image(data, options=DicomOptions("300,2000")))
    np.testing.assert_array_equal(custom, images["stored"])
    # Without a stored window, "stored" falls back to the percentile window, as "auto" always does.
    plain = phi_ct_dicom(frames=3)
    np.testing.assert_array_equal(np.asarray(dicom_to_image(plain, options=DicomOptions("stored"))),
                                  np.asarray(dicom_to_image(plain, options=DicomOptions("auto"))))


def test_frame_selection_and_its_error() -> None:
    data = phi_ct_dicom(frames=5)
    middle = np.asarray(dicom_to_image(data, options=DicomOptions("lung")))
    np.testing.assert_array_equal(middle, np.asarray(dicom_to_image(data, options=DicomOptions("lung", 2))))
    frames = [np.asarray(dicom_to_image(data, options=DicomOptions("lung", k))) for k in range(5)]
    for k in range(5):
        np.testing.assert_array_equal(frames[k][..., 0], window_reference(_hu(data, k), -600, 1500))
    assert not np.array_equal(frames[0], frames[4])
    with pytest.raises(ImageError, match="5 frame.*0 to 4.*no frame 5"):
        dicom_to_image(data, options=DicomOptions(frame=5))
    with pytest.raises(ImageError, match="1 frame"):
        load_image(ct_dicom(), dicom=DicomOptions(frame=1))


def test_load_image_passes_the_options_for_every_source_and_ignores_them_for_other_images() -> None:
    data = phi_ct_dicom(frames=3)
    expected = np.asarray(dicom_to_image(data, options=DicomOptions("bone", 0)))
    b64 = base64.b64encode(data).decode()
    for source in (data, b64, "data:application/dicom;base64," + b64):
        np.testing.assert_array_equal(np.asarray(load_image(source, dicom=DicomOptions("bone", 0))), expected)
    png = io.BytesIO()
    dicom_to_image(data).save(png, "PNG")
    np.testing.assert_array_equal(np.asarray(load_image(png.getvalue(), dicom=DicomOptions("lung", 7))),
                                  np.asarray(load_image(png.getvalue())))


def test_info_shows_what_the_image_is_and_never_who() -> None:
    data = phi_ct_dicom(frames=1, SliceLocation=-120.5, WindowCenter=40, WindowWidth=400)
    info = read_dicom_info(data)
    assert (info.modality, info.body_part, info.frames, info.rows, info.columns) == ("CT", "CHEST", 1, 96, 96)
    assert info.is_ct and info.grayscale and info.has_stored_window and info.slice_location == -120.5
    shown = repr(info) + repr(info.summary()) + repr(info.to_dict())
    assert "Synthetic chest CT" in shown and "-120.5 mm" in shown
    for value in PHI_VALUES.values():
        for part in value.split("^"):
            assert part not in shown
    # Free text that repeats an identifying value is withheld.
    leaky = read_dicom_info(phi_ct_dicom(frames=3, series_description="CT chest for DOE, Jane (Springfield)"))
    assert leaky.series_description == WITHHELD_TEXT and leaky.frames == 3
    assert "Slice position" not in dict(read_dicom_info(phi_ct_dicom(frames=3, SliceLocation=5)).summary())
    with pytest.raises(ImageError):
        read_dicom_info(b"not a dicom file at all" * 10)


def test_invalid_identifying_values_are_never_logged_or_warned(caplog: pytest.LogCaptureFixture) -> None:
    """pydicom warns about invalid values it reads (quoting some of them): none of the identifying ones may reach a
    log or a warning through reading, rendering or the tags shown."""
    import warnings

    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.simplefilter("ignore")
        data = phi_ct_dicom(frames=2, PatientName="Doe^Jane" + "Q" * 70, PatientBirthDate="1951-03-17",
                            InstitutionName="Springfield General Hospital " * 3, SeriesDescription="S" * 80)
    caplog.set_level("DEBUG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_dicom_info(data)
        dicom_to_image(data, options=DicomOptions("lung", 1))
        open_stack([("v.dcm", data)], limits=ImageLimits()).render(0, "bone")
    said = caplog.text + " ".join(str(w.message) for w in caught)
    assert not [v for v in ("Doe", "1951", "Springfield", "QQQ") if v in said], said


def test_series_is_ordered_by_position_and_renders_each_slice() -> None:
    files = ct_series(5)
    stack = open_stack(files, limits=ImageLimits())
    assert len(stack) == 5 and stack.middle == 2 and stack.note is None
    assert [stack.info(i).slice_location for i in range(5)] == [0.0, 10.0, 20.0, 30.0, 40.0]
    for k in range(5):  # slice k is -900 + 300 k HU everywhere
        expected = window_reference(np.full((64, 64), -900.0 + 300 * k), *WINDOW_PRESETS["lung"])
        np.testing.assert_array_equal(np.asarray(stack.render(k, "lung"))[..., 0], expected)
    # One multi-frame file gives its frames.
    assert len(open_stack([("v.dcm", phi_ct_dicom(frames=4))], limits=ImageLimits())) == 4


def test_series_zip_is_read_with_bounds_checked_first() -> None:
    files = ct_series(5)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(f"series/{name}", data)
        zf.writestr("series/README.txt", "not an image")
        zf.writestr("__MACOSX/._x.dcm", b"junk")
        zf.writestr("series/", b"")
    data = buf.getvalue()
    members = read_zip(data, "s.zip", limits=ImageLimits(), series=SeriesLimits())
    assert len(members) == 6  # the five slices and the README
    stack = open_stack(members, limits=ImageLimits(), source="s.zip")
    assert len(stack) == 5 and "1 file(s) that are not DICOM images were left out" in stack.note
    with pytest.raises(ImageTooLargeError, match="holds 6 files; the limit is 3"):
        read_zip(data, "s.zip", limits=ImageLimits(), series=SeriesLimits(max_files=3))
    with pytest.raises(ImageTooLargeError, match="the limit is"):
        read_zip(data, "s.zip", limits=ImageLimits(), series=SeriesLimits(max_total_bytes=10_000))
    with pytest.raises(ImageTooLargeError, match="limit for one file"):
        read_zip(data, "s.zip", limits=ImageLimits(max_bytes=1000), series=SeriesLimits())
    # A bomb: a member declaring 2 GB is refused by its declared size, before anything is inflated.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * (4 * 1024 * 1024))
    with pytest.raises(ImageTooLargeError):
        read_zip(bomb.getvalue(), "b.zip", limits=ImageLimits(max_bytes=1024 * 1024), series=SeriesLimits())
    with pytest.raises(ImageError, match="not a readable .zip"):
        read_zip(b"PK\x03\x04garbage", "bad.zip", limits=ImageLimits(), series=SeriesLimits())
    with pytest.raises(ImageError, match="holds no DICOM image"):
        open_stack([("a.txt", b"hello")], limits=ImageLimits(), source="x.zip")


def test_wire_fields_are_optional_validated_and_reach_the_options() -> None:
    old = parse_generate_request({"prompt": "hi"})
    assert old.dicom_window is None and old.dicom_frame is None and old.dicom_options is None
    req = parse_generate_request({"prompt": "hi", "dicom_window": "Soft tissue", "dicom_frame": 3, "unknown": 1})
    assert req.dicom_options == DicomOptions("soft_tissue", 3)
    assert GenerateRequest(prompt="x", dicom_frame=0).dicom_options == DicomOptions(None, 0)
    with pytest.raises(BadRequestError, match="dicom_window.*unknown DICOM window 'liver'"):
        parse_generate_request({"prompt": "hi", "dicom_window": "liver"})
    with pytest.raises(BadRequestError, match="dicom_frame") as err:
        parse_generate_request({"prompt": "hi", "dicom_frame": -1})
    assert int(err.value.code) == 40302


def test_cli_flags_parse_and_refuse_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    from llava_med.serve.cli import build_parser

    args = build_parser().parse_args(["--dicom-window", "Lung", "--dicom-frame", "4"])
    assert (args.dicom_window, args.dicom_frame) == ("lung", 4)
    assert build_parser().parse_args([]).dicom_window is None
    for argv, message in ((["--dicom-window", "liver"], "unknown DICOM window 'liver'"),
                          (["--dicom-frame", "-2"], "must be 0 or more"), (["--dicom-frame", "x"], "whole number")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert message in capsys.readouterr().err


def test_worker_passes_the_options_to_the_engine_and_refuses_bad_ones() -> None:
    from fastapi.testclient import TestClient
    from servers import wait_until

    from llava_med.engine.fake import FakeEngine
    from llava_med.serve.model_worker import ModelWorker, create_app
    from llava_med.serve.protocol import iter_chunks

    engine = FakeEngine(["fake"])
    worker = ModelWorker(engine, no_register=True)
    image = base64.b64encode(phi_ct_dicom(frames=3)).decode()
    body = {"prompt": "[INST] <image>\nWhat? [/INST]", "images": [image], "echo": False}
    with TestClient(create_app(worker)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, timeout=5, message="worker ready")

        def ask(**fields: object) -> list:
            return list(iter_chunks([client.post("/worker_generate_stream", json={**body, **fields}).content]))

        assert ask(dicom_window="Lung", dicom_frame=2)[-1].text.startswith("[dicom_window=lung,dicom_frame=2] ")
        assert engine.requests[-1].dicom == DicomOptions("lung", 2)
        plain = ask()
        assert engine.requests[-1].dicom is None and not plain[-1].text.startswith("[dicom")
        bad = ask(dicom_window="liver")
        assert len(bad) == 1 and bad[0].error_code == 40001 and "unknown DICOM window 'liver'" in bad[0].text
        assert ask()[-1].error_code == 0  # still serving


def test_the_model_sees_the_chosen_window_and_frame(tiny_loaded) -> None:
    """The real preprocessing path (prepare_prompt -> load_image) renders DICOM with the request's options."""
    from llava_med.model.generation import prepare_prompt
    from llava_med.model.preprocess import process_images

    data = phi_ct_dicom(frames=3)
    b64 = base64.b64encode(data).decode()
    prompt = "[INST] <image>\nWhat? [/INST]"

    def pixels(options: DicomOptions | None) -> np.ndarray:
        prepared = prepare_prompt(tiny_loaded, prompt, [b64], dicom=options, allow_path=False)
        return prepared.pixel_values.float().numpy()

    lung, bone = pixels(DicomOptions("lung")), pixels(DicomOptions("bone"))
    assert not np.allclose(lung, bone)
    expected = process_images([dicom_to_image(data, options=DicomOptions("lung", 0))], tiny_loaded.image_processor,
                              "pad")
    np.testing.assert_array_equal(pixels(DicomOptions("lung", 0)), expected.float().numpy())
    np.testing.assert_array_equal(pixels(None), pixels(DicomOptions("stored", 1)))


def test_cli_renders_dicom_with_the_flags(tiny_checkpoint, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from llava_med.serve.cli import main

    path = tmp_path / "volume.dcm"
    path.write_bytes(phi_ct_dicom(frames=3))
    base = ["--model-path", str(tiny_checkpoint), "--image-file", str(path), "--query", "What?",
            "--max-new-tokens", "2", "--temperature", "0"]
    assert main([*base, "--dicom-window", "bone", "--dicom-frame", "2"]) == 0
    assert main([*base, "--dicom-frame", "3"]) == 2
    assert "has 3 frame(s), numbered 0 to 2; there is no frame 3" in caplog.text
