"""Does `mislabeling` catch planted wrong labels? And what does a near-duplicate score?

    python -m benchmarks.mislabeling [--seeds 10] [--labeled 400] [--out benchmarks/results/mislabeling.md]

For PneumoniaMNIST, RetinaMNIST and Fashion-MNIST (a seeded 2,000-image train subsample each): per seed,
`--labeled` images drawn at random are the labeled set, 10 % of their labels flipped to another class
at random, the rest the pool; then the backend's cycle (`simulate.simulated_cycle` -> `cycle.run_cycle`,
what the training job runs; peal-mini, linear adapter: the score uses frozen features whatever the
adapter) gives each label its `mislabeling` score. Reported: the share of flipped labels among the
top 10 % scored, divided by the base rate (10 %), and the ROC AUC of the score for "flipped", with
- a reference we did not write: scikit-learn's `cross_val_predict` (StratifiedKFold(5), `StandardScaler`
  + `LogisticRegression()`) on the same features, with the same confident-learning score;
- cleanlab 2.9's `get_label_quality_scores` on those scikit-learn probabilities (self-confidence and
  threshold-adjusted normalized margin), when `cleanlab` is importable (it is not a dependency:
  `pip install cleanlab==2.9.0` to include it).
Then the cost of `mislabeling_scores` at 3,000 labels, and near-duplicates: the similarity
(`quality.whitened_rows`) of re-encoded, shifted and resized copies of 20 images each to their original,
against the most similar other image of 1,000 originals.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from peal_backend import quality
from peal_backend import simulate as sim
from peal_backend.backbone import build_classifier, input_size, load_backbone
from peal_backend.config import Settings
from peal_backend.cycle import ImageSet, score_images

DATASETS = ("pneumoniamnist", "retinamnist", "fashion-mnist")
TRAIN = 2000
FLIP = 0.10


def flip_labels(labels: np.ndarray, n_classes: int, fraction: float, rng: np.random.Generator):
    flipped = rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, size=len(flipped))) % n_classes
    return noisy, flipped


def top_ratio(scores: np.ndarray, flipped: np.ndarray, fraction: float = 0.1) -> float:
    k = max(1, int(round(fraction * len(scores))))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(np.isin(top, flipped).mean() / (len(flipped) / len(scores)))


def auroc(scores: np.ndarray, flipped: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    y = np.zeros(len(scores), bool)
    y[flipped] = True
    return float(roc_auc_score(y, scores))


def frozen_features(prep: sim.Prepared, settings: Settings, idx: np.ndarray) -> np.ndarray:
    """The labeled items' frozen features, as run_cycle gets them (the linear probe through the cache)."""
    probe = build_classifier(settings.replace(adapter="linear"), prep.data.n_classes)
    return score_images(probe, settings, prep.images("train", idx), prep.cache_dir).embeddings


def references(x: np.ndarray, noisy: np.ndarray, n_classes: int, seed: int) -> dict[str, np.ndarray]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probs = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), x, noisy, cv=folds,
                              method="predict_proba")
    out = {"scikit-learn cross_val_predict + same score": quality.self_confidence_scores(probs, noisy)}
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        return out
    out["cleanlab self_confidence"] = 1 - get_label_quality_scores(noisy, probs, method="self_confidence")
    out["cleanlab normalized_margin (adjusted)"] = 1 - get_label_quality_scores(
        noisy, probs, method="normalized_margin", adjust_pred_probs=True)
    return out


