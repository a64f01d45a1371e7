"""Label quality: which given labels look wrong, and which tasks are near-duplicates (pure functions).

`mislabeling_scores` is confident learning (Northcutt et al. 2021, "Confident learning: estimating
uncertainty in dataset labels") on the backend's own head: each labeled item gets class probabilities
from a head that did not see it (K-fold cross-fitting of `training.fit_head` on the frozen backbone's
features), and a score in [0, 1]: its self-confidence, 1 - the probability of the given label (cleanlab's
"self_confidence" label quality). The threshold-adjusted margin of confident learning (each class's
threshold the mean probability its own items get) is kept for multiple choice; for single choice it
caught planted flips at 1.6x the base rate on RetinaMNIST against 3.6x for self-confidence
(benchmarks/mislabeling.py), and no better on PneumoniaMNIST.

`near_duplicates` lists, for each item, the other items whose whitened, L2-normalised embeddings have
an inner product of at least a similarity threshold (faiss range search).

These are what the training job writes into Label Studio's `mislabeling` and `neighbors` prediction
fields for labeled tasks (README, "Review labels in the Data Manager").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .training import fit_head, probabilities

log = logging.getLogger(__name__)

WHITEN_COMPONENTS = 32  # directions kept by `whitened_rows` (measured: benchmarks/mislabeling.py)
IDENTICAL = 0.99999  # raw-embedding cosine similarity taken as "the same image" in a small set
MIN_DIRECTIONS = 8  # fewer rows than twice this: too few to whiten; only (near-)identical embeddings count
MIN_PER_CLASS = 2  # a label is scored only if its class has another labeled item to learn it from


@dataclass
class Mislabeling:
    scores: np.ndarray  # (N,) in [0, 1], high = the given label is likely wrong; NaN = not scored
    probs: np.ndarray   # (N, C) out-of-sample probabilities (NaN rows where not scored)
    reason: str = ""    # why nothing (or not everything) was scored; empty when all were

    @property
    def scored(self) -> np.ndarray:
        return ~np.isnan(self.scores)


# --- the pieces -------------------------------------------------------------------------------------------

def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """(N,) fold id per item: each class's items are shuffled and dealt round-robin from a random start,
    so every fold holds about 1/folds of each class and a class with at least two items has one outside
    any fold."""
    labels = np.asarray(labels)
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        out[members] = (int(rng.integers(folds)) + np.arange(len(members))) % folds
    return out


def cross_fitted_probs(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: np.ndarray, *,
                       c: float = 1.0, multilabel: bool = False) -> np.ndarray:
    """(N, C) probabilities of each item from the head fitted on the other folds (softmax; sigmoid per
    class for multiple choice)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels))
    out = np.zeros((len(x), n_classes), dtype=np.float64)
    for f in np.unique(folds):
        held = torch.from_numpy(folds == f)
        weight, bias = fit_head(x[~held], y[~held], n_classes, multilabel=multilabel, c=c)
        logits = x[held].double() @ weight.double().T + bias.double()
        out[held.numpy()] = probabilities(logits, multilabel).numpy()
    return out


def confident_thresholds(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C,) per class, the mean probability of that class over the items labeled with it (confident
    learning's per-class threshold); NaN for a class with no item."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    return np.array([probs[labels == j, j].mean() if (labels == j).any() else np.nan for j in range(n_classes)])


def adjusted_margin_scores(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N,) in [0, 1]: (max_{j != y} (p_j - t_j) - (p_y - t_y) + 2) / 4. 0.5 is the confident-learning
    boundary: another class is exactly as far above its threshold as the given one is."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if probs.shape[1] < 2:
        raise ValueError("adjusted_margin_scores needs at least two classes")
    adjusted = probs - np.nan_to_num(np.asarray(thresholds, dtype=np.float64), nan=1.0)
    rows = np.arange(len(labels))
    given = adjusted[rows, labels]
    others = adjusted.copy()
    others[rows, labels] = -np.inf
    return np.clip((others.max(axis=1) - given + 2.0) / 4.0, 0.0, 1.0)


def self_confidence_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) in [0, 1]: 1 - the out-of-sample probability of the given label. Above 0.5, a head that never
    saw the label finds it less likely than not."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    return np.clip(1.0 - probs[np.arange(len(labels)), labels], 0.0, 1.0)


# --- the score ---------------------------------------------------------------------------------------------

