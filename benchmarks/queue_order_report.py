"""Report of the label-efficiency grid (scripts/label_efficiency_grid.sh): is the queue order worth it?

    python -m benchmarks.queue_order_report benchmarks/results/queue_order [--reference linear/random]

For every dataset folder under the given one (each with the simulator's results.csv): at each label
count, every configuration's mean accuracy and the mean of its *paired* per-seed difference to the
reference (same seed, same label count) with a 95 % confidence interval (Student t over seeds); the
labels each configuration needs to reach the reference's final mean accuracy, and that as a share of
the reference's labels. Writes report.md and one PNG per dataset (curves, and differences with their
CI) into the folder, and prints report.md.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from scipy import stats

REFERENCE = "linear/random"
MIN_SEEDS = 3  # configurations run on fewer seeds are not compared
MARK_START, MARK_END = "<!-- report:start -->", "<!-- report:end -->"


def load(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*/results.csv")):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def table(rows: list[dict]) -> dict[str, dict[str, dict[int, dict[int, float]]]]:
    """dataset -> config -> labels -> seed -> accuracy."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["dataset"], {}).setdefault(r["config"], {}).setdefault(int(r["labels"]), {})[int(r["seed"])] = \
            float(r["accuracy"])
    return out


def paired(mine: dict[int, float], ref: dict[int, float]) -> tuple[float, float, int]:
    """Mean paired difference over the seeds both have, and the half-width of its 95 % CI."""
    seeds = sorted(set(mine) & set(ref))
    d = np.array([mine[s] - ref[s] for s in seeds])
    if d.size < 2:
        return (float(d.mean()) if d.size else float("nan")), float("nan"), d.size
    half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return float(d.mean()), float(half), d.size


def labels_to_reach(curve: dict[int, dict[int, float]], target: float) -> int | None:
    for n in sorted(curve):
        if np.mean(list(curve[n].values())) >= target - 1e-9:
            return n
    return None