def detection(name: str, settings: Settings, seeds: int, n_labeled: int, cache: Path) -> tuple[list[str], dict]:
    data = sim.load_dataset(name, TRAIN, 10)
    prep = sim.prepare(data, settings, cache)
    truth = data.train_labels.copy()
    ratios: dict[str, list[float]] = {}
    aucs: dict[str, list[float]] = {}
    seconds = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        labeled = rng.choice(len(truth), n_labeled, replace=False)
        noisy, flipped = flip_labels(truth[labeled], data.n_classes, FLIP, rng)
        labels = truth.copy()
        labels[labeled] = noisy
        seeded = dataclasses.replace(prep, data=dataclasses.replace(data, train_labels=labels))
        result = sim.simulated_cycle(seeded, settings.replace(seed=seed), labeled)
        seconds.append(result.metrics["mislabeling_seconds"])
        probs = result.mislabeling.probs
        scores = {"backend (run_cycle)": result.mislabeling.scores,
                  "backend's probabilities, threshold-adjusted margin (the score before)":
                  quality.adjusted_margin_scores(probs, noisy, quality.confident_thresholds(probs, noisy, data.n_classes))}
        scores.update(references(frozen_features(prep, settings, labeled), noisy, data.n_classes, seed))
        for method, s in scores.items():
            ratios.setdefault(method, []).append(top_ratio(s, flipped))
            aucs.setdefault(method, []).append(auroc(s, flipped))
        print(f"{name} seed {seed}: " + ", ".join(f"{m} {ratios[m][-1]:.1f}x" for m in scores), flush=True)
    rows = [f"| {name} | {method} | {np.mean(r):.2f}x | {np.min(r):.1f}x - {np.max(r):.1f}x | {np.mean(aucs[method]):.3f} |"
            for method, r in ratios.items()]
    return rows, {"seconds": float(np.median(seconds)), "classes": data.n_classes}


def cost(settings: Settings, cache: Path, n: int = 3000) -> str:
    data = sim.load_dataset("fashion-mnist", n, 10)
    prep = sim.prepare(data, settings, cache)
    x = frozen_features(prep, settings, np.arange(n))
    started = time.perf_counter()
    quality.mislabeling_scores(x, data.train_labels, data.n_classes)
    mis = time.perf_counter() - started
    started = time.perf_counter()
    quality.near_duplicates(x, range(n), settings.duplicate_similarity)
    dup = time.perf_counter() - started
    return (f"At {n:,} labels (Fashion-MNIST, 10 classes, {x.shape[1]} features, 1 torch thread): `mislabeling_scores` "
            f"{mis:.1f} s (five head fits), `near_duplicates` over the {n:,} {dup:.2f} s.")


def copies(image: np.ndarray) -> dict[str, np.ndarray]:
    pil = Image.fromarray(image)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=85)
    return {"JPEG re-encoded (q=85)": np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(pil.mode)),
            "resized to 2x": np.asarray(pil.resize((image.shape[1] * 2, image.shape[0] * 2), Image.BICUBIC)),
            "shifted 1 px": np.roll(image, 1, axis=1)}


