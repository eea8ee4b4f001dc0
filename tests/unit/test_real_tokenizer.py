"""The real LLaVA-Med v1.5 vocabulary (Mistral-7B v1, shipped by ``mistral_common``): prompt ids equal what the
model saw in training (the original slow tokenizer = ``sentencepiece`` on every piece between special tokens), and
streamed text of multi-byte characters and stop strings loses nothing.

Every expected id list is computed here with ``sentencepiece`` alone, never with the code under test.
"""

from __future__ import annotations

import hashlib
import random
import re
import types

import pytest
import sentencepiece as spm

from llava_med.chat import render_chat
from llava_med.constants import IMAGE_TOKEN_INDEX
from llava_med.errors import CheckpointError, MissingDependencyError
from llava_med.model import tiny
from llava_med.model import tokenizer as tokmod
from llava_med.model.generation import TextAssembler
from llava_med.model.prompting import tokenizer_image_token

SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2}


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral-v1")
    tiny.write_tokenizer(folder, tiny.PRESETS["small"])
    return folder


def _converter_before_5_2x(proto, vocab, merges=None):
    raise AssertionError("the fallback must not call transformers' converter without `legacy`")


@pytest.fixture(scope="module", params=["transformers", "own-builder"])
def tokenizer(request, real_folder):
    """Both ways :func:`load_tokenizer` builds the backend: transformers' converter (5.2x), and its own
    construction for the transformers that vLLM pins, whose converter has no ``legacy`` argument."""
    if request.param == "transformers":
        return tokmod.load_tokenizer(real_folder)
    from transformers.convert_slow_tokenizer import SpmConverter

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SpmConverter, "build_tokenizer_from_spm_proto", staticmethod(_converter_before_5_2x))
        return tokmod.load_tokenizer(real_folder)


@pytest.fixture(scope="module")
def sp(real_folder):
    return spm.SentencePieceProcessor(model_file=str(real_folder / "tokenizer.model"))


def sp_chunk_ids(sp, text: str) -> list[int]:
    """What transformers 4.36's slow LlamaTokenizer (legacy, as LLaVA loads it) gives: BOS, then sentencepiece on
    each piece between special tokens."""
    ids = [SPECIAL_IDS["<s>"]]
    for part in re.split("(<unk>|<s>|</s>)", text):
        if part in SPECIAL_IDS:
            ids.append(SPECIAL_IDS[part])
        elif part:
            ids += sp.encode(part)
    return ids


def sp_prompt_ids(sp, prompt: str) -> list[int]:
    """The original ``tokenizer_image_token``: each chunk around ``<image>`` tokenised alone, one BOS in front."""
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += sp_chunk_ids(sp, chunk)[1 if i else 0:]
    return ids


def test_the_vocabulary_is_mistral_v1_checked_by_sha256(real_folder, sp):
    data = tokmod.mistral_v1_tokenizer_model()
    assert len(data) == tokmod.MISTRAL_V1_SIZE == 493_443
    assert hashlib.sha256(data).hexdigest() == tokmod.MISTRAL_V1_SHA256
    assert (real_folder / "tokenizer.model").read_bytes() == data
    assert sp.get_piece_size() == 32000
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def _fake_package(monkeypatch, tmp_path, data: bytes | None):
    pkg = tmp_path / "mistral_common"
    (pkg / "data").mkdir(parents=True)
    if data is not None:
        (pkg / "data" / "tokenizer.model.v1").write_bytes(data)
    spec = types.SimpleNamespace(submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: spec if name == "mistral_common" else None)


def test_a_different_file_is_refused_with_its_digest(monkeypatch, tmp_path):
    real = tokmod.mistral_v1_tokenizer_model()
    altered = real[:-1] + bytes([real[-1] ^ 1])
    _fake_package(monkeypatch, tmp_path, altered)
    with pytest.raises(CheckpointError, match=hashlib.sha256(altered).hexdigest()):
        tokmod.mistral_v1_tokenizer_model()


def test_missing_package_or_file_names_the_fix(monkeypatch, tmp_path):
    _fake_package(monkeypatch, tmp_path, None)
    with pytest.raises(MissingDependencyError, match="tokenizer.model.v1"):
        tokmod.mistral_v1_tokenizer_model()
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="mistral_common"):
        tokmod.mistral_v1_tokenizer_model()
    # A preset with the real tokenizer fails before drawing any weight, with the same message.
    with pytest.raises(MissingDependencyError, match="mistral_common"):
        tiny.write_checkpoint(tmp_path / "ckpt", "small")
    assert not list((tmp_path / "ckpt" / tiny.checkpoint_dir_name("small")).glob("*.safetensors"))


