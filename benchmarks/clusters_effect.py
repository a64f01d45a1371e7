"""Label Studio's cluster rule on or off: paired differences (same seed, same label count) between the
exploration runs with PEAL_CLUSTERS=0 and with PEAL_CLUSTERS=-1 (BENCHMARKS.md, queue order).

    python benchmarks/clusters_effect.py
"""
import numpy as np, sys
sys.path.insert(0, ".")
from benchmarks.queue_order_report import load, table, paired
from pathlib import Path
a, b = table(load(Path("benchmarks/results/queue_order_explore"))), table(load(Path("benchmarks/results/queue_order_explore_cl")))
for ds in ("pneumoniamnist", "retinamnist"):
    for cfg in ("linear/random", "linear/auto:random:badge:3.0", "linear/auto:typiclust:badge:3.0"):
        if cfg not in a[ds] or cfg not in b[ds]: continue
        counts = sorted(set(a[ds][cfg]) & set(b[ds][cfg]))
        d = [paired(b[ds][cfg][n], a[ds][cfg][n]) for n in counts]
        mean_over_curve = np.mean([m for m, _, _ in d])
        worst = min(d, key=lambda x: x[0] + x[1])
        best = max(d, key=lambda x: x[0] - x[1])
        print(ds, cfg, f"clusters - none: mean over curve {mean_over_curve:+.3f}; lowest upper CI {worst[0]+worst[1]:+.3f}; highest lower CI {best[0]-best[1]:+.3f}")
