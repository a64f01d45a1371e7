"""What the freshness levers cost in label efficiency, from the simulator (the backend's own cycle):
LoRA on the last 2 blocks vs every block, and incremental (warm-started) cycles vs full retrains.
Paired differences in test accuracy (same seed, same label count) with 95 % CIs over seeds.

    bash scripts/freshness_cost_grid.sh          # runs the simulations (resumable), then this report
    python -m benchmarks.freshness_cost [FOLDER]  # the report alone (default benchmarks/results/freshness_cost)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from benchmarks import queue_order_report
from benchmarks.queue_order_report import paired

DEFAULT = Path("benchmarks/results/freshness_cost")
# (name, rows of it, rows of what it is compared with)
COMPARISONS = (
    ("LoRA last 2 blocks - every block", lambda r: r["lora_last_k"] == "2" and r["warm_start"] == "False",
     lambda r: r["lora_last_k"] == "0" and r["warm_start"] == "False"),
    ("incremental (warm, full every 5) - full retrains", lambda r: r["lora_last_k"] == "2" and r["warm_start"] == "True",
     lambda r: r["lora_last_k"] == "2" and r["warm_start"] == "False"),
)


def load(folder: Path) -> list[dict]:
    """Every run under folder/<comparison>/<dataset>/results.csv."""
    return [r for sub in sorted(p for p in folder.iterdir() if p.is_dir()) for r in queue_order_report.load(sub)]


def curve(rows: list[dict]) -> dict[int, dict[int, tuple[float, float]]]:
    """labels -> seed -> (accuracy, seconds of the cycle)."""
    out: dict = {}
    for r in rows:
        out.setdefault(int(r["labels"]), {})[int(r["seed"])] = (float(r["accuracy"]), float(r["train_seconds"]))
    return out


def report(folder: Path) -> str:
    rows = load(folder)
    lines = ["## What the freshness levers cost in label efficiency", "",
             "The simulator (the backend's `run_cycle`), peal-mini, LoRA r8, `auto` strategy, one label per class per "
             "retrain, from zero labels. Δ = mean paired difference in test accuracy (same seed, same label count) ± "
             "the half-width of its 95 % CI; s/cycle = mean simulated cycle (train + score + rank) on the shared, "
             "busy 2-core CPU.", "",
             "`bash scripts/freshness_cost_grid.sh`", ""]
    for dataset in sorted({r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == dataset and r["config"] == "lora/auto"]
        for name, a_of, b_of in COMPARISONS:
            a, b = curve([r for r in mine if a_of(r)]), curve([r for r in mine if b_of(r)])
            counts = sorted(n for n in set(a) & set(b) if len(set(a[n]) & set(b[n])) >= 2)
            if not counts:
                continue
            lines += [f"### {dataset}: {name}", "", "| labels | seeds | A | B | Δ (A - B) |", "|---|---|---|---|---|"]
            for n in counts:
                acc_a = {s: v[0] for s, v in a[n].items()}
                acc_b = {s: v[0] for s, v in b[n].items()}
                d, half, k = paired(acc_a, acc_b)
                seeds = sorted(set(acc_a) & set(acc_b))
                bold = "**" if abs(d) > half else ""
                lines.append(f"| {n} | {k} | {np.mean([acc_a[s] for s in seeds]):.3f} | {np.mean([acc_b[s] for s in seeds]):.3f} | "
                             f"{bold}{d:+.3f} ± {half:.3f}{bold} |")
            over = [paired({s: v[0] for s, v in a[n].items()}, {s: v[0] for s, v in b[n].items()})[0] for n in counts]
            sec_a = np.mean([v[1] for n in counts for v in a[n].values()])
            sec_b = np.mean([v[1] for n in counts for v in b[n].values()])
            lines += ["", f"Mean Δ over the curve {np.mean(over):+.3f}; s/cycle A {sec_a:.1f}, B {sec_b:.1f} "
                      f"({sec_b / sec_a:.1f}x).", ""]
    return "\n".join(lines)


def report_main(report_of, default: Path) -> None:
    """A simulation report's command line: the folder given (or `default`), its report printed and
    written beside it as <folder>.md."""
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    text = report_of(folder)
    print(text)
    (folder.parent / f"{folder.name}.md").write_text(text + "\n")


def main() -> None:
    report_main(report, DEFAULT)


if __name__ == "__main__":
    main()
