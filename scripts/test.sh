#!/usr/bin/env bash
# The whole test suite: formatting, clippy with warnings as errors, and every test of the
# workspace (unit, property, integration: RocksDB on disk, SIGKILL durability, the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh

echo "== default model"
METAINF_MODEL="$(scripts/fetch-model.sh)"
export METAINF_MODEL
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cache_rocksdb
echo "== cargo test"
cargo test --workspace --locked "$@"