def duplicates(name: str, settings: Settings, threshold: float) -> list[str]:
    data = sim.load_dataset(name, 1000, 10)
    originals = list(data.train_images)
    kinds: dict[str, list[np.ndarray]] = {}
    for im in originals[:20]:
        for kind, c in copies(np.asarray(im)).items():
            kinds.setdefault(kind, []).append(c)
    images = originals + [c for cs in kinds.values() for c in cs]
    pixels = sim.pixels_of(images, input_size(settings, load_backbone(settings.backbone).config))
    probe = build_classifier(settings.replace(adapter="linear"), data.n_classes)
    e = score_images(probe, settings, ImageSet.from_tensor([sim.image_hash(i) for i in images], pixels), None).embeddings
    u = quality.whitened_rows(e)
    n = len(originals)
    sims = u[:n] @ u[:n].T
    np.fill_diagonal(sims, -2)
    nearest = sims.max(axis=1)
    rows = [f"| {name} | nearest other original (of {n}) | {np.median(nearest):.3f} | {np.percentile(nearest, 99):.3f} | "
            f"{np.mean(nearest >= threshold):.1%} |"]
    for k, kind in enumerate(kinds):
        s = np.array([float(u[i] @ u[n + 20 * k + i]) for i in range(20)])
        rows.append(f"| {name} | {kind} copy to its original | {np.median(s):.3f} | min {s.min():.3f} | {np.mean(s >= threshold):.0%} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--labeled", type=int, default=400)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--parts", type=Path, default=None,
                   help="write this run's rows to PARTS/<dataset>.json only (run datasets in parallel, then --combine)")
    p.add_argument("--combine", type=Path, default=None, help="assemble --out from the .json parts in this folder")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mislabeling.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    settings = Settings(backbone="peal-mini", adapter="linear", strategy="margin", mislabeling=True,
                        duplicate_similarity=0.98)
    if args.combine:
        parts = [json.loads((args.combine / f"{n}.json").read_text()) for n in DATASETS
                 if (args.combine / f"{n}.json").exists()]
    else:
        parts = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.datasets.split(","):
                rows, info = detection(name, settings, args.seeds, args.labeled, Path(tmp) / name)
                part = {"name": name, "rows": rows, "seconds": info["seconds"], "seeds": args.seeds, "labeled": args.labeled,
                        "duplicates": duplicates(name, settings, settings.duplicate_similarity)}
                if name == "fashion-mnist":
                    part["cost"] = cost(settings, Path(tmp) / "cost")
                parts.append(part)
                if args.parts:
                    args.parts.mkdir(parents=True, exist_ok=True)
                    (args.parts / f"{name}.json").write_text(json.dumps(part))
        if args.parts:
            return
    text = report(parts, settings)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def report(parts: list[dict], settings: Settings) -> str:
    try:
        import cleanlab
        cleanlab_note = f"cleanlab {cleanlab.__version__} was importable."
    except ImportError:
        cleanlab_note = "cleanlab was not importable: its rows are absent."
    seeds, labeled = parts[0]["seeds"], parts[0]["labeled"]
    table = ["| dataset | method | top-10 % precision / base rate (mean) | range over seeds | ROC AUC |", "|---|---|---|---|---|"]
    dup_rows = ["| dataset | pair | median similarity | 99th percentile / min | at or above the threshold |", "|---|---|---|---|---|"]
    for part in parts:
        table += part["rows"]
        dup_rows += part["duplicates"]
    seconds = ", ".join(f"{part['name']} {part['seconds']:.2f} s" for part in parts)
    cost_line = " ".join(part["cost"] for part in parts if "cost" in part)
    return "\n".join([
        "# Mislabeling: planted wrong labels", "",
        f"Command: `python -m benchmarks.mislabeling --seeds {seeds} --labeled {labeled}` "
        f"(peal-mini features, {labeled} labeled items of a {TRAIN:,}-image train subsample, {FLIP:.0%} of their "
        f"labels flipped to another class at random, {seeds} seeds; {cleanlab_note} Datasets may run as parallel "
        "processes with `--datasets NAME --parts DIR`, then `--combine DIR`.)", "",
        "The backend's `mislabeling` (self-confidence: 1 - the probability of the given label from 5-fold "
        "out-of-sample fits of its own head, `peal_backend/quality.py`) through `cycle.run_cycle`; the "
        "threshold-adjusted margin of confident learning on the same probabilities (the backend's score before "
        "this run); scikit-learn's `cross_val_predict` with the same score; cleanlab's scores on scikit-learn's "
        "probabilities (cleanlab 2.9.0 installed beside the venv for this run, not a dependency). 1.0x is chance: "
        "the share of flipped labels among the 10 % highest scores divided by the 10 % base rate.", "",
        *table, "",
        f"Time of `mislabeling_scores` inside the cycle at {labeled} labels (median over seeds, on the shared 2-core "
        f"machine while other work ran): {seconds}. " + cost_line, "",
        "## Near-duplicates: what a copy scores", "",
        f"Cosine similarity of whitened peal-mini embeddings (`quality.whitened_rows`, {quality.WHITEN_COMPONENTS} "
        f"directions), 1,000 originals of each set and copies of 20 of them; threshold "
        f"`PEAL_DUPLICATE_SIMILARITY={settings.duplicate_similarity}`. The last column is the share of originals whose "
        "nearest other original is at or above it (some may be real duplicates), or of copies found.", "",
        *dup_rows, ""])


if __name__ == "__main__":
    main()
