#!/usr/bin/env bash
# Builds the image `metainf-node:local` from what is on this machine (no registry, no base
# image): the node binary, the shared libraries it links and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
model="$(scripts/fetch-model.sh)"
cargo build --locked -p metainf-node
cache_rocksdb
bin="$CARGO_TARGET_DIR/debug/metainf-node"
stage=testnet/.build
rm -rf "$stage/rootfs"
mkdir -p "$stage/rootfs/usr/local/bin" "$stage/rootfs/models" "$stage/rootfs/tmp" "$stage/rootfs/data"
chmod 1777 "$stage/rootfs/tmp"
cp "$bin" "$stage/rootfs/usr/local/bin/metainf-node"
cp "$model" "$stage/rootfs/models/"
# Every library the binary loads, at the path the loader looks for it (the loader included).
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$stage/rootfs$(dirname "$lib")"
  cp -L "$lib" "$stage/rootfs$lib"
done
cp testnet/Dockerfile "$stage/Dockerfile"
docker build -q -t metainf-node:local "$stage" >/dev/null
echo "built metainf-node:local ($(docker image inspect -f '{{.Size}}' metainf-node:local | awk '{printf "%.0f MB", $1/1e6}'))"
