#!/usr/bin/env python
"""Linear-probe transfer report: peal-mini vs a randomly initialised twin vs raw pixels.

For each shared dataset and label budget (20, 50, 200, all train labels) and 5 seeds: draw that many
labelled train images (one per class first, so every class is present, then at random), fit logistic
regression on standardised frozen features, report test accuracy as mean ± std over the seeds.
Features are the CLS token concatenated with the mean patch token, computed on ImageNet-normalised
inputs resized to the backbone's image_size, as the backend feeds them; "pixels" is that same
normalised input, flattened.

    python scripts/transfer_probe.py                       # prints the table
    python scripts/transfer_probe.py --backbone /tmp/ckpt --out report.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peal_backend.backbones import PEAL_MINI_DIR, cls_mean_features, to_pixel_values  # noqa: E402

SHARED = Path(os.environ.get("PEAL_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
DATASETS = ("retinamnist", "pneumoniamnist")
BUDGETS = (20, 50, 200, None)  # None: all train labels


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


def feature_sets(backbone: str | Path, images: np.ndarray) -> dict[str, np.ndarray]:
    import torch
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(backbone, dtype=torch.float32)
    torch.manual_seed(0)
    twin = Dinov2Model(model.config)  # same shape, random initialisation
    size = int(model.config.image_size)
    return {
        "peal-mini": cls_mean_features(model, images),
        "random init": cls_mean_features(twin, images),
        "pixels": to_pixel_values(images, size).flatten(1).numpy(),
    }


def run(backbone, seeds: int, C: float, budgets=BUDGETS) -> list[dict]:
    rows = []
    for name in DATASETS:
        with np.load(SHARED / f"{name}.npz") as d:
            tr_x, tr_y = d["train_images"], d["train_labels"].ravel()
            te_x, te_y = d["test_images"], d["test_labels"].ravel()
        feats = feature_sets(backbone, np.concatenate([tr_x, te_x]))
        for budget in budgets:
            for method, f in feats.items():
                ftr, fte = f[: len(tr_x)], f[len(tr_x):]
                accs = [probe_accuracy(ftr[idx], tr_y[idx], fte, te_y, C)
                        for idx in (draw_labelled(tr_y, budget, s) for s in range(seeds))]
                rows.append({"dataset": name, "labels": budget or len(tr_y), "method": method,
                             "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs})
    return rows


def markdown(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = ["| dataset | labels | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for (ds, n) in dict.fromkeys((r["dataset"], r["labels"]) for r in rows):
        cells = {r["method"]: r for r in rows if r["dataset"] == ds and r["labels"] == n}
        best = max(c["mean"] for c in cells.values())
        fmt = [("**%.3f ± %.3f**" if cells[m]["mean"] == best else "%.3f ± %.3f") % (cells[m]["mean"], cells[m]["std"])
               for m in methods]
        out.append(f"| {ds} | {n} | " + " | ".join(fmt) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=str(PEAL_MINI_DIR), help="folder saved with save_pretrained")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", default="20,50,200,all", help="label budgets, comma-separated; all = every train label")
    ap.add_argument("--out", default="", help="also write the markdown table here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    budgets = tuple(None if b == "all" else int(b) for b in args.budgets.split(","))
    table = markdown(run(args.backbone, args.seeds, args.C, budgets))
    print(table)
    print(f"\n({time.time() - t0:.0f}s; test accuracy, mean ± std over {args.seeds} seeds, "
          f"logistic regression C={args.C} on standardised features)")
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
