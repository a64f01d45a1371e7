"""Acquisition: which unlabeled items to label next, and in what order.

Every strategy answers the same question with the same inputs (a `Pool`: probabilities, optional
embeddings, logits and linear head, labeled indices and their labels) and returns pool indices in
priority order.

- Uncertainty strategies (`random`, `entropy`, `margin`, `least_confidence`, `featdist`) give every
  unlabeled item a number; the order is that number, ties broken by a seeded random permutation.
- Batch strategies (`coreset`, `badge`, `typiclust`) build a batch pick by pick; the order is the
  order of the picks.

`rank` returns the whole queue and `select` its first n (literally `rank(...)[:n]`: one ranking
path), `queue_scores` turns an order into the
`score` Label Studio sorts by (lowest first), and `class_balance` is the PEAL / C-PEAL wrapper that
works on top of any strategy's order. The maths lives in small pure functions (`entropy`, `margin`,
`least_confidence`, `featdist_scores`, `kcenter_greedy`, `badge_embeddings`, `kmeans_pp`, `badge`,
`typiclust`) so each can be tested and reused alone.

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
)
FEATDIST_SPACES = ("embeddings", "logits")

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

def _kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k <= 1:
        return np.zeros(x.shape[0], dtype=np.int64)
    # faiss trains on at most k * 64 sampled points, then assigns every point to its centroid: the
    # clusters only need to be roughly right, and training on the full 1M pool would take minutes
    km = faiss.Kmeans(x.shape[1], k, niter=10, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=64)
    km.train(x)
    out = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], _BLOCK):
        _, idx = km.index.search(x[s:s + _BLOCK], 1)
        out[s:s + _BLOCK] = idx[:, 0]
    return out


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

    Score strategies sort the whole pool. Batch strategies (coreset, badge, typiclust) put their picks
    for a batch of `head` items first (default RANK_HEAD; the whole pool if smaller), then the rest by
    entropy: their loops cost a pass over the pool per pick, and the head is all annotators reach
    before the next retrain. With `balance`, the top `candidate_fraction` is
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
    plans a batch of max(head, n) and returns its first n picks (TypiClust's clusters depend on
    that batch size). Returns the whole unlabeled pool when n exceeds it.
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
