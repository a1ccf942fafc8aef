#!/usr/bin/env bash
# Set up a development/test environment from scratch: a virtual environment in .venv with
# edgeinfer and every extra (export, anchors for the benchmarks, tests), and the real models in
# the model cache. Safe to run again: what is already there is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
cache="${EDGEINFER_CACHE:-$HOME/.cache/edgeinfer}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch (CPU) only for the tests' transformers reference; pinned so nothing pulls a CUDA build.
python -m pip install -q "torch==2.13.0"

# llama-cpp-python builds from source (several minutes on 2 cores). We build the wheel ourselves,
# keyed by the build flags, because pip's own wheel cache ignores CMAKE_ARGS. On CPUs that report
# AMX, llama.cpp's AMX matmul kernels crash in virtual machines (seen: a segfault in
# ggml_backend_amx_mul_mat on the first decode), so they are left out there.
LLAMA_CPP_VERSION=0.3.36
llama_flags="${CMAKE_ARGS:-}"
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  llama_flags="$llama_flags -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
llama_key="$(printf '%s %s %s' "$LLAMA_CPP_VERSION" "$llama_flags" "$(uname -m)" | sha256sum | cut -c1-12)"
wheels="$cache/wheels/llama-cpp-python-$llama_key"
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION (flags:${llama_flags:- none}); this takes a few minutes"
  mkdir -p "$wheels.tmp"
  CMAKE_ARGS="$llama_flags" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    python -m pip wheel -q --no-deps --no-cache-dir -w "$wheels.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
  rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi
# Replace an installed build that did not come from this wheel (e.g. an earlier AMX build).
want="$(ls "$wheels"/llama_cpp_python-*.whl | head -1)"
stamp=.venv/.llama-cpp-wheel
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --force-reinstall --no-deps "$want"
  python -m pip install -q "$want"  # its dependencies
  echo "$want" > "$stamp"
fi
python -m pip install -q -e ".[dev]"
PYTHON=python bash scripts/fetch_models.sh all
