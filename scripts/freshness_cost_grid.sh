#!/usr/bin/env bash
# The simulations behind BENCHMARKS.md "What the freshness levers cost": LoRA on every block vs the last 2,
# and incremental cycles vs full retrains, on RetinaMNIST and PneumoniaMNIST, 5 seeds, 10 retrains.
# Resumable: each run appends to its folder's results.csv and skips the (configuration, seed) pairs done.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/freshness_cost}
PY=${PY:-.venv/bin/python}
export PEAL_CLUSTERS=-1
sim() {  # folder, dataset, then flags
  local folder=$1 data=$2; shift 2
  nice -n 10 "$PY" -m peal_backend.cli simulate --backbone peal-mini --data "$data" --adapter lora --strategy auto \
    --cycles 10 --seeds 5 --threads 1 --quiet --out "$OUT/$folder/$data" "$@"
}
for data in retinamnist pneumoniamnist; do
  PEAL_LORA_LAST_K=2 sim lastk "$data"
  PEAL_LORA_LAST_K=0 sim lastk "$data"
  PEAL_LORA_LAST_K=2 sim warm "$data" --warm-start
done
"$PY" -m benchmarks.freshness_cost "$OUT"
