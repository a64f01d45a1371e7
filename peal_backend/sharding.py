"""Pool scoring shared over RQ workers: the activation cache of a large pool filled in parallel.

The coordinator (the training job) puts shards of (hash, url) on a Redis list and enqueues helper jobs
on the scoring queue; helpers and the coordinator itself pop shards until the list is empty, each
filling the shared cache (MODEL_DIR must be shared). With no idle worker the coordinator simply does
every shard itself, so sharding can never deadlock; a helper that dies mid-shard leaves its images
missing and the coordinator computes them at the end.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from .backbone import Classifier
from .config import Settings
from .scoring import ActivationCache, cache_key, cacheable, frozen_activations


def score_queue_name(settings: Settings) -> str:
    return f"{settings.queue_name}-score"


def _frozen_model(settings: Settings) -> Classifier:
    from .backbone import build_classifier
    return build_classifier(settings, 1)  # the frozen part does not depend on the head or trained weights


def fill_from_list(list_key: str, settings_payload: dict, size: int, cache_dir: str) -> int:
    """The RQ helper job: rebuild settings in this worker, then drain the shard list."""
    from .jobs import settings_from_payload
    return drain_shards(list_key, settings_from_payload(settings_payload), size, cache_dir)


def drain_shards(list_key: str, settings: Settings, size: int, cache_dir: str) -> int:
    """Pop shards from `list_key` until it is empty; returns how many images this process computed."""
    import redis

    from .images import ImageError, ImageFetcher, content_hash, preprocess
    from .labelstudio import LabelStudio

    conn = redis.Redis.from_url(settings.redis_url)
    clf = fetcher = None  # built on the first shard: a helper arriving after the list emptied leaves at once
    cache = ActivationCache(cache_dir)
    done = 0
    while (raw := conn.lpop(list_key)) is not None:
        if clf is None:
            clf = _frozen_model(settings)
            auth = LabelStudio.from_settings(settings).auth_headers if settings.label_studio_api_key else None
            fetcher = ImageFetcher(settings, auth)
        shard = json.loads(raw)
        todo = [shard[i] for i in cache.missing([h for h, _ in shard])]
        hashes, images = [], []
        for h, url in todo:
            try:
                data, image = fetcher.fetch_both(url)
            except ImageError:
                continue  # the coordinator already holds this image; it fills the gap at the end
            if content_hash(data) == h:
                hashes.append(h)
                images.append(image)
        if images:
            cache.put(hashes, frozen_activations(clf, preprocess(images, size), settings))
            done += len(images)
    return done


def fill_cache_sharded(settings: Settings, size: int, items: list[tuple[str, str]], cache_dir: str,
                       shard_size: int = 32, helpers: int = 8) -> dict:
    """Compute the missing frozen activations of `items` ((hash, url) pairs) with the RQ workers' help."""
    import redis
    from rq import Queue

    from .jobs import settings_payload

    cache = ActivationCache(cache_dir)
    todo = [items[i] for i in cache.missing([h for h, _ in items])]
    if not todo:
        return {"shards": 0, "computed_here": 0, "computed_by_helpers": 0, "helpers": 0}
    conn = redis.Redis.from_url(settings.redis_url)
    list_key = f"peal:{settings.queue_name}:shards:{uuid.uuid4().hex}"
    shards = [json.dumps(todo[i:i + shard_size]) for i in range(0, len(todo), shard_size)]
    conn.rpush(list_key, *shards)
    conn.expire(list_key, 3600)
    queue = Queue(score_queue_name(settings), connection=conn)
    payload = settings_payload(settings)
    jobs = [queue.enqueue(fill_from_list, list_key, payload, size, str(cache_dir), job_timeout=settings.job_timeout,
                          result_ttl=600, failure_ttl=3600) for _ in range(min(helpers, len(shards) - 1))]
    mine = drain_shards(list_key, settings, size, str(cache_dir))
    # the list is empty: wait for helpers finishing their last shard, drop those that never started
    deadline = time.monotonic() + settings.job_lock_ttl * 20
    while time.monotonic() < deadline and any(j.get_status(refresh=True) == "started" for j in jobs):
        time.sleep(0.05)
    by_helpers = 0
    for j in jobs:
        status = j.get_status(refresh=True)
        if status in ("queued", "deferred", "scheduled"):
            j.cancel()
        elif status == "finished":
            by_helpers += int(j.return_value() or 0)
    return {"shards": len(shards), "computed_here": mine, "computed_by_helpers": by_helpers, "helpers": len(jobs)}


def prefill_sharded(settings: Settings, size: int, items: list[tuple[str, str]], cache_root: str) -> dict | None:
    """Fill the pool's frozen activations over the RQ workers before a cycle scores it (None: nothing
    frozen to cache for this adapter)."""
    clf = _frozen_model(settings)
    if not cacheable(clf):
        return None
    return fill_cache_sharded(settings, size, items, str(Path(cache_root) / cache_key(settings, clf, size)))
