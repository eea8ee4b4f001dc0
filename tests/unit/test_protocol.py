"""Wire models, stream framing and validation messages (llava_med.serve.protocol)."""

from __future__ import annotations

import asyncio
import json

import pytest

from llava_med import constants
from llava_med.errors import BadRequestError
from llava_med.serve import protocol
from llava_med.serve.protocol import (
    ErrorCode,
    GenerateRequest,
    RegisterWorkerRequest,
    StreamChunk,
    StreamProtocolError,
    WorkerStatus,
    aiter_chunks,
    encode_chunk,
    error_cause,
    error_chunk,
    iter_chunks,
    parse_generate_request,
    parse_json_body,
)


def test_error_code_is_the_constants_enum():
    assert protocol.ErrorCode is constants.ErrorCode


def test_encode_chunk_is_json_plus_one_nul_and_roundtrips():
    chunk = StreamChunk(text='a "quoted"\n\x00 text é', error_code=0)
    data = encode_chunk(chunk)
    assert data.endswith(b"\0") and data.count(b"\0") == 1  # NUL inside text is escaped
    assert json.loads(data[:-1]) == {"text": 'a "quoted"\n\x00 text é', "error_code": 0}  # None fields left out
    assert list(iter_chunks([data])) == [chunk]


def test_encode_chunk_accepts_dicts():
    assert encode_chunk({"text": "x", "error_code": 0, "usage": None}) == b'{"text": "x", "error_code": 0}\0'


def test_iter_chunks_handles_any_split_and_skips_empty_chunks():
    chunks = [StreamChunk(text="P" + "w" * i) for i in range(5)]
    chunks.append(StreamChunk(text="Pwwww!", finish_reason="stop", usage={"total_tokens": 3}))
    stream = b"\0".join(encode_chunk(c) for c in chunks)  # doubled NULs = empty keep-alive chunks
    for size in (1, 2, 7, 64, len(stream)):
        pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
        assert list(iter_chunks(pieces)) == chunks


def test_iter_chunks_tolerates_a_missing_final_delimiter_but_not_a_cut_chunk():
    assert [c.text for c in iter_chunks([b'{"text": "a"}\0{"text": "ab"}'])] == ["a", "ab"]
    gen = iter_chunks([b'{"text": "a"}\0{"text": "a'])
    assert next(gen).text == "a"
    with pytest.raises(StreamProtocolError, match="ended inside a chunk"):
        next(gen)


def test_iter_chunks_reports_garbage():
    with pytest.raises(StreamProtocolError, match="invalid stream chunk"):
        list(iter_chunks([b"not json\0"]))


def test_aiter_chunks():
    async def source():
        for piece in (b'{"text": "a"', b'}\0{"text": "ab", "error_code": 0}\0'):
            yield piece

    async def collect():
        return [c.text async for c in aiter_chunks(source())]

    assert asyncio.run(collect()) == ["a", "ab"]


