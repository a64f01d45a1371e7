#!/usr/bin/env python
"""Linear-probe transfer report: shipped backbones vs a randomly initialised twin vs raw pixels.

For each dataset (RetinaMNIST and PneumoniaMNIST from the shared folder, Fashion-MNIST from Debian's
package: its test split, labels drawn from a fixed 10,000-image subset of its train split), label
budget and seed: draw that many labelled train images (one per class first, so every class is
present, then at random), fit logistic regression on standardised frozen features, report test
accuracy as mean ± std over the seeds, and each backbone's paired difference (same draws) to pixels
and to the random twin, with a 95 % t interval. Features are the CLS token concatenated with the mean patch
token, computed on ImageNet-normalised inputs resized to the backbone's image_size, as the backend
feeds them; "pixels" is that same normalised input, flattened; "random init" is a randomly
initialised model shaped as the first backbone. With --stats, a reference column "intensity stats" probes the
9 global intensity statistics of that input (peal_backend.backbones.image_stats: per-channel mean, std and
central mean), to show how much of a set's signal is global colour and brightness.

    python scripts/transfer_probe.py                                   # peal-mini-4 and peal-mini-3
    python scripts/transfer_probe.py --backbone /tmp/ckpt --out report.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import queue_order_report  # noqa: E402
from peal_backend.backbone import resolve_backbone  # noqa: E402
from peal_backend.backbones import cls_mean_features, image_stats, to_pixel_values  # noqa: E402
from peal_backend.simulate import load_dataset  # noqa: E402

DATASETS = ("retinamnist", "pneumoniamnist", "fashion-mnist")
TRAIN_LIMIT = {"fashion-mnist": 10_000}  # the pool labels are drawn from; the test split is whole
BUDGETS = (20, 50, 200)  # None: all train labels
DEFAULT_BACKBONES = ("peal-mini-4", "peal-mini-3")
REFERENCES = ("random init", "pixels", "intensity stats")  # the columns that are not backbones


def draw_labelled(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of n labelled train images: one per class, then uniformly at random without replacement."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    first = np.array([rng.choice(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    rest = rng.permutation(np.setdiff1d(np.arange(len(labels)), first))[: n - len(first)]
    return np.concatenate([first, rest])


def probe_accuracy(train_x, train_y, test_x, test_y, C: float = 1.0) -> float:
    """Test accuracy of logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def feature_sets(backbones: list[str], images: np.ndarray, stats: bool = False) -> dict[str, np.ndarray]:
    import torch
    from transformers import Dinov2Model

    feats, first = {}, None
    for spec in backbones:
        model = Dinov2Model.from_pretrained(resolve_backbone(spec), dtype=torch.float32)  # a shipped name or a folder
        first = first or model
        feats[Path(spec).name if Path(spec).name not in feats else spec] = cls_mean_features(model, images)
    torch.manual_seed(0)
    twin = Dinov2Model(first.config)  # same shape as the first, random initialisation
    feats["random init"] = cls_mean_features(twin, images)
    pixels = to_pixel_values(images, int(first.config.image_size))
    feats["pixels"] = pixels.flatten(1).numpy()
    if stats:
        feats["intensity stats"] = image_stats(pixels).numpy()
    return feats


def run(backbones: list[str], seeds: int, C: float, budgets=BUDGETS, datasets=DATASETS,
        stats: bool = False) -> list[dict]:
    rows = []
    for name in datasets:
        data = load_dataset(name, limit_train=TRAIN_LIMIT.get(name, 0))
        tr_x, tr_y = np.asarray(data.train_images), np.asarray(data.train_labels).ravel()
        te_x, te_y = np.asarray(data.test_images), np.asarray(data.test_labels).ravel()
        feats = feature_sets(backbones, np.concatenate([tr_x, te_x]), stats)
        for budget in budgets:
            for method, f in feats.items():
                ftr, fte = f[: len(tr_x)], f[len(tr_x):]
                accs = [probe_accuracy(ftr[idx], tr_y[idx], fte, te_y, C)
                        for idx in (draw_labelled(tr_y, budget, s) for s in range(seeds))]
                rows.append({"dataset": name, "labels": budget or len(tr_y), "method": method,
                             "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs})
    return rows


def paired(a: list[float], b: list[float]) -> str:
    """Mean of the per-draw differences a - b (same labelled draws, in seed order) with a 95 % t interval."""
    mean, half, _ = queue_order_report.paired(dict(enumerate(a)), dict(enumerate(b)))
    return f"{mean:+.3f} ± {half:.3f}"


def markdown(rows: list[dict]) -> str:
    """Mean ± std per method, then each backbone's paired difference to pixels and to the random twin, and the
    first backbone's to each other backbone."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    backbones = [m for m in methods if m not in REFERENCES]
    deltas = ([(b, ref) for b in backbones for ref in ("pixels", "random init")]
              + [(backbones[0], b) for b in backbones[1:]])  # the first backbone against each other one
    out = ["| dataset | labels | " + " | ".join(methods) + " | "
           + " | ".join(f"{b} − {ref}" for b, ref in deltas) + " |",
           "|---|---:|" + "---:|" * (len(methods) + len(deltas))]
    for (ds, n) in dict.fromkeys((r["dataset"], r["labels"]) for r in rows):
        cells = {r["method"]: r for r in rows if r["dataset"] == ds and r["labels"] == n}
        best = max(c["mean"] for c in cells.values())
        fmt = [("**%.3f ± %.3f**" if cells[m]["mean"] == best else "%.3f ± %.3f") % (cells[m]["mean"], cells[m]["std"])
               for m in methods]
        fmt += [paired(cells[b]["accs"], cells[ref]["accs"]) for b, ref in deltas]
        out.append(f"| {ds} | {n} | " + " | ".join(fmt) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append",
                    help="a shipped backbone's name or a save_pretrained folder; repeat to compare several "
                         f"(default: {', '.join(DEFAULT_BACKBONES)})")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stats", action="store_true",
                    help="add the reference column 'intensity stats' (9 global colour and brightness statistics)")
    ap.add_argument("--budgets", default="20,50,200", help="label budgets, comma-separated; all = every train label")
    ap.add_argument("--out", default="", help="also write the markdown table here, and each draw's accuracy as "
                                              "JSON beside it (the same name, .json)")
    args = ap.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    # BLAS threads too: on a busy machine, OpenBLAS spinning on more threads than it has cores made
    # each logistic regression on pixels 12x slower (5.1 s against 0.41 s, side by side)
    threadpool_limits(args.threads)
    t0 = time.time()
    budgets = tuple(None if b == "all" else int(b) for b in args.budgets.split(","))
    rows = run(args.backbone or list(DEFAULT_BACKBONES), args.seeds, args.C, budgets,
               tuple(args.datasets.split(",")), args.stats)
    table = markdown(rows)
    print(table)
    print(f"\n({time.time() - t0:.0f}s; test accuracy, mean ± std over {args.seeds} seeds, "
          f"logistic regression C={args.C} on standardised features)")
    if args.out:  # the table, and beside it every draw's accuracy (for paired comparisons between backbones)
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
