"""One active-learning cycle: train on the labeled set, score the pool, rank it.

The backend's training job and the offline simulator both call `run_cycle`, so every figure the
simulator publishes measures the code users run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import acquisition
from .backbone import Classifier, build_classifier
from .config import Settings
from .scoring import ActivationCache, cache_key, cacheable, score_cached
from .training import Prediction, fit, predict


@dataclass
class CycleResult:
    classifier: Classifier
    metrics: dict
    labeled: Prediction
    pool: Prediction
    order: np.ndarray         # pool positions (0..len(pool)-1), label-next first
    queue_scores: np.ndarray  # (len(pool),) Label Studio scores, lowest = label next


def acquisition_pool(labeled: Prediction, pool: Prediction, targets: np.ndarray) -> acquisition.Pool:
    """Labeled items first, then the pool, as the strategies expect (indices into one array)."""
    n_lab = len(labeled.probs)
    return acquisition.Pool(probs=np.concatenate([labeled.probs, pool.probs]),
                            embeddings=np.concatenate([labeled.embeddings, pool.embeddings]).astype(np.float32),
                            logits=np.concatenate([labeled.logits, pool.logits]),
                            labeled=np.arange(n_lab), labels=np.asarray(targets, dtype=np.int64))


def class_ids(targets: torch.Tensor) -> np.ndarray:
    """Class id per labeled item (first chosen class for multiple choice) for the strategies."""
    t = targets.cpu().numpy()
    return t.argmax(axis=1) if t.ndim == 2 else t


def normalised(pred: Prediction, multiple: bool) -> Prediction:
    """Strategies expect rows that sum to 1; sigmoid outputs of multiple choice are renormalised."""
    if not multiple:
        return pred
    p = pred.probs / np.clip(pred.probs.sum(axis=1, keepdims=True), 1e-12, None)
    return Prediction(p, pred.logits, pred.embeddings)


def run_cycle(settings: Settings, pixels: torch.Tensor, targets: torch.Tensor,
              pool_pixels: torch.Tensor | Callable[[list[int]], torch.Tensor], n_classes: int, *,
              n_pool: int | None = None, multiple: bool = False, init: dict[str, torch.Tensor] | None = None,
              progress: Callable[[int, int, float], None] | None = None,
              hashes: tuple[list[str], list[str]] | None = None, cache_dir: str | None = None) -> CycleResult:
    """Train a fresh classifier (or warm-start from `init`), score the pool and rank it.

    `pool_pixels` is a tensor, or a callable giving the tensor for a list of pool positions (then
    `n_pool` says how many there are): a large pool is then preprocessed a chunk at a time, and images
    whose frozen activations are cached are not preprocessed at all. With `hashes` (content hashes of
    the labeled and pool images) and `cache_dir`, frozen activations are reused from earlier cycles."""
    n_pool = len(pool_pixels) if n_pool is None else n_pool
    clf = build_classifier(settings, n_classes)
    if init is not None:
        clf.load_trainable(init)
    metrics = fit(clf, pixels, targets, settings, multilabel=multiple, progress=progress)
    if hashes is not None and cache_dir and cacheable(clf):
        cache = ActivationCache.shared(Path(cache_dir) / cache_key(settings, clf, pixels.shape[-1]))
        labeled = score_cached(clf, settings, hashes[0], pixels, cache, multilabel=multiple)
        pool = score_cached(clf, settings, hashes[1], pool_pixels, cache, multilabel=multiple)
    else:
        labeled = predict(clf, pixels, settings, multilabel=multiple)
        pool = predict_in_chunks(clf, pool_pixels, n_pool, settings, multilabel=multiple)
    order, scores = rank_pool(settings, labeled, pool, class_ids(targets), multiple)
    return CycleResult(clf, metrics, labeled, pool, order, scores)


POOL_CHUNK = 1024  # pool images preprocessed at once: bounds memory (224 px: 0.6 MB per image)


def predict_in_chunks(clf: Classifier, source, n: int, settings: Settings, *, multilabel: bool = False) -> Prediction:
    parts = [predict(clf, source(list(range(i, min(n, i + POOL_CHUNK)))) if callable(source)
                     else source[i:i + POOL_CHUNK], settings, multilabel=multilabel)
             for i in range(0, n, POOL_CHUNK)]
    if not parts:
        return predict(clf, torch.zeros(0, 3, 1, 1), settings, multilabel=multilabel)
    return Prediction(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("probs", "logits", "embeddings")))


def rank_pool(settings: Settings, labeled: Prediction, pool: Prediction, labels: np.ndarray,
              multiple: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The whole pool in the strategy's order, and the matching queue scores (pool positions)."""
    n_lab, n_pool = len(labeled.probs), len(pool.probs)
    if n_pool == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    ap = acquisition_pool(normalised(labeled, multiple), normalised(pool, multiple), labels)
    order = acquisition.rank(settings.strategy, ap, seed=settings.seed, balance=settings.balance,
                             candidate_fraction=settings.candidate_fraction)
    scores = acquisition.queue_scores(order, n_lab + n_pool)[n_lab:]
    return order - n_lab, scores
