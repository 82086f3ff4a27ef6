#!/usr/bin/env bash
# Sets up and starts a metainf node with its data in ./.metainf/node (Ctrl-C stops it).
# Arguments are passed to `metainf-node run`, e.g. `scripts/run.sh --log-format json`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
scripts/fetch-model.sh >/dev/null
cargo build --locked -p metainf-node
cache_rocksdb
export METAINF_DATA_DIR="${METAINF_DATA_DIR:-$PWD/.metainf/node}"
exec "$CARGO_TARGET_DIR/debug/metainf-node" run "$@"
