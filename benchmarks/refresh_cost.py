"""What head refreshes between adapter trainings (PEAL_ADAPT_GROWTH) cost in label efficiency, from the
simulator (the backend's own cycle and plan): each growth against LoRA training every cycle, paired by
seed and label count, with 95 % CIs over seeds.

    bash scripts/refresh_cost_grid.sh            # runs the simulations (resumable), then this report
    python -m benchmarks.refresh_cost [FOLDER]    # the report alone (default benchmarks/results/refresh_cost)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import queue_order_report
from benchmarks.freshness_cost import report_main
from benchmarks.queue_order_report import paired

DEFAULT = Path("benchmarks/results/refresh_cost")


def growth(row: dict) -> float:
    return float(row.get("adapt_growth") or 0.0)


def curves(rows: list[dict]) -> dict[float, dict[int, dict[int, dict]]]:
    """growth -> labels -> seed -> row."""
    out: dict = {}
    for r in rows:
        out.setdefault(growth(r), {}).setdefault(int(r["labels"]), {})[int(r["seed"])] = r
    return out


def report(folder: Path) -> str:
    rows = queue_order_report.load(folder)
    lines = ["## Head refreshes between adapter trainings: what they cost in label efficiency", "",
             "The simulator (the backend's `run_cycle` and `refresh_plan`), peal-mini, LoRA r8 on the last 2 blocks, "
             "`auto` strategy. A = PEAL_ADAPT_GROWTH = g (the head alone is solved again until the labels have grown "
             "by g since LoRA last trained), B = 0 (LoRA trains every cycle). Δ = mean paired difference in test "
             "accuracy (same seed, same label count) ± the half-width of its 95 % CI over seeds; bold where the CI "
             "excludes 0. *Over the curve*: each seed's mean Δ over the label counts where A refreshed at least once "
             "so far, then the mean and CI of those over seeds.", "",
             "`bash scripts/refresh_cost_grid.sh`", "",
             "Budgets: PneumoniaMNIST 4 labels a cycle (25 cycles), RetinaMNIST 5 (20 cycles), from no label; the backend "
             "runs a cycle per label, so its refreshes are finer-grained than these. g = 0.5 is also the furthest a "
             "deferred LoRA training can fall behind under g = 0.25 (it gives way to new labels until the labels have "
             "grown by 2g). Seconds per cycle were measured beside other work (niced), so only their ratio means much.",
             ""]
    for dataset in sorted({r["dataset"] for r in rows}):
        by = curves([r for r in rows if r["dataset"] == dataset])
        base = by.get(0.0, {})
        for g in sorted(k for k in by if k > 0):
            a = by[g]
            counts = sorted(n for n in set(a) & set(base) if len(set(a[n]) & set(base[n])) >= 2)
            if not counts:
                continue
            lines += [f"### {dataset}: PEAL_ADAPT_GROWTH={g:g} - LoRA every cycle", "",
                      "| labels | seeds | head-only cycles in A | A | B | Δ (A - B) | s/cycle A | s/cycle B |",
                      "|---|---|---|---|---|---|---|---|"]
            since_refresh, per_seed = False, {}
            for n in counts:
                seeds = sorted(set(a[n]) & set(base[n]))
                acc_a = {s: float(a[n][s]["accuracy"]) for s in seeds}
                acc_b = {s: float(base[n][s]["accuracy"]) for s in seeds}
                d, half, k = paired(acc_a, acc_b)
                heads = sum(a[n][s].get("refresh") == "head" for s in seeds)
                since_refresh = since_refresh or heads > 0
                if since_refresh:
                    for s in seeds:
                        per_seed.setdefault(s, []).append(acc_a[s] - acc_b[s])
                bold = "**" if abs(d) > half else ""
                sec_a = np.mean([float(a[n][s]["train_seconds"]) for s in seeds])
                sec_b = np.mean([float(base[n][s]["train_seconds"]) for s in seeds])
                lines.append(f"| {n} | {k} | {heads}/{k} | {np.mean(list(acc_a.values())):.3f} | "
                             f"{np.mean(list(acc_b.values())):.3f} | {bold}{d:+.3f} ± {half:.3f}{bold} | "
                             f"{sec_a:.1f} | {sec_b:.1f} |")
            means = {s: float(np.mean(v)) for s, v in per_seed.items()}
            d, half, k = paired(means, {s: 0.0 for s in means})
            all_a = [float(a[n][s]["train_seconds"]) for n in counts for s in a[n]]
            all_b = [float(base[n][s]["train_seconds"]) for n in counts for s in base[n]]
            share = np.mean([a[n][s].get("refresh") == "head" for n in counts for s in a[n]])
            lines += ["", f"Over the curve (from the first refresh, {k} seeds): Δ {d:+.3f} ± {half:.3f}. "
                      f"Head-only cycles: {share:.0%}. Simulated cycle (train + score + rank): A {np.mean(all_a):.1f} s, "
                      f"B {np.mean(all_b):.1f} s ({np.mean(all_b) / np.mean(all_a):.1f}x).", ""]
    return "\n".join(lines)


def main() -> None:
    report_main(report, DEFAULT)


if __name__ == "__main__":
    main()
