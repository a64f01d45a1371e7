"""One active-learning cycle: train on the labeled set, score the pool, rank it.

The backend's training job (`labelstudio_job.train_project`) and the offline simulator
(`simulate.run_seed`) both call `run_cycle`, with the same images, the same activation cache and the
same ranking, so every figure the simulator publishes measures the code users run. `served_next`
models how Label Studio's uncertainty sampling serves that ranking between two retrains.

A cycle has two phases:
- cold (fewer than two classes labeled): no classifier is trained or shown; the pool is still ordered
  (`auto`'s start strategy: a seeded random order, or coverage on the frozen backbone's embeddings), so
  Label Studio serves that order instead of its random fallback;
- trained: the classifier is fitted (`training.fit`) and the pool ranked by the strategy; or, between
  adapter trainings (`refresh_plan`, PEAL_ADAPT_GROWTH), only its head is solved again on the adapted
  features the last adapter training stored (`Adapter`), with no forward pass.
`PEAL_STRATEGY=auto` picks the strategy from what is labeled (`auto_strategy`).
Label quality (`label_quality`) comes from the same frozen features: how likely each given label is
wrong, and the labeled items' near-duplicates.
"""
from __future__ import annotations

import time

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import acquisition, quality
from .backbone import Classifier, build_classifier
from .config import Settings
from .scoring import ActivationCache, cache_key, cacheable, frozen_activations, score_cached, score_from_activations
from .training import Prediction, fit, head_outputs, predict, refresh_head


@dataclass
class ImageSet:
    """Images known by content hash, preprocessed on demand a chunk at a time (so a large pool is never
    held as pixels, and images whose frozen activations are cached are not even preprocessed)."""
    hashes: list[str]
    pixels: Callable[[list[int]], torch.Tensor]
    size: int  # the square input size the pixels come at

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def from_tensor(cls, hashes: list[str], pixels: torch.Tensor) -> "ImageSet":
        return cls(list(hashes), lambda positions: pixels[positions], int(pixels.shape[-1]))


@dataclass
class CycleResult:
    classifier: Classifier | None  # None in the cold phase
    metrics: dict
    pool: Prediction               # classifier outputs for the pool (uniform in the cold phase)
    embeddings: np.ndarray         # (n_pool, D) frozen backbone features of the pool
    order: np.ndarray              # pool positions (0..len(pool)-1), label-next first
    queue_scores: np.ndarray       # (len(pool),) Label Studio scores in [0, 1], lowest = label next
    clusters: np.ndarray           # (n_labeled + n_pool,) cluster ids, labeled first; empty if off
    strategy: str                  # the strategy that ranked (what `auto` resolved to)
    # label quality (settings.mislabeling, settings.duplicate_similarity), for the labeled items:
    mislabeling: quality.Mislabeling | None = None  # None: off, or no classifier
    neighbors: dict[int, list[int]] | None = None   # labeled position -> near-duplicate positions (labeled first)
    adapted: np.ndarray | None = None  # (n_labeled + n_pool, D) the head's input features, labeled first; None if cold

    @property
    def trained(self) -> bool:
        return self.classifier is not None

    @property
    def pool_clusters(self) -> np.ndarray:
        return self.clusters[len(self.clusters) - len(self.queue_scores):] if self.clusters.size else self.clusters


# --- pure helpers ------------------------------------------------------------------------------------

def class_ids(targets: torch.Tensor) -> np.ndarray:
    """Class id per labeled item (first chosen class for multiple choice) for the strategies."""
    t = targets.cpu().numpy()
    return t.argmax(axis=1) if t.ndim == 2 else t


def can_train(targets: torch.Tensor, multiple: bool) -> bool:
    """A classifier needs two classes to tell apart: two distinct labels (single choice), or a choice
    that is present on some labeled items and absent on others (multiple choice)."""
    if len(targets) == 0:
        return False
    t = targets.cpu()
    if multiple:
        on = t.sum(dim=0)
        return bool(((on > 0) & (on < len(t))).any())
    return len(torch.unique(t)) >= 2


