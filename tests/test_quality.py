"""Label quality (peal_backend.quality): mislabeling scores from out-of-sample predictions, and
near-duplicates; and both through the one engine (cycle.run_cycle)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from peal_backend import quality
from tests.conftest import DATASETS
from peal_backend.quality import (adjusted_margin_scores, confident_thresholds, mislabeling_scores, near_duplicates,
                                  stratified_folds)


def blobs(n_per_class: int, n_classes: int, dim: int = 16, spread: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4.0, size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[labels] + rng.normal(0, spread, size=(len(labels), dim))
    return x.astype(np.float32), labels


def flip(labels: np.ndarray, n_classes: int, fraction: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, n_classes, size=len(flipped))) % n_classes
    return noisy, flipped


def test_planted_wrong_labels_rank_first_on_separable_data():
    x, y = blobs(60, 3)
    noisy, flipped = flip(y, 3, 0.1)
    result = mislabeling_scores(x, noisy, 3)
    assert result.reason == "" and result.scored.all()
    assert ((0 <= result.scores) & (result.scores <= 1)).all()
    top = np.argsort(-result.scores)[:len(flipped)]
    assert set(top) == set(flipped)  # separable blobs: every flipped label, and only those, on top
    assert (result.scores[flipped] > 0.5).all() and np.median(np.delete(result.scores, flipped)) < 0.4
    # the probabilities are out of sample: a flipped item's given class gets a low probability
    assert (result.probs[flipped, noisy[flipped]] < 0.5).all()


def test_an_items_probabilities_do_not_depend_on_its_own_label():
    """Out of sample: the head that scores an item never saw its label, so changing that label changes
    the item's probabilities not at all (and the other folds' items' only through their heads)."""
    x, y = blobs(15, 2, spread=3.0, seed=3)
    folds = stratified_folds(y, 3, seed=0)
    before = quality.cross_fitted_probs(x, y, 2, folds)
    changed = y.copy()
    changed[7] = 1 - changed[7]
    after = quality.cross_fitted_probs(x, changed, 2, folds)
    assert after[7] == pytest.approx(before[7], abs=1e-9)
    same_fold = folds == folds[7]
    assert np.allclose(after[same_fold], before[same_fold], atol=1e-9)
    assert not np.allclose(after[~same_fold], before[~same_fold], atol=1e-6)


def test_thresholds_adjust_for_a_class_the_head_is_less_sure_of():
    # class 1's own items get 0.6 on average: an item of class 1 at 0.55 is ordinary, not suspicious,
    # while a class-0 item at 0.55 (class 0's items usually get 0.9) is
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.55, 0.45], [0.4, 0.6], [0.4, 0.6], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    t = confident_thresholds(probs, labels, 2)
    assert t == pytest.approx([(0.9 + 0.9 + 0.55) / 3, (0.6 + 0.6 + 0.55) / 3])
    s = adjusted_margin_scores(probs, labels, t)
    assert s[2] > 0.5 > s[5]


def test_folds_are_stratified_and_every_class_stays_in_training():
    y = np.array([0] * 11 + [1] * 2 + [2] * 7)
    folds = stratified_folds(y, 5, seed=0)
    for f in range(5):
        train = y[folds != f]
        assert set(train) == {0, 1, 2}
        assert np.sum((folds == f) & (y == 0)) in (2, 3)
    with pytest.raises(ValueError, match="folds"):
        stratified_folds(y, 1)


def test_a_class_with_one_label_is_not_scored_and_says_why():
    x, y = blobs(10, 3)
    y = np.concatenate([y[:20], y[20:21]])  # class 2 has one label
    x = x[:21]
    result = mislabeling_scores(x, y, 3)
    assert np.isnan(result.scores[20]) and result.scored[:20].all()
    assert "1 labels not scored" in result.reason


