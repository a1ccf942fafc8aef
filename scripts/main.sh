#!/usr/bin/env bash
# The main job: set everything up (idempotent), build the default bundle (SmolLM2-135M-Instruct
# fp32 target + int8 draft) if it is not cached, then generate with plain decoding and with
# token-tree speculation, showing both outputs and speeds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/edgeinfer demo "$@"
