"""The activation cache: cached re-scores equal full forwards, and cached images skip the backbone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from peal_backend.backbone import build_classifier
from peal_backend.config import Settings
from peal_backend.images import content_hash, preprocess, to_pil
from peal_backend.scoring import ActivationCache, cache_key, cacheable, score_cached
from peal_backend.training import fit, predict
from tests.backbone_fixture import tiny_backbone  # noqa: F401
from tests.conftest import DATASETS


@pytest.fixture(scope="module")
def retina():
    with np.load(DATASETS / "retinamnist.npz") as d:
        arrays, labels = d["train_images"][:48], d["train_labels"][:48, 0]
    hashes = [content_hash(a.tobytes()) for a in arrays]
    return preprocess([to_pil(a) for a in arrays], 28), torch.tensor(labels.astype(np.int64)), hashes


def no_backbone(_positions):
    raise AssertionError("the backbone ran for an image that is in the cache")


@pytest.mark.parametrize("adapter,extra", [("linear", {}), ("lora", {"lora_last_k": 1})])
def test_cached_rescore_matches_full_forward_and_skips_the_backbone(tmp_path, tiny_backbone, retina, adapter, extra):
    pixels, labels, hashes = retina
    s = Settings(backbone=tiny_backbone, adapter=adapter, epochs=3, min_steps=10, **extra)
    clf = build_classifier(s, 5)
    assert cacheable(clf)
    fit(clf, pixels[:24], labels[:24], s)
    cache = ActivationCache(tmp_path / cache_key(s, clf, 28))
    first = score_cached(clf, s, hashes, pixels, cache)
    full = predict(clf, pixels, s)
    np.testing.assert_allclose(first.probs, full.probs, atol=2e-3)
    np.testing.assert_allclose(first.embeddings, full.embeddings, atol=2e-2)
    assert len(cache) == len(set(hashes))
    # next cycle: the adapter and head change, the frozen part is reused from disk by a new process's cache
    fit(clf, pixels, labels, s)
    again = score_cached(clf, s, hashes, no_backbone, ActivationCache(cache.root))
    # the cache stores float16: a head fitted to convergence (large weights) turns its rounding into
    # differences of a few 1e-3 in probability
    np.testing.assert_allclose(again.probs, predict(clf, pixels, s).probs, atol=5e-3)


def test_one_pass_fills_the_probe_and_the_lora_caches(tmp_path, tiny_backbone, retina):
    """The cycle's first pass (the probe's features) also stores the tokens LoRA on the last K blocks
    starts from, so the first trained cycle does not push the pool through the frozen blocks again."""
    from peal_backend.cycle import ImageSet, score_images
    pixels, _, hashes = retina
    s = Settings(backbone=tiny_backbone, adapter="lora", lora_last_k=1)
    probe, lora = build_classifier(s.replace(adapter="linear"), 5), build_classifier(s, 5)
    images = ImageSet.from_tensor(hashes, pixels)
    via = score_images(probe, s, images, str(tmp_path), via=lora)
    direct = score_images(probe, s, images, str(tmp_path / "direct"))
    # the probe's features come from float16-stored tokens through the last frozen block: rounding only
    np.testing.assert_allclose(via.embeddings, direct.embeddings, atol=2e-2)
    lora_cache = ActivationCache(tmp_path / cache_key(s, lora, 28))
    assert lora_cache.missing(hashes) == []
    assert len(ActivationCache(tmp_path / cache_key(s, probe, 28))) == len(set(hashes))
    # LoRA's first scoring finishes from its cache without the backbone's frozen blocks
    again = score_images(lora, s, ImageSet(hashes, no_backbone, 28), str(tmp_path))
    np.testing.assert_allclose(again.probs, predict(lora, pixels, s).probs, atol=5e-3)


def test_a_trained_cycle_takes_the_labeled_tokens_from_the_cache(tmp_path, tiny_backbone, retina, monkeypatch):
    """LoRA on the last K blocks: the cycle's first pass caches the labeled images' tokens too, so its
    training runs no frozen block and fetches no labeled pixel; the model it trains is the one trained
    from pixels, up to the cache's float16 rounding."""
    from peal_backend import training
    from peal_backend.cycle import ImageSet, run_cycle
    pixels, labels, hashes = retina
    s = Settings(backbone=tiny_backbone, adapter="lora", lora_last_k=1, epochs=2, min_steps=10)
    labeled, pool = slice(0, 24), slice(24, 48)

    def from_pixels(cache_dir):
        return run_cycle(s, ImageSet.from_tensor(hashes[labeled], pixels[labeled]), labels[labeled],
                         ImageSet.from_tensor(hashes[pool], pixels[pool]), 5, cache_dir=cache_dir)

    uncached = from_pixels(None)
    from_pixels(str(tmp_path))  # fills the caches (and, its labeled tokens being there, already uses them)
    monkeypatch.setattr(training, "_frozen_prefix", lambda *a: pytest.fail("the frozen blocks ran on the labeled set"))
    cached = run_cycle(s, ImageSet(hashes[labeled], no_backbone, 28), labels[labeled],
                       ImageSet(hashes[pool], no_backbone, 28), 5, cache_dir=str(tmp_path))
    assert cached.metrics["steps"] == uncached.metrics["steps"] == 10
    np.testing.assert_allclose(cached.pool.probs, uncached.pool.probs, atol=2e-2)
    assert (cached.pool.probs.argmax(1) == uncached.pool.probs.argmax(1)).mean() >= 0.9