def test_tokenizer_settings_are_llava_med_v15s(tokenizer):
    ids = tokenizer("What is shown?").input_ids
    assert ids[0] == tokenizer.bos_token_id == 1 and ids[-1] != tokenizer.eos_token_id
    assert tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 2048


def test_first_turn_prompt_ids(tokenizer, sp):
    prompt = "[INST] <image>\nWhat is shown? [/INST]"
    expected = sp_prompt_ids(sp, prompt)
    assert expected[0] == 1 and expected.count(IMAGE_TOKEN_INDEX) == 1
    assert tokenizer_image_token(prompt, tokenizer) == expected


def test_multi_turn_conversation_ids(tokenizer, sp):
    chat = render_chat([
        {"role": "user", "content": "What is shown?", "images": ["a"]},
        {"role": "assistant", "content": "A chest X-ray of an adult."},
        {"role": "user", "content": "Is  there an effusion? Compare with this one.", "images": ["b"]},
        {"role": "assistant", "content": "No effusion;  the angles are sharp."},
        {"role": "user", "content": " Size in µm, temperature in °C?"},
    ], "mistral_instruct")
    prompt = chat.prompt
    assert prompt.count("</s>") == 2 and prompt.count("<image>") == 2
    expected = sp_prompt_ids(sp, prompt)
    assert expected.count(2) == 2  # each </s> separator is the EOS id, as in training
    assert tokenizer_image_token(prompt, tokenizer) == expected


# Where transformers 5.24's own LlamaTokenizer differs from sentencepiece (runs of spaces, leading spaces), and
# multi-byte text.
TEXTS = [
    "and  spaces", " x", "x  y", "  ", "   a", "a   ", "x\n  y", "\t tab", " ANSWER </s>", "x </s>[INST] y",
    "<s> nested </s></s>", "12.5 µm at 37 °C", "Ελληνικά: αβγ δ", "中文 CT 影像显示", "emoji 🩻 🫁 done",
    "naïve café ﬁ", "", " ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_ids_equal_sentencepiece(tokenizer, sp, text):
    assert tokenizer(text).input_ids == sp_chunk_ids(sp, text)
    prompt = f"[INST] <image>{text} [/INST]{text}"
    assert tokenizer_image_token(prompt, tokenizer) == sp_prompt_ids(sp, prompt)


def test_random_text_ids_equal_sentencepiece(tokenizer, sp):
    rng = random.Random(13)
    alphabet = list("ab x.,?\n\t0123µ°Cαβ中文😀") + [" ", "  ", "the", "[INST]", "[/INST]", "</s>", "<s>", "▁"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert tokenizer(text).input_ids == sp_chunk_ids(sp, text), repr(text)


STREAMED = ["Nuclei of 12 µm; kept at 37 °C.", "Ελληνικά και αβγ.", "胸部X光片显示右下肺野实变。",
            "Findings 🩻 and 🫁, then 😀😀."]


@pytest.mark.parametrize("text", STREAMED)
def test_streamed_multibyte_text_has_no_replacement_characters_and_no_lost_bytes(tokenizer, sp, text):
    ids = sp.encode(text)
    assembler = TextAssembler(tokenizer)
    shown = []
    for token in ids:
        assembler.add(token)
        shown.append(assembler.text)
    assert all("\ufffd" not in s for s in shown)
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:]))
    assert assembler.final_text == text == sp.decode(ids)
    assert assembler.final_text.encode("utf-8") == text.encode("utf-8")


def test_emoji_and_cjk_really_stream_through_byte_pieces(sp):
    # Otherwise the test above would not exercise partial UTF-8 sequences.
    for text in STREAMED[2:]:
        assert any(sp.is_byte(i) for i in sp.encode(text)), text


@pytest.mark.parametrize(("stop", "before"), [("°C", "The slide was kept at 37 "), ("</s>", "The slide was kept at 37 °C ")])
def test_stop_strings_on_the_real_vocabulary(tokenizer, sp, stop, before):
    ids = sp.encode("The slide was kept at 37 °C </s> and this must not show.")
    assembler = TextAssembler(tokenizer, [stop])
    shown = []
    for token in ids:
        if assembler.add(token):
            break
        shown.append(assembler.text)
    assert assembler.stopped and assembler.final_text == before
    assert all(before.startswith(s) for s in shown)  # no piece of the stop string is ever shown
