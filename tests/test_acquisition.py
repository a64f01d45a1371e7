"""Acquisition strategies: properties every strategy must have, and cases whose right answer is known."""
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peal_backend.acquisition import (
    MAX_CLUSTERS, REGISTRY, STRATEGIES, Pool, badge, badge_embeddings, class_balance, clusters,
    default_cluster_count, delta_from_purity, dropout_disagreement, dropquery, entropy, featdist_priority,
    featdist_scores, kcenter_greedy, kmeans_pp, least_confidence, margin, max_coverage, probcover,
    probcover_delta, purity_radius, queue_scores, rank, select, typiclust, unknown_ratio,
)
from peal_backend.config import Settings

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def pools(draw, max_items=30):
    """Small pools with awkward probabilities: one-hot rows, exact zeros, uniform rows, one class."""
    n = draw(st.integers(1, max_items))
    c = draw(st.integers(1, 4))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["dirichlet", "onehot", "uniform", "mixed"]))
    if kind == "dirichlet":
        probs = rng.dirichlet(np.full(c, 0.3), size=n)
    elif kind == "onehot":
        probs = np.eye(c)[rng.integers(0, c, n)]
    elif kind == "uniform":
        probs = np.full((n, c), 1.0 / c)
    else:
        probs = np.where(rng.random((n, 1)) < 0.5, np.eye(c)[rng.integers(0, c, n)], np.full((n, c), 1.0 / c))
    emb = rng.standard_normal((n, d)).astype(np.float32)
    if draw(st.booleans()):
        emb[: n // 2] = emb[0]  # exact duplicates
    logits = np.log(np.clip(probs, 1e-12, 1))
    n_lab = draw(st.integers(0, n))
    labeled = rng.choice(n, n_lab, replace=False)
    labels = rng.integers(0, c, n_lab)
    head = rng.standard_normal((c, d)).astype(np.float32)  # every strategy can run, dropquery included
    return Pool(probs, emb, logits, labeled, labels, head, rng.standard_normal(c).astype(np.float32))


@FAST
@given(pool=pools(), n=st.integers(0, 40), seed=st.integers(0, 1000), strategy=st.sampled_from(STRATEGIES),
       balance=st.booleans())
def test_select_returns_n_distinct_unlabeled_indices_deterministically(pool, n, seed, strategy, balance):
    picks = select(strategy, pool, n, seed=seed, balance=balance)
    assert picks.dtype.kind == "i"
    assert len(picks) == min(n, pool.unlabeled.size)  # n beyond the pool gives the whole pool
    assert len(set(picks.tolist())) == len(picks)
    assert np.isin(picks, pool.unlabeled).all()
    assert not np.isin(picks, pool.labeled).any()
    np.testing.assert_array_equal(picks, select(strategy, pool, n, seed=seed, balance=balance))


@FAST
@given(pool=pools(), seed=st.integers(0, 1000), strategy=st.sampled_from(STRATEGIES), balance=st.booleans())
def test_rank_is_a_permutation_of_the_unlabeled_pool(pool, seed, strategy, balance):
    order = rank(strategy, pool, seed=seed, balance=balance, head=7)
    np.testing.assert_array_equal(np.sort(order), pool.unlabeled)
    np.testing.assert_array_equal(order, rank(strategy, pool, seed=seed, balance=balance, head=7))
    scores = queue_scores(order, pool.n_items)
    assert np.isnan(scores[pool.labeled]).all()
    ranked = scores[order]
    assert np.isfinite(ranked).all() and (ranked >= 0).all() and (ranked <= 1).all()
    np.testing.assert_array_equal(np.argsort(scores, kind="stable")[: order.size], order)


@FAST
@given(pool=pools(), n=st.integers(0, 40), seed=st.integers(0, 1000), strategy=st.sampled_from(STRATEGIES),
       balance=st.booleans(), head=st.integers(0, 12))
def test_select_is_the_head_of_rank(pool, n, seed, strategy, balance, head):
    # one ranking path: for every strategy, balanced or not, select's n picks are the queue's first n
    # (n beyond the candidate fraction or the pool included), with a head of at least n
    picks = select(strategy, pool, n, seed=seed, balance=balance, head=head)
    queue = rank(strategy, pool, seed=seed, balance=balance, head=max(head, n))
    np.testing.assert_array_equal(picks, queue[:n])


@FAST
@given(pool=pools())
def test_scores_are_nan_free_on_extreme_probabilities(pool):
    for values in (entropy(pool.probs), margin(pool.probs), least_confidence(pool.probs)):
        assert values.shape == (pool.n_items,) and np.isfinite(values).all()
    assert np.isfinite(badge_embeddings(pool.probs, pool.embeddings)).all()
    for feats in (pool.embeddings, pool.logits):
        dist, known = featdist_scores(feats, pool.predicted, pool.labeled, pool.labels, pool.n_classes)
        assert np.isfinite(dist).all() and (dist >= 0).all()
        assert np.isfinite(featdist_priority(dist, known)).all()


def test_uncertainty_scores_on_exact_rows():
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(entropy(probs), [0.0, np.log(2), np.log(3)])
    np.testing.assert_allclose(margin(probs), [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(least_confidence(probs), [0.0, 0.5, 2 / 3])


def test_entropy_picks_the_most_uniform_rows():
    rng = np.random.default_rng(0)
    confident = np.eye(4)[rng.integers(0, 4, 50)] * 0.9 + 0.025
    uniformish = np.array([[0.25, 0.25, 0.25, 0.25], [0.3, 0.3, 0.2, 0.2], [0.4, 0.3, 0.2, 0.1]])
    probs = np.vstack([confident[:20], uniformish[2:], confident[20:35], uniformish[:2], confident[35:]])
    pool = Pool(probs)
    picks = select("entropy", pool, 3)
    np.testing.assert_array_equal(probs[picks], uniformish)  # most uniform first
    for strategy in ("margin", "least_confidence"):
        assert set(select(strategy, pool, 2).tolist()) == set(picks[:2].tolist())


def test_kcenter_picks_the_far_outlier():
    rng = np.random.default_rng(1)
    emb = rng.normal(0, 0.1, (200, 8)).astype(np.float32)
    emb[137] = 50.0
    emb[42] = -20.0
    pool = Pool(np.full((200, 2), 0.5), emb, labeled=np.array([0, 1]), labels=np.array([0, 1]))
    np.testing.assert_array_equal(select("coreset", pool, 2), [137, 42])
    # with nothing labeled the first pick is random, the second is the point farthest from it
    assert kcenter_greedy(emb, 2, seed=3)[1] == 137


def test_kcenter_covers_clusters_before_revisiting_them():
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float32)
    emb = (centres[np.arange(400) % 4] + rng.normal(0, 0.2, (400, 2))).astype(np.float32)
    picks = kcenter_greedy(emb, 3, centers=np.array([0]))  # item 0 is in cluster 0
    assert picks[0] % 4 == 3  # the opposite corner first
    assert sorted((picks % 4).tolist()) == [1, 2, 3]


def test_featdist_ranks_a_far_sample_above_a_near_one():
    emb = np.zeros((6, 2), dtype=np.float32)
    emb[:, 0] = [0, 1, 0.1, 5, 0.2, 0.3]  # items 2 and 3 are unlabeled, predicted class 0
    probs = np.array([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 2)
    pool = Pool(probs, emb, labeled=np.array([0, 1, 4, 5]), labels=np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(select("featdist", pool, 2), [3, 2])
    dist, known = featdist_scores(emb, pool.predicted, pool.labeled, pool.labels, 2)
    np.testing.assert_allclose(dist[[2, 3]], [0.4, 4.5], rtol=1e-5)
    assert known.all()


def test_featdist_unknown_classes_first_or_last_on_request():
    emb = np.array([[0, 0], [0.1, 0], [100, 0], [0.2, 0]], dtype=np.float32)
    # item 3 is predicted as class 1, which has no labeled sample; item 2 is a far class-0 sample
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
    pool = Pool(probs, emb, labeled=np.array([0]), labels=np.array([0]))
    np.testing.assert_array_equal(rank("featdist", pool, unknown_first=True), [3, 2, 1])
    np.testing.assert_array_equal(rank("featdist", pool, unknown_first=False), [2, 1, 3])
    # the default follows the C-PEAL reference: a class nobody has labeled yet goes last
    np.testing.assert_array_equal(rank("featdist", pool), [2, 1, 3])
    np.testing.assert_array_equal(select("featdist", pool, 1), [2])


def test_featdist_on_logits():
    logits = np.array([[5, 0], [4, 0], [9, 0], [4.5, 0]], dtype=np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pool = Pool(probs, logits=logits, labeled=np.array([0]), labels=np.array([0]))
    np.testing.assert_array_equal(select("featdist", pool, 3, featdist_space="logits"), [2, 1, 3])
    with pytest.raises(ValueError, match="featdist.*embeddings"):
        select("featdist", pool, 1)  # embeddings are the default space and this pool has none


def test_class_balancing_fills_the_rarest_class_first():
    # 5 labels of class 0, 5 of class 1, none of class 2; the strategy ranks class-0 items on top
    predicted = np.array([0] * 60 + [1] * 30 + [2] * 10)
    order = np.concatenate([np.arange(0, 60), np.arange(60, 90), np.arange(90, 100)])
    labels = np.array([0] * 5 + [1] * 5)
    picks = class_balance(order, predicted, labels, 3, n=4, candidate_fraction=1.0)
    np.testing.assert_array_equal(predicted[picks], [2, 2, 2, 2])
    np.testing.assert_array_equal(picks, [90, 91, 92, 93])  # best-ranked of the class first
    picks = class_balance(order, predicted, labels, 3, n=15, candidate_fraction=1.0)
    totals = np.bincount(labels, minlength=3) + np.bincount(predicted[picks], minlength=3)
    assert totals.sum() == 25 and totals.max() - totals.min() <= 1  # class 2 caught up, then round robin


def test_class_balancing_takes_a_random_candidate_for_a_class_without_any():
    predicted = np.array([0] * 10 + [1] * 10)
    labels = np.array([0, 1, 1])  # class 2 has no label and no candidate: a random one is taken once
    for seed in range(5):
        picks = class_balance(np.arange(20), predicted, labels, 3, n=9, candidate_fraction=1.0, seed=seed)
        assert len(set(picks.tolist())) == 9
        # after that single random pick, classes 0 and 1 are filled evenly: 1 + 2 labels + 9 picks = 6 + 6
        assert (np.bincount(labels, minlength=2) + np.bincount(predicted[picks], minlength=2)).tolist() == [6, 6]
    firsts = {int(class_balance(np.arange(20), predicted, labels, 3, n=1, candidate_fraction=1.0, seed=s)[0])
              for s in range(10)}
    assert len(firsts) > 1  # the pick for the class without candidates is random, not the top of the list


def test_balanced_select_uses_the_strategy_candidates():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), size=1000)
    pool = Pool(probs, labeled=np.arange(10), labels=np.zeros(10, dtype=int))
    picks = select("entropy", pool, 20, balance=True, candidate_fraction=0.1)
    top = rank("entropy", pool)[:99]
    assert np.isin(picks, top).all()
    counts = np.bincount(pool.predicted[picks], minlength=3)
    assert counts[0] <= counts[1] and counts[0] <= counts[2]  # class 0 already has 10 labels


def test_badge_needs_no_gradient_matrix_and_matches_explicit_kmeans_pp():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(3), size=80)
    emb = rng.standard_normal((80, 5)).astype(np.float32)
    labeled = np.arange(5)
    g = badge_embeddings(probs, emb)
    assert g.shape == (80, 15)
    first = 5 + int(np.argmax(np.linalg.norm(g[5:], axis=1)))
    fast = badge(probs, emb, 12, labeled, seed=9)
    assert fast[0] == first
    # same seeded draws on the explicit (N, C*D) matrix: the factored distances must agree with it
    explicit = kmeans_pp(g, 12, seed=9, first=first, exclude=labeled)
    np.testing.assert_array_equal(fast, explicit)


def test_badge_starts_with_the_largest_gradient_and_then_spreads_out():
    probs = np.vstack([np.tile([[1.0, 0.0]], (50, 1)), [[0.5, 0.5]], [[0.55, 0.45]], [[0.6, 0.4]]])
    emb = np.ones((53, 3), dtype=np.float32)
    emb[52] = -1.0  # same uncertainty as 51 but its gradient points the other way
    for seed in range(5):
        picks = select("badge", Pool(probs, emb), 2, seed=seed)
        assert picks[0] == 50  # most uncertain: largest gradient norm
        assert picks[1] == 52 or picks[1] < 50  # never 51, a near copy of 50 in gradient space
    # confident rows (zero gradient) are all at distance |g_50| from it, 52 at |g_50| + |g_52|


def test_typiclust_cold_start_picks_typical_points_not_outliers():
    rng = np.random.default_rng(5)
    centres = np.array([[0, 0], [20, 0], [0, 20]], dtype=np.float32)
    emb = np.vstack([c + rng.normal(0, 1, (100, 2)) for c in centres] + [rng.uniform(-60, 60, (10, 2))])
    emb = emb.astype(np.float32)
    pool = Pool(np.full((310, 4), 0.25), emb)  # nothing labeled, uniform probabilities
    picks = select("typiclust", pool, 3, seed=1, head=3)  # a batch of 3: three clusters
    assert sorted((picks // 100).tolist()) == [0, 1, 2]  # one per cluster, never an outlier (index >= 300)
    for i in picks:
        assert np.linalg.norm(emb[i] - centres[i // 100]) < 1.0  # near the cluster's centre
    # the queue before any annotation starts with them, and is deterministic
    np.testing.assert_array_equal(rank("typiclust", pool, seed=1, head=3)[:3], picks)


def test_typiclust_skips_clusters_that_are_already_labeled():
    rng = np.random.default_rng(6)
    centres = np.array([[0, 0], [20, 0], [0, 20]], dtype=np.float32)
    emb = np.vstack([c + rng.normal(0, 1, (60, 2)) for c in centres]).astype(np.float32)
    picks = typiclust(emb, 2, labeled=np.array([0, 1, 2]), seed=0)  # three labels in cluster 0
    assert sorted((picks // 60).tolist()) == [1, 2]


@pytest.mark.parametrize("strategy", ["coreset", "badge", "typiclust", "probcover", "dropquery"])
def test_embedding_strategies_name_themselves_when_embeddings_are_missing(strategy):
    with pytest.raises(ValueError, match=f"'{strategy}'.*embeddings"):
        select(strategy, Pool(np.full((5, 2), 0.5)), 2)


def test_dropquery_names_the_missing_head():
    pool = Pool(np.full((5, 2), 0.5), np.ones((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="strategy 'dropquery' needs Pool.head_weight"):
        rank("dropquery", pool)


def test_bad_input_gets_clear_errors():
    probs = np.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="unknown strategy 'bald'"):
        select("bald", Pool(probs), 1)
    with pytest.raises(ValueError, match="NaN"):
        Pool(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="embeddings must have shape"):
        Pool(probs, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="duplicate"):
        Pool(probs, labeled=np.array([1, 1]), labels=np.array([0, 0]))
    with pytest.raises(ValueError, match="class ids outside"):
        Pool(probs, labeled=np.array([1]), labels=np.array([2]))
    with pytest.raises(ValueError, match="budget"):
        select("entropy", Pool(probs), -1)
    with pytest.raises(ValueError, match="featdist_space"):
        select("featdist", Pool(probs, np.zeros((4, 2))), 1, featdist_space="pixels")
    with pytest.raises(ValueError, match="duplicate"):
        queue_scores(np.array([0, 0]), 3)


def test_fully_labeled_pool_and_single_item():
    probs = np.full((3, 2), 0.5)
    pool = Pool(probs, np.eye(3, dtype=np.float32)[:, :2], labeled=np.arange(3), labels=np.array([0, 1, 0]),
                head_weight=np.eye(2, dtype=np.float32))
    for strategy in STRATEGIES:
        assert select(strategy, pool, 5).size == 0 and rank(strategy, pool).size == 0
    single = Pool(np.array([[1.0]]), np.ones((1, 4), dtype=np.float32), head_weight=np.ones((1, 4)))
    for strategy in STRATEGIES:
        np.testing.assert_array_equal(select(strategy, single, 3, balance=True), [0])


def test_unknown_ratio_counts_model_mistakes_among_the_picks():
    predicted = np.array([0, 1, 2, 0, 1])
    truth = np.array([0, 2, 2, 1, 1])
    out = unknown_ratio(np.array([1, 3, 4]), predicted, truth)
    assert out == {"unknown": 2, "known": 1, "ratio": 2.0, "fraction": 2 / 3}
    probs = np.eye(3)[predicted]
    assert unknown_ratio(np.array([1, 3]), probs, truth)["ratio"] == 2.0  # no known pick: divided by 1
    assert unknown_ratio(np.array([], dtype=int), predicted, truth)["fraction"] == 0.0


def test_random_strategy_is_uniformish_and_seeded():
    pool = Pool(np.full((1000, 2), 0.5))
    a, b = select("random", pool, 100, seed=1), select("random", pool, 100, seed=2)
    assert len(set(a.tolist()) & set(b.tolist())) < 40
    assert 300 < a.mean() < 700


def test_registry_covers_every_strategy():
    assert tuple(REGISTRY) == STRATEGIES == (
        "random", "entropy", "margin", "least_confidence", "featdist", "coreset", "badge", "typiclust",
        "probcover", "dropquery")
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(Settings)}["strategy"]
    assert set(STRATEGIES) <= set(choices)  # every strategy can be chosen with PEAL_STRATEGY


# --- ProbCover --------------------------------------------------------------------------------------------

def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _blobs(rng, sizes, dim=16, spread=0.15, noise=0):
    """Blobs around random unit directions (items of blob b first, then `noise` uniform outliers)."""
    centres = _unit(rng.standard_normal((len(sizes), dim)))
    parts = [c + rng.normal(0, spread / np.sqrt(dim), (s, dim)) for c, s in zip(centres, sizes)]
    parts.append(_unit(rng.standard_normal((noise, dim))))
    return np.vstack(parts).astype(np.float32), np.repeat(np.arange(len(sizes) + 1), list(sizes) + [noise])


def _coverage(emb, picks, delta):
    """Fraction of items within distance delta of a pick, on L2-normalised embeddings."""
    x = _unit(emb)
    dist = np.sqrt(np.maximum(2 - 2 * x @ x[picks].T, 0))
    return float((dist < delta).any(axis=1).mean())


def test_purity_radius_and_delta_on_exact_numbers():
    sims = np.array([[0.9, 0.5], [0.9, 0.2], [0.5, 0.2]], dtype=np.float32)  # most similar first
    idx = np.array([[1, 2], [0, 2], [0, 1]])
    # points 0 and 1 share a class: their radius is the distance to point 2 (|a - b|^2 = 2 - 2 a.b)
    np.testing.assert_allclose(purity_radius(sims, idx, np.array([0, 0, 1])), [1.0, np.sqrt(1.6), 1.0], rtol=1e-6)
    # one class everywhere: pure as far as the list goes, i.e. up to the farthest listed neighbour
    np.testing.assert_allclose(purity_radius(sims, idx, np.zeros(3, int)), np.sqrt([1.0, 1.6, 1.6]), rtol=1e-6)
    # pure for delta <= radius: at 2, three balls of four are pure; just above 2, only two
    assert delta_from_purity(np.array([4.0, 1.0, 3.0, 2.0]), alpha=0.75) == 2.0
    assert delta_from_purity(np.array([4.0, 1.0, 3.0, 2.0]), alpha=0.5) == 3.0
    assert delta_from_purity(np.array([4.0, 1.0, 3.0, 2.0]), alpha=1.0) == 1.0
    assert delta_from_purity(np.arange(20.0), alpha=0.95) == 1.0  # 19 of 20, despite 0.95 * 20 > 19 in floats


def test_max_coverage_on_points_of_a_circle():
    angles = np.array([0.0, 0.1, 0.2, 0.3, 1.5, 1.6, 3.0])  # a group of four, a pair, a loner
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1)[:, :-1]  # every other point, most similar first
    sims = np.take_along_axis(s, idx, axis=1).astype(np.float32)
    # delta 0.35 (chord length): every ball of the group holds all four (the lowest index wins the
    # tie), then the pair, then the loner. Then delta halves to 0.175: items 2 and 3, 0.2 and 0.3 rad
    # from item 0, are uncovered again, and item 2's ball holds both (so does item 3's: the tie again)
    np.testing.assert_array_equal(max_coverage(x, sims, idx, 0.35, 4), [0, 4, 6, 2])
    # a labeled item at angle 0.05 already covers the group: the pair comes first
    lab = np.cos(angles - 0.05)
    np.testing.assert_array_equal(max_coverage(x, sims, idx, 0.35, 2, labeled_similarity=lab), [4, 6])
    # a tiebreak favouring item 2 over item 1
    np.testing.assert_array_equal(max_coverage(x, sims, idx, 0.35, 1, tiebreak=np.eye(7)[2] * 0.5), [2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probcover_takes_one_point_per_dense_blob_before_a_second(seed):
    rng = np.random.default_rng(seed)
    emb, blob = _blobs(rng, [150, 120, 100, 80, 60], noise=40)  # blob 5 = scattered outliers
    picks = probcover(emb, 5, n_classes=5, seed=seed)
    assert sorted(blob[picks].tolist()) == [0, 1, 2, 3, 4]
    # with a labeled item in blob 0, the first four picks go to the four other blobs
    picks = probcover(emb, 4, labeled=np.array([3]), n_classes=5, seed=seed)
    assert sorted(blob[picks].tolist()) == [1, 2, 3, 4]


def test_probcover_covers_more_of_the_pool_than_random_picks():
    rng = np.random.default_rng(7)
    sizes = rng.integers(20, 200, 25)
    emb, _ = _blobs(rng, sizes, spread=0.4)
    delta = probcover_delta(emb, n_classes=25)
    picks = probcover(emb, 10, n_classes=25, delta=delta)
    ours = _coverage(emb, picks, delta)
    randoms = [_coverage(emb, rng.choice(len(emb), 10, replace=False), delta) for _ in range(50)]
    assert ours > max(randoms) and ours > 2 * np.mean(randoms)


def test_probcover_delta_is_the_purity_rule_on_separated_blobs():
    rng = np.random.default_rng(3)
    emb, blob = _blobs(rng, [60, 50, 40, 30], dim=8, spread=0.3)
    x = _unit(emb)
    dist = np.sqrt(np.maximum(2 - 2 * x @ x.T, 0))
    # k-means with k = 4 finds the blobs; every blob is smaller than the neighbour lists, so a ball is
    # pure up to the nearest item of another blob, and delta is the ceil(0.95 m)-th largest such radius
    radius = np.where(blob[:, None] != blob[None, :], dist, np.inf).min(axis=1)
    expected = np.sort(radius)[::-1][int(np.ceil(0.95 * len(emb))) - 1]
    assert probcover_delta(emb, n_classes=4) == pytest.approx(expected, rel=1e-4)


@FAST
@given(n=st.integers(2, 60), d=st.integers(1, 8), seed=st.integers(0, 1000), classes=st.integers(1, 6),
       duplicates=st.booleans())
def test_probcover_delta_lies_inside_the_pairwise_distance_range(n, d, seed, classes, duplicates):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    if duplicates:
        emb[: n // 2] = emb[0]
    x = _unit(emb)
    dist = np.sqrt(np.maximum(2 - 2 * x @ x.T, 0))[np.triu_indices(n, 1)]
    delta = probcover_delta(emb, n_classes=classes, seed=seed)
    assert dist.min() - 1e-3 <= delta <= dist.max() + 1e-3


def test_probcover_on_a_sample_of_a_large_pool():
    rng = np.random.default_rng(4)
    emb, _ = _blobs(rng, [200, 200, 200])
    labeled = np.arange(0, 600, 7)
    picks = probcover(emb, 30, labeled=labeled, max_points=100, n_classes=3)
    assert picks.size == 30 and np.unique(picks).size == 30 and not np.isin(picks, labeled).any()
    assert probcover(emb, 500, max_points=100).size == 100  # candidates are the sample
    np.testing.assert_array_equal(picks, probcover(emb, 30, labeled=labeled, max_points=100, n_classes=3))


# --- DropQuery --------------------------------------------------------------------------------------------

def _boundary_toy(rng, n_near, n_far, dim=32):
    """Two classes split by the hyperplane w.x = 0 of a known head; `near` items lie within 0.1 of it,
    `far` items 4 to 6 away, on either side. A toy in 2-D would not do: dropout at p = 0.75 zeroes the
    one decisive feature in three trials of four, wherever the item is."""
    w = rng.standard_normal(dim)
    u = w / np.linalg.norm(w)
    side = np.concatenate([rng.uniform(-0.1, 0.1, n_near), rng.choice([-1, 1], n_far) * rng.uniform(4, 6, n_far)])
    noise = rng.standard_normal((n_near + n_far, dim))
    noise -= (noise @ u)[:, None] * u  # orthogonal to w: the distance to the boundary is |side|
    emb = (side[:, None] * u + noise).astype(np.float32)
    head = np.stack([w, -w]).astype(np.float32)
    logits = emb @ head.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return emb, head, probs / probs.sum(axis=1, keepdims=True)


def test_dropout_disagreement_is_higher_near_the_decision_boundary():
    rng = np.random.default_rng(8)
    emb, head, _ = _boundary_toy(rng, 100, 100)
    votes = dropout_disagreement(emb, head, np.zeros(2, np.float32), p=0.75, trials=10, seed=1)
    assert votes[:100].mean() > 3 and votes[100:].mean() < 1
    assert not dropout_disagreement(emb, head, np.zeros(2, np.float32), p=0.0, trials=3).any()  # no dropout


def test_dropquery_picks_items_near_the_decision_boundary():
    rng = np.random.default_rng(9)
    emb, head, probs = _boundary_toy(rng, 40, 400)
    for seed in range(3):
        picks = dropquery(probs, emb, head, None, 10, seed=seed)
        assert np.unique(picks).size == 10 and (picks < 40).sum() >= 9  # 9 % of the pool, 90 % of the picks
    pool = Pool(probs, emb, head_weight=head)
    assert (select("dropquery", pool, 10) < 40).sum() >= 9


def test_dropquery_clusters_candidates_and_takes_one_per_cluster():
    rng = np.random.default_rng(10)
    a, head, _ = _boundary_toy(rng, 30, 0, dim=32)
    w = head[0]
    v = rng.standard_normal(32)
    v -= v @ w / (w @ w) * w
    v = (v / np.linalg.norm(v)).astype(np.float32)
    emb = np.vstack([a * 0.2 + 3 * v, a * 0.2 - 3 * v])  # two groups along the boundary, 6 apart
    logits = emb @ head.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for seed in range(3):
        picks = dropquery(probs, emb, head, np.zeros(2, np.float32), 2, seed=seed)
        assert sorted((picks // 30).tolist()) == [0, 1]


def test_dropquery_fills_with_the_highest_entropy_when_candidates_run_short():
    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.ones(3), size=50)
    emb = rng.standard_normal((50, 4)).astype(np.float32)
    head = rng.standard_normal((3, 4)).astype(np.float32)
    # p = 0: the dropout copies are the clean item, nobody disagrees, every pick is a fill
    picks = dropquery(probs, emb, head, np.zeros(3, np.float32), 5, labeled=np.array([0, 1]), p=0.0)
    expected = 2 + np.argsort(-entropy(probs[2:]))[:5]
    np.testing.assert_array_equal(picks, expected)
    with pytest.raises(ValueError, match="dropout rate"):
        dropquery(probs, emb, head, None, 5, p=1.0)


# --- the head in the Pool, and clusters for Label Studio ---------------------------------------------------

def test_pool_head_fields_are_validated():
    probs, emb = np.full((4, 3), 1 / 3), np.zeros((4, 5), dtype=np.float32)
    pool = Pool(probs, emb, head_weight=np.ones((3, 5)))
    assert pool.head_weight.dtype == np.float32 and pool.head_bias.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"head_weight must have shape \(C=3, D=5\)"):
        Pool(probs, emb, head_weight=np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"head_weight must have shape \(C=3, D=5\)"):
        Pool(probs, emb, head_weight=np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"head_bias must have shape \(C=3,\)"):
        Pool(probs, emb, head_weight=np.ones((3, 5)), head_bias=np.ones(5))
    with pytest.raises(ValueError, match="head_weight needs Pool.embeddings"):
        Pool(probs, head_weight=np.ones((3, 5)))
    with pytest.raises(ValueError, match="head_bias is set but Pool.head_weight is None"):
        Pool(probs, emb, head_bias=np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        Pool(probs, emb, head_weight=np.full((3, 5), np.nan))


def test_clusters_recover_separated_blobs_deterministically():
    rng = np.random.default_rng(12)
    emb, blob = _blobs(rng, [90, 70, 50, 40, 30, 20], dim=12, spread=0.2)
    for seed in range(3):
        labels = clusters(emb, 6, seed=seed)
        assert labels.dtype == np.int64 and labels.shape == (len(emb),)
        assert labels.min() >= 0 and labels.max() < 6
        # the same partition as the blobs: one label per blob, six different labels
        assert all(np.unique(labels[blob == b]).size == 1 for b in range(6))
        assert np.unique(labels).size == 6
        np.testing.assert_array_equal(labels, clusters(emb, 6, seed=seed))


def test_clusters_default_count_and_edge_cases():
    assert [default_cluster_count(n) for n in (0, 1, 2, 8, 1000, 20_000, 10**6)] == [1, 1, 2, 2, 22, 100, 100]
    assert MAX_CLUSTERS == 100
    rng = np.random.default_rng(13)
    emb = rng.standard_normal((1000, 6)).astype(np.float32)
    labels = clusters(emb)
    assert labels.max() < 22 and np.unique(labels).size > 15  # k-means leaves few clusters empty
    # k-means, not an arbitrary split: far less within-cluster spread than a random partition of the same k
    def spread(lab):
        return sum(((emb[lab == c] - emb[lab == c].mean(axis=0)) ** 2).sum() for c in np.unique(lab))
    assert spread(labels) < 0.6 * spread(rng.integers(0, 22, 1000))
    assert clusters(np.zeros((0, 3), np.float32)).size == 0
    np.testing.assert_array_equal(clusters(emb[:1]), [0])
    np.testing.assert_array_equal(clusters(emb[:5], k=50), clusters(emb[:5], k=5))  # k capped at N
    with pytest.raises(ValueError, match="positive integer"):
        clusters(emb, k=0)