def test_error_chunk_names_the_cause_and_keeps_the_banner_for_overload_only():
    chunk = error_chunk(ErrorCode.IMAGE_COUNT_MISMATCH, "2 images but 1 <image> tag")
    assert chunk.error_code == 40003 and chunk.is_error
    # A bad request is not "high traffic": its text is the cause alone.
    assert chunk.text == "(error_code: 40003) 2 images but 1 <image> tag"
    assert error_cause(chunk) == "2 images but 1 <image> tag"
    for code in (ErrorCode.ENGINE_OVERLOADED, ErrorCode.WORKER_UNREACHABLE, ErrorCode.CONTROLLER_WORKER_TIMEOUT,
                 ErrorCode.OUT_OF_MEMORY):
        busy = error_chunk(code, "the queue is full")
        assert busy.text.startswith(constants.SERVER_ERROR_MSG)  # what the original clients show for overload
        assert f"(error_code: {int(code)}) the queue is full" in busy.text
        assert error_cause(busy) == "the queue is full"
    assert error_cause(StreamChunk(text="other server text", error_code=1)) == "other server text"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"prompt": "x", "max_new_tokens": -5}, ErrorCode.PARAM_OUT_OF_RANGE, "max_new_tokens: must be >= 1, got -5"),
        ({"prompt": "x", "max_new_tokens": 10**12}, ErrorCode.PARAM_OUT_OF_RANGE, "max_new_tokens: must be <="),
        ({"prompt": "x", "temperature": -0.1}, ErrorCode.PARAM_OUT_OF_RANGE, "temperature: must be >= 0"),
        ({"prompt": "x", "temperature": 100}, ErrorCode.PARAM_OUT_OF_RANGE, "temperature: must be <= 5"),
        ({"prompt": "x", "top_p": 0}, ErrorCode.PARAM_OUT_OF_RANGE, "top_p: must be > 0"),
        ({"prompt": "x", "top_p": 1.5}, ErrorCode.PARAM_OUT_OF_RANGE, "top_p: must be <= 1"),
        ({}, ErrorCode.BAD_REQUEST, "prompt: is required"),
        ({"prompt": 42}, ErrorCode.BAD_REQUEST, "prompt: must be a string, got 42"),
        ({"prompt": "x", "temperature": "hot"}, ErrorCode.BAD_REQUEST, "temperature: must be a number, got 'hot'"),
        ({"prompt": "x", "max_new_tokens": 1.5}, ErrorCode.BAD_REQUEST, "max_new_tokens: must be a whole number"),
        ({"prompt": "x", "images": "abc"}, ErrorCode.BAD_REQUEST, "images: must be a list"),
        ({"prompt": "x", "images": ["abc", 3]}, ErrorCode.BAD_REQUEST, "images[1]: must be a string, got 3"),
        ({"prompt": "x", "stop": 7}, ErrorCode.BAD_REQUEST, "stop: must be a string, got 7"),
    ],
)
def test_generate_request_validation_messages(body, code, message):
    with pytest.raises(BadRequestError) as info:
        parse_generate_request(json.dumps(body).encode())
    assert info.value.code == code
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_several_bad_fields_are_all_named():
    with pytest.raises(BadRequestError) as info:
        parse_generate_request({"prompt": "x", "temperature": -1, "top_p": 0})
    assert "temperature: must be >= 0.0, got -1" in str(info.value)
    assert "top_p: must be > 0.0, got 0" in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"", "empty"), (b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object, got list"),
     (b"\xff\xfe", "not valid JSON")],
)
def test_malformed_bodies(body, message):
    with pytest.raises(BadRequestError, match=message):
        parse_json_body(body)


def test_generate_request_defaults_unknown_fields_and_stop_strings():
    req = parse_generate_request(b'{"prompt": "p", "top_k": 3, "repetition_penalty": 1.1, "model": "m"}')
    assert (req.model, req.temperature, req.top_p, req.max_new_tokens, req.echo) == ("m", 1.0, 1.0, 256, True)
    assert req.sampling_params().stop == () and req.images is None and req.num_images == 0
    # The served template's stop string applies only when the request names none.
    assert req.sampling_params("</s>").stop == ("</s>",)
    assert GenerateRequest(prompt="p", stop="</s>").sampling_params("###").stop == ("</s>",)
    assert GenerateRequest(prompt="p", stop="").sampling_params("</s>").stop == ()  # the original sent "" for none
    assert GenerateRequest(prompt="p", stop=["a", "", "b", "a"]).sampling_params().stop == ("a", "b")
    params = GenerateRequest(prompt="p", temperature=0, top_p=0.5, max_new_tokens=9, seed=3,
                             ignore_eos=True).sampling_params()
    assert (params.temperature, params.top_p, params.max_new_tokens, params.seed, params.ignore_eos,
            params.greedy) == (0, 0.5, 9, 3, True, True)


def test_original_payloads_parse():
    # What the original gradio web server and test_message send.
    original = {"model": "llava-med-v1.5-mistral-7b", "prompt": "[INST] <image>\nWhat? [/INST]",
                "temperature": 0.2, "top_p": 0.7, "max_new_tokens": 512, "stop": "</s>", "images": ["aGk="]}
    req = parse_generate_request(json.dumps(original))
    assert req.images == ["aGk="] and req.stop == "</s>"


def test_register_and_status_models():
    req = RegisterWorkerRequest.model_validate(
        {"worker_name": "http://h:1/", "check_heart_beat": True, "worker_status": None})
    assert req.worker_name == "http://h:1" and req.worker_status is None
    with pytest.raises(BadRequestError, match=r"worker_name: .*URL"):
        protocol.parse_model(RegisterWorkerRequest, {"worker_name": "h:1", "check_heart_beat": True})
    status = WorkerStatus.model_validate({"model_names": ["m"], "speed": 1, "queue_length": 0, "extra": 1})
    assert status.model_dump() == {"model_names": ["m"], "speed": 1.0, "queue_length": 0, "instance_id": None}
    for speed in (1e9, float("inf"), -1):
        with pytest.raises(BadRequestError, match="speed"):
            protocol.parse_model(WorkerStatus, {"model_names": ["m"], "speed": speed})
