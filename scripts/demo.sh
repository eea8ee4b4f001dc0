#!/usr/bin/env bash
# Installs the package into .venv (see setup_env.sh) and starts the whole local stack on the embedded tiny model:
# a controller, one model worker, the web chat and the OpenAI-compatible API, then prints the URLs (open the web UI's in a browser).
# Ctrl-C stops everything. The tiny model has random weights: its answers are noise, but every part of the real
# path runs: checkpoint loading, DICOM decoding, CLIP, projector, prompt template, streaming generation, Stop.
# Extra arguments go to `llava-med launch`, e.g. `bash scripts/demo.sh --web-port 8080` or `--model-path ...`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-web}"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$VENV/bin/llava-med" launch "$@"
