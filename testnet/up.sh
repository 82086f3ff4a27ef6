#!/usr/bin/env bash
# Builds the image and starts the three-node testnet; waits until node-a routes to all three.
# node-a's API: http://127.0.0.1:${METAINF_TESTNET_PORT:-18080}. Stop with testnet/down.sh.
set -euo pipefail
cd "$(dirname "$0")"
./build-image.sh
mkdir -p .data/a .data/b .data/c
NODE_A_ID="$(docker run --rm -v "$PWD/.data/a:/data" metainf-node:local id)"
export NODE_A_ID
docker-compose -p metainf up -d
source ../scripts/env.sh
bin="$CARGO_TARGET_DIR/debug/metainf-node"
api="http://127.0.0.1:${METAINF_TESTNET_PORT:-18080}"
hosts=0
for _ in $(seq 1 200); do
  hosts="$("$bin" status --node "$api" 2>/dev/null \
    | python3 -c 'import json,sys; print(max([m["hosts"] for m in json.load(sys.stdin)["network_models"]] or [0]))' \
    2>/dev/null || echo 0)"
  [ "$hosts" -ge 3 ] && break
  sleep 0.5
done
[ "$hosts" -ge 3 ] || { docker-compose -p metainf logs --tail 30; echo "testnet did not form" >&2; exit 1; }
echo "testnet up: node-a ($NODE_A_ID) at $api routes to $hosts hosts"
"$bin" peers --node "$api"
