# Sourced by the other scripts: where builds and caches live.
#
# One persistent target directory outside the checkout, shared by every clone, the scripts and
# CI, so the ~30-minute cold build of the dependencies happens once per machine. RocksDB's C++
# library (26 of those minutes) is additionally cached on its own and linked through
# ROCKSDB_LIB_DIR, so changing compiler flags or profiles never rebuilds it.

METAINF_CACHE="${METAINF_CACHE:-$HOME/.cache/metainf}"
export METAINF_CACHE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$METAINF_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_rocksdb_version="$(awk '/^name = "librocksdb-sys"$/ { getline; sub(/^version = "/, ""); sub(/"$/, ""); print; exit }' "$_root/Cargo.lock")"
ROCKSDB_CACHE="$METAINF_CACHE/rocksdb/${_rocksdb_version:-unknown}-lz4"
if [ -z "${ROCKSDB_LIB_DIR:-}" ] && [ -f "$ROCKSDB_CACHE/librocksdb.a" ]; then
  export ROCKSDB_LIB_DIR="$ROCKSDB_CACHE"
  export ROCKSDB_STATIC=1
fi

# After a build that compiled RocksDB from source, keep its library for later builds.
cache_rocksdb() {
  [ -f "$ROCKSDB_CACHE/librocksdb.a" ] && return 0
  local lib
  lib="$(ls -t "$CARGO_TARGET_DIR"/*/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -n 1)"
  [ -n "$lib" ] || return 0
  mkdir -p "$ROCKSDB_CACHE"
  cp "$lib" "$ROCKSDB_CACHE/librocksdb.a.tmp" && mv "$ROCKSDB_CACHE/librocksdb.a.tmp" "$ROCKSDB_CACHE/librocksdb.a"
  echo "cached $(du -h "$ROCKSDB_CACHE/librocksdb.a" | cut -f1) RocksDB library in $ROCKSDB_CACHE"
}