@pytest.mark.parametrize("labels, n_classes", [(np.zeros(8, int), 2), (np.array([0, 0, 0, 1]), 2), (np.zeros(0, int), 2)])
def test_too_few_labels_score_nothing_with_a_reason(labels, n_classes):
    x = np.random.default_rng(0).normal(size=(len(labels), 4))
    result = mislabeling_scores(x, labels, n_classes)
    assert not result.scored.any() and "two classes with at least 2 labels" in result.reason


def test_tiny_set_two_per_class_is_scored():
    x, y = blobs(2, 2)
    result = mislabeling_scores(x, y, 2)
    assert result.scored.all() and (result.scores < 0.5).all()


def test_bad_input_is_refused_clearly():
    x, y = blobs(5, 2)
    with pytest.raises(ValueError, match="class ids in 0..1"):
        mislabeling_scores(x, y + 1, 2)
    with pytest.raises(ValueError, match="expected \\(N, D\\) features and N labels"):
        mislabeling_scores(x[:3], y, 2)
    with pytest.raises(ValueError, match="folds must be at least 2"):
        mislabeling_scores(x, y, 2, folds=1)
    with pytest.raises(ValueError, match="multi-hot"):
        mislabeling_scores(x, y, 2, multilabel=True)


def test_multiple_choice_scores_the_worst_choice():
    x, y = blobs(40, 2, seed=5)
    rng = np.random.default_rng(6)
    # choice 0 follows the blob, choice 1 is chosen at random (nothing to learn from: no confident issue)
    multi = np.stack([y, rng.integers(0, 2, len(y))], axis=1).astype(np.float32)
    wrong = np.array([3, 50])
    multi[wrong, 0] = 1 - multi[wrong, 0]
    result = mislabeling_scores(x, multi, 2, multilabel=True)
    assert result.scored.all()
    assert set(np.argsort(-result.scores)[:2]) == set(wrong)
    nothing = mislabeling_scores(x, np.ones_like(multi), 2, multilabel=True)
    assert not nothing.scored.any() and "no choice is both chosen and not chosen" in nothing.reason


def test_near_duplicates_finds_planted_copies_only():
    x, _ = blobs(50, 4, dim=48, spread=2.0)
    rng = np.random.default_rng(2)
    copies = x[[5, 77]] + rng.normal(0, 1e-3, size=(2, x.shape[1])).astype(np.float32)
    everything = np.concatenate([x, copies, x[[120]]])
    ids = [1000 + i for i in range(len(everything))]
    found = near_duplicates(everything, ids, 0.98)
    a, b, exact = ids[200], ids[201], ids[202]
    assert found == {ids[5]: [a], a: [ids[5]], ids[77]: [b], b: [ids[77]], ids[120]: [exact], exact: [ids[120]]}
    # most similar first, capped
    many = np.concatenate([x, np.repeat(x[[0]], 4, axis=0)])
    got = near_duplicates(many, list(range(len(many))), 0.98, max_neighbors=2)
    assert len(got[0]) == 2 and set(got[0]) <= {200, 201, 202, 203}


def test_a_copy_stands_out_in_a_small_project():
    """Whitening keeps at most half as many directions as rows (to nearly as many, every row is about
    equally far from every other and a copy no longer stands out): a copy among 19 items is found."""
    x, _ = blobs(10, 2, dim=48, spread=2.0)
    everything = np.concatenate([x[:18], x[:1] + 1e-3])
    assert near_duplicates(everything, list(range(19)), 0.98) == {0: [18], 18: [0]}


