#!/usr/bin/env bash
# Fills a performance tensor on this machine: `metainf-node bench --full` at several engine
# thread counts (each a different hardware profile), then exports every record as signed JSONL.
#
#   scripts/sweep.sh [OUT.jsonl]          THREADS="1 2 3" by default; DATA_DIR=.metainf/sweep
#
# Run it on an idle machine: the records are timings.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
cd "$here/.."
out="${1:-data/tensor-$(hostname -s).jsonl}"
data="${DATA_DIR:-.metainf/sweep}"
"$here/fetch-model.sh" >/dev/null
cargo build -q -p metainf-node
bin="$CARGO_TARGET_DIR/debug/metainf-node"
for t in ${THREADS:-1 2 3}; do
  echo "== bench --full, $t thread(s)"
  "$bin" --data-dir "$data" --threads "$t" bench --full
done
mkdir -p "$(dirname "$out")"
"$bin" --data-dir "$data" tensor export "$out"
echo "tensor written to $out"
