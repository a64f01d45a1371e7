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


def run_cycle(settings: Settings, pixels: torch.Tensor, targets: torch.Tensor, pool_pixels: torch.Tensor,
              n_classes: int, *, multiple: bool = False, init: dict[str, torch.Tensor] | None = None,
              progress: Callable[[int, int, float], None] | None = None,
              hashes: tuple[list[str], list[str]] | None = None, cache_dir: str | None = None) -> CycleResult:
    """Train a fresh classifier (or warm-start from `init`), score the pool and rank it.

    With `hashes` (content hashes of the labeled and pool images) and `cache_dir`, frozen activations
    are reused from earlier cycles (see scoring.py)."""
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
        pool = predict(clf, pool_pixels, settings, multilabel=multiple)
    order, scores = rank_pool(settings, labeled, pool, class_ids(targets), multiple)
    return CycleResult(clf, metrics, labeled, pool, order, scores)


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
