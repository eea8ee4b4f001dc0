#!/usr/bin/env bash
# Installs the vLLM virtualenv (see setup_vllm_env.sh) and runs the tests of `--engine vllm` on the real vLLM.
# Extra arguments go to pytest. On a shared machine run it under the heavy-jobs lock:
#   flock /tmp/llava-med-heavy.lock bash scripts/test_vllm.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_vllm_env.sh"
cd "$ROOT"
# The real-tokenizer tests too: vLLM pins an older transformers, whose tokenizer backend is built differently.
exec "$VLLM_VENV/bin/python" -m pytest tests/integration/test_vllm_worker.py tests/unit/test_real_tokenizer.py \
  -p no:cacheprovider "$@"
