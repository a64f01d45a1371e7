#!/usr/bin/env bash
# The label-efficiency grid behind BENCHMARKS.md's "Queue order" section (benchmarks/results/queue_order).
#
#   bash scripts/label_efficiency_grid.sh [STAGE...]   # stages: linear lora clusters (default: all), core
#   BACKBONE=peal-mini-2 SERIAL=1 bash scripts/label_efficiency_grid.sh core lora   # another backbone, one stream
#   DATASETS="pneumoniamnist retinamnist" bash scripts/label_efficiency_grid.sh lora     # some sets, one stream
#   bash scripts/label_efficiency_grid.sh report       # tables and plots from what has run
#
# Every run is the backend's own cycle (peal_backend.cycle.run_cycle) from zero labels; the annotator
# takes what Label Studio would serve; one label per class per retrain, 20 retrains (20 labels per class
# at the end). Each command appends to one results.csv per dataset folder and skips the (configuration,
# seed) pairs already there, so the grid can be stopped and resumed. Two streams run in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKBONE=${BACKBONE:-peal-mini}
OUT=${OUT:-benchmarks/results/queue_order$([ "$BACKBONE" = peal-mini ] || echo "-$BACKBONE")}
PY=${PY:-.venv/bin/python}
export PEAL_LORA_LAST_K=${PEAL_LORA_LAST_K:-2}   # LoRA on the last 2 of peal-mini's 6 blocks (frozen prefix cached)
export PEAL_CLUSTERS=${PEAL_CLUSTERS:--1}        # Label Studio's cluster rule off unless a stage turns it on
# auto:COVERAGE:UNCERTAINTY:SWITCH variants (PEAL_AUTO_*), the default `auto`, and what they are made of
LINEAR=auto,auto:typiclust:margin:3,auto:random:margin:3,auto:probcover:margin:3,auto:typiclust:badge:1,auto:probcover:dropquery:2,random,typiclust,probcover,margin,entropy,badge,dropquery,coreset,featdist,entropy+cal,margin+bal

sim() {  # dataset, then simulate flags
  local data=$1; shift
  local extra=()
  [ "$data" = fashion-mnist ] && extra=(--limit-train 20000 --limit-test 2000)
  nice -n 10 "$PY" -m peal_backend.cli simulate --backbone "$BACKBONE" --data "$data" --cycles 20 --threads 1 --quiet \
    --out "$OUT/$data" "${extra[@]}" "$@"
}
# Fashion-MNIST's 20k pool makes a cycle ~10x dearer: the policy candidates and the classics only
FMNIST_LINEAR=auto,auto:typiclust:margin:3,auto:random:margin:3,random,typiclust,probcover,margin,badge
stage_linear()   { sim "$1" --adapter linear --strategy "$([ "$1" = fashion-mnist ] && echo "$FMNIST_LINEAR" || echo "$LINEAR")" --seeds 10; }
stage_core()     { sim "$1" --adapter linear --strategy auto,random --seeds 10; }  # the default policy vs random
stage_lora()     { sim "$1" --adapter lora --strategy auto,random --seeds 5; }
stage_clusters() { PEAL_CLUSTERS=0 OUT="$OUT-clusters" sim "$1" --adapter linear --strategy auto,random --seeds 10; }

if [ "${1:-}" = report ]; then
  for out in "$OUT" "$OUT-clusters"; do [ -d "$out" ] && "$PY" -m benchmarks.queue_order_report "$out" > /dev/null; done
  echo "wrote $OUT/report.md"
  exit
fi
read -r -a STAGES <<< "${*:-linear lora clusters}"
stream() { for st in "${STAGES[@]}"; do for data in "$@"; do "stage_$st" "$data"; done; done; }
if [ -n "${DATASETS:-}" ]; then  # these sets only, one stream: DATASETS="retinamnist" ... lora
  read -r -a SETS <<< "$DATASETS"
  stream "${SETS[@]}"
elif [ "${SERIAL:-0}" = 1 ]; then  # one stream (the other core busy): the two small sets first
  stream pneumoniamnist retinamnist fashion-mnist
else
  stream pneumoniamnist retinamnist &
  stream fashion-mnist &
  wait
fi
