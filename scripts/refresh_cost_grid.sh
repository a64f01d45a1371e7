#!/usr/bin/env bash
# The simulations behind BENCHMARKS.md "Head refreshes between adapter trainings": PEAL_ADAPT_GROWTH=0
# (LoRA trains every cycle) vs 0.25 and 0.5 (the head alone is solved again until the labels have grown by
# that fraction since LoRA last trained), LoRA on the last 2 blocks, `auto`, on PneumoniaMNIST and
# RetinaMNIST to 100 labels, 6 seeds. Resumable: each run appends to its folder's results.csv and skips
# the (configuration, seed) pairs done. DATA=name limits it to one dataset (to run two in parallel).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/refresh_cost}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-6}
export PEAL_CLUSTERS=-1 PEAL_LORA_LAST_K=2
sim() {  # dataset, budget, cycles, growth
  PEAL_ADAPT_GROWTH=$4 nice -n 15 "$PY" -m peal_backend.cli simulate --backbone peal-mini --data "$1" --adapter lora \
    --strategy auto --budget "$2" --cycles "$3" --seeds "$SEEDS" --threads 1 --quiet --out "$OUT/$1"
}
for data in ${DATA:-pneumoniamnist retinamnist}; do
  case $data in pneumoniamnist) budget=4 cycles=25 ;; retinamnist) budget=5 cycles=20 ;; esac
  for growth in 0 0.25 0.5; do sim "$data" "$budget" "$cycles" "$growth"; done
done
"$PY" -m benchmarks.refresh_cost "$OUT" || true
