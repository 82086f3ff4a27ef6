#!/usr/bin/env bash
# Writes the llama.cpp references the engine is tested against: for each shipped model, the
# token ids llama-server gives a set of prompts (Unicode, digits, code, whitespace, a chat
# turn) and its first 32 greedy tokens, into profiler/tests/data/reference-<model>.json
# (committed; profiler/tests/reference.rs reads them). Not run by CI: it builds llama.cpp
# (~15 minutes once, scripts/build-llama-server.sh).
#
#   scripts/llama-reference.sh                 # every shipped model and the tiny ones
#   scripts/llama-reference.sh gemma3-270m     # one
#
# The tiny models (random weights in the architectures no shipped model has: qwen2, qwen3,
# llama with Llama 3's RoPE factors) are written by the test that checks them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

bin="$(scripts/build-llama-server.sh)"
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2 gemma3-270m tiny-qwen2 tiny-qwen3 tiny-llama3)
mkdir -p profiler/tests/data
tiny="$(mktemp -d)"
trap 'rm -rf "$tiny"' EXIT
METAINF_MODEL="$(scripts/fetch-model.sh)" METAINF_TINY_OUT="$tiny" \
  cargo test --locked --workspace --test reference tiny >&2
for name in "${models[@]}"; do
  case "$name" in
    tiny-*) path="$tiny/$name.gguf" ;;
    *) path="$(scripts/fetch-model.sh "$name")" ;;
  esac
  python3 scripts/llama-reference.py "$bin/llama-server" "$path" "$name" \
    "profiler/tests/data/reference-$name.json"
  echo "wrote profiler/tests/data/reference-$name.json" >&2
done
