#!/usr/bin/env bash
# The label-efficiency grid behind benchmarks/results/label_efficiency.md, in priority order.
#
#   bash scripts/run_grid.sh [STAGE...]      # stages: linear lora lora-more prompt balance (default: all)
#
# Every command appends to one results.csv and skips the (configuration, seed) pairs already there,
# so the grid can be stopped and resumed, stage by stage. On the 2-core CPU of the project machines
# a linear-probe cycle takes about a second, a LoRA cycle tens of seconds (see the .md for numbers).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/label_efficiency}
PY=${PY:-.venv/bin/python}
# LoRA on the last 2 of peal-mini's 6 blocks: the 4 frozen blocks run once per run instead of once
# per cycle, which is what makes LoRA affordable here (see the .md).
export PEAL_LORA_LAST_K=${PEAL_LORA_LAST_K:-2}
STRATEGIES=random,entropy,margin,featdist,coreset,badge,entropy+cal
DATASETS=(pneumoniamnist retinamnist)

sim() { nice -n 10 "$PY" -m peal_backend.cli simulate --backbone peal-mini --cycles 10 --out "$OUT" "$@"; }

stage_linear() {   # linear probe, every strategy, 5 seeds
  for d in "${DATASETS[@]}"; do sim --data "$d" --adapter linear --strategy "$STRATEGIES" --seeds 5; done
}
stage_lora() {     # PEAL's core comparison first: LoRA with random vs entropy, 3 seeds
  for d in "${DATASETS[@]}"; do sim --data "$d" --adapter lora --strategy random,entropy --seeds 3; done
}
stage_lora_more() {  # the other strategies, then seeds 3-4
  for d in "${DATASETS[@]}"; do sim --data "$d" --adapter lora --strategy "$STRATEGIES" --seeds 3; done
  for d in "${DATASETS[@]}"; do sim --data "$d" --adapter lora --strategy "$STRATEGIES" --seeds 5; done
}
stage_prompt() {
  for d in "${DATASETS[@]}"; do sim --data "$d" --adapter prompt --strategy "$STRATEGIES" --seeds 5; done
}
stage_balance() {  # class balancing for the two best variants (chosen from the results above)
  for d in "${DATASETS[@]}"; do sim --data "$d" --adapter lora --strategy "${BALANCED:-entropy+bal,badge+bal}" --seeds 5; done
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(linear lora lora-more prompt balance)
for s in "${stages[@]}"; do
  echo "== stage $s ($(date +%H:%M:%S))"
  "stage_${s//-/_}"
done