def mislabeling_scores(features: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int = 5, c: float = 1.0,
                       seed: int = 0, multilabel: bool = False) -> Mislabeling:
    """How likely each given label is wrong, from out-of-sample predictions (module docstring).

    `labels`: class ids (N,), or a multi-hot (N, C) array with `multilabel`, where each choice is its
    own two-class problem (chosen / not chosen) and an item's score is its worst choice's.
    Items whose class has fewer than MIN_PER_CLASS labels are not scored (NaN): no held-out head could
    know their class. With fewer than two such classes nothing is scored; `reason` says why."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features {x.shape} and labels {y.shape}: expected (N, D) features and N labels")
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    n = len(x)
    if multilabel:
        return _multilabel(x, y, n_classes, folds=folds, c=c, seed=seed)
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be class ids in 0..{n_classes - 1}")
    counts = np.bincount(y, minlength=n_classes)
    usable = counts >= MIN_PER_CLASS
    keep = usable[y] if n else np.zeros(0, bool)
    scores = np.full(n, np.nan)
    probs = np.full((n, n_classes), np.nan)
    if usable.sum() < 2:
        return Mislabeling(scores, probs, f"needs two classes with at least {MIN_PER_CLASS} labels each "
                                          f"(labels per class: {counts.tolist()})")
    k = int(min(folds, counts[usable].max()))
    fold = stratified_folds(y[keep], k, seed)
    p = cross_fitted_probs(x[keep], y[keep], n_classes, fold, c=c)
    probs[keep] = p
    scores[keep] = self_confidence_scores(p, y[keep])
    skipped = int((~keep).sum())
    reason = "" if not skipped else (f"{skipped} labels not scored: their class has fewer than {MIN_PER_CLASS} labels")
    return Mislabeling(scores, probs, reason)


def _multilabel(x: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int, c: float, seed: int) -> Mislabeling:
    n = len(x)
    if y.ndim != 2 or y.shape[1] != n_classes:
        raise ValueError(f"multiple choice labels must be (N, {n_classes}) multi-hot, got {y.shape}")
    y = (y > 0.5).astype(np.int64)
    on = y.sum(axis=0)
    # a choice is judged only where both of its answers have MIN_PER_CLASS items
    judged = (on >= MIN_PER_CLASS) & (n - on >= MIN_PER_CLASS)
    scores = np.full(n, np.nan)
    probs = np.full((n, n_classes), np.nan)
    if not judged.any():
        return Mislabeling(scores, probs, f"no choice is both chosen and not chosen on {MIN_PER_CLASS}+ labeled items "
                                          f"(chosen per choice: {on.tolist()})")
    k = int(min(folds, max(MIN_PER_CLASS, n // MIN_PER_CLASS)))
    fold = stratified_folds(y.argmax(axis=1) * 2 + y.max(axis=1), k, seed)  # strata: first choice, or none
    p = cross_fitted_probs(x, y.astype(np.float32), n_classes, fold, c=c, multilabel=True)
    per_choice = np.full((n, n_classes), np.nan)
    for j in np.flatnonzero(judged):
        two = np.stack([1.0 - p[:, j], p[:, j]], axis=1)
        per_choice[:, j] = adjusted_margin_scores(two, y[:, j], confident_thresholds(two, y[:, j], 2))
    probs[:] = p
    scores[:] = np.nanmax(per_choice, axis=1)
    unjudged = int((~judged).sum())
    return Mislabeling(scores, probs, "" if not unjudged else f"{unjudged} choices not judged (too few items with or without them)")


# --- near-duplicates ---------------------------------------------------------------------------------------

def whitened_rows(embeddings: np.ndarray, components: int = WHITEN_COMPONENTS) -> np.ndarray:
    """Rows projected on their `components` main directions, each scaled to unit variance (PCA whitening),
    then to unit length, as float32 for faiss. Raw or merely centred backbone features put almost every
    image's nearest neighbour above 0.99 cosine similarity (peal-mini on PneumoniaMNIST: median 0.995),
    where a re-encoded copy also lands; whitened to 32 directions, the median nearest neighbour is at
    0.72 and re-encoded copies stay above 0.98 (benchmarks/mislabeling.py measures it)."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    # at most half as many directions as rows: whitened to nearly as many directions as there are rows,
    # every row is about equally far from every other (a simplex) and copies no longer stand out
    k = max(1, min(int(components), x.shape[0] // 2, x.shape[1]))
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    sv = sv[:k] / np.sqrt(max(len(x), 1))
    w = (x @ vt[:k].T) / np.where(sv > 1e-12, sv, 1.0)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return np.ascontiguousarray(w / np.where(norms > 1e-12, norms, 1.0), dtype=np.float32)


def near_duplicates(embeddings: np.ndarray, ids, similarity: float, *, max_neighbors: int = 10,
                    block: int = 4096) -> dict:
    """{id: [ids of its near-duplicates, most similar first]} for every item with at least one other item
    whose cosine similarity (`whitened_rows`) is at least `similarity`; at most `max_neighbors` each.
    Sets of fewer than 2 * MIN_DIRECTIONS items cannot be whitened usefully: there, only items whose raw
    embeddings are identical up to IDENTICAL count."""
    x = np.asarray(embeddings)
    ids = list(ids)
    if x.ndim != 2 or len(ids) != len(x):
        raise ValueError(f"embeddings {x.shape} and {len(ids)} ids: expected (N, D) embeddings and N ids")
    if not 0.0 < similarity <= 1.0:
        raise ValueError(f"similarity must be in (0, 1], got {similarity}")
    if len(x) < 2:
        return {}
    if len(x) < 2 * MIN_DIRECTIONS:  # in a few whitened directions unrelated rows align by chance
        raw = np.asarray(x, dtype=np.float64)
        u = np.ascontiguousarray(raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12), dtype=np.float32)
        similarity = max(similarity, IDENTICAL)
    else:
        u = whitened_rows(x)
    index = faiss.IndexFlatIP(u.shape[1])
    index.add(u)
    radius = float(np.nextafter(np.float32(similarity), np.float32(-1)))  # faiss keeps ip > radius
    radius = min(radius, 1.0 - 1e-4)  # exact duplicates score 1 up to float error
    out = {}
    at_mean = np.flatnonzero(np.linalg.norm(u, axis=1) == 0)  # rows equal to the mean: whitening cannot tell them
    for start in range(0, len(u), block):
        lims, sims, found = index.range_search(u[start:start + block], radius)
        for r in range(len(lims) - 1):
            i = start + r
            hit_sims, hits = sims[lims[r]:lims[r + 1]], found[lims[r]:lims[r + 1]]
            order = np.argsort(-hit_sims, kind="stable")
            others = [ids[int(j)] for j in hits[order] if int(j) != i][:max_neighbors]
            if others:
                out[ids[i]] = others
    for i in at_mean if len(at_mean) > 1 else ():  # identical to each other
        out[ids[i]] = [ids[int(j)] for j in at_mean if j != i][:max_neighbors]
    return out