def auto_strategy(settings: Settings, labels: np.ndarray, n_classes: int, trained: bool) -> str:
    """What `PEAL_STRATEGY=auto` runs now: `auto_start` while labels are few, i.e. before a classifier
    exists, while some class has no label, or while there are fewer than `auto_switch_per_class` labels
    per class; `auto_uncertainty` after. Uncertainty is below random until the model knows every class
    (Pourahmadi et al. 2021); the start and the switch are chosen by measurement (BENCHMARKS.md)."""
    if settings.strategy != "auto":
        # with no classifier, only a coverage strategy has anything to go on
        return settings.strategy if trained or settings.strategy in acquisition.COVERAGE_STRATEGIES else "random"
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    if not trained or (counts == 0).any() or counts.sum() < settings.auto_switch_per_class * n_classes:
        return settings.auto_start
    return settings.auto_uncertainty


def selection_seed(seed: int, n_labeled: int) -> int:
    """A distinct seed for every labeled-set size, so a cycle never replays the last one's random draws,
    and the same in the backend and the simulator."""
    return int(np.random.SeedSequence([int(seed), int(n_labeled)]).generate_state(1)[0] % (2**31 - 1))


def served_next(scores: np.ndarray, clusters: np.ndarray | None, solved: dict[int, int], n: int) -> np.ndarray:
    """The n tasks Label Studio's uncertainty sampling serves one annotator, in order, from the pushed
    scores (`projects/functions/next_task.py`, 1.23): tasks of the cluster this annotator has labeled
    least come first, lowest score first within; each served task counts for its cluster. `solved`:
    cluster -> tasks already labeled by the annotator (updated in place). Without clusters: by score."""
    scores = np.asarray(scores, dtype=np.float64)
    n = min(int(n), scores.size)
    if clusters is None or np.asarray(clusters).size == 0:
        return np.argsort(scores, kind="stable")[:n]
    clusters = np.asarray(clusters, dtype=np.int64)
    by_cluster: dict[int, list[int]] = {}
    for i in np.argsort(scores, kind="stable")[::-1]:  # pop() gives the lowest score
        by_cluster.setdefault(int(clusters[i]), []).append(int(i))
    out = []
    while len(out) < n:
        c = min((k for k, q in by_cluster.items() if q), key=lambda k: (solved.get(k, 0), scores[by_cluster[k][-1]]))
        out.append(by_cluster[c].pop())
        solved[c] = solved.get(c, 0) + 1
    return np.asarray(out, dtype=np.int64)


def warm_plan(settings: Settings, previous_labels: dict[str, list] | None, labels: dict[str, list],
              previous_since_full: int | None) -> tuple[bool, int | None, int]:
    """How a cycle starts (PEAL_WARM_START): (warm, new labels, cycles since the last full training).

    `previous_labels`: task -> label of what the last version trained on, None when there is no last
    version to start from (none yet, another architecture or label set, or a cold-start version). A warm
    cycle starts from the last adapter and trains on a budget scaled to the labels that are new or
    changed since (`training.cycle_steps`); every `full_retrain_every`-th cycle trains from the
    pretrained weights with the full budget, so warm starts cannot drift for ever."""
    if not settings.warm_start or previous_labels is None or previous_since_full is None:
        return False, None, 0
    if settings.full_retrain_every and previous_since_full + 1 >= settings.full_retrain_every:
        return False, None, 0
    new = sum(1 for task, label in labels.items() if previous_labels.get(task) != label)
    return True, new, previous_since_full + 1


@dataclass
class Adapter:
    """What a trained version keeps so that later cycles can refresh only its head: the adapter and head
    weights, the labels the adapter trained on (task -> label indices) and the head's input features of
    every image it scored (labeled and pool), by content hash."""
    state: dict[str, torch.Tensor]
    labels: dict[str, list]
    hashes: list[str]
    features: np.ndarray  # (len(hashes), D), float16 on disk

    def rows(self, hashes: list[str]) -> np.ndarray | None:
        return feature_rows(self.hashes, self.features, hashes)


def feature_rows(known: list[str], features: np.ndarray, hashes: list[str]) -> np.ndarray | None:
    """The rows of `features` (one per image of `known`, by content hash) for `hashes`, in that order, as
    float32; None when any of them is not known."""
    where = {h: i for i, h in enumerate(known)}
    idx = [where.get(h) for h in hashes]
    if any(i is None for i in idx):
        return None
    return np.asarray(features[np.asarray(idx, dtype=np.int64)], dtype=np.float32)