def test_a_tiny_set_counts_only_identical_embeddings():
    """Below 16 items there are too few rows to whiten: only identical embeddings are duplicates, so a
    handful of unrelated items never pair up by chance."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.normal(size=(6, 8)).astype(np.float32)
        assert near_duplicates(x, list(range(6)), 0.98) == {}
    x = np.concatenate([x, x[:1]])
    assert near_duplicates(x, list(range(7)), 0.98) == {0: [6], 6: [0]}


def test_near_duplicates_edge_cases():
    assert near_duplicates(np.zeros((1, 4)), [7], 0.9) == {}
    assert near_duplicates(np.zeros((0, 4)), [], 0.9) == {}
    assert near_duplicates(np.ones((2, 4)), ["a", "b"], 0.9) == {"a": ["b"], "b": ["a"]}  # identical only
    with pytest.raises(ValueError, match="similarity must be in"):
        near_duplicates(np.zeros((3, 4)), [1, 2, 3], 0.0)
    with pytest.raises(ValueError, match="3 ids"):
        near_duplicates(np.zeros((2, 4)), [1, 2, 3], 0.9)


def test_whitening_spreads_typical_pairs_but_keeps_copies():
    """Features sharing a strong common direction (as backbone features do): raw cosine similarity puts
    unrelated items close together; whitened, they are far apart and a copy is still close."""
    rng = np.random.default_rng(0)
    common = rng.normal(size=32) * 10
    x = (common + rng.normal(size=(300, 32))).astype(np.float32)
    raw = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = raw @ raw.T
    np.fill_diagonal(sims, 0)
    assert np.median(sims.max(axis=1)) > 0.98
    u = quality.whitened_rows(np.concatenate([x, x[:1] + 1e-3]))
    w = u[:300] @ u[:300].T
    np.fill_diagonal(w, 0)
    assert np.median(w.max(axis=1)) < 0.8 and float(u[0] @ u[300]) > 0.99


# --- through the engine ----------------------------------------------------------------------------------

PNEUMONIA = DATASETS / "pneumoniamnist.npz"


@pytest.mark.skipif(not PNEUMONIA.exists(), reason=f"{PNEUMONIA} missing (set PEAL_DATASETS)")
def test_run_cycle_scores_labels_and_finds_duplicates_without_touching_the_queue(tmp_path):
    """The one engine on real chest X-rays through peal-mini: 200 labels (both classes), 20 flipped, and one
    labeled image repeated in the pool. The flipped labels dominate the top of the mislabeling ranking,
    the copy is the labeled image's neighbour, and the queue is the same as with label quality off."""
    from peal_backend import simulate as sim
    from peal_backend.config import Settings

    with np.load(PNEUMONIA) as data:  # the file is sorted by class: 150 of each
        lab = data["train_labels"][:, 0]
        pick = np.concatenate([np.flatnonzero(lab == 0)[:150], np.flatnonzero(lab == 1)[:150]])
        pick = pick[np.random.default_rng(0).permutation(len(pick))]
        images, labels = data["train_images"][pick], lab[pick].astype(np.int64)
    images = np.concatenate([images, images[[3]]])  # pool item 300 is labeled item 3 again
    labels = np.concatenate([labels, labels[[3]]])
    noisy, flipped = flip(labels[:200], 2, 0.1, seed=2)
    labels = np.concatenate([noisy, labels[200:]])
    data = sim.Dataset("xrays", images, labels, images[:2], labels[:2], ["normal", "pneumonia"])
    settings = Settings(backbone="peal-mini", adapter="linear", strategy="margin", mislabeling=True,
                        duplicate_similarity=0.98)
    prep = sim.prepare(data, settings, tmp_path / "cache")
    labeled = np.arange(200)

    on = sim.simulated_cycle(prep, settings, labeled)
    off = sim.simulated_cycle(prep, settings.replace(mislabeling=False, duplicate_similarity=0.0), labeled)
    assert off.mislabeling is None and off.neighbors is None
    assert np.array_equal(on.order, off.order) and np.array_equal(on.queue_scores, off.queue_scores)

    scores = on.mislabeling.scores
    assert scores.shape == (200,) and on.mislabeling.scored.all()
    top = np.argsort(-scores)[:20]
    assert len(set(top) & set(flipped)) >= 6  # at least 3x the 10 % base rate among the top 10 %
    assert 300 in on.neighbors[3]  # position 300: the labeled set (200) + pool position 100 (item 300)
    assert on.metrics["mislabeling_seconds"] >= 0 and on.metrics["duplicates_seconds"] >= 0
