"""llava_med.sampling: the one set of sampling limits and defaults (torch-free)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llava_med.constants import ErrorCode
from llava_med.errors import BadRequestError
from llava_med.sampling import (
    CHAT_DEFAULTS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_TEMPERATURE,
    WIRE_DEFAULTS,
    GenerationOutput,
    SamplingParams,
    normalize_stop,
)
from llava_med.serve.protocol import GenerateRequest, parse_generate_request


@pytest.mark.parametrize(
    ("kwargs", "message", "code"),
    [
        ({"temperature": -0.1}, "temperature", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"temperature": float("nan")}, "temperature", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"temperature": MAX_TEMPERATURE + 0.5}, "temperature must be between 0 and 5", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"temperature": "hot"}, "temperature must be a number", ErrorCode.BAD_REQUEST),
        ({"top_p": 0.0}, "top_p", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"top_p": 1.5}, "top_p", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"max_new_tokens": -5}, "max_new_tokens must be >= 1", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"max_new_tokens": MAX_NEW_TOKENS_LIMIT + 1}, "at most 1000000", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer", ErrorCode.BAD_REQUEST),
        ({"stop": ("a",) * 17}, "at most 16 stop strings", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"stop": ("x" * 257,)}, "limited to 256 characters", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"stop": "</s>"}, "stop must be a tuple", ErrorCode.BAD_REQUEST),
        ({"seed": "x"}, "seed", ErrorCode.BAD_REQUEST),
        ({"seed": 2**100}, "seed must be between", ErrorCode.PARAM_OUT_OF_RANGE),
        ({"seed": -1}, "seed must be between", ErrorCode.PARAM_OUT_OF_RANGE),
    ],
)
def test_sampling_params_validation(kwargs, message, code):
    with pytest.raises(BadRequestError, match=message) as info:
        SamplingParams(**kwargs)
    assert info.value.code == code


def test_defaults_are_the_originals():
    # The original worker's defaults for missing fields, and the original web UI's sliders.
    assert (WIRE_DEFAULTS.temperature, WIRE_DEFAULTS.top_p, WIRE_DEFAULTS.max_new_tokens) == (1.0, 1.0, 256)
    assert (CHAT_DEFAULTS.temperature, CHAT_DEFAULTS.top_p, CHAT_DEFAULTS.max_new_tokens) == (0.2, 0.7, 512)
    wire = parse_generate_request(b'{"prompt": "p"}').sampling_params()
    assert wire == WIRE_DEFAULTS
    assert SamplingParams(temperature=0).greedy and not CHAT_DEFAULTS.greedy


def test_wire_and_sampling_limits_agree():
    # The same values are refused by the wire model and by SamplingParams (one set of limits).
    for field, bad in (("temperature", MAX_TEMPERATURE + 0.1), ("top_p", 0.0), ("max_new_tokens", 0),
                       ("max_new_tokens", MAX_NEW_TOKENS_LIMIT + 1), ("seed", -1)):
        with pytest.raises(BadRequestError):
            parse_generate_request({"prompt": "p", field: bad})
        with pytest.raises(BadRequestError):
            SamplingParams(**{field: bad})
    ok = GenerateRequest(prompt="p", temperature=MAX_TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS_LIMIT)
    assert ok.sampling_params().max_new_tokens == MAX_NEW_TOKENS_LIMIT


def test_capped_and_replace():
    params = SamplingParams(max_new_tokens=4000, temperature=0.5)
    assert params.capped(1024).max_new_tokens == 1024 and params.capped(1024).temperature == 0.5
    assert params.capped(5000) is params
    with pytest.raises(BadRequestError):
        params.replace(top_p=2.0)


def test_normalize_stop():
    assert normalize_stop(None, "</s>") == ("</s>",)
    assert normalize_stop(["###", "", "</s>"], "</s>", None) == ("###", "</s>")
    assert normalize_stop("x") == ("x",)
    with pytest.raises(BadRequestError, match="stop"):
        normalize_stop([1])


def test_generation_output_usage():
    out = GenerationOutput("hi", "stop", 10, 3)
    assert out.usage() == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def test_torch_free():
    code = ("import sys, llava_med.sampling, llava_med.chat, llava_med.serve.protocol, llava_med.serve.client, "
            "llava_med.images.decode, llava_med.engine.registry, llava_med.engine.hf, llava_med.serve.web.session; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
