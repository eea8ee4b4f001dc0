"""bf16 weights packed for oneDNN on a CPU (llava_med.model.cpu_packing): the loader packs every linear layer of the
language model from the checkpoint's own bytes, and answers stay those of the unpacked model."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from PIL import Image, ImageDraw

from llava_med.model.args import LoadConfig, add_model_args, load_config_from_args
from llava_med.model.builder import load_pretrained_model
from llava_med.model.cpu_packing import PackedLinear, can_prepack, prepack_linears
from llava_med.model.generation import generate_stream, prepare_prompt
from llava_med.sampling import SamplingParams

PROMPT = "[INST] <image>\nDescribe the image. [/INST]"

# This project's machines and CI have oneDNN bf16 kernels; elsewhere the loader's fallback is what is tested.
PACKING = can_prepack()


def _image() -> Image.Image:
    img = Image.new("RGB", (200, 160), (25, 25, 25))
    ImageDraw.Draw(img).ellipse((40, 30, 160, 140), fill=(210, 200, 190))
    return img


def _greedy(loaded, n: int = 12) -> tuple[int, ...]:
    prepared = prepare_prompt(loaded, PROMPT, [_image()])
    params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    return list(generate_stream(loaded, prepared, params))[-1].token_ids


def _linears(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]


@pytest.fixture(scope="module")
def unpacked(tiny_checkpoint):
    return load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), dtype="bfloat16", cpu_prepack=False))


def test_packed_linear_equals_linear_for_every_batch_shape():
    if PACKING is not None:
        pytest.fail(f"this machine cannot pack bf16 weights: {PACKING}")  # CI and the lab machines can
    torch.manual_seed(0)
    for bias in (False, True):
        linear = torch.nn.Linear(96, 40, bias=bias, dtype=torch.bfloat16)
        packed = PackedLinear(linear)
        with torch.inference_mode():
            for shape in [(1, 96), (5, 96), (2, 1, 96), (3, 7, 96)]:
                x = torch.randn(shape, dtype=torch.bfloat16)
                torch.testing.assert_close(packed(x), linear(x), rtol=0, atol=0)
    assert PackedLinear(linear).state_dict() == {}  # a state_dict carries no oneDNN tensor


def test_the_loader_packs_every_linear_from_the_checkpoint_and_answers_stay_the_same(tiny_checkpoint, unpacked,
                                                                                    caplog):
    caplog.set_level(logging.INFO, logger="llava_med.model.builder")
    names = _linears(unpacked.model.language_model)
    assert len(names) > 10
    loaded = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), dtype="bfloat16"))
    lm = loaded.model.language_model
    assert _linears(lm) == []
    modules = dict(lm.named_modules())
    assert all(isinstance(modules[name], PackedLinear) for name in names)
    assert f"packed the {len(names)} linear weights" in caplog.text
    # The vision tower and projector are not packed (they run once per image).
    assert _linears(loaded.model.vision_tower) and _linears(loaded.model.mm_projector)
    assert _greedy(loaded) == _greedy(unpacked)


def test_weights_come_from_the_checkpoint_file(tiny_checkpoint, unpacked, monkeypatch):
    """The loader packs the bytes stored under each layer's name (read with pread), not the mapped copy: every
    language-model linear layer is found in the file, lm_head included, and q_proj of layer 0 is the file's."""
    from llava_med.model import builder

    seen: dict[str, torch.Tensor] = {}
    original = builder.prepack_linears

    def recording(model, weight_of=None, after_each=None):
        def spy(name, linear):
            seen[name] = weight = weight_of(name, linear)
            assert weight.data_ptr() != linear.weight.data_ptr(), f"{name}: the loaded copy, not the file's"
            return weight
        return original(model, weight_of=spy, after_each=after_each)

    monkeypatch.setattr(builder, "prepack_linears", recording)
    lm = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), dtype="bfloat16",
                                          cpu_prepack=False)).model.language_model
    names = _linears(lm)
    assert builder._prepack_from_checkpoint(lm, builder.CheckpointTensors(tiny_checkpoint)) == len(names)
    assert sorted(seen) == sorted(names) and "lm_head" in seen
    key = "model.layers.0.self_attn.q_proj.weight"
    with builder.CheckpointTensors(tiny_checkpoint).slices([key]) as slices:
        stored = slices[key][:]
    torch.testing.assert_close(seen["model.layers.0.self_attn.q_proj"], stored.to(torch.bfloat16), rtol=0, atol=0)


def test_no_packing_in_float32_or_with_the_flag_off(tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="llava_med.model.builder")
    fp32 = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), dtype="float32"))
    assert _linears(fp32.model.language_model) and "packed the" not in caplog.text
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    assert load_config_from_args(parser.parse_args([])).cpu_prepack is True
    assert load_config_from_args(parser.parse_args(["--no-cpu-prepack"])).cpu_prepack is False
    off = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), dtype="bfloat16", cpu_prepack=False))
    assert _linears(off.model.language_model) and "left unpacked (--no-cpu-prepack)" in caplog.text


def test_prepack_linears_without_a_source_packs_the_modules_own_weights():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8, dtype=torch.bfloat16), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Linear(8, 4, dtype=torch.bfloat16)))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(x)
    calls = []
    assert prepack_linears(model, after_each=lambda: calls.append(1)) == 2 and len(calls) == 2
    assert [type(m).__name__ for m in model.modules()].count("PackedLinear") == 2
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
