"""The grid report's paired comparisons: the pairs that ran, at a quarter, half and all of the labels."""
from __future__ import annotations

import csv

from benchmarks.queue_order_report import comparisons, load, table


def test_comparisons_pair_seeds_and_skip_pairs_that_did_not_run(tmp_path):
    (tmp_path / "toy").mkdir()
    with open(tmp_path / "toy" / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["dataset", "config", "seed", "labels", "accuracy"])
        w.writeheader()
        for seed in range(4):
            for labels in (2, 4, 6, 8):
                base = 0.5 + 0.01 * seed + 0.02 * labels
                w.writerow({"dataset": "toy", "config": "linear/random", "seed": seed, "labels": labels, "accuracy": base})
                # auto is 0.1 ahead on every seed at 6 labels and after, level before
                w.writerow({"dataset": "toy", "config": "linear/auto", "seed": seed, "labels": labels,
                            "accuracy": base + (0.1 if labels >= 6 else 0.0)})
    text = comparisons(table(load(tmp_path)))
    rows = [line for line in text.splitlines() if line.startswith("| toy")]
    assert rows == ["| toy | linear/auto − linear/random | 4 | @4 +0.000 ± 0.000 | @6 +0.100 ± 0.000 | @8 +0.100 ± 0.000 |"]
