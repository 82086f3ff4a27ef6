#!/usr/bin/env bash
# Sets up and starts a metainf node with its data in ./.metainf/node, sends it a real job
# through its HTTP API (OpenAI-compatible, streamed) and keeps it serving until Ctrl-C.
# On the first start it benchmarks the engine's acceleration methods (`bench --quick`, about two
# minutes), so the node has signed records to share and to route with. Arguments are passed to
# `metainf-node run`, e.g. `scripts/run.sh --log-format json --api-listen 0.0.0.0:8080`.
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
  echo "== first start: benchmarking the acceleration methods on this machine"
  "$bin" bench --quick
  touch "$METAINF_DATA_DIR/benchmarked"
fi
api="${METAINF_API_LISTEN:-127.0.0.1:8080}"
export METAINF_API_LISTEN="$api"
echo "== starting the node (HTTP API on http://$api)"
peer_id="$("$bin" id)"
"$bin" run "$@" &
node=$!
trap 'kill -TERM "$node" 2>/dev/null; wait "$node"' INT TERM
# Ready when the API answers with this node's peer id (not some other process on the port).
until "$bin" status --node "http://$api" 2>/dev/null | grep -q "$peer_id"; do
  kill -0 "$node" 2>/dev/null || { wait "$node"; exit 1; }
  sleep 0.3
done
echo "== a job on the default model, through the API (metainf-node submit --stream)"
"$bin" submit --node "http://$api" --stream --max-tokens 64 \
  --system "You are a helpful assistant." --prompt "What is the capital of France?"
echo "== serving; try: curl http://$api/v1/chat/completions -H 'content-type: application/json' \\"
echo "     -d '{\"model\":\"SmolLM2-135M-Instruct\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}'"
echo "   Ctrl-C stops the node."
wait "$node"