def adapter_of(result: "CycleResult", labels: dict[str, list], hashes: list[str], order: np.ndarray | None = None) -> Adapter:
    """The `Adapter` a trained cycle leaves: its weights, the labels it trained on and its features of the
    labeled images then the pool. `hashes`: the images' content hashes in that order, or (with `order`,
    the labeled positions in `hashes`) of a whole set whose labeled rows come first and the rest follow
    in index order (the simulator's split)."""
    if order is not None:
        rest = np.setdiff1d(np.arange(len(hashes)), order)
        hashes = [hashes[i] for i in np.concatenate([np.asarray(order, np.int64), rest])]
    return Adapter(result.classifier.trainable_state(), dict(labels), list(hashes),
                   np.asarray(result.adapted, dtype=np.float16))


def changed_labels(before: dict[str, list], now: dict[str, list]) -> int:
    """Labels given, changed or removed between two labelings (task -> label indices)."""
    return sum(1 for task, label in now.items() if before.get(task) != label) + sum(1 for task in before if task not in now)


def refreshable(settings: Settings) -> bool:
    """Whether head refreshes apply at all: PEAL_ADAPT_GROWTH is on and there is an adapter to keep (a
    linear probe's every cycle is a head fit already)."""
    return settings.adapt_growth > 0 and settings.adapter != "linear"


def refresh_plan(settings: Settings, adapter_labels: dict[str, list] | None, labels: dict[str, list]) -> bool:
    """Whether this cycle only refreshes the head (PEAL_ADAPT_GROWTH): an adapter is there to keep
    (`adapter_labels`: what it trained on, None when there is none usable) and the labels new or changed
    since it trained are fewer than `adapt_growth` times the labels it trained on. So the adapter trains
    on every cycle while labels are few, then each time the labeled set has grown by that fraction: the
    adapter's trainings grow logarithmically with the labels, the head follows every label."""
    if not refreshable(settings) or not adapter_labels:
        return False
    return changed_labels(adapter_labels, labels) < settings.adapt_growth * len(adapter_labels)


def may_defer(settings: Settings, adapter_labels: dict[str, list] | None, labels: dict[str, list]) -> bool:
    """Whether an adapter training that is due (`refresh_plan` said no) may still wait for a pause in the
    annotations: while the labels new or changed since the adapter trained stay under twice the growth
    that made it due. Beyond that it trains even while labels arrive, so it lags by at most 2x."""
    if not refreshable(settings) or not adapter_labels:
        return False
    return changed_labels(adapter_labels, labels) < 2 * settings.adapt_growth * len(adapter_labels)


# --- scoring -------------------------------------------------------------------------------------------

POOL_CHUNK = 1024  # pool images preprocessed at once: bounds memory (224 px: 0.6 MB per image)


def _cache(clf: Classifier, settings: Settings, size: int, cache_dir: str | None) -> ActivationCache | None:
    """`clf`'s activation cache folder for images of `size` px, or None: no folder given, the cache is
    off, or the model has no frozen prefix to cache."""
    if not (cache_dir and settings.activation_cache and cacheable(clf)):
        return None
    return ActivationCache.shared(Path(cache_dir) / cache_key(settings, clf, size))


def score_images(clf: Classifier, settings: Settings, images: ImageSet, cache_dir: str | None, *,
                 multilabel: bool = False, via: Classifier | None = None) -> Prediction:
    """The one inference path of a cycle: finished from the activation cache where the model has a frozen
    prefix (and a cache folder is given), else a chunked forward; a linear probe's chunks still go through
    `frozen_activations`, so the frozen first pass runs where PEAL_RUNTIME says, cache or not."""
    if (cache := _cache(clf, settings, images.size, cache_dir)) is not None:
        source = None
        if via is not None and via.first_adapted < clf.first_adapted == clf.n_layers \
                and (via_cache := _cache(via, settings, images.size, cache_dir)) is not None:
            source = (via, via_cache)
        return score_cached(clf, settings, images.hashes, images.pixels, cache, multilabel=multilabel, source=source)
    n = len(images)
    if cacheable(clf) and clf.first_adapted == clf.n_layers and n:  # the whole backbone frozen: features, then the head
        return Prediction.concat([
            score_from_activations(clf, frozen_activations(clf, images.pixels(list(range(i, min(n, i + POOL_CHUNK)))), settings),
                                   settings, multilabel=multilabel) for i in range(0, n, POOL_CHUNK)])
    parts = [predict(clf, images.pixels(list(range(i, min(n, i + POOL_CHUNK)))), settings, multilabel=multilabel)
             for i in range(0, n, POOL_CHUNK)]
    if not parts:
        return predict(clf, torch.zeros(0, 3, 1, 1), settings, multilabel=multilabel)
    return Prediction.concat(parts)


