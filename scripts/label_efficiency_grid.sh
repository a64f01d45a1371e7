#!/usr/bin/env bash
# The label-efficiency grid behind BENCHMARKS.md's "Queue order" section (benchmarks/results/queue_order).
#
#   bash scripts/label_efficiency_grid.sh [STAGE...]   # stages: linear new lora clusters (default: all); report
#
# Every run is the backend's own cycle (peal_backend.cycle.run_cycle) from zero labels, budget = one label
# per class per retrain, 20 retrains (20 labels per class at the end). Each command appends to one
# results.csv per dataset folder and skips the (configuration, seed) pairs already there, so the grid can
# be stopped and resumed. Two streams run in parallel (one torch thread each).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/queue_order}
PY=${PY:-.venv/bin/python}
export PEAL_LORA_LAST_K=${PEAL_LORA_LAST_K:-2}   # LoRA on the last 2 of peal-mini's 6 blocks (frozen prefix cached)
export PEAL_CLUSTERS=${PEAL_CLUSTERS:--1}        # Label Studio's cluster rule off unless a stage turns it on
CORE=auto,random,typiclust,margin,entropy,badge,coreset

sim() {  # dataset, then simulate flags
  local data=$1; shift
  local extra=()
  [ "$data" = fashion-mnist ] && extra=(--limit-train 20000 --limit-test 2000)
  nice -n 10 "$PY" -m peal_backend.cli simulate --backbone peal-mini --data "$data" --cycles 20 --threads 1 --quiet \
    --out "$OUT/$data" "${extra[@]}" "$@"
}
stage_linear()   { sim "$1" --adapter linear --strategy "$CORE" --seeds 10; }
stage_new()      { sim "$1" --adapter linear --strategy probcover,dropquery,featdist,entropy+cal,margin+bal --seeds 10; }
stage_lora()     { sim "$1" --adapter lora --strategy auto,random,margin --seeds 5; }
stage_clusters() { PEAL_CLUSTERS=0 OUT="$OUT-clusters" sim "$1" --adapter linear --strategy auto,random --seeds 10; }

run_stream() { for data in "$@"; do for st in "${STAGES[@]}"; do "stage_$st" "$data"; done; done; }

if [ "${1:-}" = report ]; then
  "$PY" -m benchmarks.queue_order_report "$OUT"
  exit
fi
STAGES=("${@:-linear new lora clusters}")
read -r -a STAGES <<< "${STAGES[*]}"
run_stream pneumoniamnist retinamnist &
run_stream fashion-mnist &
wait
