#!/usr/bin/env bash
# The testnet end to end: up, a streamed job through node-a, a batch job routed to the cheapest
# host (node-c), node-c killed mid-job (docker kill), the job finished elsewhere, down.
set -euo pipefail
cd "$(dirname "$0")"
trap './down.sh >/dev/null 2>&1 || true' EXIT
./down.sh >/dev/null 2>&1 || true
./up.sh
source ../scripts/env.sh
bin="$CARGO_TARGET_DIR/debug/metainf-node"
api="http://127.0.0.1:${METAINF_TESTNET_PORT:-18080}"
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }

echo "== a streamed chat job through node-a"
"$bin" submit --node "$api" --stream --max-tokens 24 --prompt "What is the capital of France?"

echo "== a batch job, cheapest host first; node-c is killed while it runs it"
node_c="$(docker run --rm -v "$PWD/.data/c:/data" metainf-node:local id)"
body='{"model":"SmolLM2-135M-Instruct","objective":"cost","max_tokens":300,"temperature":0,"prompts":[{"messages":[{"role":"user","content":"Tell a long story about a lighthouse."}]},{"messages":[{"role":"user","content":"Tell a long story about a river."}]},{"messages":[{"role":"user","content":"Tell a long story about a clock."}]},{"messages":[{"role":"user","content":"Tell a long story about a fox."}]}]}'
accepted="$(python3 - "$api" "$body" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/v1/jobs", data=sys.argv[2].encode(),
                             headers={"content-type": "application/json"})
print(urllib.request.urlopen(req).read().decode())
PY
)"
id="$(echo "$accepted" | json 'v["id"]')"
host="$(echo "$accepted" | json 'v["metainf"]["host"]')"
[ "$host" = "$node_c" ] || { echo "expected node-c ($node_c) for the cost objective, got $host" >&2; exit 1; }
for _ in $(seq 1 200); do
  state="$(python3 -c "import json,urllib.request; print(json.load(urllib.request.urlopen('$api/v1/jobs/$id'))['status'])")"
  [ "$state" = running ] && break
  sleep 0.1
done
docker kill metainf_node-c_1 >/dev/null
echo "killed node-c while the job was $state"
for _ in $(seq 1 600); do
  job="$(python3 -c "import urllib.request; print(urllib.request.urlopen('$api/v1/jobs/$id').read().decode())")"
  status="$(echo "$job" | json 'v["status"]')"
  [ "$status" = done ] || [ "$status" = failed ] && break
  sleep 0.5
done
echo "$job" | json '"job %s: %s on %s after %s attempts, %d results" % (v["id"], v["status"], v["host"], v["attempts"], len(v.get("results") or []))'
[ "$status" = done ] || { echo "the job did not finish" >&2; exit 1; }
[ "$(echo "$job" | json 'v["host"]')" != "$node_c" ] || { echo "the job claims the dead host" >&2; exit 1; }
echo "testnet smoke: ok"
