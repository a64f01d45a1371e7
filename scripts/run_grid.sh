#!/usr/bin/env bash
# The label-efficiency grid behind benchmarks/results/label_efficiency.md, in priority order.
#
#   bash scripts/run_grid.sh [STAGE...]   # stages: linear lora lora-more prompt balance (default: all)
#
# One stream per dataset, the two in parallel (each simulate uses one torch thread, see --threads),
# each running the stages in order. Every command appends to one results.csv (locked while written)
# and skips the (configuration, seed) pairs already there, so the grid can be stopped and resumed.
# `bash scripts/run_grid.sh report` redraws the plots and summary.md after a stopped run.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/label_efficiency}
PY=${PY:-.venv/bin/python}
# LoRA on the last 2 of peal-mini's 6 blocks: the 4 frozen blocks run once per run instead of once
# per cycle, which is what makes LoRA affordable on this CPU (see the .md).
export PEAL_LORA_LAST_K=${PEAL_LORA_LAST_K:-2}
STRATEGIES=random,entropy,margin,featdist,coreset,badge,entropy+cal
read -r -a DATASETS <<< "${DATASETS:-pneumoniamnist retinamnist}"

sim() { nice -n 10 "$PY" -m peal_backend.cli simulate --backbone peal-mini --cycles 10 --out "$OUT" "$@"; }

stage_linear() {     # linear probe, every strategy, 5 seeds
  sim --data "$1" --adapter linear --strategy "$STRATEGIES" --seeds 5
}
stage_lora() {       # PEAL's and C-PEAL's core comparison first: LoRA with random, entropy, entropy + calibration
  for seeds in 3 5; do sim --data "$1" --adapter lora --strategy random,entropy,entropy+cal --seeds $seeds; done
}
stage_lora_more() {  # the other strategies
  for seeds in 3 5; do sim --data "$1" --adapter lora --strategy "$STRATEGIES" --seeds $seeds; done
}
stage_prompt() {
  sim --data "$1" --adapter prompt --strategy "$STRATEGIES" --seeds 5
}
stage_balance() {    # class balancing for the two best variants: BEST="adapter/strategy ...", chosen from the results above
  for best in ${BEST:-linear/margin linear/entropy+cal}; do
    sim --data "$1" --adapter "${best%%/*}" --strategy "${best#*/}+bal" --seeds 5
  done
}
report() {
  "$PY" -c "import sys; from pathlib import Path; from peal_backend import simulate as s; o = Path(sys.argv[1]); \
rows = s.read_results(o / 'results.csv'); s.plot_results(rows, o); (o / 'summary.md').write_text(s.summary_markdown(rows))" "$OUT"
  # the report page quotes summary.md between its two marker comments
  "$PY" -c "import re, sys; from pathlib import Path; page = Path(sys.argv[1]); summary = Path(sys.argv[2]).read_text(); text = page.read_text(); a = re.search(r'<!-- summary.md begins[^\n]*-->\n', text); b = text.index('<!-- summary.md ends -->'); page.write_text(text[:a.end()] + summary.rstrip() + '\n' + text[b:])" "$OUT.md" "$OUT/summary.md"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(linear lora lora-more prompt balance)
if [ "${stages[*]}" = report ]; then report; exit; fi
for d in "${DATASETS[@]}"; do
  (
    for s in "${stages[@]}"; do
      echo "== $d: stage $s ($(date +%H:%M:%S))"
      "stage_${s//-/_}" "$d"
    done
  ) &
done
wait
report
