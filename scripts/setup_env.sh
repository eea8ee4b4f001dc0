#!/usr/bin/env bash
# Creates the virtualenv (.venv, or $VENV) and installs this package into it. Sourced by demo.sh and test.sh.
#
# torch: pinned to torch==2.13.0 (a CPU-only wheel where pip's index has one, e.g. with
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). On a GPU machine, install the torch build you
# want into the venv first, or set TORCH_SPEC (e.g. TORCH_SPEC="torch>=2.13"); an empty TORCH_SPEC skips it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
EXTRAS="${EXTRAS:-test,quant,web}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [ -n "$TORCH_SPEC" ]; then
  "${PIP[@]}" "$TORCH_SPEC"
fi
"${PIP[@]}" -e "$ROOT[$EXTRAS]"
