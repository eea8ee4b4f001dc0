"""The 7B-shaped preset (planned, never built here: the benchmark builds it), the real tokenizer in the random
checkpoints, and ``--dtype auto``."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import sentencepiece as spm
import torch

from llava_med.model import dtypes, tiny
from llava_med.model.args import DTYPE_ENV, LoadConfig, add_model_args, load_config_from_args
from llava_med.model.builder import load_pretrained_model
from llava_med.model.dtypes import cpu_native_bf16, dtype_reason, resolve_dtype
from llava_med.model.generation import generate, prepare_prompt
from llava_med.sampling import SamplingParams
from sample_images import scan  # tests/ is on sys.path through conftest

MISTRAL_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "mm_hidden_size": 1024,
              "mm_projector_type": "mlp2x_gelu", "rope_theta": 1000000.0, "tokenizer_model_max_length": 2048}


def _shapes(preset: str) -> dict[str, tuple[int, ...]]:
    p = tiny.resolve_preset(preset)
    return {name: tuple(t.shape) for name, t in tiny._checkpoint_weights(p, tiny._Init(0, meta=True))}


def test_7b_preset_has_the_real_key_names_and_shapes():
    shapes = _shapes("7b")
    v = "model.vision_tower.vision_tower.vision_model."
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (32000, 4096)
    assert shapes["model.layers.31.self_attn.q_proj.weight"] == (4096, 4096)
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)  # 8 KV heads of 128
    assert shapes["model.layers.31.mlp.gate_proj.weight"] == (14336, 4096)
    assert shapes["model.layers.31.mlp.down_proj.weight"] == (4096, 14336)
    assert "model.layers.32.mlp.up_proj.weight" not in shapes
    assert shapes["model.mm_projector.0.weight"] == (4096, 1024)
    assert shapes["model.mm_projector.2.weight"] == (4096, 4096)
    assert shapes[v + "embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes[v + "embeddings.position_embedding.weight"] == (577, 1024)  # 24x24 patches + CLS at 336 px
    assert shapes[v + "encoder.layers.23.mlp.fc1.weight"] == (4096, 1024)
    assert v + "encoder.layers.24.mlp.fc1.weight" not in shapes
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 7_566_219_264
    config = tiny.llava_config(tiny.PRESETS["7b"], "../clip")
    assert {k: config[k] for k in MISTRAL_7B} == MISTRAL_7B
    vision = tiny.clip_config(tiny.PRESETS["7b"])["vision_config"]
    assert (vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"],
            vision["num_attention_heads"], vision["image_size"], vision["patch_size"]) == (1024, 4096, 24, 16, 336, 14)


def test_7b_shards_are_bounded_and_cover_every_tensor_once():
    p = tiny.PRESETS["7b"]
    plan = tiny.plan_shards(p)
    assert list(plan) == list(_shapes("7b"))  # storage order is the order the weights are drawn in
    sizes: dict[str, int] = {}
    for name, shape in _shapes("7b").items():
        sizes[plan[name]] = sizes.get(plan[name], 0) + torch.Size(shape).numel() * 2
    assert sorted(sizes) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert max(sizes.values()) <= p.max_shard_bytes
    assert sum(sizes.values()) == tiny.checkpoint_bytes(p) == 15_132_438_528
    # Each shard is one contiguous run of the storage order, so the writer holds one shard at a time.
    runs = [plan[n] for n in plan]
    assert runs == sorted(runs)


def test_writer_refuses_a_tensor_of_a_later_shard_before_the_current_one_is_complete(tmp_path):
    writer = tiny._ShardWriter(tmp_path, {"a": "s1", "b": "s1", "c": "s2"})
    writer.add("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="before shard s1 was complete"):
        writer.add("c", torch.zeros(2))


def test_not_enough_disk_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny.shutil, "disk_usage", lambda path: argparse.Namespace(free=10 * 2**30))
    with pytest.raises(OSError, match=r"needs 14\.1 GiB but .* has 10\.0 GiB free"):
        tiny.write_checkpoint(tmp_path, "7b")
    assert not list(tmp_path.rglob("*.safetensors"))


def test_presets_tokenizers_and_cache_keys():
    assert tiny.PRESETS["tiny"].tokenizer == "toy"
    assert tiny.PRESETS["small"].tokenizer == tiny.PRESETS["7b"].tokenizer == "mistral-v1"
    assert tiny.resolve_preset("tiny", "mistral-v1").vocab_size == 32000
    assert tiny.resolve_preset("small", "toy").vocab_size == 1000
    keys = {tiny.cache_key("tiny"), tiny.cache_key("tiny", tokenizer="mistral-v1"), tiny.cache_key("small"),
            tiny.cache_key("small", tokenizer="toy"), tiny.cache_key("tiny", seed=1)}
    assert len(keys) == 5 and all(k.startswith(f"v{tiny.FORMAT_VERSION}-") for k in keys)
    assert tiny.cache_key("small", tokenizer="mistral-v1") == tiny.cache_key("small")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tiny.resolve_preset("tiny", "gpt2")


@pytest.fixture(scope="module")
def real_vocab_tiny(tmp_path_factory):
    """The tiny shapes with the real 32,000-piece vocabulary (built in a second)."""
    return tiny.ensure_checkpoint("tiny", cache_dir=tmp_path_factory.mktemp("cache"), tokenizer="mistral-v1")


def test_checkpoint_with_the_real_tokenizer_loads_and_answers(real_vocab_tiny):
    assert (real_vocab_tiny / "tokenizer.model").read_bytes() == tiny.tokenizer_model(tiny.PRESETS["small"])
    loaded = load_pretrained_model(LoadConfig(model_path=str(real_vocab_tiny)))
    assert loaded.model.language_model.config.vocab_size == 32000 == len(loaded.tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(real_vocab_tiny / "tokenizer.model"))
    prompt = "[INST] <image>\nIs  there an effusion? [/INST]"
    prepared = prepare_prompt(loaded, prompt, [scan()])
    head, tail = prompt.split("<image>")
    assert prepared.input_ids == [1, *sp.encode(head), -200, *sp.encode(tail)]
    text = generate(loaded, prompt, [scan()], SamplingParams(temperature=0, max_new_tokens=8))
    assert isinstance(text, str) and text


def test_make_tiny_writes_the_real_tokenizer_on_request(tmp_path):
    assert tiny.main(["--preset", "tiny", "--tokenizer", "mistral-v1", "--output-dir", str(tmp_path)]) == 0
    ckpt = tmp_path / tiny.checkpoint_dir_name("tiny")
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == 32000
    assert spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).get_piece_size() == 32000


X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
AMX_CPUINFO = "flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"
OLD_CPUINFO = "flags\t\t: fpu sse sse2 avx avx2 fma\n"


@pytest.mark.parametrize(("cpuinfo", "flag"), [(X86_CPUINFO, "avx512_bf16"), (AMX_CPUINFO, "amx_bf16"),
                                               (ARM_CPUINFO, "bf16"), (OLD_CPUINFO, None), ("", None)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, flag):
    assert cpu_native_bf16(cpuinfo) == flag


@pytest.mark.parametrize(("flag", "expected"), [("avx512_bf16", torch.bfloat16), (None, torch.float32)])
def test_auto_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, flag, expected):
    monkeypatch.setattr(dtypes, "cpu_native_bf16", lambda cpuinfo=None: flag)
    assert resolve_dtype("auto", "cpu") is expected
    assert resolve_dtype(None, "cpu") is expected
    assert resolve_dtype("float32", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("auto", "mps") is torch.float16
    reason = dtype_reason("auto", "cpu")
    assert (f"native bf16 ({flag})" in reason) if flag else ("no native bf16" in reason)
    assert dtype_reason("float32", "cpu") == "--dtype float32"


def test_default_dtype_is_auto_unless_the_environment_says_otherwise(monkeypatch):
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert load_config_from_args(parser.parse_args([])).dtype == "auto"
    assert load_config_from_args(parser.parse_args(["--dtype", "float32"])).dtype == "float32"
    monkeypatch.setenv(DTYPE_ENV, "bf16")
    assert LoadConfig().dtype == "bfloat16"
    assert load_config_from_args(parser.parse_args(["--dtype", "auto"])).dtype == "auto"
    monkeypatch.setenv(DTYPE_ENV, "int3")
    with pytest.raises(ValueError, match=f"got 'int3' \\(from {DTYPE_ENV}\\)"):
        LoadConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "half"])


def test_the_test_suite_runs_in_float32():
    # Exactness tests and golden streams rely on it (tests/conftest.py sets LLAVA_MED_DTYPE).
    assert LoadConfig().dtype == "float32"


def test_startup_log_says_which_dtype_and_why(tiny_checkpoint, monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "cpu_native_bf16", lambda cpuinfo=None: "avx512_bf16")
    with caplog.at_level(logging.INFO, logger="llava_med.model.builder"):
        loaded = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), dtype="auto"))
    assert loaded.model.language_model.dtype == torch.bfloat16
    assert next(loaded.model.vision_tower.parameters()).dtype == torch.bfloat16
    assert "as bfloat16 (--dtype auto: this CPU has native bf16 (avx512_bf16))" in caplog.text


def test_4bit_weights_are_in_the_cpu_kernel_layout_once_loaded(tiny_checkpoint):
    """bitsandbytes would convert them on the first request (+3 GiB RSS and a 20 s first request on the 7B shapes)."""
    import bitsandbytes as bnb  # the [quant] extra, installed by scripts/test.sh
    loaded = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), load_4bit=True))
    linears = [m for m in loaded.model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears
    for module in linears:
        expected = bool(getattr(module, "support_avx512bf16_for_cpu", False))
        assert bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False)) == expected

