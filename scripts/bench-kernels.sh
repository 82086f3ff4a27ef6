#!/usr/bin/env bash
# The engine's kernels side by side with llama.cpp, in one run: the same GGUF, the same thread
# count, paired runs (llama.cpp, then metainf, RUNS times per shape and thread count), the
# ratio of each pair and the median ratio. Not run by CI (it needs
# scripts/build-llama-server.sh, ~15 minutes once).
#
#   scripts/bench-kernels.sh                 # RUNS=3 THREADS="1 2" SHAPES="decode prefill batched shared"
#   METAINF_WEIGHTS=q8 scripts/bench-kernels.sh   # the engine with every weight requantized to Q8
#
# Shapes (profiler/benches/engine.rs says exactly what each side measures):
#   decode   llama-bench -p 0 -n 128          vs 128 tokens after a 16-token prompt
#   prefill  llama-bench -p 512 -n 0          vs one 512-token prompt
#   batched  llama-batched-bench -npp 128 -ntg 64 -npl 4        vs 4 × (128 + 64), total tok/s
#   shared   llama-batched-bench -npp 128 -ntg 64 -npl 16 -pps  vs 16 sharing a prompt, total tok/s
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
model="${METAINF_MODEL:-$(scripts/fetch-model.sh)}"
export METAINF_MODEL="$model"
runs="${RUNS:-3}"
threads="${THREADS:-1 2}"
shapes="${SHAPES:-decode prefill batched shared}"
llama_bin="$(scripts/build-llama-server.sh)"
# --workspace: the same feature set as every other build of the shared target directory.
# (The integration test of the same name also builds an `engine-*` binary: ask cargo which is
# the bench.)
bench="$(cargo bench --locked --workspace --bench engine --profile dev --no-run \
  --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and "bench" in m["target"]["kind"] and m.get("executable"):
        print(m["executable"])')"
[ -x "$bench" ] || { echo "the engine bench did not build" >&2; exit 1; }

llama() {
  local shape="$1" t="$2"
  case "$shape" in
    decode) "$llama_bin/llama-bench" -m "$model" -t "$t" -p 0 -n 128 -r 1 -o csv 2>/dev/null |
      python3 -c 'import csv,sys; print([r for r in csv.DictReader(sys.stdin)][-1]["avg_ts"])' ;;
    prefill) "$llama_bin/llama-bench" -m "$model" -t "$t" -p 512 -n 0 -r 1 -o csv 2>/dev/null |
      python3 -c 'import csv,sys; print([r for r in csv.DictReader(sys.stdin)][-1]["avg_ts"])' ;;
    batched | shared)
      local npl=4 pps=()
      [ "$shape" = shared ] && npl=16 pps=(-pps)
      "$llama_bin/llama-batched-bench" -m "$model" -t "$t" -tb "$t" -c 4096 -b 2048 -ub 512 \
        -npp 128 -ntg 64 -npl "$npl" "${pps[@]}" 2>&1 |
        awk -F'|' '$2 ~ /^ *128 *$/ { gsub(/ /, "", $11); print $11 }' ;;
  esac
}

ours() {
  local shape="$1" t="$2"
  "$bench" --threads "$t" --shape "$shape" --reps 1 | awk '/^engine / { for (i = 1; i <= NF; i++) if ($i ~ /^tok_s=/) { sub(/tok_s=/, "", $i); print $i } }'
}

results="$(mktemp)"
"$bench" --threads 1 --shape decode --reps 1 --triad | grep -E '^(triad|weights)' >&2 || true
for t in $threads; do
  for shape in $shapes; do
    for run in $(seq 1 "$runs"); do
      l="$(llama "$shape" "$t")"
      m="$(ours "$shape" "$t")"
      echo "$t $shape $run $m $l" | tee -a "$results" >&2
    done
  done
done
python3 - "$results" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print("| threads | shape | metainf tok/s | llama.cpp tok/s | ratio per pair | median ratio |")
print("|---|---|---|---|---|---|")
groups = {}
for t, shape, run, m, l in rows:
    groups.setdefault((t, shape), []).append((float(m), float(l)))
for (t, shape), pairs in groups.items():
    ratios = [m / l for m, l in pairs]
    fmt = lambda v: "/".join(f"{x:.1f}" for x in v)
    print(f"| {t} | {shape} | {fmt([m for m, _ in pairs])} | {fmt([l for _, l in pairs])} | "
          + "/".join(f"{r:.2f}" for r in ratios) + f" | **{statistics.median(ratios):.2f}** |")
EOF
rm -f "$results"
