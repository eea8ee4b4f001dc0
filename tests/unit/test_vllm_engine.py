"""``--engine vllm`` where vLLM is not installed (the main suite): its flags, the worker's and launcher's handling
of them, the clear error naming the extra, and the torchvision fix for CPU torch. The engine itself runs in
tests/integration/test_vllm_worker.py, in the vLLM virtualenv."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

from llava_med.engine.registry import engine_class, engine_names
from llava_med.engine.registry import parse_size as parse_bytes
from llava_med.engine.vllm import VLLMEngine, VLLMOptions, parse_vllm_args
from llava_med.errors import MissingDependencyError
from llava_med.model.args import LoadConfig
from llava_med.serve import launch, model_worker

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def test_registry_and_flags():
    assert "vllm" in engine_names() and engine_class("vllm") is VLLMEngine
    args = model_worker.parse_args([
        "--engine", "vllm", "--model-path", "/models/llava-med", "--num-gpus", "2", "--dtype", "bfloat16",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.8", "--kv-cache-memory", "64MiB",
        "--enforce-eager", "--quantization", "fp8", "--max-num-seqs", "8", "--max-images-per-prompt", "2",
        "--vllm-args", '{"enable-prefix-caching": false}',
    ])
    assert (args.max_model_len, args.gpu_memory_utilization, args.kv_cache_memory) == (4096, 0.8, 64 * 2**20)
    assert args.enforce_eager and args.quantization == "fp8" and args.max_num_seqs == 8
    assert parse_vllm_args(args.vllm_args) == {"enable_prefix_caching": False}


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here")
def test_choosing_vllm_without_it_names_the_extra():
    args = model_worker.parse_args(["--engine", "vllm"])
    with pytest.raises(MissingDependencyError, match=re.escape("pip install -e '.[vllm]'")):
        VLLMEngine.from_args(args)
    # The worker process exits with that message instead of serving.
    proc = subprocess.run([sys.executable, "-m", "llava_med.serve.model_worker", "--engine", "vllm", "--no-register",
                           "--port", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "pip install -e '.[vllm]'" in proc.stderr


def test_importing_the_engine_imports_neither_vllm_nor_torch():
    code = "import sys, llava_med.engine.vllm, llava_med.engine.registry as r; r.add_engine_args(__import__('argparse')" \
           ".ArgumentParser()); print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_launcher_passes_vllm_flags_to_every_worker():
    args = launch.build_parser().parse_args([
        "--engine", "vllm", "--model-path", "/models/llava-med", "--num-gpus", "2", "--kv-cache-memory", "2GiB",
        "--enforce-eager", "--max-model-len", "4096", "--vllm-args", '{"enable_prefix_caching": false}'])
    config = dataclasses.replace(launch.config_from_args(args), controller_port=0, worker_port=0, web=False)
    [worker] = [c for c in launch.plan(config) if c.role == "worker"]
    argv = worker.argv
    assert argv[argv.index("--engine") + 1] == "vllm"
    for flag, value in (("--num-gpus", "2"), ("--kv-cache-memory", str(2 * 2**30)), ("--max-model-len", "4096"),
                        ("--vllm-args", '{"enable_prefix_caching": false}')):
        assert argv[argv.index(flag) + 1] == value
    assert "--enforce-eager" in argv
    # What the launcher forwards, the worker parses back to the same settings.
    parsed = model_worker.parse_args(argv[argv.index("llava_med.serve.model_worker") + 1:])
    assert parsed.kv_cache_memory == 2 * 2**30 and parsed.num_gpus == 2 and parsed.enforce_eager


def test_option_checks():
    assert (parse_bytes("64MiB"), parse_bytes("2g"), parse_bytes("1.5KiB"), parse_bytes("100")) == \
        (64 * 2**20, 2 * 2**30, 1536, 100)
    with pytest.raises(Exception, match="not a size"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="JSON object"):
        parse_vllm_args("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        parse_vllm_args("{nope")
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        VLLMOptions(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="max-images-per-prompt"):
        VLLMOptions(max_images_per_prompt=0)
    with pytest.raises(ValueError, match="--load-8bit has no vLLM equivalent"):
        VLLMEngine(LoadConfig(load_8bit=True))
    with pytest.raises(ValueError, match="--load-4bit means --quantization bitsandbytes"):
        VLLMEngine(LoadConfig(load_4bit=True), VLLMOptions(quantization="fp8"))
    engine = VLLMEngine(LoadConfig(model_path="/models/llava-med-v1.5-mistral-7b"))
    assert engine.model_names == ["llava-med-v1.5-mistral-7b"] and not engine.ready and engine.queue_length() == 0
    assert VLLMEngine(LoadConfig()).model_names == ["llava-med-small-mistral"]  # the embedded default


def test_torchvision_becomes_importable_where_its_ops_do_not_load(tmp_path):
    """A stand-in for PyPI's CUDA torchvision on a CPU torch: its ``_C`` does not load and its import registers a
    fake kernel for ``torchvision::nms`` unconditionally. It fails to import, unless the finder is installed."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "_C.so").write_bytes(b"not a shared library")
    (package / "__init__.py").write_text(textwrap.dedent("""
        import torch
        import torch.library

        @torch.library.register_fake("torchvision::nms")
        def meta_nms(dets, scores, iou_threshold):
            return dets.new_empty(0, dtype=torch.long)
    """))
    check = ("import torchvision, torch; print(hasattr(torch.ops.torchvision, 'nms'), "
             "hasattr(torch.ops.torchvision, 'qnms'))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    broken = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120)
    assert broken.returncode != 0 and "torchvision::nms does not exist" in broken.stderr
    fixed = subprocess.run(
        [sys.executable, "-c", "import llava_med.engine.torchvision_cpu as t; t.install(); " + check],
        capture_output=True, text=True, env=env, timeout=120)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout.split() == ["True", "True"]
