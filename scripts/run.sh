#!/usr/bin/env bash
# Sets up and starts a metainf node with its data in ./.metainf/node (Ctrl-C stops it).
# On the first start it answers one prompt with the default model and benchmarks the engine's
# acceleration methods (`bench --quick`, about two minutes), so the node has signed records to
# share. Arguments are passed to `metainf-node run`, e.g. `scripts/run.sh --log-format json`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
METAINF_MODEL="$(scripts/fetch-model.sh)"
export METAINF_MODEL
cargo build --locked -p metainf-node
cache_rocksdb
export METAINF_DATA_DIR="${METAINF_DATA_DIR:-$PWD/.metainf/node}"
bin="$CARGO_TARGET_DIR/debug/metainf-node"
if [ ! -f "$METAINF_DATA_DIR/benchmarked" ]; then
  echo "== a job on the default model"
  "$bin" generate "What is the capital of France?"
  echo "== first start: benchmarking the acceleration methods on this machine"
  "$bin" bench --quick
  touch "$METAINF_DATA_DIR/benchmarked"
fi
echo "== starting the node"
exec "$bin" run "$@"
