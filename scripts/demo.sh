#!/usr/bin/env bash
# Installs the package into .venv (see setup_env.sh) and asks the embedded tiny model about a real CT slice
# (pydicom's bundled CT_small.dcm). The tiny model has random weights: its answer is noise, but every part of
# the real path runs: checkpoint loading, DICOM decoding, CLIP, projector, prompt template and generation.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-quant}"
source "$ROOT/scripts/setup_env.sh"
IMAGE="$("$VENV/bin/python" -c 'import pydicom.data; print(pydicom.data.get_testdata_file("CT_small.dcm"))')"
exec "$VENV/bin/llava-med" chat --query "Describe the image." --image-file "$IMAGE" --max-new-tokens 48 "$@"
