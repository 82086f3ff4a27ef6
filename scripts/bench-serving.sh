#!/usr/bin/env bash
# Side by side, in one run: a metainf node and llama.cpp's llama-server on the same GGUF and
# thread count, loaded by the same client (`metainf-node loadgen`), scenario by scenario,
# alternating engines. Not run by CI (it needs scripts/build-llama-server.sh, ~10 minutes).
#
#   scripts/bench-serving.sh [OUT_DIR]       # JSON reports in OUT_DIR (default target/bench-serving)
#
# Scenarios (the serving issue's numbers): 8 chats one after another; 8 chats at once; 4
# conversations × 3 turns behind a ~800-token system prompt, history resent; 16 chats with
# Poisson arrivals, on metainf with chunked prefill on and off.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
model="$(scripts/fetch-model.sh)"
threads="${THREADS:-2}"
out="${1:-target/bench-serving}"
mkdir -p "$out"
# The dev profile: dependencies and the engine at opt-level 3 (Cargo.toml), one target dir.
cargo build --locked -p metainf-node
bin="$CARGO_TARGET_DIR/debug/metainf-node"
llama_bin="$(scripts/build-llama-server.sh)"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() {
  local url="$1" pid="$2"
  for _ in $(seq 1 600); do
    curl -sf "$url/v1/models" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

node_pid=""
llama_pid=""
cleanup() {
  [ -n "$node_pid" ] && kill -TERM "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null
  [ -n "$llama_pid" ] && kill -TERM "$llama_pid" 2>/dev/null && wait "$llama_pid" 2>/dev/null
  true
}
trap cleanup EXIT

# methods: the router's choice set (e.g. "cb+pc" or "cb+pc+cp").
start_node() {
  local methods="$1"
  node_port="$(port)"
  local dir
  dir="$(mktemp -d)"
  cat >"$dir/node.toml" <<EOF
data_dir = "$dir/data"
[network]
enabled = false
[engine]
models = ["$model"]
threads = $threads
[jobs]
queue_capacity = 256
methods = ["$methods"]
explore = 0.0
EOF
  "$bin" --config "$dir/node.toml" --api-listen "127.0.0.1:$node_port" run >"$dir/log" 2>&1 &
  node_pid=$!
  wait_ready "http://127.0.0.1:$node_port" "$node_pid" || { cat "$dir/log"; exit 1; }
}
stop_node() { kill -TERM "$node_pid"; wait "$node_pid" 2>/dev/null || true; node_pid=""; }

start_llama() {
  llama_port="$(port)"
  "$llama_bin/llama-server" -m "$model" -t "$threads" -np 8 -c 16384 --port "$llama_port" \
    --host 127.0.0.1 >"$out/llama-server.log" 2>&1 &
  llama_pid=$!
  wait_ready "http://127.0.0.1:$llama_port" "$llama_pid" || { tail -20 "$out/llama-server.log"; exit 1; }
}

load() {
  local name="$1" url="$2"
  shift 2
  echo "== $name" >&2
  # A run with failed requests still reports (and says how many failed).
  "$bin" loadgen --url "$url" --json "$@" >"$out/$name.json" || true
  python3 - "$out/$name.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
turns = " ".join(f"t{i+1}={q['p50']:.2f}s" for i, q in enumerate(r["ttft_by_turn_s"])) if len(r["ttft_by_turn_s"]) > 1 else ""
print(f"   {r['output_tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_s']['p50']:.2f}s p99 {r['ttft_s']['p99']:.2f}s  "
      f"ITL p50 {r['itl_s']['p50']*1e3:.0f}ms p95 {r['itl_s']['p95']*1e3:.0f}ms  wall {r['wall_s']:.1f}s  "
      f"failed {r['failed']} {turns}", file=sys.stderr)
EOF
}

scenarios=(
  "sequential|--scenario sequential --conversations 8 --max-tokens 64"
  "concurrent8|--scenario concurrent --clients 8 --conversations 8 --max-tokens 64"
  "multiturn|--scenario multi-turn --clients 4 --conversations 4 --turns 3 --system-tokens 800 --max-tokens 64"
)

start_llama
start_node "cb+pc+cp"
node="http://127.0.0.1:$node_port"
llama="http://127.0.0.1:$llama_port"
# Warm both (page the weights in).
"$bin" loadgen --url "$node" --scenario sequential --conversations 1 --max-tokens 8 >/dev/null
"$bin" loadgen --url "$llama" --scenario sequential --conversations 1 --max-tokens 8 >/dev/null
for s in "${scenarios[@]}"; do
  name="${s%%|*}"
  read -r -a args <<<"${s#*|}"
  load "metainf-$name" "$node" "${args[@]}"
  load "llama-$name" "$llama" "${args[@]}"
done
poisson=(--scenario concurrent --rate 2 --conversations 16 --max-tokens 64)
load "metainf-poisson16-cp" "$node" "${poisson[@]}"
load "llama-poisson16" "$llama" "${poisson[@]}"
stop_node
start_node "cb+pc"
load "metainf-poisson16-nocp" "http://127.0.0.1:$node_port" "${poisson[@]}"
echo "reports in $out" >&2
