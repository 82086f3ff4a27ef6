#!/usr/bin/env bash
# The whole test suite: formatting, clippy with warnings as errors, and every test of the
# workspace (unit, property, integration: RocksDB on disk, SIGKILL durability, the binary), and
# the docker testnet's smoke test where Docker is available.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh

echo "== models: the default (SmolLM2-135M) and Gemma 3 270M"
METAINF_MODEL="$(scripts/fetch-model.sh)"
export METAINF_MODEL
scripts/fetch-model.sh gemma3-270m >/dev/null
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== import circles"
python3 scripts/check-imports.py node scheduler profiler protocol
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cache_rocksdb
echo "== cargo test"
cargo test --workspace --locked "$@"
if docker info >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1; then
  echo "== testnet: three nodes in containers, a job, a host killed mid-job"
  METAINF_TESTNET_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    testnet/smoke.sh
else
  echo "== testnet: skipped (no Docker engine or docker-compose here)"
fi