def test_nothing_to_cache_for_prompts_or_lora_everywhere(tiny_backbone):
    assert not cacheable(build_classifier(Settings(backbone=tiny_backbone, adapter="prompt"), 2))
    assert not cacheable(build_classifier(Settings(backbone=tiny_backbone, adapter="lora"), 2))


def test_incomplete_shard_is_ignored(tmp_path):
    cache = ActivationCache(tmp_path)
    cache.put(["a", "b"], np.ones((2, 4), np.float32))
    np.save(tmp_path / "shard-dead.npy", np.zeros((1, 4)))  # a writer died before its hash list
    assert cache.missing(["a", "b", "c"]) == [2]
    np.testing.assert_array_equal(ActivationCache(tmp_path).get(["b"]), np.ones((1, 4)))


def test_cache_key_separates_backbones_sizes_and_blocks(tiny_backbone):
    s = Settings(backbone=tiny_backbone, adapter="lora", lora_last_k=1)
    clf = build_classifier(s, 2)
    keys = {cache_key(s, clf, 28), cache_key(s, clf, 56), cache_key(s.replace(features="cls"), clf, 28),
            cache_key(s, build_classifier(s.replace(adapter="linear"), 2), 28)}
    assert len(keys) == 4


def test_many_small_shards_are_merged_and_no_entry_is_lost(tmp_path, monkeypatch):
    from peal_backend import scoring

    monkeypatch.setattr(scoring, "COMPACT_AT", 8)  # a smaller threshold, the same code path
    rng = np.random.default_rng(0)
    values = {f"h{i}": rng.normal(size=(1, 6)).astype(np.float32) for i in range(30)}
    writer, reader = ActivationCache(tmp_path), ActivationCache(tmp_path)  # as two processes
    for i, (h, v) in enumerate(values.items()):
        writer.put([h], v)  # one small shard per /predict of a new image
        if i == 5:
            reader.get(["h0", "h5"])  # the reader has mapped early shards, which a compaction then deletes
    writer.put(["h0"], values["h0"])  # a duplicate entry: kept once by the merge
    assert writer.shard_count() <= 8
    expected = np.concatenate(list(values.values()))
    for cache in (writer, reader, ActivationCache(tmp_path)):
        assert cache.missing(list(values)) == []
        np.testing.assert_allclose(cache.get(list(values)), expected, atol=1e-2)  # stored as float16
    assert writer.compact() >= 2 and writer.shard_count() == 1 and len(ActivationCache(tmp_path)) == 30


def test_cache_key_follows_the_weights_loaded_not_the_files_on_disk(tiny_backbone):
    """Weights rewritten under a running process: it keeps serving (and keying) the weights it loaded;
    a process started after the rewrite loads the new ones under a new key."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    s = Settings(backbone=tiny_backbone, adapter="linear")
    clf = build_classifier(s, 2)
    code = ("from peal_backend.config import Settings; from peal_backend.backbone import build_classifier; "
            "from peal_backend.scoring import cache_key; "
            f"s = Settings(backbone={tiny_backbone!r}, adapter='linear'); print(cache_key(s, build_classifier(s, 2), 28))")
    fresh = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,  # noqa: E731
                                   cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    before = cache_key(s, clf, 28)
    assert cache_key(s, clf, 28) == before == fresh()  # stable while the weights are
    weights = next(Path(tiny_backbone).glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # retrained in place
    assert cache_key(s, clf, 28) == before  # this process still holds the old weights
    assert fresh() != before  # a new process loads the new ones, under a new key


def test_a_cached_rescore_reads_the_cache_a_chunk_at_a_time(tmp_path, tiny_backbone, retina, monkeypatch):
    """Memory of a re-score is bounded: the cache is read back FINISH_CHUNK entries at a time, never
    the whole pool at once, with the same scores as one read."""
    from peal_backend import scoring

    pixels, labels, hashes = retina
    s = Settings(backbone=tiny_backbone, adapter="lora", lora_last_k=1, epochs=1, min_steps=2)
    clf = build_classifier(s, 5)
    fit(clf, pixels[:10], labels[:10], s)
    cache = ActivationCache(tmp_path / cache_key(s, clf, 28))
    whole = score_cached(clf, s, hashes, pixels, cache)
    reads = []
    get = ActivationCache.get
    monkeypatch.setattr(ActivationCache, "get", lambda self, hs: reads.append(len(hs)) or get(self, hs))
    monkeypatch.setattr(scoring, "FINISH_CHUNK", 7)
    chunked = score_cached(clf, s, hashes, no_backbone, cache)
    assert max(reads) == 7 and sum(reads) == len(hashes)
    np.testing.assert_allclose(chunked.probs, whole.probs, atol=1e-6)