def report(folder: Path, reference: str = REFERENCE, data: dict | None = None) -> str:
    """The tables and plots; `data` is table(load(folder)) when the caller already has it."""
    data = table(load(folder)) if data is None else data
    lines = ["# Queue order: label efficiency against random sampling", "",
             f"Reference: `{reference}`. Δ = mean paired difference in test accuracy to the reference (same seed, same",
             "label count) ± the half-width of its 95 % CI over seeds; **bold** where the CI excludes 0. "
             "'labels to reach' = fewest labels at which the mean accuracy reaches the reference's final mean "
             "(share of the reference's final label count).", ""]
    for dataset, cfgs in sorted(data.items()):
        few = sorted(c for c, curve in cfgs.items() if max(len(v) for v in curve.values()) < MIN_SEEDS)
        cfgs = {c: curve for c, curve in cfgs.items() if c not in few}
        if reference not in cfgs:  # absent, or too few seeds yet
            continue
        ref = cfgs[reference]
        counts = sorted(ref)
        final = max(counts)
        target = float(np.mean(list(ref[final].values())))
        shown = [n for n in counts if n in (counts[0], counts[len(counts) // 4], counts[len(counts) // 2],
                                             counts[3 * len(counts) // 4], final)]
        lines += [f"## {dataset}", "",
                  f"{reference} ends at {target:.3f} with {final} labels ({len(ref[final])} seeds).", "",
                  "| config | seeds | " + " | ".join(f"acc @{n}" for n in shown) + " | "
                  + " | ".join(f"Δ @{n}" for n in shown) + " | worst Δ (upper CI) | labels to reach |",
                  "|" + "---|" * (3 + 2 * len(shown) + 1)]
        for name in sorted(cfgs, key=lambda c: (c != reference, c)):
            curve = cfgs[name]
            seeds = max(len(v) for v in curve.values())
            accs = [f"{np.mean(list(curve[n].values())):.3f}" if n in curve else "" for n in shown]
            deltas, worst = [], None
            for n in counts:
                if n not in curve:
                    continue
                m, h, k = paired(curve[n], ref[n])
                if worst is None or m + h < worst[0] + worst[1]:
                    worst = (m, h, n)
                if n in shown:
                    cell = f"{m:+.3f} ± {h:.3f}"
                    deltas.append(f"**{cell}**" if np.isfinite(h) and abs(m) > h else cell)
            reach = labels_to_reach(curve, target)
            reach_cell = f"{reach} ({reach / final:.0%})" if reach is not None else "not reached"
            worst_cell = "" if name == reference or worst is None else \
                f"{worst[0]:+.3f} (upper {worst[0] + worst[1]:+.3f}) @{worst[2]}"
            lines.append(f"| {name} | {seeds} | " + " | ".join(accs) + " | "
                         + " | ".join(deltas or [""] * len(shown)) + f" | {worst_cell} | {reach_cell} |")
        if few:
            lines += ["", f"Left out with fewer than {MIN_SEEDS} seeds (an early, stopped pass): " + ", ".join(f"`{c}`" for c in few) + "."]
        lines += ["", f"![{dataset}]({dataset}/queue_order_{dataset}.png)", ""]
        plot(dataset, cfgs, reference, folder / dataset / f"queue_order_{dataset}.png")
    return "\n".join(lines)


KEY = ("linear/auto", "lora/auto", "lora/random")  # drawn thick; the default's CI is shaded
RIGHT = KEY + ("linear/typiclust", "linear/margin", "linear/badge", "linear/auto:typiclust:margin:3.0")
SAME_AS_DEFAULT = "linear/auto:random:margin:3.0"  # the default's own spec: the same rows, not drawn twice


def plot(dataset: str, cfgs: dict, reference: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [c for c in sorted(cfgs, key=lambda c: (c != reference, c not in KEY, c)) if c != SAME_AS_DEFAULT]
    colours = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        curve = cfgs[name]
        x = sorted(curve)
        mean = [np.mean(list(curve[n].values())) for n in x]
        seeds = max(len(v) for v in curve.values())
        if name == reference:
            style = dict(color="k", ls="--", lw=1.8)
        elif name in KEY:
            style = dict(color={"linear/auto": "tab:blue", "lora/auto": "tab:purple", "lora/random": "tab:gray"}[name], lw=2.6)
        else:
            style = dict(color=colours((i + 4) % 20), lw=1.0, alpha=0.75)
        ax1.plot(x, mean, label=f"{name} ({seeds})", **style)
        if name == reference or name not in RIGHT:
            continue
        d = [paired(curve[n], cfgs[reference][n]) if n in cfgs[reference] else (np.nan, np.nan, 0) for n in x]
        m, h = np.array([a for a, _, _ in d]), np.array([b for _, b, _ in d])
        ax2.plot(x, m, label=name, **style)
        if name == "linear/auto":
            ax2.fill_between(x, m - h, m + h, color=style["color"], alpha=0.2, label="linear/auto 95 % CI")
    ax2.axhline(0, color="k", ls="--", lw=1)
    ax1.set(title=f"{dataset}: test accuracy (mean over seeds; seeds in brackets)", xlabel="labels", ylabel="accuracy")
    ax2.set(title=f"paired difference to {reference}", xlabel="labels", ylabel="Δ accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=6.5, ncol=2)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# pairs asked of every grid: the order within one adapter, and LoRA against the linear probe (PEAL's question)
COMPARISONS = (("linear/auto", "linear/random"), ("lora/auto", "lora/random"), ("lora/random", "linear/random"),
               ("lora/auto", "linear/auto"))


def comparisons(data: dict) -> str:
    """Paired differences of COMPARISONS' pairs, where both ran, at a quarter, half and all of the labels;
    `data` as table() gives it."""
    out = ["## Paired comparisons", "",
           "Mean paired difference (same seed, same label count) ± the half-width of its 95 % CI; n = seeds both ran.",
           "", "| dataset | comparison | n | Δ @¼ | Δ @½ | Δ final |", "|---|---|---|---|---|---|"]
    for dataset, cfgs in sorted(data.items()):
        for a, b in COMPARISONS:
            if a not in cfgs or b not in cfgs:
                continue
            counts = sorted(set(cfgs[a]) & set(cfgs[b]))
            cells, n = [], 0
            for count in (counts[len(counts) // 4], counts[len(counts) // 2], counts[-1]):
                mean, half, n = paired(cfgs[a][count], cfgs[b][count])
                cells.append(f"@{count} {mean:+.3f} ± {half:.3f}")
            out.append(f"| {dataset} | {a} − {b} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--reference", default=REFERENCE)
    args = p.parse_args()
    data = table(load(args.folder))
    text = report(args.folder, args.reference, data)
    (args.folder / "report.md").write_text(text + "\n\n" + comparisons(data) + "\n")
    # the section of BENCHMARKS.md that quotes these tables keeps them between markers, so they cannot drift
    page = args.folder.parent / f"{args.folder.name}.md"
    if page.exists() and MARK_START in page.read_text():
        body = page.read_text()
        head, rest = body.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1]
        tables = text.split("\n", 1)[1].replace("](", f"]({args.folder.name}/")
        page.write_text(head + MARK_START + "\n" + tables.strip() + "\n" + MARK_END + tail)
    print(text)


if __name__ == "__main__":
    main()
