#!/usr/bin/env bash
# Set up a development/test environment from scratch: a virtual environment in .venv with
# edgeinfer and every extra (export, anchors for the benchmarks, tests), and the real models in
# the model cache. Safe to run again: what is already there is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch (CPU) only for the tests' transformers reference; pinned so nothing pulls a CUDA build.
python -m pip install -q "torch==2.13.0"
# llama-cpp-python builds from source the first time (several minutes on 2 cores); pip caches the wheel.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" python -m pip install -q -e ".[dev]"
PYTHON=python bash scripts/fetch_models.sh all
