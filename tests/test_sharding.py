"""Pool scoring sharded over real RQ workers on the real Redis, images over real loopback HTTP."""
from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from peal_backend.config import Settings
from peal_backend.images import content_hash, preprocess, to_pil
from peal_backend.scoring import ActivationCache, frozen_activations
from peal_backend.sharding import _frozen_model, fill_cache_sharded
from tests.backbone_fixture import tiny_backbone  # noqa: F401
from tests.conftest import DATASETS
from tests.test_jobs import REDIS_URL, Workers, _redis_or_skip, forget_queue


@pytest.fixture
def pool(image_server):
    with np.load(DATASETS / "pneumoniamnist.npz") as d:
        arrays = d["test_images"][:96]
    items, images = [], []
    for i, a in enumerate(arrays):
        img = to_pil(a)
        image_server.add(f"pool/{i}.png", b"")
        img.save(image_server.dir / f"pool/{i}.png")
        data = (image_server.dir / f"pool/{i}.png").read_bytes()
        items.append((content_hash(data), image_server.url(f"/pool/{i}.png")))
        images.append(img)
    return items, images


@pytest.fixture
def shard_settings(tmp_path, tiny_backbone, image_server):
    client = _redis_or_skip()
    name = f"test-shard-{uuid.uuid4().hex[:10]}"
    s = Settings(redis_url=REDIS_URL, queue_name=name, backbone=tiny_backbone, adapter="linear",
                 model_dir=str(tmp_path), label_studio_url=image_server.base_url, log_level="WARNING")
    yield s
    forget_queue(client, name)
    client.close()


def expected(settings, images):
    return frozen_activations(_frozen_model(settings), preprocess(images, 28), settings)


def test_without_idle_workers_the_coordinator_scores_every_shard(shard_settings, pool, tmp_path):
    items, images = pool
    out = fill_cache_sharded(shard_settings, 28, items, str(tmp_path / "cache"), shard_size=16)
    assert out["shards"] == 6 and out["computed_here"] == 96
    cache = ActivationCache(tmp_path / "cache")
    np.testing.assert_allclose(cache.get([h for h, _ in items]), expected(shard_settings, images), atol=1e-2)
    again = fill_cache_sharded(shard_settings, 28, items, str(tmp_path / "cache"))
    assert again["shards"] == 0  # everything cached: nothing to shard


def test_a_real_worker_shares_the_shards(shard_settings, pool, tmp_path):
    items, images = pool
    workers = Workers(shard_settings, str(tmp_path))
    workers.start()
    try:
        # warm the worker up (imports, model load) on a first pool, then time-independent checks
        fill_cache_sharded(shard_settings, 28, items[:40], str(tmp_path / "warm"), shard_size=8)
        out = fill_cache_sharded(shard_settings, 28, items, str(tmp_path / "cache"), shard_size=8)
    finally:
        workers.stop()
    assert out["shards"] == 12
    assert out["computed_here"] + out["computed_by_helpers"] == 96  # each image computed exactly once
    cache = ActivationCache(tmp_path / "cache")
    assert cache.missing([h for h, _ in items]) == []
    np.testing.assert_allclose(cache.get([h for h, _ in items]), expected(shard_settings, images), atol=1e-2)