def cached_tokens(clf: Classifier, settings: Settings, images: ImageSet, cache_dir: str | None) -> torch.Tensor | None:
    """The tokens entering `clf`'s first adapted block for `images`, from the activation cache when every
    one is there (the cycle's first pass fills it for the labeled set too), so training does not run the
    frozen blocks on the labeled images again; None otherwise (training computes them)."""
    cache = _cache(clf, settings, images.size, cache_dir) if clf.first_adapted < clf.n_layers and len(images) else None
    if cache is None or cache.missing(images.hashes):
        return None
    return torch.from_numpy(cache.get(images.hashes))


def concat(a: ImageSet, b: ImageSet) -> ImageSet:
    n = len(a)

    def pixels(positions: list[int]) -> torch.Tensor:
        left, right = [p for p in positions if p < n], [p - n for p in positions if p >= n]
        parts = ([a.pixels(left)] if left else []) + ([b.pixels(right)] if right else [])
        return torch.cat(parts)
    return ImageSet(a.hashes + b.hashes, pixels, a.size)


def _uniform(n: int, n_classes: int, embeddings: np.ndarray) -> Prediction:
    return Prediction(np.full((n, n_classes), 1.0 / n_classes, np.float32), np.zeros((n, n_classes), np.float32),
                      embeddings)


def _rows(pred: Prediction, idx) -> Prediction:
    return Prediction(pred.probs[idx], pred.logits[idx], pred.embeddings[idx])


# --- the cycle ----------------------------------------------------------------------------------------------

def label_quality(settings: Settings, frozen: np.ndarray, targets: torch.Tensor, n_classes: int, multiple: bool,
                  trainable: bool) -> tuple[quality.Mislabeling | None, dict[int, list[int]] | None, dict]:
    """Mislabeling scores of the labeled items (the first len(targets) rows of `frozen`) and their
    near-duplicates among all rows, as settings ask; the seconds each took."""
    n_lab = len(targets)
    scores, neighbors, seconds = None, None, {}
    if settings.mislabeling and trainable:
        started = time.perf_counter()
        scores = quality.mislabeling_scores(frozen[:n_lab], targets.cpu().numpy(), n_classes, c=settings.head_c,
                                            seed=settings.seed, multilabel=multiple)
        seconds["mislabeling_seconds"] = round(time.perf_counter() - started, 3)
    if settings.duplicate_similarity > 0 and n_lab:
        started = time.perf_counter()
        found = quality.near_duplicates(frozen, range(len(frozen)), settings.duplicate_similarity)
        neighbors = {i: found[i] for i in range(n_lab) if i in found}
        seconds["duplicates_seconds"] = round(time.perf_counter() - started, 3)
    return scores, neighbors, seconds


