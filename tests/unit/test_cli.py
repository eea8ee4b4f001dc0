"""The chat CLI's logic in-process on the tiny checkpoint: one-shot answers equal the model layer's, bad images are
clear errors, the interactive loop keeps the conversation. (The installed console script and Ctrl-C in a real
terminal process are covered in tests/e2e/test_cli_process.py.)"""

from __future__ import annotations

import io
import logging

import pytest
import sample_images

from llava_med.chat import Message, render_chat
from llava_med.images.decode import load_image
from llava_med.model.generation import generate
from llava_med.sampling import SamplingParams
from llava_med.serve import cli


@pytest.fixture(scope="module")
def png_file(tmp_path_factory):
    return sample_images.png_file(tmp_path_factory.mktemp("img") / "lesion.png", sample_images.scan(size=(256, 192)))


@pytest.fixture(autouse=True)
def _reuse_the_loaded_tiny_model(monkeypatch, tiny_loaded):
    """cli.main loads the embedded tiny checkpoint; hand it the already loaded one (same checkpoint, same code)."""
    import llava_med.model.builder as builder

    loads = []

    def load(cfg):
        loads.append(cfg)
        assert cfg.model_path is None
        return tiny_loaded

    monkeypatch.setattr(builder, "load_pretrained_model", load)
    return loads


def expected_answer(loaded, image, max_new_tokens: int) -> str:
    rendered = render_chat([Message("user", "Describe the image.", (image,))], "mistral_instruct")
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=rendered.stop)
    return generate(loaded, rendered.prompt, rendered.images, params).strip()


def test_query_with_png_matches_model_layer(png_file, tiny_loaded, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code = cli.main(["--query", "Describe the image.", "--image-file", str(png_file), "--temperature", "0",
                         "--max-new-tokens", "16"])
    assert code == 0
    assert "tiny random-weight checkpoint" in caplog.text  # says it uses the embedded model
    expected = expected_answer(tiny_loaded, load_image(str(png_file)), 16)
    assert expected and capsys.readouterr().out.strip() == expected


def test_query_with_dicom(tiny_loaded, capsys):
    ct = sample_images.ct_dicom()
    assert cli.main(["--query", "Describe the image.", "--image-file", ct, "--temperature", "0",
                     "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == expected_answer(tiny_loaded, load_image(ct), 12)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"this is plain text, not pixels", "not an image"), (b"\x89PNG\r\n\x1a\n\x00\x00", "image"), (None, "missing.png")],
    ids=["text-file", "truncated-png", "missing-file"],
)
def test_bad_image_is_a_clear_error(tmp_path, content, message, caplog):
    path = tmp_path / ("bad.png" if content is not None else "missing.png")
    if content is not None:
        path.write_bytes(content)
    assert cli.main(["--query", "hi", "--image-file", str(path)]) == 2
    assert message in caplog.text and "Traceback" not in caplog.text


def test_interactive_multi_turn_then_empty_line_exits(png_file, monkeypatch, capsys, caplog):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is shown?\nIs it normal?\n\n"))
    with caplog.at_level(logging.DEBUG, logger="llava_med.cli"):
        code = cli.main(["--image-file", str(png_file), "--temperature", "0", "--max-new-tokens", "6", "--debug"])
    assert code == 0
    out, err = capsys.readouterr()
    assert out.count("ASSISTANT: ") == 2 and "exit..." in err
    # The second turn's prompt holds the first exchange and the image tag once.
    prompts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prompt: ")]
    assert len(prompts) == 2
    assert prompts[-1].count("<image>") == 1 and "Is it normal?" in prompts[-1] and "</s>[INST]" in prompts[-1]


def test_interactive_exits_on_eof(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["--max-new-tokens", "4"]) == 0
    assert "exit..." in capsys.readouterr().err


def test_sampling_defaults_are_the_shared_ones():
    from llava_med.sampling import CHAT_DEFAULTS

    args = cli.build_parser().parse_args([])
    assert (args.temperature, args.top_p, args.max_new_tokens) == (
        CHAT_DEFAULTS.temperature, CHAT_DEFAULTS.top_p, CHAT_DEFAULTS.max_new_tokens)
