"""The backend's linear probe against scikit-learn's LogisticRegression on the same frozen features.

    python -m benchmarks.head_fit [--seeds 5] [--per-class 1,2,5,10,20] [--out benchmarks/results/head_fit.md]

For PneumoniaMNIST, RetinaMNIST and Fashion-MNIST (a seeded 20k train subsample, 2k test): peal-mini's
features of every image, read through the backend's activation cache (`cycle.score_images`, float16 as
the backend stores them). For each labels-per-class count and seed, a labeled set drawn at random per
class; then
- the backend: `training.fit` of a linear-probe `Classifier` (what a training cycle runs), scored on the
  test split with the same head;
- the reference: `StandardScaler` fitted on the labeled features + `LogisticRegression()` (C=1, lbfgs).
Prints and writes a table of mean test accuracy and the largest per-seed difference.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from peal_backend import simulate as sim
from peal_backend.backbone import build_classifier
from peal_backend.config import Settings
from peal_backend.cycle import score_images
from peal_backend.training import fit

DATASETS = (("pneumoniamnist", 0, 0), ("retinamnist", 0, 0), ("fashion-mnist", 20000, 2000))


def features(name: str, limit_train: int, limit_test: int, settings: Settings, cache: Path):
    data = sim.load_dataset(name, limit_train, limit_test)
    prep = sim.prepare(data, settings, cache)
    probe = build_classifier(settings, data.n_classes)
    tr = score_images(probe, settings, prep.images("train"), str(cache)).embeddings
    te = score_images(probe, settings, prep.images("test"), str(cache)).embeddings
    return data, tr, te


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--per-class", default="1,2,5,10,20")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/head_fit.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    settings = Settings(backbone="peal-mini", adapter="linear")
    lines = ["| dataset | labels | backend linear probe | scikit-learn LogisticRegression | mean Δ | largest |Δ| of a seed | backend fit s |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, lt, le in DATASETS:
            data, tr, te = features(name, lt, le, settings, Path(tmp) / name)
            for per in (int(x) for x in args.per_class.split(",")):
                ours, ref, secs = [], [], []
                for seed in range(args.seeds):
                    rng = np.random.default_rng(seed)
                    idx = np.concatenate([rng.choice(np.flatnonzero(data.train_labels == c), per, replace=False)
                                          for c in range(data.n_classes)])
                    y = data.train_labels[idx]
                    clf = build_classifier(settings, data.n_classes)
                    t0 = time.perf_counter()
                    fit(clf, torch.zeros(0), torch.from_numpy(y), settings, features=torch.from_numpy(tr[idx]))
                    secs.append(time.perf_counter() - t0)
                    with torch.inference_mode():
                        pred = clf.head(torch.from_numpy(te)).argmax(1).numpy()
                    ours.append(float((pred == data.test_labels).mean()))
                    scaler = StandardScaler().fit(tr[idx])
                    lr = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(tr[idx]), y)
                    ref.append(float((lr.predict(scaler.transform(te)) == data.test_labels).mean()))
                d = np.array(ours) - np.array(ref)
                lines.append(f"| {name} | {per * data.n_classes} ({per}/class) | {np.mean(ours):.3f} | {np.mean(ref):.3f} | "
                             f"{d.mean():+.4f} | {np.abs(d).max():.4f} | {np.mean(secs):.3f} |")
                print(lines[-1], flush=True)
    text = ("# The linear head against scikit-learn's LogisticRegression\n\n"
            "The backend's head (`training.fit_head`: standardised features, L2 logistic regression solved with "
            "L-BFGS, scikit-learn's objective with C=1) against `StandardScaler` + `LogisticRegression()` on the "
            "same float16-cached peal-mini features, labeled sets drawn per class.\n\n"
            f"Command: `python -m benchmarks.head_fit --seeds {args.seeds} --per-class {args.per_class}` "
            f"(peal-mini features, test accuracy, mean over seeds)\n\n" + "\n".join(lines) + "\n")
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
