#!/usr/bin/env bash
# Routing policies side by side, in one run: three metainf node processes on loopback with
# different speeds (engine threads 1, 1 and 2 by default), the same multi-tenant load (T
# tenants, each with its own ~600-token system prompt, multi-turn conversations resent with
# history, Poisson arrivals) sent to all three gateways, once per policy, each with its own
# seed (so no policy finds another's prompts in the caches). Not run by CI (~10 minutes).
#
#   scripts/bench-routing.sh [OUT_DIR]     # JSON reports in OUT_DIR (default target/bench-routing)
#
# TESTNET=1 runs it on the docker testnet instead (testnet/up.sh: node-a/b/c with engine threads
# 1, 2, 1), each container held to a CPU quota (TESTNET_CPUS, default "0.5 1.0 0.5", applied
# with `docker update --cpus`), so the hosts' speeds differ without sharing cores.
#
# ORDER=reverse runs the policies in the reverse order (the predictor learns from every job,
# so a later policy routes with a better-trained predictor: run both orders). THREADS="1 1 2",
# TENANTS, CONVERSATIONS, TURNS, RATE, MAX_TOKENS and SYSTEM_TOKENS change the setup.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
model="$(scripts/fetch-model.sh)"
out="${1:-target/bench-routing}"
read -r -a threads <<<"${THREADS:-1 1 2}"
tenants="${TENANTS:-4}"
conversations="${CONVERSATIONS:-12}"
turns="${TURNS:-3}"
rate="${RATE:-0.4}"
max_tokens="${MAX_TOKENS:-32}"
system_tokens="${SYSTEM_TOKENS:-600}"
mkdir -p "$out"
cargo build --locked -p metainf-node
bin="$CARGO_TARGET_DIR/debug/metainf-node"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${TESTNET:-}" = 1 ]; then testnet/down.sh >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

apis=()
if [ "${TESTNET:-}" = 1 ]; then
  testnet/down.sh >/dev/null 2>&1 || true
  testnet/up.sh >&2
  read -r -a cpus <<<"${TESTNET_CPUS:-0.5 1.0 0.5}"
  names=(a b c)
  ports=("${METAINF_TESTNET_PORT:-18080}" "${METAINF_TESTNET_PORT_B:-18081}" "${METAINF_TESTNET_PORT_C:-18082}")
  for i in 0 1 2; do
    docker update --cpus "${cpus[$i]}" "metainf_node-${names[$i]}_1" >/dev/null
    apis+=("http://127.0.0.1:${ports[$i]}")
  done
  threads=(1 2 1)
  echo "== docker testnet, CPU quotas ${cpus[*]}" >&2
else
boot=""
for i in "${!threads[@]}"; do
  dir="$(mktemp -d)"
  api_port="$(port)"
  p2p_port="$(port)"
  cat >"$dir/node.toml" <<EOF
data_dir = "$dir/data"
[network]
listen = ["/ip4/127.0.0.1/tcp/$p2p_port"]
bootstrap = [$boot]
mdns = false
nat = false
[engine]
models = ["$model"]
threads = ${threads[$i]}
[jobs]
queue_capacity = 64
EOF
  "$bin" --config "$dir/node.toml" --api-listen "127.0.0.1:$api_port" run >"$out/node$i.log" 2>&1 &
  pids+=($!)
  api="http://127.0.0.1:$api_port"
  for _ in $(seq 1 600); do
    curl -sf "$api/v1/status" >/dev/null 2>&1 && break
    sleep 0.2
  done
  if [ "$i" = 0 ]; then
    peer="$(curl -sf "$api/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])')"
    boot="\"/ip4/127.0.0.1/tcp/$p2p_port/p2p/$peer\""
  fi
  apis+=("$api")
done
fi
urls="$(IFS=,; echo "${apis[*]}")"
# Every gateway sees every host.
for api in "${apis[@]}"; do
  for _ in $(seq 1 300); do
    hosts="$(curl -sf "$api/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["metainf"]["hosts"])' 2>/dev/null || echo 0)"
    [ "$hosts" -ge "${#apis[@]}" ] && break
    sleep 0.5
  done
done
echo "== ${#apis[@]} nodes (threads ${threads[*]}): $urls" >&2

counters() {
  for api in "${apis[@]}"; do curl -sf "$api/metrics"; done | python3 -c '
import sys
p = c = 0.0
for line in sys.stdin:
    k, _, v = line.partition(" ")
    if k == "metainf_served_prompt_tokens_total": p += float(v)
    if k == "metainf_served_cached_prompt_tokens_total": c += float(v)
print(p, c)'
}

load() {
  local policy="$1" seed="$2"
  read -r p0 c0 <<<"$(counters)"
  "$bin" loadgen --url "$urls" --json --policy "$policy" --seed "$seed" \
    --scenario multi-tenant --tenants "$tenants" --conversations "$conversations" \
    --turns "$turns" --rate "$rate" --system-tokens "$system_tokens" \
    --max-tokens "$max_tokens" >"$out/$policy.json" || true
  read -r p1 c1 <<<"$(counters)"
  python3 - "$out/$policy.json" "$policy" "$p0" "$c0" "$p1" "$c1" <<'EOF'
import json, sys
path, policy, p0, c0, p1, c1 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
r = json.load(open(path))
share = (c1 - c0) / (p1 - p0) if p1 > p0 else 0.0
r["cache_hit_share"] = share
json.dump(r, open(path, "w"))
t, e = r["ttft_s"], r["e2e_s"]
print(f"{policy:16s} TTFT p50 {t['p50']:6.2f}s p90 {t['p90']:6.2f}s  e2e p50 {e['p50']:6.2f}s "
      f"p90 {e['p90']:6.2f}s  {r['output_tok_s']:6.1f} tok/s  cache hits {share:5.1%}  "
      f"failed {r['failed']}/{r['requests']}", file=sys.stderr)
EOF
}

# Warm-up (unmeasured): the predictor learns from served jobs before the first policy.
"$bin" loadgen --url "$urls" --scenario multi-tenant --tenants 2 --conversations 6 --turns 2 \
  --rate 1 --system-tokens "$system_tokens" --max-tokens 16 --seed 999 >/dev/null || true
policies=(round-robin random least-loaded prefix-affinity metainf)
if [ "${ORDER:-}" = reverse ]; then
  policies=(metainf prefix-affinity least-loaded random round-robin)
fi
seed=1
for policy in "${policies[@]}"; do
  load "$policy" "$seed"
  seed=$((seed + 1))
done
echo "reports in $out" >&2