def run_cycle(settings: Settings, labeled: ImageSet, targets: torch.Tensor, pool: ImageSet, n_classes: int, *,
              multiple: bool = False, init: dict[str, torch.Tensor] | None = None,
              progress: Callable[[int, int, float], None] | None = None,
              cache_dir: str | None = None, new_labels: int | None = None,
              refresh: np.ndarray | None = None) -> CycleResult:
    """Train (or, with fewer than two classes labeled, don't), score the pool and rank it.

    The frozen backbone's features of every image (from the activation cache when `cache_dir` is
    given) serve the cold phase, coverage strategies and Label Studio's clusters; they do not change
    between versions, so neither do the clusters. `init` (a previous adapter) with `new_labels` (how
    many labels it has not seen, `warm_plan`) makes an incremental cycle with a scaled step budget.
    `init` with `refresh` (the head's input features under `init`'s adapter of every labeled and pool
    image, labeled first: `Adapter.rows`) makes a head refresh (`refresh_plan`): the adapter is kept,
    the head solved again on the labeled rows and the pool scored from its rows, with no forward pass."""
    n_lab = len(labeled)
    everything = concat(labeled, pool)
    probe = build_classifier(settings.replace(adapter="linear"), n_classes)
    # built now, so that the pass that gives the probe its features also fills the adapted model's cache
    # (the tokens entering its first adapted block), which its first training would otherwise compute again
    adapted = build_classifier(settings, n_classes) if settings.adapter != "linear" else None
    started = time.perf_counter()
    frozen_pred = score_images(probe, settings, everything, cache_dir, multilabel=multiple, via=adapted)
    score_seconds = time.perf_counter() - started
    frozen = frozen_pred.embeddings
    trainable = can_train(targets, multiple)
    labels = class_ids(targets) if n_lab else np.zeros(0, np.int64)
    strategy = auto_strategy(settings, labels, n_classes, trainable)
    head_only = trainable and refresh is not None and init is not None and refreshable(settings)
    metrics: dict = {"phase": "trained" if trainable else "cold", "strategy": strategy,
                     "warm": init is not None and trainable and not head_only, "refresh": "head" if head_only else None}

    clf = None
    if trainable:
        clf = probe if settings.adapter == "linear" else adapted
        if init is not None:
            clf.load_trainable(init)
        if head_only:
            metrics.update(refresh_head(clf, torch.from_numpy(refresh[:n_lab]), targets, settings, multilabel=multiple))
            outputs = head_outputs(clf, refresh, multilabel=multiple)
        elif settings.adapter == "linear":  # the head is solved from scratch on the features already at hand,
            metrics.update(fit(clf, torch.zeros(0), targets, settings, multilabel=multiple,  # and applied to them
                               features=torch.from_numpy(frozen[:n_lab])))
            outputs = score_from_activations(clf, frozen, settings, multilabel=multiple)
        else:
            tokens = cached_tokens(clf, settings, labeled, cache_dir)
            pixels = labeled.pixels(list(range(n_lab))) if tokens is None else torch.zeros(0)
            metrics.update(fit(clf, pixels, targets, settings, multilabel=multiple, prefix=tokens,
                               progress=progress, new_labels=new_labels if init is not None else None))
            started = time.perf_counter()
            outputs = score_images(clf, settings, everything, cache_dir, multilabel=multiple)
            score_seconds += time.perf_counter() - started
    else:
        outputs = _uniform(n_lab + len(pool), n_classes, frozen)
    metrics["score_seconds"] = round(score_seconds, 3)  # the pool and the labeled set through the model
    adapted = outputs.embeddings if trainable else None
    mislabeling, neighbors, seconds = label_quality(settings, frozen, targets, n_classes, multiple, trainable)
    metrics.update(seconds)

    if len(pool) == 0:
        empty = np.zeros(0, np.int64)
        return CycleResult(clf, metrics, _rows(outputs, slice(n_lab, None)), frozen[n_lab:], empty, np.zeros(0),
                           empty, strategy, mislabeling, neighbors, adapted)
    probs = outputs.probs
    if multiple:  # strategies expect rows that sum to 1; sigmoid outputs are renormalised
        probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
    coverage = strategy in acquisition.COVERAGE_STRATEGIES or not trainable
    head = {}
    if clf is not None:
        head = {"head_weight": clf.head.weight.detach().float().cpu().numpy(),
                "head_bias": clf.head.bias.detach().float().cpu().numpy()}
    ap = acquisition.Pool(probs=probs, embeddings=frozen if coverage else outputs.embeddings, logits=outputs.logits,
                          labeled=np.arange(n_lab), labels=labels, **head)
    order = acquisition.rank(strategy, ap, seed=selection_seed(settings.seed, n_lab),
                             balance=settings.balance and trainable, candidate_fraction=settings.candidate_fraction)
    scores = acquisition.queue_scores(order, n_lab + len(pool))[n_lab:]
    clusters = (acquisition.clusters(frozen, k=settings.clusters or None, seed=settings.seed)
                if settings.clusters >= 0 else np.zeros(0, np.int64))
    return CycleResult(clf, metrics, _rows(outputs, slice(n_lab, None)), frozen[n_lab:], order - n_lab, scores,
                       clusters, strategy, mislabeling, neighbors, adapted)
