"""``llava-med convert``: the original LLaVA-Med format -> transformers' native Llava format, checked against our
own loader on the tiny checkpoint (logits, tokenizer, chat template)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sample_images import png_bytes, scan

from llava_med.__main__ import main as llava_med_main
from llava_med.chat import Message, render_chat
from llava_med.constants import IMAGE_TOKEN_INDEX
from llava_med.errors import CheckpointError
from llava_med.model.convert import CONVERSION_INFO, convert_checkpoint, conversion_info, ensure_converted
from llava_med.model.generation import generate, prepare_prompt
from llava_med.sampling import SamplingParams

IMAGE_PROMPT = "[INST] <image>\nWhat does this scan show? [/INST]"


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    return convert_checkpoint(str(tiny_checkpoint), tmp_path_factory.mktemp("converted") / "tiny-hf")


@pytest.fixture(scope="module")
def native(converted):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(str(converted), dtype=torch.float32,
                                                                output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched: no weight left random
    return model.eval()


def _native_ids(input_ids: list[int], image_id: int, per_image: int) -> list[int]:
    out: list[int] = []
    for token in input_ids:
        out += [image_id] * per_image if token == IMAGE_TOKEN_INDEX else [token]
    return out


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_converted_logits_equal_our_loaders(tiny_loaded, native, with_image):
    prompt = IMAGE_PROMPT if with_image else "[INST] What is a pleural effusion? [/INST]"
    prepared = prepare_prompt(tiny_loaded, prompt, [png_bytes(scan(seed=4, size=(300, 180)))] if with_image else [])
    model = tiny_loaded.model
    vocab = native.config.image_token_index
    with torch.inference_mode():
        features = [] if prepared.pixel_values is None else list(model.encode_images(prepared.pixel_values))
        ours = model(inputs_embeds=model.embed_prompt(prepared.input_ids, features).unsqueeze(0)).logits[0]
        inputs = {"input_ids": torch.tensor([_native_ids(prepared.input_ids, vocab, native.config.image_seq_length)])}
        if with_image:
            inputs["pixel_values"] = prepared.pixel_values
        theirs = native(**inputs).logits[0]
    assert theirs.shape == (prepared.num_prompt_tokens, vocab + 1)
    torch.testing.assert_close(theirs[:, :vocab], ours, rtol=0, atol=1e-5)
    assert theirs[:, vocab].abs().max().item() == 0.0  # the LM head row of <image> is zero
    # Greedy decoding of the native model follows ours token for token.
    ours_text = generate(tiny_loaded, prompt, [png_bytes(scan(seed=4, size=(300, 180)))] if with_image else [],
                         SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
    with torch.inference_mode():
        out = native.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert tiny_loaded.tokenizer.decode(new, skip_special_tokens=True) == ours_text


def test_converted_folder_layout(converted, tiny_checkpoint):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == 1000 and config["text_config"]["vocab_size"] == 1001
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 576
    assert not [k for k in config["text_config"] if k.startswith("mm_")]  # LLaVA's training keys stay behind
    index = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    # vLLM needs the CLIP tower under vision_model.*; the projector and language model take native names.
    assert any(k.startswith("model.vision_tower.vision_model.encoder.layers.") for k in index)
    assert "model.multi_modal_projector.linear_1.weight" in index and "lm_head.weight" in index
    assert not any(k.startswith(("model.mm_projector", "model.layers.", "model.vision_tower.vision_tower")) for k in index)
    # One output shard per source shard holding language-model or projector weights (the tiny checkpoint has two),
    # plus one for the vision tower.
    assert sorted(set(index.values())) == [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
    info = conversion_info(converted)
    assert info["conv_mode"] == "mistral_instruct" and info["image_aspect_ratio"] == "pad"
    assert info["context_length"] == 2048 and info["image_token_id"] == 1000
    assert info["source_folder"] == str(tiny_checkpoint.resolve())


def test_converted_tokenizer_and_chat_template(converted, tiny_loaded):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(converted))
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == 1000
    for text in ["What is shown?", "[INST] hi [/INST]", " leading space", "two  spaces", "µm °C 肺", "x</s>y"]:
        assert tokenizer(text).input_ids == tiny_loaded.tokenizer(text).input_ids, text
    conversations = [
        [Message("user", "What is shown?", ("img",))],
        [Message("user", "  What is shown? <image>", ("img",)), Message("assistant", "A chest x-ray."),
         Message("user", "Any effusion?")],
        [Message("system", "Be brief."), Message("user", "Hi", ("img",))],
        [Message("user", "Hello")],
    ]
    for messages in conversations:
        hf_messages = []
        for m in messages:
            if m.role == "user" and m.images:
                content = [{"type": "image"}] * len(m.images) + [{"type": "text", "text": m.text}]
            else:
                content = m.text
            hf_messages.append({"role": m.role, "content": content})
        rendered = processor.apply_chat_template(hf_messages, tokenize=False)
        assert rendered == tokenizer.bos_token + render_chat(messages, "mistral_instruct").prompt


def test_ensure_converted_reuses_the_cache_and_serves_native_folders(tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    first = ensure_converted(str(tiny_checkpoint), cache_dir=cache)
    assert (first / CONVERSION_INFO).is_file() and first.parent == cache
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_converted(str(tiny_checkpoint), cache_dir=cache) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp  # not converted twice
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary folder left behind
    assert ensure_converted(str(first), cache_dir=tmp_path / "other") == first  # already native: as it is


def test_cli_converts_and_refuses_bad_input(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert llava_med_main(["convert", str(tiny_checkpoint), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with pytest.raises(SystemExit) as info:  # a non-empty output folder
        llava_med_main(["convert", str(tiny_checkpoint), str(out)])
    assert info.value.code == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a folder that is already converted
        llava_med_main(["convert", str(out), str(tmp_path / "again")])
    assert "already in the transformers Llava format" in capsys.readouterr().err


def test_conversion_checks_what_it_writes(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mm_projector_type 'linear'"):
        convert_checkpoint(str(src), tmp_path / "out-linear")
    config["mm_projector_type"] = "mlp2x_gelu"
    config["vocab_size"] = 999  # the embedding has 1000 rows: caught before anything wrong is written
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vocab"):
        convert_checkpoint(str(src), tmp_path / "out-vocab")
    assert not (tmp_path / "out-vocab").exists()  # nothing half-written is left behind
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(CheckpointError, match="not an original LLaVA checkpoint"):
        convert_checkpoint(str(tmp_path / "plain"), tmp_path / "out-plain")
