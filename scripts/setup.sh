#!/usr/bin/env bash
# Installs what a fresh machine lacks to build metainf: the Rust toolchain must be there
# (rustup); this adds rustfmt and clippy, and libclang for RocksDB's bindings.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install Rust with rustup first" >&2
  exit 1
fi

need_apt=()
# bindgen needs libclang itself (libclang.so or libclang-N.so), not libclang-cpp.
if ! ls /usr/lib/llvm-*/lib/libclang.so /usr/lib/llvm-*/lib/libclang-[0-9]*.so >/dev/null 2>&1; then
  need_apt+=(libclang-dev)
fi
if ! command -v c++ >/dev/null 2>&1; then
  need_apt+=(g++)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
  done
fi
