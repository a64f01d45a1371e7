"""Acquisition: which unlabeled items to label next, and in what order.

Every strategy answers the same question with the same inputs (a `Pool`: probabilities, optional
embeddings, logits and linear head, labeled indices and their labels) and returns pool indices in
priority order.

- Uncertainty strategies (`random`, `entropy`, `margin`, `least_confidence`, `featdist`) give every
  unlabeled item a number; the order is that number, ties broken by a seeded random permutation.
- Batch strategies (`coreset`, `badge`, `typiclust`, `probcover`, `dropquery`) build a batch pick by
  pick; the order is the order of the picks.

`rank` returns the whole queue and `select` its first n (literally `rank(...)[:n]`: one ranking path),
`queue_scores` turns an order into the `score` Label Studio sorts by (lowest first), `class_balance`
is the PEAL / C-PEAL wrapper that works on top of any strategy's order, and `clusters` groups the pool
for Label Studio's cluster-first sampling. The maths lives in small pure functions (`entropy`,
`margin`, `least_confidence`, `featdist_scores`, `kcenter_greedy`, `badge_embeddings`, `kmeans_pp`,
`badge`, `typiclust`, `probcover_delta`, `max_coverage`, `probcover`, `dropout_disagreement`,
`dropquery`, `clusters`) so each can be tested and reused alone.

Memory stays linear in the pool size: distances are computed block by block (faiss for
many-to-many searches, BLAS for one-to-many) and greedy strategies keep one running vector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import faiss
import numpy as np
from threadpoolctl import threadpool_limits  # ships with scikit-learn

STRATEGIES: tuple[str, ...] = (
    "random", "entropy", "margin", "least_confidence", "featdist", "coreset", "badge", "typiclust",
    "probcover", "dropquery",
)
FEATDIST_SPACES = ("embeddings", "logits")
# Strategies that need no classifier: they rank by the pool's geometry (the frozen backbone's embeddings)
COVERAGE_STRATEGIES = ("typiclust", "probcover")

# Batch strategies place this many picks at the head of `rank`'s queue (rest by entropy): several
# cycles' worth at the default budget (one per class), while each pick costs a pass over the pool and
# `rank` on 100k items must stay at a few seconds (benchmarks/selection.py measures it).
RANK_HEAD = 100

_BLOCK = 65536  # rows per block in blocked distance computations (about 100 MB at width 384)


def _one_blas_thread():
    """Greedy loops do one memory-bound matrix-vector product per pick: extra BLAS threads add a
    wake-up and a sync per call and little bandwidth. Measured on the 2-core box: coreset on 10k items
    0.2 s with one thread against 0.7-1.9 s with two; equal at 1M."""
    return threadpool_limits(limits=1, user_api="blas")


def _empty_int() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Pool:
    """Model outputs for every item of a project (labeled and unlabeled), and what is labeled.

    probs: (N, C) class probabilities. embeddings: (N, D) backbone features or None.
    logits: (N, C) raw logits or None. labeled: indices into N of the labeled items.
    labels: class id of each labeled item, aligned with `labeled`.
    head_weight: (C, D) and head_bias: (C,), the linear head that reads `embeddings` (logits =
    embeddings @ head_weight.T + head_bias), or None; DropQuery re-classifies perturbed embeddings
    with it. A head needs embeddings; no bias with a weight means a zero bias.
    """

    probs: np.ndarray
    embeddings: np.ndarray | None = None
    logits: np.ndarray | None = None
    labeled: np.ndarray = field(default_factory=_empty_int)
    labels: np.ndarray = field(default_factory=_empty_int)
    head_weight: np.ndarray | None = None
    head_bias: np.ndarray | None = None

    def __post_init__(self):
        probs = np.asarray(self.probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] < 1:
            raise ValueError(f"Pool.probs must be a 2-D array (N items, C classes), got shape {probs.shape}")
        if not np.isfinite(probs).all():
            raise ValueError("Pool.probs contains NaN or infinite values")
        if probs.size and (probs.min() < -1e-6 or probs.max() > 1 + 1e-6):
            raise ValueError(f"Pool.probs must lie in [0, 1], got values in [{probs.min()}, {probs.max()}]")
        n, c = probs.shape
        object.__setattr__(self, "probs", np.clip(probs, 0.0, 1.0))

        if self.embeddings is not None:
            emb = np.ascontiguousarray(self.embeddings, dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] < 1:
                raise ValueError(f"Pool.embeddings must have shape (N={n}, D), got {emb.shape}")
            for s in range(0, n, _BLOCK):  # blockwise, so a 1M x 384 pool needs no 384 MB mask
                if not np.isfinite(emb[s:s + _BLOCK]).all():
                    raise ValueError("Pool.embeddings contains NaN or infinite values")
            object.__setattr__(self, "embeddings", emb)
        if self.logits is not None:
            logits = np.ascontiguousarray(self.logits, dtype=np.float32)
            if logits.shape != (n, c):
                raise ValueError(f"Pool.logits must have the shape of probs {(n, c)}, got {logits.shape}")
            if not np.isfinite(logits).all():
                raise ValueError("Pool.logits contains NaN or infinite values")
            object.__setattr__(self, "logits", logits)
        self._check_head(c)

        labeled = np.asarray(self.labeled).reshape(-1)
        labels = np.asarray(self.labels).reshape(-1)
        if labeled.size and not np.issubdtype(labeled.dtype, np.integer):
            raise ValueError(f"Pool.labeled must hold integer indices, got dtype {labeled.dtype}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"Pool.labels must hold integer class ids, got dtype {labels.dtype}")
        labeled, labels = labeled.astype(np.int64), labels.astype(np.int64)
        if labeled.shape != labels.shape:
            raise ValueError(f"Pool.labeled ({labeled.size}) and Pool.labels ({labels.size}) differ in length")
        if labeled.size:
            if labeled.min() < 0 or labeled.max() >= n:
                raise ValueError(f"Pool.labeled has indices outside [0, {n})")
            if np.unique(labeled).size != labeled.size:
                raise ValueError("Pool.labeled has duplicate indices")
            if labels.min() < 0 or labels.max() >= c:
                raise ValueError(f"Pool.labels has class ids outside [0, {c})")
        object.__setattr__(self, "labeled", labeled)
        object.__setattr__(self, "labels", labels)

    def _check_head(self, c: int):
        if self.head_weight is None:
            if self.head_bias is not None:
                raise ValueError("Pool.head_bias is set but Pool.head_weight is None")
            return
        if self.embeddings is None:
            raise ValueError("Pool.head_weight needs Pool.embeddings (the features the head reads), which is None")
        d = self.embeddings.shape[1]
        weight = np.ascontiguousarray(self.head_weight, dtype=np.float32)
        if weight.shape != (c, d):
            raise ValueError(f"Pool.head_weight must have shape (C={c}, D={d}) to match probs and embeddings, "
                             f"got {weight.shape}")
        bias = np.zeros(c, dtype=np.float32) if self.head_bias is None else \
            np.ascontiguousarray(self.head_bias, dtype=np.float32)
        if bias.shape != (c,):
            raise ValueError(f"Pool.head_bias must have shape (C={c},) to match probs, got {bias.shape}")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise ValueError("Pool.head_weight or Pool.head_bias contains NaN or infinite values")
        object.__setattr__(self, "head_weight", weight)
        object.__setattr__(self, "head_bias", bias)

    @property
    def n_items(self) -> int:
        return self.probs.shape[0]

    @property
    def n_classes(self) -> int:
        return self.probs.shape[1]

    @cached_property
    def unlabeled(self) -> np.ndarray:
        """Sorted indices of the items not labeled."""
        mask = np.ones(self.n_items, dtype=bool)
        mask[self.labeled] = False
        return np.flatnonzero(mask)

    @cached_property
    def predicted(self) -> np.ndarray:
        """(N,) predicted class of every item (argmax of probs)."""
        return self.probs.argmax(axis=1)


# --- uncertainty scores: (N, C) probabilities -> (N,) numbers ----------------------------------------

def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy -sum p log p of each row (nats); 0 log 0 counts as 0. Higher = more uncertain."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    safe = np.where(p > 0, p, 1.0)  # log(1) = 0, so zero entries add nothing and no -inf appears
    return np.maximum(-(p * np.log(safe)).sum(axis=1), 0.0)


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row (top-1 alone with one class). Lower = more uncertain."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 1:
        return p[:, 0].copy()
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """1 - max probability of each row. Higher = more uncertain."""
    return 1.0 - np.asarray(probs, dtype=np.float64).max(axis=1)


# --- Featdist -----------------------------------------------------------------------------------------

def _sq_norms(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], dtype=np.float32)
    for s in range(0, x.shape[0], _BLOCK):
        b = x[s:s + _BLOCK]
        out[s:s + _BLOCK] = np.einsum("ij,ij->i", b, b)
    return out


def _column_mean(x: np.ndarray) -> np.ndarray:
    total = np.zeros(x.shape[1], dtype=np.float64)
    for s in range(0, x.shape[0], _BLOCK):
        total += x[s:s + _BLOCK].sum(axis=0, dtype=np.float64)
    return total / max(x.shape[0], 1)


def featdist_scores(features: np.ndarray, predicted: np.ndarray, labeled: np.ndarray,
                    labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each item's features to the mean features of the labeled items of its predicted class.

    Returns (distance, known), both (N,). `known[i]` is False when item i's predicted class has no
    labeled item yet; such items get the distance to the mean of all labeled items instead (to the
    pool mean when nothing is labeled), so they can still be ordered among themselves.
    Computed block by block: one (block, C) product per block, no (N, D) temporary.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    predicted = np.asarray(predicted, dtype=np.int64)
    labeled, labels = np.asarray(labeled, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=n_classes)
    sums = np.zeros((n_classes, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x[labeled].astype(np.float64))
    fallback = sums.sum(axis=0) / labeled.size if labeled.size else _column_mean(x)
    known_class = counts > 0
    means = np.where(known_class[:, None], sums / np.maximum(counts, 1)[:, None], fallback[None, :])
    means = means.astype(np.float32)
    mean_sq = np.einsum("ij,ij->i", means, means)
    sq = _sq_norms(x)
    dist = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], _BLOCK):
        b = x[s:s + _BLOCK]
        pred = predicted[s:s + _BLOCK]
        dots = (b @ means.T)[np.arange(b.shape[0]), pred]  # ||x - m||^2 = ||x||^2 - 2 x.m + ||m||^2
        dist[s:s + _BLOCK] = sq[s:s + _BLOCK] - 2.0 * dots + mean_sq[pred]
    return np.sqrt(np.maximum(dist, 0.0)), known_class[predicted]


def featdist_priority(distance: np.ndarray, known: np.ndarray, unknown_first: bool = False) -> np.ndarray:
    """One number per item, higher = label first: far from its class mean first; items of a predicted
    class with no labeled sample all come after (the default, as in the C-PEAL reference code) or,
    with unknown_first, before every known-class item."""
    shift = float(distance.max(initial=0.0)) + 1.0
    unknown = ~np.asarray(known, dtype=bool)
    return distance + shift * (unknown if unknown_first else ~unknown)


# --- coreset: greedy k-center --------------------------------------------------------------------------

def _min_sq_dist_to(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(N,) squared distance from each row of x to its nearest row of `centers` (faiss, blockwise)."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centers, dtype=np.float32))
    out = np.empty(x.shape[0], dtype=np.float32)
    for s in range(0, x.shape[0], _BLOCK):
        d, _ = index.search(x[s:s + _BLOCK], 1)
        out[s:s + _BLOCK] = d[:, 0]
    return out


def kcenter_greedy(embeddings: np.ndarray, n: int, centers: np.ndarray = _empty_int(), seed: int = 0) -> np.ndarray:
    """Greedy k-center (Sener & Savarese's coreset): repeatedly pick the item farthest from every center.

    `centers` (the labeled items) start the center set and are never picked; with no centers the first
    pick is a seeded random item. Returns up to n indices, in pick order. Keeps one running (N,)
    min-distance vector: faiss for the distances to the initial centers, one BLAS matrix-vector
    product per pick.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    centers = np.asarray(centers, dtype=np.int64)
    n_items = x.shape[0]
    n = min(int(n), n_items - centers.size)
    if n <= 0:
        return _empty_int()
    sq = _sq_norms(x)
    picks = np.empty(n, dtype=np.int64)
    if centers.size:
        mind = _min_sq_dist_to(x, x[centers])
        mind[centers] = -np.inf  # never picked, whatever rounding says their distance is
        start = 0
    else:
        picks[0] = np.random.default_rng(seed).integers(n_items)
        mind = sq - 2.0 * (x @ x[picks[0]]) + sq[picks[0]]
        mind[picks[0]] = -np.inf
        start = 1
    with _one_blas_thread():
        for k in range(start, n):
            i = int(np.argmax(mind))
            picks[k] = i
            np.minimum(mind, sq - 2.0 * (x @ x[i]) + sq[i], out=mind)
            mind[i] = -np.inf
    return picks


# --- BADGE: gradient embeddings + k-means++ -----------------------------------------------------------

def _grad_factors(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    a = p.copy()
    a[np.arange(p.shape[0]), p.argmax(axis=1)] -= 1.0  # d CE / d logits at the predicted label
    return a


def badge_embeddings(probs: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """(N, C*D) gradient of the cross-entropy at the predicted label w.r.t. a linear head's weights:
    (p - onehot(argmax p)) outer h. `badge` never builds this matrix (see its docstring)."""
    a = _grad_factors(probs).astype(np.float32)
    h = np.asarray(embeddings, dtype=np.float32)
    return (a[:, :, None] * h[:, None, :]).reshape(h.shape[0], -1)


def _d2_sampling(n: int, first: int, sqdist_from: Callable[[int], np.ndarray], available: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: after `first`, draw each item with probability proportional to its squared
    distance to the nearest item drawn so far; uniform among the rest once every distance is zero."""
    avail = available.copy()
    n = min(n, int(avail.sum()))
    if n <= 0:
        return _empty_int()
    picks = [first]
    avail[first] = False
    with _one_blas_thread():
        mind = np.maximum(sqdist_from(first), 0.0)
        while len(picks) < n:
            cum = np.cumsum(np.where(avail, mind, 0.0), dtype=np.float64)
            if cum[-1] > 0:
                # an item with zero weight owns an empty interval of cum, so it cannot be drawn
                i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
            else:
                i = int(rng.choice(np.flatnonzero(avail)))
            picks.append(i)
            avail[i] = False
            np.minimum(mind, np.maximum(sqdist_from(i), 0.0), out=mind)
    return np.asarray(picks, dtype=np.int64)


def kmeans_pp(points: np.ndarray, n: int, seed: int | np.random.Generator = 0, first: int | None = None,
              exclude: np.ndarray = _empty_int()) -> np.ndarray:
    """k-means++ seeding on explicit points: n distinct row indices (never one in `exclude`), in draw
    order. `first` fixes the first draw (default: seeded uniform)."""
    x = np.asarray(points, dtype=np.float64)
    rng = np.random.default_rng(seed)  # a Generator passes through unchanged
    available = np.ones(x.shape[0], dtype=bool)
    available[np.asarray(exclude, dtype=np.int64)] = False
    if not available.any():
        return _empty_int()
    if first is None:
        first = int(rng.choice(np.flatnonzero(available)))
    sq = np.einsum("ij,ij->i", x, x)
    return _d2_sampling(int(n), int(first), lambda j: sq - 2.0 * (x @ x[j]) + sq[j], available, rng)


def badge(probs: np.ndarray, embeddings: np.ndarray, n: int, labeled: np.ndarray = _empty_int(),
          seed: int = 0) -> np.ndarray:
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings, first pick the largest
    gradient norm. Gradient embeddings are outer products g = a (x) h, so
    <g_i, g_j> = <a_i, a_j><h_i, h_j>: distances come from two small matrix-vector products and the
    (N, C*D) matrix is never built."""
    a = _grad_factors(probs)
    h = np.ascontiguousarray(embeddings, dtype=np.float32)
    asq = np.einsum("ij,ij->i", a, a)
    gsq = asq * _sq_norms(h)
    available = np.ones(a.shape[0], dtype=bool)
    available[np.asarray(labeled, dtype=np.int64)] = False
    if not available.any() or n <= 0:
        return _empty_int()
    rng = np.random.default_rng(seed)
    norms = np.where(available, gsq, -np.inf)
    tied = np.flatnonzero(norms == norms.max())
    first = int(tied[0] if tied.size == 1 else rng.choice(tied))

    def sqdist_from(j: int) -> np.ndarray:
        return gsq - 2.0 * (a @ a[j]) * (h @ h[j]) + gsq[j]

    return _d2_sampling(int(n), first, sqdist_from, available, rng)


# --- TypiClust: typical points of k-means clusters (cold start) ---------------------------------------

def _kmeans(x: np.ndarray, k: int, seed: int, max_points_per_centroid: int = 64,
            rows: np.ndarray | None = None, restarts: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """k-means with faiss on x[rows] (all rows by default): the cluster of each row and its squared
    distance to the centroid, both aligned with `rows`.

    Trains on a seeded sample of at most k * max_points_per_centroid rows, then assigns every row block
    by block: the clusters only need to be roughly right, training on a 1M pool would take minutes, and
    x[rows] is never copied whole. Each of `restarts` runs starts from k-means++ seeds drawn on the
    sample and the lowest objective wins: faiss's own start (k random rows) merged three of five
    well-separated blobs and split a fourth in a test, and one k-means++ start still did now and then.
    Deterministic for a seed."""
    rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    k = max(1, min(int(k), rows.size))
    rng = np.random.default_rng(seed)
    cap = k * max_points_per_centroid
    train = rows if rows.size <= cap else np.sort(rng.choice(rows, cap, replace=False))
    sample = np.ascontiguousarray(x[train], dtype=np.float32)
    sq = _sq_norms(sample)
    best = None
    for _ in range(max(1, int(restarts))):
        seeds = _d2_sampling(k, int(rng.integers(train.size)), lambda j: sq - 2.0 * (sample @ sample[j]) + sq[j],
                             np.ones(train.size, dtype=bool), rng)
        km = faiss.Kmeans(x.shape[1], k, niter=10, seed=int(rng.integers(2**31 - 1)), verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max_points_per_centroid)
        objective = km.train(sample, init_centroids=sample[seeds])
        if best is None or objective < best[0]:
            best = (objective, km)
    return _nearest_centroid(best[1].index, x, rows)


def _nearest_centroid(index, x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each of x[rows]'s nearest centroid in a faiss `index` and its squared distance, block by block
    (x[rows] is never copied whole)."""
    assign = np.empty(rows.size, dtype=np.int64)
    sqdist = np.empty(rows.size, dtype=np.float32)
    for s in range(0, rows.size, _BLOCK):
        d, idx = index.search(np.ascontiguousarray(x[rows[s:s + _BLOCK]], dtype=np.float32), 1)
        assign[s:s + _BLOCK], sqdist[s:s + _BLOCK] = idx[:, 0], d[:, 0]
    return assign, sqdist


def _kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k <= 1:
        return np.zeros(x.shape[0], dtype=np.int64)
    # faiss trains on at most k * 64 sampled points, then assigns every point to its centroid: the
    # clusters only need to be roughly right, and training on the full 1M pool would take minutes
    km = faiss.Kmeans(x.shape[1], k, niter=10, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=64)
    km.train(x)
    return _nearest_centroid(km.index, x, np.arange(x.shape[0]))[0]


def _typicality(x: np.ndarray, k_neighbors: int) -> np.ndarray:
    """1 / mean distance to the k nearest other points (TypiClust's density estimate)."""
    m = x.shape[0]
    k = min(k_neighbors, m - 1)
    if k < 1:
        return np.ones(m)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    d, _ = index.search(x, k + 1)  # the first neighbour is the point itself (distance 0)
    return 1.0 / (np.sqrt(np.maximum(d[:, 1:], 0.0)).mean(axis=1) + 1e-12)


def typiclust(embeddings: np.ndarray, n: int, labeled: np.ndarray = _empty_int(), seed: int = 0,
              max_clusters: int = 500, k_neighbors: int = 20, max_typicality_points: int = 3000) -> np.ndarray:
    """TypiClust (Hacohen et al. 2022), made for cold start: cluster the pool into
    min(labeled + n, max_clusters) k-means clusters; each pick goes to the cluster with the fewest
    labeled or picked items (largest first) and takes its most typical unpicked item.

    Typicality is computed on at most `max_typicality_points` members of a cluster (a seeded sample),
    which keeps huge clusters cheap. Needs no labels and no probabilities. Returns up to n indices.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    labeled = np.asarray(labeled, dtype=np.int64)
    n_items = x.shape[0]
    n = min(int(n), n_items - labeled.size)
    if n <= 0:
        return _empty_int()
    rng = np.random.default_rng(seed)
    k = max(1, min(labeled.size + n, max_clusters, n_items))
    assign = _kmeans_labels(x, k, int(rng.integers(2**31 - 1)))
    available = np.ones(n_items, dtype=bool)
    available[labeled] = False
    members = np.split(np.argsort(assign, kind="stable"), np.cumsum(np.bincount(assign, minlength=k))[:-1])
    sizes = np.array([m.size for m in members])
    covered = np.bincount(assign[labeled], minlength=k)
    left = np.array([int(available[m].sum()) for m in members])
    ranked: dict[int, list] = {}  # cluster -> [members by typicality, position of the next to try]

    picks = []
    while len(picks) < n:
        open_ = np.flatnonzero(left > 0)
        c = int(open_[np.lexsort((-sizes[open_], covered[open_]))[0]])
        entry = ranked.get(c)
        if entry is None or entry[1] >= entry[0].size:
            pts = members[c] if entry is None else members[c][available[members[c]]]
            if pts.size > max_typicality_points:
                pts = np.sort(rng.choice(pts, max_typicality_points, replace=False))
            order = pts[np.argsort(-_typicality(x[pts], k_neighbors), kind="stable")]
            entry = ranked[c] = [order, 0]
        order, pos = entry
        while pos < order.size and not available[order[pos]]:
            pos += 1
        entry[1] = pos
        if pos >= order.size:  # every sampled member taken: resample among the cluster's free ones
            ranked[c] = [np.empty(0, dtype=np.int64), 1]
            continue
        i = int(order[pos])
        picks.append(i)
        available[i] = False
        left[c] -= 1
        covered[c] += 1
    return np.asarray(picks, dtype=np.int64)


# --- ProbCover: greedy maximum coverage by delta-balls (cold start) ------------------------------------

# ProbCover works on a seeded sample of at most this many unlabeled items (all of them in a smaller
# pool): they are both the candidates and the points to cover. The neighbour search costs
# points^2 * D flops (about 8e10 at 10,000 x 768, a few seconds on the 2-core box), and coverage
# measured on 10,000 random points is within about 1 % of the whole pool's.
PROBCOVER_MAX_POINTS = 10_000
# Each point keeps at most its this-many nearest neighbours inside its ball, so the graph takes
# points x 200 x 12 bytes (24 MB at 10,000) whatever delta is, and with its reversed copy in
# `max_coverage` about 100 MB at most. A ball holding more points counts as
# holding 200 when picks are compared (denser balls win the ties); covering stays exact, one
# matrix-vector product per pick. The default delta keeps most balls under the cap (see
# `probcover_delta`).
PROBCOVER_MAX_NEIGHBORS = 200
PROBCOVER_DEFAULT_CLASSES = 10  # k-means pseudo-classes for the delta rule when the classes are unknown


def _l2_normalised(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32)  # a copy, normalised in place
    for s in range(0, x.shape[0], _BLOCK):
        b = x[s:s + _BLOCK]
        norms = np.sqrt(np.einsum("ij,ij->i", b, b))
        b /= np.where(norms > 0, norms, 1.0)[:, None]  # a zero vector stays zero: similar to nothing
    return x


def _neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows x: each row's k most similar other rows, as (m, k) cosine similarities (descending)
    and (m, k) row indices. The row itself is left out, even among exact duplicates of it."""
    m = x.shape[0]
    k = min(int(k), m - 1)
    sims, idx = np.empty((m, max(k, 0)), dtype=np.float32), np.empty((m, max(k, 0)), dtype=np.int64)
    if k < 1:
        return sims, idx
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    step = 4096
    for s in range(0, m, step):
        d, i = index.search(x[s:s + step], k + 1)
        own = i == np.arange(s, s + i.shape[0])[:, None]
        own[~own.any(axis=1), -1] = True  # self not listed (tied duplicates came first): drop the last
        sims[s:s + step] = d[~own].reshape(-1, k)
        idx[s:s + step] = i[~own].reshape(-1, k)
    return sims, idx


def _distance(sims: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0))  # unit vectors: |a - b|^2 = 2 - 2 a.b


def _similarity_threshold(delta: float) -> float:
    return 1.0 - delta * delta / 2.0  # |a - b| < delta  <=>  a.b > 1 - delta^2 / 2 (unit vectors)


def purity_radius(sims: np.ndarray, idx: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """(m,) for each point, the largest delta at which its open delta-ball is known to be pure (to hold
    only points of its own pseudo-class): the distance to its nearest listed neighbour of another
    class; if every listed neighbour shares its class, the distance to the farthest one listed, as
    purity beyond the list is not checked. `sims`, `idx`: each point's neighbours, most similar first."""
    pseudo = np.asarray(pseudo)
    if idx.shape[1] == 0:
        return np.zeros(idx.shape[0])
    other = pseudo[idx] != pseudo[:, None]
    first = np.where(other.any(axis=1), other.argmax(axis=1), idx.shape[1] - 1)
    return _distance(sims[np.arange(idx.shape[0]), first].astype(np.float64))


def delta_from_purity(radius: np.ndarray, alpha: float = 0.95) -> float:
    """The largest delta at which at least a fraction `alpha` of the balls are pure, given each ball's
    purity radius (pure for every delta <= radius): the ceil(alpha * m)-th largest radius."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha}: must be in (0, 1]")
    radius = np.asarray(radius, dtype=np.float64)
    if radius.size == 0:
        return 0.0
    j = max(math.ceil(alpha * radius.size - 1e-9), 1) - 1  # 1e-9: 0.95 * 20 is 19.000000000000004
    return float(-np.partition(-radius, j)[j])


def _probcover_delta(x: np.ndarray, sims: np.ndarray, idx: np.ndarray, n_classes: int | None, seed: int,
                     alpha: float) -> float:
    k = PROBCOVER_DEFAULT_CLASSES if n_classes is None else int(n_classes)
    pseudo = _kmeans(x, k, seed, max_points_per_centroid=256, restarts=5)[0]  # k is small: restarts are cheap
    return delta_from_purity(purity_radius(sims, idx, pseudo), alpha)


def _probcover_sample(embeddings: np.ndarray, labeled: np.ndarray, max_points: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = np.ones(embeddings.shape[0], dtype=bool)
    mask[labeled] = False
    points = np.flatnonzero(mask)
    if points.size > max_points:
        points = np.sort(rng.choice(points, max_points, replace=False))
    return points, _l2_normalised(embeddings[points])


def probcover_delta(embeddings: np.ndarray, n_classes: int | None = None, seed: int = 0, alpha: float = 0.95,
                    max_points: int = PROBCOVER_MAX_POINTS,
                    max_neighbors: int = PROBCOVER_MAX_NEIGHBORS) -> float:
    """ProbCover's radius rule (Yehuda et al. 2022): the largest delta at which at least `alpha` of the
    delta-balls around the points are pure with respect to k-means pseudo-labels (k = n_classes, or
    PROBCOVER_DEFAULT_CLASSES when unknown), on L2-normalised embeddings (distances in [0, 2]).

    Computed on a seeded sample of `max_points` items. A ball counts as pure only as far as each
    point's `max_neighbors` nearest neighbours show, so the rule never picks a delta whose balls are
    mostly larger than the neighbour lists `probcover` keeps: a choice on the safe (smaller) side."""
    rng = np.random.default_rng(seed)
    _, x = _probcover_sample(np.asarray(embeddings, dtype=np.float32), _empty_int(), max_points, rng)
    sims, idx = _neighbours(x, max_neighbors)
    return _probcover_delta(x, sims, idx, n_classes, int(rng.integers(2**31 - 1)), alpha)


def _csr_gather(ptr: np.ndarray, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[ptr[r]:ptr[r + 1]] for every r in rows, concatenated, without a Python loop."""
    starts, lengths = ptr[rows], ptr[rows + 1] - ptr[rows]
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return values[offsets + np.arange(offsets.size)]


def max_coverage(x: np.ndarray, sims: np.ndarray, idx: np.ndarray, delta: float, n: int,
                 labeled_similarity: np.ndarray | None = None, tiebreak: np.ndarray | None = None,
                 min_delta: float = 1e-4) -> np.ndarray:
    """ProbCover's greedy step on unit rows x: n times, pick the row whose open delta-ball holds the
    most rows not yet covered (itself included), then mark its whole ball covered. Returns row indices
    in pick order.

    sims, idx: each row's nearest neighbours (`_neighbours`); a ball's size is counted over that list
    only, while covering uses an exact product with every row. labeled_similarity: (m,) each row's
    largest similarity to a labeled item; the labeled items' balls start out covering. tiebreak: (m,)
    values in [0, 1), higher wins among equal counts. Once every row is covered, delta is halved and
    coverage recomputed from the picks and labeled items (balls at a finer scale); below `min_delta`
    the rest follow in tiebreak order.
    """
    m = x.shape[0]
    n = min(int(n), m)
    tiebreak = np.zeros(m) if tiebreak is None else np.asarray(tiebreak, dtype=np.float64)
    labeled_similarity = np.full(m, -np.inf) if labeled_similarity is None else labeled_similarity
    available = np.ones(m, dtype=bool)
    picks: list[int] = []
    src_all = np.repeat(np.arange(m), idx.shape[1])
    with _one_blas_thread():
        while len(picks) < n:
            thr = _similarity_threshold(delta)
            covered = labeled_similarity > thr
            for s in range(0, len(picks), 256):  # balls of the picks so far (after a halving)
                covered |= (x @ x[picks[s:s + 256]].T > thr).any(axis=1)
            covered[picks] = True
            # edge (i -> j): j is in i's ball; sorted by j, so covering j finds every ball that held it
            inside = (sims > thr).ravel()
            src, dst = src_all[inside], idx.ravel()[inside]
            order = np.argsort(dst, kind="stable")
            holders, ptr = src[order], np.concatenate([[0], np.cumsum(np.bincount(dst, minlength=m))])
            count = np.bincount(src[~covered[dst]], minlength=m) + ~covered
            while len(picks) < n:
                i = int(np.argmax(np.where(available, count + tiebreak, -1.0)))
                if count[i] <= 0:
                    break  # everything is covered at this delta
                picks.append(i)
                available[i] = False
                hit = x @ x[i] > thr
                hit[i] = True
                newly = np.flatnonzero(hit & ~covered)
                covered[newly] = True
                count[newly] -= 1  # each covered row leaves its own ball...
                count -= np.bincount(_csr_gather(ptr, holders, newly), minlength=m)  # ...and its holders'
            if len(picks) < n and delta < min_delta:  # only duplicates of the picks are left
                rest = np.flatnonzero(available)
                picks.extend(rest[np.argsort(-tiebreak[rest], kind="stable")][:n - len(picks)].tolist())
            delta /= 2.0
    return np.asarray(picks, dtype=np.int64)


def probcover(embeddings: np.ndarray, n: int, labeled: np.ndarray = _empty_int(), seed: int = 0,
              delta: float | None = None, n_classes: int | None = None, alpha: float = 0.95,
              max_points: int = PROBCOVER_MAX_POINTS, max_neighbors: int = PROBCOVER_MAX_NEIGHBORS) -> np.ndarray:
    """ProbCover (Yehuda et al. 2022, "Active Learning Through a Covering Lens"), made for small budgets.

    On L2-normalised embeddings, each point holds an open ball of radius `delta`; greedily pick the
    unlabeled point whose ball covers the most points not covered yet, the labeled points' balls
    covering from the start (`max_coverage`). delta defaults to the paper's purity rule
    (`probcover_delta`, alpha = 0.95, k-means with k = n_classes). Ties in coverage go to the denser
    point (higher mean similarity to its neighbours), then at random. When everything is covered,
    delta is halved and the greedy goes on at the finer scale.

    Candidates and covered points are a seeded sample of at most `max_points` unlabeled items (all of
    them in a smaller pool), so it returns up to min(n, max_points) pool indices, in pick order.
    """
    labeled = np.asarray(labeled, dtype=np.int64)
    emb = np.asarray(embeddings, dtype=np.float32)
    rng = np.random.default_rng(seed)
    points, x = _probcover_sample(emb, labeled, max_points, rng)
    n = min(int(n), points.size)
    if n <= 0:
        return _empty_int()
    sims, idx = _neighbours(x, max_neighbors)
    kmeans_seed = int(rng.integers(2**31 - 1))
    if delta is None:
        delta = _probcover_delta(x, sims, idx, n_classes, kmeans_seed, alpha)
    if delta < 0:
        raise ValueError(f"delta={delta}: must be non-negative")
    labeled_similarity = np.full(points.size, -np.inf)
    if labeled.size:
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(_l2_normalised(emb[labeled]))
        for s in range(0, points.size, _BLOCK):
            labeled_similarity[s:s + _BLOCK] = index.search(x[s:s + _BLOCK], 1)[0][:, 0]
    density = sims.mean(axis=1) if sims.shape[1] else np.zeros(points.size)
    tiebreak = np.empty(points.size)
    tiebreak[np.lexsort((rng.permutation(points.size), density))] = np.arange(points.size) / points.size
    return points[max_coverage(x, sims, idx, float(delta), n, labeled_similarity, tiebreak)]


# --- DropQuery: dropout disagreement on the features, clustered (Gupte et al. 2024) -------------------

def _dropout_votes(x: np.ndarray, rows: np.ndarray, weight: np.ndarray, bias: np.ndarray, p: float,
                   trials: int, rng: np.random.Generator) -> np.ndarray:
    if not 0 <= p < 1:
        raise ValueError(f"p={p}: the dropout rate must be in [0, 1)")
    if trials < 1:
        raise ValueError(f"trials={trials}: must be at least 1")
    w_t = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)
    bias = np.asarray(bias, dtype=np.float32)
    votes = np.zeros(rows.size, dtype=np.int64)
    step = 8192  # an (8192, D) mask at a time: 25 MB at width 768
    for s in range(0, rows.size, step):
        b = np.asarray(x[rows[s:s + step]], dtype=np.float32)
        clean = (b @ w_t + bias).argmax(axis=1)
        for _ in range(trials):
            # inverted dropout, as at training time: kept features scaled by 1 / (1 - p), so the
            # expected logits are the clean ones and only the noise moves the prediction
            kept = rng.random(b.shape, dtype=np.float32) >= p
            noisy = ((b * kept) @ w_t) / (1.0 - p) + bias
            votes[s:s + step] += noisy.argmax(axis=1) != clean
    return votes


def dropout_disagreement(embeddings: np.ndarray, head_weight: np.ndarray, head_bias: np.ndarray,
                         p: float = 0.75, trials: int = 3, seed: int = 0) -> np.ndarray:
    """(N,) in how many of `trials` feature-dropout copies of each embedding the linear head
    (logits = x @ head_weight.T + head_bias) predicts another class than on the clean embedding."""
    x = np.asarray(embeddings, dtype=np.float32)
    return _dropout_votes(x, np.arange(x.shape[0]), head_weight, head_bias, p, trials, np.random.default_rng(seed))


def dropquery(probs: np.ndarray, embeddings: np.ndarray, head_weight: np.ndarray, head_bias: np.ndarray | None,
              n: int, labeled: np.ndarray = _empty_int(), seed: int = 0, p: float = 0.75,
              trials: int = 3) -> np.ndarray:
    """DropQuery (Gupte et al. 2024, "Revisiting Active Learning in the Era of Vision Foundation Models").

    Each unlabeled embedding is re-classified by the linear head `trials` times with feature dropout
    (rate p = 0.75 and 3 trials, the paper's setting); the items whose prediction changes in more than
    half of the trials are the candidates: near a decision boundary in feature space. The candidates
    are clustered with k-means into n clusters and each cluster gives its member nearest the centroid,
    the largest clusters first (most of the uncertain mass). Empty clusters, or fewer candidates than
    n, are filled with the remaining candidates (most votes first), then the other items by highest
    entropy of `probs`. The clean prediction the trials are compared with is the head's own, so both
    come from one classifier. Returns up to n pool indices, in pick order.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    weight = np.asarray(head_weight, dtype=np.float32)
    bias = np.zeros(weight.shape[0], dtype=np.float32) if head_bias is None else head_bias
    mask = np.ones(x.shape[0], dtype=bool)
    mask[np.asarray(labeled, dtype=np.int64)] = False
    unlabeled = np.flatnonzero(mask)
    n = min(int(n), unlabeled.size)
    if n <= 0:
        return _empty_int()
    rng = np.random.default_rng(seed)
    votes = _dropout_votes(x, unlabeled, weight, bias, p, trials, rng)
    is_candidate = 2 * votes > trials
    candidates = unlabeled[is_candidate]
    picks = _empty_int()
    if candidates.size > n:
        assign, sqdist = _kmeans(x, n, int(rng.integers(2**31 - 1)), rows=candidates)
        by_cluster = np.lexsort((sqdist, assign))  # within a cluster, nearest the centroid first
        firsts = by_cluster[np.r_[True, assign[by_cluster][1:] != assign[by_cluster][:-1]]]
        sizes = np.bincount(assign)
        picks = candidates[firsts[np.lexsort((assign[firsts], -sizes[assign[firsts]]))]]
    if picks.size < n:
        left = np.ones(unlabeled.size, dtype=bool)
        left[np.searchsorted(unlabeled, picks)] = False
        rest = np.flatnonzero(left)
        fill = rest[np.lexsort((rng.permutation(rest.size), -entropy(np.asarray(probs)[unlabeled[rest]]),
                                -(votes * is_candidate)[rest], ~is_candidate[rest]))]
        picks = np.concatenate([picks, unlabeled[fill[:n - picks.size]]])
    return picks.astype(np.int64)


# --- clusters for Label Studio ------------------------------------------------------------------------

MAX_CLUSTERS = 100


def default_cluster_count(n_items: int) -> int:
    """sqrt(N / 2), the classic rule of thumb for k-means (Mardia et al. 1979), at least 2 and at most
    MAX_CLUSTERS: Label Studio serves the least-labeled cluster first, so k clusters mean k labels
    spread over the pool before any cluster gets a second; with at most 100, each cluster of a large
    pool holds on average at least 1 % of it, and a day's labeling still visits every cluster."""
    return int(min(max(2, round(math.sqrt(max(n_items, 0) / 2))), MAX_CLUSTERS, max(n_items, 1)))


def clusters(embeddings: np.ndarray, k: int | None = None, seed: int = 0) -> np.ndarray:
    """(N,) int64 k-means cluster of each item, in [0, k); k defaults to `default_cluster_count(N)`.

    faiss k-means trained on a seeded sample of at most 256 items per cluster, then every item assigned
    to its nearest centroid block by block (memory linear in N). Deterministic for a seed. With k <= 20,
    the best of 3 k-means++ starts: one start split or merged six well-separated blobs of unequal size
    in 9 seeds of 20, three never did, and a start costs k^2 * 256 * D * 10 flops, nothing at such k.
    At larger k one start (2 s at 20,000 x 768, k = 100 on the 2-core box), where a merged pair of
    clusters matters less."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D), got shape {x.shape}")
    n_items = x.shape[0]
    if k is None:
        k = default_cluster_count(n_items)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: the number of clusters must be a positive integer")
    if n_items == 0:
        return _empty_int()
    if not np.isfinite(x).all():
        raise ValueError("embeddings contains NaN or infinite values")
    k = min(int(k), n_items)
    return _kmeans(x, k, seed, max_points_per_centroid=256, restarts=3 if k <= 20 else 1)[0]


# --- registry and the front doors -----------------------------------------------------------------------

@dataclass(frozen=True)
class Strategy:
    """kind "score": fn(pool, rng, **options) -> priority of each pool.unlabeled item (higher first).
    kind "batch": fn(pool, n, rng) -> up to n picks in order. needs: the optional Pool fields it reads."""

    name: str
    kind: str
    fn: Callable
    needs: tuple[str, ...] = ()


def _features(pool: Pool, space: str) -> np.ndarray:
    if space not in FEATDIST_SPACES:
        raise ValueError(f"featdist_space={space!r}: expected one of {', '.join(FEATDIST_SPACES)}")
    feats = pool.embeddings if space == "embeddings" else pool.logits
    if feats is None:
        raise ValueError(f"strategy 'featdist' with featdist_space={space!r} needs Pool.{space}, which is None")
    return feats


def _featdist(pool: Pool, rng, *, featdist_space: str = "embeddings", unknown_first: bool = False, **_):
    dist, known = featdist_scores(_features(pool, featdist_space), pool.predicted, pool.labeled,
                                  pool.labels, pool.n_classes)
    u = pool.unlabeled
    return featdist_priority(dist[u], known[u], unknown_first)


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Strategy("random", "score", lambda pool, rng, **_: rng.random(pool.unlabeled.size)),
    Strategy("entropy", "score", lambda pool, rng, **_: entropy(pool.probs[pool.unlabeled])),
    Strategy("margin", "score", lambda pool, rng, **_: -margin(pool.probs[pool.unlabeled])),
    Strategy("least_confidence", "score", lambda pool, rng, **_: least_confidence(pool.probs[pool.unlabeled])),
    Strategy("featdist", "score", _featdist),
    Strategy("coreset", "batch", lambda pool, n, rng: kcenter_greedy(pool.embeddings, n, pool.labeled, _seed(rng)),
             ("embeddings",)),
    Strategy("badge", "batch", lambda pool, n, rng: badge(pool.probs, pool.embeddings, n, pool.labeled, _seed(rng)),
             ("embeddings",)),
    Strategy("typiclust", "batch", lambda pool, n, rng: typiclust(pool.embeddings, n, pool.labeled, _seed(rng)),
             ("embeddings",)),
    Strategy("probcover", "batch", lambda pool, n, rng: probcover(pool.embeddings, n, pool.labeled, _seed(rng),
                                                                  n_classes=pool.n_classes), ("embeddings",)),
    Strategy("dropquery", "batch", lambda pool, n, rng: dropquery(pool.probs, pool.embeddings, pool.head_weight,
                                                                  pool.head_bias, n, pool.labeled, _seed(rng)),
             ("embeddings", "head_weight")),
)}
assert tuple(REGISTRY) == STRATEGIES


def _order_by(priority: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """items sorted by priority, highest first; ties in a seeded random order (not by index, which
    would favour whatever was imported first)."""
    tiebreak = rng.permutation(items.size)
    return items[np.lexsort((tiebreak, -priority))]


def _strategy(name: str, pool: Pool) -> Strategy:
    if not isinstance(pool, Pool):
        raise TypeError(f"expected a Pool, got {type(pool).__name__}")
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    strategy = REGISTRY[name]
    for needed in strategy.needs:
        if getattr(pool, needed) is None:
            raise ValueError(f"strategy {name!r} needs Pool.{needed}, which is None")
    return strategy


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    # separate streams for the strategy and the balancing, so the strategy's order does not depend on
    # whether the balancing runs
    a, b = np.random.SeedSequence(int(seed)).spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def _ordering(strategy: Strategy, pool: Pool, head: int, rng: np.random.Generator, options: dict) -> np.ndarray:
    """Every unlabeled index in priority order; a batch strategy orders the first `head`, entropy the rest."""
    unlabeled = pool.unlabeled
    if strategy.kind == "score":
        return _order_by(strategy.fn(pool, rng, **options), unlabeled, rng)
    picks = strategy.fn(pool, min(head, unlabeled.size), rng)
    rest = np.setdiff1d(unlabeled, picks, assume_unique=True)
    return np.concatenate([picks, _order_by(entropy(pool.probs[rest]), rest, rng)]).astype(np.int64)


def _candidate_count(n: int, n_unlabeled: int, candidate_fraction: float) -> int:
    if not 0 < candidate_fraction <= 1:
        raise ValueError(f"candidate_fraction={candidate_fraction}: must be in (0, 1]")
    return min(n_unlabeled, max(n, math.ceil(candidate_fraction * n_unlabeled)))


def class_balance(order: np.ndarray, predicted: np.ndarray, labels: np.ndarray, n_classes: int, n: int,
                  candidate_fraction: float = 0.1, seed: int | np.random.Generator = 0) -> np.ndarray:
    """PEAL / C-PEAL class balancing on top of any strategy's `order`.

    Candidates: the first max(n, ceil(candidate_fraction * len(order))) of `order`. Then n times: take
    the class with the fewest labels so far (labels + picks, counted by predicted class; ties at random),
    pick its best-ranked candidate predicted as that class; if it has none, pick a random candidate
    instead and drop that class from later turns (it can never get one). Returns picks in pick order.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    order = np.asarray(order, dtype=np.int64)
    cand = order[:_candidate_count(n, order.size, candidate_fraction)]
    n = min(n, cand.size)
    cand_class = np.asarray(predicted)[cand]
    queues = [list(np.flatnonzero(cand_class == c)[::-1]) for c in range(n_classes)]  # pop() = best
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.int64)
    in_play = np.ones(n_classes, dtype=bool)
    taken = np.zeros(cand.size, dtype=bool)
    shuffled, next_random = rng.permutation(cand.size), 0
    picks = []
    while len(picks) < n:
        lowest = counts[in_play].min()
        tied = np.flatnonzero(in_play & (counts == lowest))
        c = int(tied[0] if tied.size == 1 else rng.choice(tied))
        queue = queues[c]
        while queue and taken[queue[-1]]:
            queue.pop()
        if queue:
            pos = queue.pop()
        else:
            in_play[c] = False
            while taken[shuffled[next_random]]:
                next_random += 1
            pos = int(shuffled[next_random])
        taken[pos] = True
        picks.append(cand[pos])
        counts[cand_class[pos]] += 1
    return np.asarray(picks, dtype=np.int64)


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n={n!r}: the budget must be a non-negative integer")
    return int(n)


def _queue(strategy: str, pool: Pool, seed: int, balance: bool, candidate_fraction: float, options: dict,
           head: int, stop: int | None = None) -> np.ndarray:
    """The one ranking path behind `rank` and `select`. With `stop`, class balancing stops after that
    many picks: its picks are made one after another from one random stream, so the first `stop` are
    the same either way, and `select` need not balance the whole candidate set."""
    strat = _strategy(strategy, pool)
    rng, balance_rng = _rngs(seed)
    order = _ordering(strat, pool, head, rng, options)
    if not balance:
        return order
    n_cand = _candidate_count(0, order.size, candidate_fraction)
    n_balanced = n_cand if stop is None else min(stop, n_cand)
    top = class_balance(order[:n_cand], pool.predicted, pool.labels, pool.n_classes, n_balanced, 1.0, balance_rng)
    return np.concatenate([top, order[n_balanced:][~np.isin(order[n_balanced:], top)]]).astype(np.int64)


def rank(strategy: str, pool: Pool, seed: int = 0, *, balance: bool = False, candidate_fraction: float = 0.1,
         featdist_space: str = "embeddings", unknown_first: bool = False, head: int = RANK_HEAD) -> np.ndarray:
    """Every unlabeled index, in the order the strategy would have them labeled (the whole queue).

    Score strategies sort the whole pool. Batch strategies (coreset, badge, typiclust, probcover,
    dropquery) put their picks for a batch of `head` items first (default RANK_HEAD; the whole pool if
    smaller), then the rest by entropy: their loops cost a pass over the pool per pick, and the head is
    all annotators reach before the next retrain. With `balance`, the top `candidate_fraction` is
    reordered by `class_balance` and the rest follows in strategy order.
    featdist_space: "embeddings" or "logits". unknown_first: Featdist puts items predicted as a class
    with no labeled sample last (False, the C-PEAL reference) or first (True).
    """
    options = dict(featdist_space=featdist_space, unknown_first=unknown_first)
    return _queue(strategy, pool, seed, balance, candidate_fraction, options, _check_n(head))


def select(strategy: str, pool: Pool, n: int, seed: int = 0, *, balance: bool = False,
           candidate_fraction: float = 0.1, featdist_space: str = "embeddings",
           unknown_first: bool = False, head: int = RANK_HEAD) -> np.ndarray:
    """The strategy's n picks, in priority order (first = label first); indices into N, never labeled.

    Exactly `rank(...)[:n]` with the same arguments and a head of at least n (max(head, n)): one ranking
    path, so what the simulator measures is what Label Studio's queue serves. A batch strategy therefore
    plans a batch of max(head, n) and returns its first n picks (TypiClust's clusters, DropQuery's
    k-means, depend on that batch size). Returns the whole unlabeled pool when n exceeds it.
    """
    n = _check_n(n)
    options = dict(featdist_space=featdist_space, unknown_first=unknown_first)
    return _queue(strategy, pool, seed, balance, candidate_fraction, options, max(_check_n(head), n), stop=n)[:n]


# --- Label Studio's score, and PEAL's Figure 1 metric ---------------------------------------------------

def queue_scores(order: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items,) scores for Label Studio, lowest = label next: the k-th of `order` gets k / (len - 1),
    so sorting ascending reproduces `order`. Items not in `order` (labeled) get NaN. Scores in [0, 1]."""
    order = np.asarray(order, dtype=np.int64)
    if order.size and (order.min() < 0 or order.max() >= n_items):
        raise ValueError(f"order has indices outside [0, {n_items})")
    if np.unique(order).size != order.size:
        raise ValueError("order has duplicate indices")
    scores = np.full(n_items, np.nan)
    scores[order] = np.arange(order.size) / max(order.size - 1, 1)
    return scores


def unknown_ratio(picks: np.ndarray, predicted: np.ndarray, true_labels: np.ndarray) -> dict:
    """PEAL's Figure 1 metric for one cycle's picks: how many the current model gets wrong ("unknown")
    and right ("known").

    `predicted` (N,) predicted classes or (N, C) probabilities, and `true_labels` (N,), are per pool
    item and indexed by `picks`. Returns {"unknown", "known", "ratio": unknown / max(known, 1),
    "fraction": unknown / len(picks) (0 for no picks)}; higher is better for both.
    """
    picks = np.asarray(picks, dtype=np.int64)
    predicted = np.asarray(predicted)
    if predicted.ndim == 2:
        predicted = predicted.argmax(axis=1)
    true_labels = np.asarray(true_labels)
    if predicted.shape != true_labels.shape:
        raise ValueError(f"predicted {predicted.shape} and true_labels {true_labels.shape} must both be per pool item")
    if picks.size and (picks.min() < 0 or picks.max() >= true_labels.size):
        raise ValueError(f"picks has indices outside [0, {true_labels.size})")
    unknown = int((predicted[picks] != true_labels[picks]).sum())
    known = int(picks.size - unknown)
    return {"unknown": unknown, "known": known, "ratio": unknown / max(known, 1),
            "fraction": unknown / picks.size if picks.size else 0.0}
