"""Prompt tokenisation, stop strings, sampling and incremental detokenisation on the tiny tokenizer/model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_med.constants import IMAGE_TOKEN_INDEX
from llava_med.errors import BadRequestError, ContextOverflowError, ImageCountMismatchError, ImageError
from llava_med.model.generation import (
    TextAssembler,
    TokenSampler,
    generate,
    generate_stream,
    prepare_prompt,
)
from llava_med.model.prompting import stop_holdback, tokenizer_image_token, truncate_at_stop
from llava_med.sampling import SamplingParams


def test_tokenizer_image_token_matches_chunked_tokenisation(tiny_loaded):
    tok = tiny_loaded.tokenizer
    prompt = "[INST] <image>\nWhat is this? [/INST]"
    ids = tokenizer_image_token(prompt, tok)
    before = tok("[INST] ").input_ids
    after = tok("\nWhat is this? [/INST]").input_ids[1:]
    assert ids == before + [IMAGE_TOKEN_INDEX] + after
    two = tokenizer_image_token("<image> and <image> compare", tok)
    assert two.count(IMAGE_TOKEN_INDEX) == 2
    assert two.count(tok.bos_token_id) == 1 and two[0] == tok.bos_token_id
    assert IMAGE_TOKEN_INDEX not in tokenizer_image_token("no image here", tok)


def test_stop_helpers():
    assert truncate_at_stop("abc###def</s>", ("</s>", "###")) == ("abc", True)
    assert truncate_at_stop("abc", ("</s>",)) == ("abc", False)
    assert stop_holdback("answer </", ("</s>",)) == 2
    assert stop_holdback("answer", ("</s>",)) == 0


def test_text_assembler_never_splits_multibyte_characters(tiny_loaded):
    tok = tiny_loaded.tokenizer
    text = " lung é中 nodule"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text.split())  # byte-fallback pieces are present
    asm = TextAssembler(tok)
    seen = []
    for t in ids:
        asm.add(t)
        seen.append(asm.text)
        assert "\ufffd" not in asm.text
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # cumulative, never rewritten
    assert asm.final_text == tok.decode(ids, skip_special_tokens=True)


def test_text_assembler_stops_at_stop_string_and_holds_back_prefix(tiny_loaded):
    tok = tiny_loaded.tokenizer
    ids = tok(" normal heart ### extra", add_special_tokens=False).input_ids
    asm = TextAssembler(tok, stop=("###",))
    stopped_at = None
    for i, t in enumerate(ids):
        if asm.add(t):
            stopped_at = i
            break
        assert "#" not in asm.text
    assert stopped_at is not None
    # Encoded as sentencepiece does, the leading space is a token of its own and decodes back (round trip).
    assert asm.final_text == " normal heart "


def test_sampler_seeded_reproducible_and_top_p():
    logits = torch.linspace(-2, 2, 50)
    a = TokenSampler(SamplingParams(temperature=1.0, seed=7))
    b = TokenSampler(SamplingParams(temperature=1.0, seed=7))
    draws_a = [a(logits) for _ in range(30)]
    assert draws_a == [b(logits) for _ in range(30)]
    assert len(set(draws_a)) > 3  # really sampling
    narrow = TokenSampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=1))
    assert {narrow(logits) for _ in range(20)} == {49}
    greedy = TokenSampler(SamplingParams(temperature=0.0))
    assert greedy(logits) == 49


def test_generate_stream_is_cumulative_and_finishes(tiny_loaded):
    prompt = "[INST] <image>\nDescribe the image. [/INST]"
    img = Image.new("RGB", (64, 48), (120, 30, 200))
    prepared = prepare_prompt(tiny_loaded, prompt, [img])
    updates = list(generate_stream(tiny_loaded, prepared, SamplingParams(temperature=0, max_new_tokens=10,
                                                                         ignore_eos=True)))
    assert updates[-1].finish_reason == "length"
    assert updates[-1].num_generated_tokens == 10
    assert all(u.finish_reason is None for u in updates[:-1])
    texts = [u.text for u in updates]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    # Seeded sampling is reproducible end to end; greedy output equals the convenience wrapper's.
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=8)
    assert generate(tiny_loaded, prompt, [img], p) == generate(tiny_loaded, prompt, [img], p)
    g = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    assert generate(tiny_loaded, prompt, [img], g) == updates[-1].text


def test_cancellation_stops_generation(tiny_loaded):
    prepared = prepare_prompt(tiny_loaded, "[INST] hello [/INST]", [])
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    updates = list(generate_stream(tiny_loaded, prepared, SamplingParams(temperature=0, max_new_tokens=50),
                                   is_cancelled=cancelled))
    assert updates[-1].finish_reason == "cancelled"
    assert updates[-1].num_generated_tokens == 3


def test_prepare_prompt_errors(tiny_loaded):
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ImageCountMismatchError, match=r"number of images \(0\).*\(1\)"):
        prepare_prompt(tiny_loaded, "[INST] <image>\nhi [/INST]", [])
    with pytest.raises(ImageCountMismatchError):
        prepare_prompt(tiny_loaded, "[INST] hi [/INST]", [img])
    with pytest.raises(ImageError):
        prepare_prompt(tiny_loaded, "[INST] <image>\nhi [/INST]", [b"not an image at all"])
    with pytest.raises(BadRequestError, match="prompt"):
        prepare_prompt(tiny_loaded, "", [])
    long_prompt = "[INST] " + "lung " * 3000 + "[/INST]"
    with pytest.raises(ContextOverflowError, match="context is 2048 tokens"):
        prepare_prompt(tiny_loaded, long_prompt, [])
    four_images = "[INST] " + "<image>\n" * 4 + "compare [/INST]"
    with pytest.raises(ContextOverflowError, match=r"4 image\(s\) x 576"):
        prepare_prompt(tiny_loaded, four_images, [img] * 4)


def test_max_new_tokens_capped_by_context(tiny_loaded):
    prompt = "[INST] <image>\n<image>\n<image>\ncompare [/INST]"
    img = Image.new("RGB", (32, 32))
    prepared = prepare_prompt(tiny_loaded, prompt, [img] * 3)
    assert prepared.num_prompt_tokens + prepared.room == tiny_loaded.context_len
    # A request asking for more than the room ends with "length" when the context is full.
    from llava_med.model.generation import SequenceState

    state = SequenceState(prepared, SamplingParams(temperature=0, max_new_tokens=4096), tiny_loaded.tokenizer)
    assert state.limit == prepared.room
