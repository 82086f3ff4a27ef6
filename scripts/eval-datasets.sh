#!/usr/bin/env bash
# `eval` of MetaInf and every baseline on each public dataset of ../shared/datasets and on this
# machine's own tensor (data/tensor-*.jsonl), under every split (random, held-out hardware,
# model, workload), as markdown tables.
#
#   scripts/eval-datasets.sh [OUT_DIR]       SEED=42 by default; OUT_DIR=.metainf/eval
#
# Writes OUT_DIR/<dataset>-<split>.json (eval --json) and prints the tables.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
cd "$here/.."
out="${1:-.metainf/eval}"
seed="${SEED:-42}"
datasets="${DATASETS_DIR:-../shared/datasets}"
mkdir -p "$out"
cargo build -q -p metainf-node
bin="$CARGO_TARGET_DIR/debug/metainf-node"
data="$(mktemp -d)"
trap 'rm -rf "$data"' EXIT

# name | file | column map (empty for signed JSONL) | extra flags
sets=(
  "this-machine|$(ls data/tensor-*.jsonl | head -n 1)||"
  "infpop|$datasets/infpop_vllm_vs_hf.csv|hardware=gpu,model=model,method=engine_config,metric=throughput_tok_s,workload=batch_size;max_new_tokens|--higher-is-better"
  "mlenergy|$datasets/mlenergy_v3_parallelism.csv|hardware=hardware,model=model,method=method,metric=energy_per_token_j,workload=task;max_num_seqs|"
  "llmd|$datasets/llmd_stack_comparison.csv|hardware=hardware,model=model,method=method,metric=mean_ttft_s,workload=scenario;qps|"
  "mlperf|$datasets/mlperf_inf_v4.1_llm.csv|hardware=hardware,model=model,method=method,metric=tokens_per_s,workload=scenario|--higher-is-better"
)
for entry in "${sets[@]}"; do
  IFS='|' read -r name file map flags <<<"$entry"
  for split in random hardware model workload; do
    args=(--data-dir "$data" eval --tensor "$file" --split "$split" --seed "$seed" --json)
    [ -n "$map" ] && args+=(--map "$map")
    # shellcheck disable=SC2206
    [ -n "$flags" ] && args+=($flags)
    start=$(date +%s.%N)
    if "$bin" "${args[@]}" >"$out/$name-$split.json" 2>"$out/$name-$split.log"; then
      echo "$name $split: $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s" >&2
    else
      # A split with a single group cannot hold one out: recorded, not fatal.
      tail -n 1 "$out/$name-$split.log" >"$out/$name-$split.err"
      rm -f "$out/$name-$split.json"
      echo "$name $split: $(cat "$out/$name-$split.err")" >&2
    fi
  done
done
python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
names = ["this-machine", "infpop", "mlenergy", "llmd", "mlperf"]
splits = ["random", "hardware", "model", "workload"]
for name in names:
    print(f"\n#### {name}\n")
    reports = {}
    for s in splits:
        p = os.path.join(out, f"{name}-{s}.json")
        if os.path.exists(p):
            reports[s] = json.load(open(p))
    if not reports:
        print("no split could be evaluated")
        continue
    head = "| selector | " + " | ".join(
        f"{s} ({r['cells']} cells): acc / F1 / regret / ≤5%" for s, r in reports.items()) + " |"
    print(head)
    print("|---" * (1 + len(reports)) + "|")
    selectors = [row["selector"] for row in next(iter(reports.values()))["rows"]]
    for sel in selectors:
        cells = []
        for s, r in reports.items():
            row = next(x for x in r["rows"] if x["selector"] == sel)
            regrets = sorted(x["regret"] for x in r["rows"]
                             if x["selector"] != "Oracle" and x["regret"] is not None)
            fmt = lambda v: "—" if v is None else f"{v:.3f}"
            reg = fmt(row["regret"])
            if sel != "Oracle" and regrets and row["regret"] is not None and row["regret"] <= regrets[0] + 1e-12:
                reg = f"**{reg}**"
            cells.append(f"{fmt(row['accuracy'])} / {fmt(row['macro_f1'])} / {reg} / {fmt(row['near_best'])}")
        print(f"| {sel} | " + " | ".join(cells) + " |")
    for s, r in reports.items():
        meta = next(x for x in r["rows"] if x["selector"] == "MetaInf")
        cov = meta.get("coverage_80")
        secs = sum(x["seconds"] for x in r["rows"])
        print(f"\n{s}: {r['folds']} folds; MetaInf kept {', '.join(sorted(set(r['gates'])))}; "
              f"80 % interval coverage {cov:.3f}; all selectors fitted in {secs:.1f} s" if cov is not None else
              f"\n{s}: {r['folds']} folds; MetaInf kept {', '.join(sorted(set(r['gates'])))}")
    missing = [s for s in splits if s not in reports]
    for s in missing:
        p = os.path.join(out, f"{name}-{s}.err")
        if os.path.exists(p):
            print(f"\n{s}: not evaluated: {open(p).read().strip()}")
EOF
