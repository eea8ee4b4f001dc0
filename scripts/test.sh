#!/usr/bin/env bash
# Installs the package with its test extras into .venv (see setup_env.sh) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k controller -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
