"""The loaded tiny checkpoint against an independent computation written here, and loader failure modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

from llava_med.constants import IMAGE_TOKEN_INDEX
from llava_med.errors import CheckpointError
from llava_med.model.builder import LoadConfig, load_pretrained_model
from llava_med.model.generation import generate_stream, prepare_prompt
from llava_med.sampling import SamplingParams
from llava_med.model.preprocess import process_images
from llava_med.model.tiny import vision_dir_name

PROMPT_WITH_IMAGE = "[INST] <image>\nDescribe the image. [/INST]"
PROMPT_TEXT = "[INST] Is there a pleural effusion in the left lung? [/INST]"
NUM_GREEDY = 12


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key).float()
    return out


class Reference:
    """LLaVA written out by hand: CLIP hidden_states[-2] minus CLS, Linear-GELU-Linear, splice, Mistral."""

    def __init__(self, ckpt: Path, vision_state: dict[str, torch.Tensor] | None = None) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        weights = _read_all(ckpt)
        text_keys = {k: v for k, v in weights.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))}
        text_cfg = {k: v for k, v in config.items() if not k.startswith("mm_") and k != "model_type"}
        self.lm = MistralForCausalLM(MistralConfig(**text_cfg)).eval()
        missing, unexpected = self.lm.load_state_dict(text_keys, strict=True)
        assert not missing and not unexpected
        self.proj = [weights[f"model.mm_projector.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias")]
        clip_dir = (ckpt / config["mm_vision_tower"]).resolve()
        vcfg = json.loads((clip_dir / "config.json").read_text())["vision_config"]
        self.vision = CLIPVisionModel(CLIPVisionConfig(**vcfg)).eval()
        if vision_state is None:
            prefix = "model.vision_tower.vision_tower.vision_model."
            vision_state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        self.vision.load_state_dict(vision_state, strict=True)
        self.select_layer = config["mm_vision_select_layer"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt))

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        patches = hidden[:, 1:]
        w0, b0, w2, b2 = self.proj
        return F.linear(F.gelu(F.linear(patches, w0, b0)), w2, b2)

    @torch.no_grad()
    def embeds(self, prompt: str, features: torch.Tensor | None) -> torch.Tensor:
        embed = self.lm.get_input_embeddings()
        if features is None:
            return embed(torch.tensor(self.tokenizer(prompt).input_ids))
        before, after = prompt.split("<image>")
        ids_before = self.tokenizer(before).input_ids  # starts with BOS
        ids_after = self.tokenizer(after).input_ids[1:]  # drop the second BOS
        return torch.cat([embed(torch.tensor(ids_before)), features[0], embed(torch.tensor(ids_after))])

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeds.unsqueeze(0), use_cache=False).logits[0]

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, n: int) -> list[int]:
        tokens: list[int] = []
        embed = self.lm.get_input_embeddings()
        for _ in range(n):
            token = int(self.logits(embeds)[-1].argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([token]))])
        return tokens


def _test_image() -> Image.Image:
    img = Image.new("RGB", (300, 220), (30, 30, 30))
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 40, 240, 200), fill=(200, 200, 190))
    draw.rectangle((140, 90, 170, 140), fill=(90, 20, 20))
    return img


def _our_logits(loaded, prompt: str, image: Image.Image | None) -> tuple[torch.Tensor, list[int]]:
    prepared = prepare_prompt(loaded, prompt, [image] if image is not None else [])
    model = loaded.model
    feats = [] if prepared.pixel_values is None else list(model.encode_images(prepared.pixel_values))
    with torch.no_grad():
        embeds = model.embed_prompt(prepared.input_ids, feats).unsqueeze(0)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0]
    params = SamplingParams(temperature=0.0, max_new_tokens=NUM_GREEDY, ignore_eos=True)
    final = list(generate_stream(loaded, prepared, params))[-1]
    return logits, list(final.token_ids)


def _reference_result(ref: Reference, loaded, prompt: str, image: Image.Image | None):
    features = None
    if image is not None:
        pixels = process_images([image], loaded.image_processor, "pad")
        features = ref.image_features(pixels)
    embeds = ref.embeds(prompt, features)
    return ref.logits(embeds), ref.greedy(embeds, NUM_GREEDY)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Reference:
    return Reference(tiny_checkpoint)


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_embedded_vision_tower_matches_reference(tiny_loaded, reference, with_image):
    assert tiny_loaded.vision_source == "embedded"
    prompt = PROMPT_WITH_IMAGE if with_image else PROMPT_TEXT
    image = _test_image() if with_image else None
    ours, our_tokens = _our_logits(tiny_loaded, prompt, image)
    ref_logits, ref_tokens = _reference_result(reference, tiny_loaded, prompt, image)
    assert ours.shape == ref_logits.shape
    torch.testing.assert_close(ours, ref_logits, atol=1e-5, rtol=0)
    assert our_tokens == ref_tokens


def test_image_changes_the_answer(tiny_loaded):
    red = Image.new("RGB", (200, 200), (220, 20, 20))
    blue = Image.new("RGB", (200, 200), (20, 20, 220))
    logits_red, _ = _our_logits(tiny_loaded, PROMPT_WITH_IMAGE, red)
    logits_blue, _ = _our_logits(tiny_loaded, PROMPT_WITH_IMAGE, blue)
    assert (logits_red[-1] - logits_blue[-1]).abs().max() > 1e-2


def test_image_sentinel_positions(tiny_loaded):
    prepared = prepare_prompt(tiny_loaded, PROMPT_WITH_IMAGE, [_test_image()])
    ids = prepared.input_ids
    assert ids[0] == tiny_loaded.tokenizer.bos_token_id
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids.count(tiny_loaded.tokenizer.bos_token_id) == 1
    assert prepared.num_prompt_tokens == len(ids) - 1 + 576
    assert tuple(prepared.pixel_values.shape) == (1, 3, 336, 336)


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_separate_vision_tower_matches_reference(tiny_checkpoint, with_image):
    clip_dir = tiny_checkpoint.parent / vision_dir_name("tiny")
    loaded = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), vision_tower=str(clip_dir)))
    assert loaded.vision_source == str(clip_dir.resolve())
    clip_state = {k[len("vision_model."):]: v for k, v in load_file(str(clip_dir / "model.safetensors")).items()
                  if k.startswith("vision_model.")}
    ref = Reference(tiny_checkpoint, vision_state=clip_state)
    prompt = PROMPT_WITH_IMAGE if with_image else PROMPT_TEXT
    image = _test_image() if with_image else None
    ours, our_tokens = _our_logits(loaded, prompt, image)
    ref_logits, ref_tokens = _reference_result(ref, loaded, prompt, image)
    torch.testing.assert_close(ours, ref_logits, atol=1e-5, rtol=0)
    assert our_tokens == ref_tokens


def test_vision_tower_override_is_really_used(tiny_checkpoint, tiny_loaded, tmp_path):
    """A perturbed CLIP folder given with --vision-tower changes the features, and matches the reference."""
    clip_dir = tiny_checkpoint.parent / vision_dir_name("tiny")
    altered = tmp_path / "clip-altered"
    shutil.copytree(clip_dir, altered)
    state = load_file(str(altered / "model.safetensors"))
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    state[key] = state[key] * -1.5
    save_file(state, str(altered / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), vision_tower=str(altered)))
    image = _test_image()
    ours, _ = _our_logits(loaded, PROMPT_WITH_IMAGE, image)
    default, _ = _our_logits(tiny_loaded, PROMPT_WITH_IMAGE, image)
    assert (ours - default).abs().max() > 1e-3
    ref = Reference(tiny_checkpoint, vision_state={k[len("vision_model."):]: v.float() for k, v in state.items()
                                                   if k.startswith("vision_model.")})
    ref_logits, _ = _reference_result(ref, loaded, PROMPT_WITH_IMAGE, image)
    torch.testing.assert_close(ours, ref_logits, atol=1e-5, rtol=0)


def _copy_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ckpt-root"
    shutil.copytree(tiny_checkpoint.parent, root)
    return root / tiny_checkpoint.name


def _rewrite_weight(ckpt: Path, old: str, new: str | None) -> None:
    """Rename (or drop, with new=None) one weight in the shard that holds it, keeping the index in step."""
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"].pop(old)
    tensors = load_file(str(ckpt / shard))
    value = tensors.pop(old)
    if new is not None:
        tensors[new] = value
        index["weight_map"][new] = shard
    save_file(tensors, str(ckpt / shard), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.upp_proj.weight",
         ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.upp_proj.weight"]),
        ("lm_head.weight", None, ["lm_head.weight"]),
        ("model.mm_projector.2.bias", None, ["model.mm_projector.2.bias"]),
        ("model.mm_projector.0.weight", "model.mm_projector.1.weight",
         ["model.mm_projector.0.weight", "model.mm_projector.1.weight"]),
        ("model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias", None,
         ["model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"]),
    ],
    ids=["renamed-text", "missing-lm-head", "missing-projector", "renamed-projector", "missing-vision"],
)
def test_bad_weights_fail_naming_the_key(tiny_checkpoint, tmp_path, old, new, named):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path)
    _rewrite_weight(ckpt, old, new)
    with pytest.raises(CheckpointError) as info:
        load_pretrained_model(LoadConfig(model_path=str(ckpt)))
    for key in named:
        assert key in str(info.value)


def test_unknown_format_and_missing_folder(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llava_gpt9"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="llava_gpt9"):
        load_pretrained_model(LoadConfig(model_path=str(ckpt)))
    with pytest.raises(CheckpointError, match="no such folder"):
        load_pretrained_model(LoadConfig(model_path=str(tmp_path / "nowhere")))
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained_model(LoadConfig(model_path=str(ckpt)))


def test_format_is_decided_by_config_not_folder_name(tiny_checkpoint, tmp_path):
    """A folder named like some other model still loads as LLaVA-Mistral because its config says so."""
    root = tmp_path / "root"
    shutil.copytree(tiny_checkpoint.parent, root)
    renamed = root / "gpt2-not-llava"
    (root / tiny_checkpoint.name).rename(renamed)
    loaded = load_pretrained_model(LoadConfig(model_path=str(renamed)))
    assert type(loaded.model.language_model).__name__ == "MistralForCausalLM"
    assert loaded.model_name == "gpt2-not-llava"


def test_load_config_validation():
    with pytest.raises(ValueError, match="one of --load-8bit and --load-4bit"):
        LoadConfig(load_8bit=True, load_4bit=True)
    with pytest.raises(ValueError, match="device"):
        LoadConfig(device="tpu")
    with pytest.raises(ValueError, match="num_gpus"):
        LoadConfig(num_gpus=0)


def _fake_gpus(monkeypatch, *capabilities: tuple[int, int], name: str = "Tesla V100-SXM2-16GB") -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(major=capabilities[i][0], minor=capabilities[i][1]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: name)
    # What transformers' is_bf16_supported() says on a V100 or T4: emulation counts as support.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_dtype_on_gpus_is_bf16_only_with_native_support(monkeypatch, caplog):
    from llava_med.model.dtypes import choose_dtype

    monkeypatch.delenv("LLAVA_MED_DTYPE", raising=False)  # the suite pins float32: here, the default choice
    monkeypatch.setattr("llava_med.model.dtypes.cpu_native_bf16", lambda: None)
    _fake_gpus(monkeypatch, (7, 0))  # V100: bf16 only emulated
    assert choose_dtype(LoadConfig(), "cuda") == (
        torch.float16, "Tesla V100-SXM2-16GB (compute capability 7.0) has no native bfloat16")
    with caplog.at_level("WARNING", logger="llava_med.model.dtypes"):
        assert choose_dtype(LoadConfig(dtype="bfloat16"), "cuda") == (torch.bfloat16, "--dtype")
    assert "emulated and slow" in caplog.text
    _fake_gpus(monkeypatch, (8, 0), (8, 6), name="NVIDIA A100-SXM4-80GB")
    dtype, why = choose_dtype(LoadConfig(num_gpus=2), "cuda")
    assert dtype == torch.bfloat16 and why.endswith("has native bfloat16")
    _fake_gpus(monkeypatch, (8, 0), (7, 5))  # one T4 in the set: no bf16 for the model spread over both
    assert choose_dtype(LoadConfig(num_gpus=2), "cuda")[0] == torch.float16
    # 8-bit computes in fp16 whatever the card (bitsandbytes casts everything else on every matmul).
    _fake_gpus(monkeypatch, (9, 0), name="NVIDIA H100")
    assert choose_dtype(LoadConfig(load_8bit=True), "cuda") == (torch.float16, "--load-8bit computes in float16")
    assert choose_dtype(LoadConfig(load_4bit=True), "cuda")[0] == torch.bfloat16
    assert choose_dtype(LoadConfig(), "cpu")[0] == torch.float32  # a CPU without native bf16


@pytest.mark.parametrize("flag", ["load_8bit", "load_4bit"])
def test_quantized_loading_generates_on_cpu(tiny_checkpoint, flag, caplog):
    import bitsandbytes as bnb  # the [quant] extra, installed by scripts/test.sh

    caplog.set_level("WARNING", logger="bitsandbytes")
    loaded = load_pretrained_model(LoadConfig(model_path=str(tiny_checkpoint), **{flag: True}))
    layer_type = bnb.nn.Linear8bitLt if flag == "load_8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, layer_type) for m in loaded.model.language_model.modules())
    prepared = prepare_prompt(loaded, PROMPT_WITH_IMAGE, [_test_image()])
    final = list(generate_stream(loaded, prepared, SamplingParams(temperature=0, max_new_tokens=8,
                                                                  ignore_eos=True)))[-1]
    assert final.num_generated_tokens == 8
    assert final.finish_reason == "length"
    assert final.text.strip()
    # fp32 int8 matmuls: bitsandbytes warns of its fp16 cast on each of them; the log shows it once.
    assert caplog.text.count("MatMul8bitLt") == (1 if flag == "load_8bit" else 0)


def test_embedded_vision_tower_without_its_config_folder(tiny_checkpoint, tiny_loaded, tmp_path, monkeypatch):
    """Offline, with mm_vision_tower unreachable, the embedded CLIP weights load with a config inferred from
    their shapes, and the model computes exactly what it computes with the CLIP folder's config."""
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-not-downloaded-here"
    (ckpt / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_pretrained_model(LoadConfig(model_path=str(ckpt)))
    assert loaded.vision_source == "embedded"
    image = _test_image()
    ours, tokens = _our_logits(loaded, PROMPT_WITH_IMAGE, image)
    expected, expected_tokens = _our_logits(tiny_loaded, PROMPT_WITH_IMAGE, image)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert tokens == expected_tokens
