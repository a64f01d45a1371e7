"""The training job run by the queue: Label Studio annotations in, a new model version and fresh
predictions for the unlabeled pool out.

Order matters for "nothing lost or half-written": the version (weights, labels, queue scores) is
saved atomically first; only then are predictions pushed and the project's model_version moved to
it. If the push fails the job fails, the new version still serves /predict, and the next run pushes
again (Label Studio predictions are created idempotently per task and version). A job may publish two
versions this way: a head refresh (the queue is fresh within seconds), then the adapter it trains.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import torch

from .backbone import input_size, load_backbone
from .config import Settings
from .cycle import Adapter, ImageSet, can_train, may_defer, refresh_plan, refreshable, run_cycle, warm_plan
from .jobs import another_requested, check_lease, request_watch
from . import learning
from .progress import JobProgress
from .images import ImageError, ImageFetcher, content_hash, preprocess
from .labelstudio import LabelStudio
from .model import (ADAPTER_FILE, CLUSTERS_FILE, FEATURE_HASHES_FILE, FEATURES_FILE, QUEUE_FILE, TRAINED_FILE, LabelSpec,
                    PayloadError, choices_result, model_settings, parse_label_config, task_image_url, version_prefix)
from .sharding import prefill_sharded
from .store import ModelStore, version_number

log = logging.getLogger(__name__)


FETCH_THREADS = 8  # images fetched (and decoded) at once by a training job


def _fetch_all(fetcher: ImageFetcher, tasks: list[dict], spec: LabelSpec, what: str, project: int,
               keep_images: bool = True):
    """Images (and content hashes) of the tasks that can be fetched, FETCH_THREADS at a time, in task
    order; a bad image skips its task, never the batch. Without `keep_images` only the hashes are kept
    (a pool is re-read from the fetcher's disk cache a chunk at a time, so its memory stays bounded),
    and images already in that cache are not decoded again."""
    from concurrent.futures import ThreadPoolExecutor

    def one(task):
        try:
            url = task_image_url(task, spec)
            return fetcher.fetch_both(url) if keep_images else (fetcher.fetch_content(url), None)
        except (ImageError, PayloadError) as exc:
            return exc

    kept, images, hashes, errors = [], [], [], 0
    with ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="peal-job-fetch") as pool:
        for task, got in zip(tasks, pool.map(one, tasks)):
            if isinstance(got, Exception):
                errors += 1
                log.warning("project %s: skipping %s task %s: %s", project, what, task.get("id"), got)
                continue
            data, image = got
            if keep_images:
                images.append(image)
            hashes.append(content_hash(data))
            kept.append(task)
    return kept, images, hashes, errors


def labeled_examples(labeled: list[tuple[dict, dict]], project: int, spec: LabelSpec):
    """(task, label indices) for every task whose latest usable annotation names our choices."""
    out, skipped = [], 0
    for task, annotation in labeled:
        try:
            labels = spec.labels_of(annotation.get("result") or [])
        except PayloadError as exc:
            skipped += 1
            log.warning("project %s task %s: %s; annotation ignored", project, task.get("id"), exc)
            continue
        if not labels:
            skipped += 1
            continue
        out.append((task, [spec.labels.index(lab) for lab in labels]))
    return out, skipped


COLD_START_PREFIX = "peal-coldstart"  # versions that only order the queue: no classifier yet
QUALITY_PREFIX = "peal-quality"  # labeled tasks' label-quality predictions (`mislabeling`, `neighbors`)


def stored_adapter(store: ModelStore, latest) -> Adapter | None:
    """What a head refresh needs from the latest version (`cycle.refresh_plan`), as the simulator keeps
    it: its weights, the labels its adapter trained on and its adapted features by image; None when it
    stored none (the adapter then trains; so it does when `Adapter.rows` misses an image added since)."""
    labels = store.read_json(latest, ADAPTER_FILE)
    known = store.read_json(latest, FEATURE_HASHES_FILE)
    if not labels or not known:
        return None
    features = store.read_array(latest, FEATURES_FILE)
    if features is None or len(features) != len(known):
        log.warning("project %s: %s has %s rows of adapted features for %d images; the adapter trains", latest.project,
                    latest.name, "no" if features is None else len(features), len(known))
        return None
    return Adapter(latest.weights(), labels, known, features)


def adapter_files(result, adapter_labels: dict, hashes: list[str]) -> dict:
    """A trained version's files for the head refreshes after it: the labels its adapter trained on and
    the head's input features of every image it scored (labeled, then pool), as float16."""
    if not result.trained or result.adapted is None:
        return {}
    return {ADAPTER_FILE: adapter_labels, FEATURE_HASHES_FILE: list(hashes),
            FEATURES_FILE: np.asarray(result.adapted, dtype=np.float16)}


def quality_version(version: str) -> str:
    """The model version of the label-quality predictions written with `version` (same number): apart from
    the queue's version, so the project's model_version, the queue and the pre-annotations never see it."""
    return f"{QUALITY_PREFIX}-v{version_number(version)}"


def quality_predictions(spec: LabelSpec, result, labeled_ids: list[int], pool_ids: list[int], max_writes: int,
                        threshold: float) -> list[dict]:
    """Label Studio predictions for the labeled tasks the cycle judged: `mislabeling` (how likely the given
    label is wrong), `neighbors` (near-duplicate task ids, labeled or not) and, as `result`, the choice of
    a head that never saw the task's label. Tasks with near-duplicates first, then by mislabeling,
    highest first; at most `max_writes` (each costs Label Studio one request)."""
    ids = list(labeled_ids) + list(pool_ids)
    scores = result.mislabeling.scores if result.mislabeling is not None else np.full(len(labeled_ids), np.nan)
    neighbors = result.neighbors or {}
    rows = []
    for i, tid in enumerate(labeled_ids):
        scored = not np.isnan(scores[i])
        if not scored and i not in neighbors:
            continue
        row = {"task": tid, "result": choices_result(spec, result.mislabeling.probs[i], threshold) if scored else [],
               "mislabeling": round(float(scores[i]), 6) if scored else 0.0}
        if i in neighbors:
            row["neighbors"] = [ids[j] for j in neighbors[i]]
        rows.append(row)
    rows.sort(key=lambda r: ("neighbors" not in r, -r["mislabeling"]))
    return rows[:max(0, int(max_writes))]


def train_project(project_id: int, settings: Settings, reason: str = "") -> dict:
    """One cycle for a Label Studio project. With fewer than two classes labeled (a project just
    connected, or one label so far) it only orders the queue (a `peal-coldstart-vN` version whose
    predictions carry an empty result); after that it trains a classifier."""
    started = time.perf_counter()
    project = int(project_id)
    track = JobProgress(settings.model_dir, project)  # the dashboard's job panel
    track.phase("fetching", "reading tasks from Label Studio")
    ls = LabelStudio.from_settings(settings)
    fetcher = ImageFetcher(settings, ls.auth_headers)
    store = ModelStore(settings.model_dir)
    spec = parse_label_config(ls.project(project)["label_config"])

    data_as_of = time.time()  # annotations after this are ones this cycle's ranking has not seen
    labeled_tasks, unlabeled_tasks = ls.split_tasks(project)
    track.phase("fetching", f"fetching {len(labeled_tasks)} labeled and {len(unlabeled_tasks)} unlabeled images")
    examples, skipped = labeled_examples(labeled_tasks, project, spec)
    # every read from Label Studio before the long part. The versions it holds: never reuse one of their
    # names (a backend that lost MODEL_DIR would otherwise name its first version v1 again, and tasks
    # already holding a v1 prediction would keep the old model's)
    held = ls.model_versions(project) if settings.push_predictions else {}
    tasks, images, hashes, bad = _fetch_all(fetcher, [t for t, _ in examples], spec, "labeled", project)
    label_of = {t["id"]: labs for t, labs in examples}
    n_classes = len(spec.labels)
    if spec.multiple:
        targets = torch.zeros(len(tasks), n_classes)
        for i, t in enumerate(tasks):
            targets[i, label_of[t["id"]]] = 1.0
    else:
        targets = torch.tensor([label_of[t["id"]][0] for t in tasks], dtype=torch.long)

    size = input_size(settings, load_backbone(settings.backbone).config)
    pool_tasks, _, pool_hashes, pool_bad = _fetch_all(fetcher, unlabeled_tasks, spec,
                                                      "unlabeled", project, keep_images=False)
    if not tasks and not pool_tasks:
        log.info("project %s: no task with a usable image (%d annotations skipped, %d images failed)",
                 project, skipped, bad + pool_bad)
        return {"status": "skipped", "reason": "no task with a usable image", "skipped_annotations": skipped,
                "failed_images": bad + pool_bad}

    fetch_seconds = time.perf_counter() - started
    sharding = None
    if settings.redis_url and settings.activation_cache and pool_tasks:
        urls = [fetcher.resolve(task_image_url(t, spec)) for t in pool_tasks]
        sharding = prefill_sharded(settings, size, list(zip(pool_hashes, urls)), settings.activation_cache_dir)

    trained_labels = {str(t["id"]): list(label_of[t["id"]]) for t in tasks}
    labeled = ImageSet.from_tensor(hashes, preprocess(images, size) if images else torch.zeros(0, 3, size, size))
    pool = ImageSet(pool_hashes, lambda positions: preprocess(
        [fetcher.fetch(task_image_url(pool_tasks[i], spec)) for i in positions], size), size)
    cache_dir = settings.activation_cache_dir if settings.activation_cache else None

    def publish(result, latest, extra_meta: dict, adapter_labels: dict, last: bool = True) -> dict:
        """Save `result` as a new version, then push its predictions and move the project to it. `last`:
        nothing follows in this job (for the training-duration histogram)."""
        # the previous version, scored on the labels submitted since it was trained (prequential accuracy)
        evaluated = learning.previous_evaluation(store, latest, label_of)
        score_seconds = float(result.metrics["score_seconds"])  # the backbone's features and the pool's scores
        track.phase("saving", "saving the new version")
        clusters = result.pool_clusters
        queue = {str(t["id"]): float(s) for t, s in zip(pool_tasks, result.queue_scores)}
        state = result.classifier.trainable_state() if result.trained else {}
        counts = result.classifier.parameter_counts() if result.trained else {"trainable": 0}
        meta = {"labels": list(spec.labels), "multiple": spec.multiple, "model_settings": model_settings(settings),
                "trained": result.trained, "strategy": result.strategy, "strategy_setting": settings.strategy,
                "balance": settings.balance, "calibration": settings.calibration, **extra_meta, "reason": reason,
                "metrics": {**result.metrics, "n_labeled": len(tasks), "n_pool": len(pool_tasks), "failed_images": bad + pool_bad,
                            "skipped_annotations": skipped, "fetch_seconds": round(fetch_seconds, 3),
                            "pool_sharding": sharding},
                "parameters": counts}
        if not result.trained:
            meta["cycles_since_full"] = None
        dash_files, cycle_entry = _dashboard_files(settings, spec, result, tasks, pool_tasks, latest, store)
        check_lease()  # fenced: a job that lost its lease (another training may run) writes nothing
        saving = time.perf_counter()
        prefix = version_prefix(settings) if result.trained else COLD_START_PREFIX
        version = store.save(project, prefix, state, meta,
                             files={QUEUE_FILE: queue, CLUSTERS_FILE: {str(t["id"]): int(c) for t, c in zip(pool_tasks, clusters)},
                                    TRAINED_FILE: trained_labels if result.trained else {}, **dash_files,
                                    **adapter_files(result, adapter_labels, hashes + pool_hashes)},
                             keep=settings.keep_versions, after=max((version_number(v) for v in held), default=0))
        log.info("project %s: saved %s (%s, %d labeled, %d in pool, strategy %s)", project, version.name,
                 "head refreshed" if extra_meta.get("refresh") else "trained" if result.trained else "queue order only",
                 len(tasks), len(pool_tasks), result.strategy)

        learning.record_cycle(settings.model_dir, project, {
            **cycle_entry, "version": version.name, "created_at": version.meta["created_at"], "data_as_of": data_as_of,
            "score_seconds": round(score_seconds, 3), "reason": reason}, evaluated)

        pushed = quality_written = 0
        timings = {"fetch": round(fetch_seconds, 3), "train": result.metrics.get("train_seconds", 0.0),
                   "score": result.metrics.get("score_seconds", 0.0), "save": round(time.perf_counter() - saving, 3)}
        if settings.push_predictions:
            pushing = time.perf_counter()
            track.phase("pushing", f"pushing {len(pool_tasks)} predictions to Label Studio")
            with label_studio_writes(project):  # never beside this project's background pruning
                check_lease()
                predictions = []
                for i, t in enumerate(pool_tasks):
                    p = {"task": t["id"], "score": float(result.queue_scores[i]),
                         "result": choices_result(spec, result.pool.probs[i], settings.threshold) if result.trained else []}
                    if clusters.size:
                        p["cluster"] = int(clusters[i])
                    predictions.append(p)
                pushed = ls.create_predictions(project, predictions, version.name, new_version=version.name not in held)
                timings["push"] = round(time.perf_counter() - pushing, 3)
                switching = time.perf_counter()
                if pool_tasks:  # Label Studio refuses a model_version that no prediction carries
                    check_lease()
                    ls.set_model_version(project, version.name)
                if settings.set_uncertainty_sampling:
                    ls.set_sampling(project, "Uncertainty sampling")
                timings["switch"] = round(time.perf_counter() - switching, 3)  # the queue is fresh from here
            # label quality, after the switch (the queue is fresh already); the previous quality version goes
            # with the versions no longer kept, so each labeled task has at most one
            keep = {version.name}
            if result.mislabeling is not None and result.mislabeling.reason:
                log.info("project %s: mislabeling: %s", project, result.mislabeling.reason)
            rows = quality_predictions(spec, result, [t["id"] for t in tasks], [t["id"] for t in pool_tasks],
                                       settings.quality_max_writes, settings.threshold)
            if rows:
                writing = time.perf_counter()
                track.phase("pushing", f"writing label quality for {len(rows)} labeled tasks")
                check_lease()
                judged = quality_version(version.name)
                with label_studio_writes(project):
                    quality_written = ls.create_predictions(project, rows, judged, new_version=judged not in held)
                keep.add(judged)
                timings["quality"] = round(time.perf_counter() - writing, 3)
            prune_in_background(ls, store, project, held, keep, put_off=request_watch(running_too=True))
        first = pool_tasks[int(result.order[0])]["id"] if len(result.order) else None
        learning.record_job_seconds(settings.model_dir, project, version.name, time.perf_counter() - started, timings,
                                    job_ended=last)
        return {"status": "trained" if result.trained else "ordered", "model_version": version.name,
                "refresh": extra_meta.get("refresh"), "strategy": result.strategy, "n_labeled": len(tasks),
                "n_pool": len(pool_tasks), "predictions_pushed": pushed, "quality_predictions": quality_written,
                "label_next": first, "failed_images": bad + pool_bad, "skipped_annotations": skipped,
                "trainable_parameters": counts["trainable"], "timings": timings,
                "seconds": round(time.perf_counter() - started, 3)}

    # What this job runs (PEAL_ADAPT_GROWTH): a head refresh while the adapter's labels are recent enough;
    # when an adapter training is due, a head refresh first (the queue is fresh within seconds), then the
    # adapter training, which gives way (`may_defer`) when another label comes meanwhile
    latest = store.latest(project)
    previous_labels, since_full = None, None
    if (latest is not None and latest.meta.get("model_settings") == model_settings(settings)
            and tuple(latest.meta.get("labels", ())) == spec.labels and latest.meta.get("trained", True)):
        previous_labels = store.read_json(latest, TRAINED_FILE)
        since_full = latest.meta.get("cycles_since_full")
    adapter = stored_adapter(store, latest) if previous_labels is not None and refreshable(settings) else None
    rows = adapter.rows(hashes + pool_hashes) if adapter is not None else None
    summary = None
    if rows is not None and can_train(targets, spec.multiple):
        refresh_only = refresh_plan(settings, adapter.labels, trained_labels)
        track.phase("training", f"solving the head again on {len(tasks)} labels (the adapter of {latest.name} kept)")
        result = run_cycle(settings, labeled, targets, pool, n_classes, multiple=spec.multiple, init=adapter.state,
                           cache_dir=cache_dir, refresh=rows)
        summary = publish(result, latest, {"refresh": "head", "adapter_from": latest.meta.get("adapter_from") or latest.name,
                                           "cycles_since_full": since_full}, adapter.labels, last=refresh_only)
        if refresh_only:
            track.phase("done")
            return summary
        latest, deferrable = store.latest(project), may_defer(settings, adapter.labels, trained_labels)

        def give_way(step: int, total: int, loss: float | None = None) -> None:
            track.step(step, total, loss)
            if deferrable and another_requested():
                raise AdapterDeferred(f"a label came during the adapter's training (step {step} of {total})")
    else:
        give_way = track.step
    warm, new_labels, since_full = warm_plan(settings, previous_labels, trained_labels, since_full)
    init = latest.weights() if warm else None
    track.phase("training", f"training on {len(tasks)} labels (with {len(pool_tasks)} unlabeled tasks to score)")
    try:
        result = run_cycle(settings, labeled, targets, pool, n_classes, multiple=spec.multiple, init=init,
                           cache_dir=cache_dir, progress=give_way, new_labels=new_labels)
    except AdapterDeferred as exc:
        log.info("project %s: adapter training deferred: %s; %s serves meanwhile", project, exc, summary["model_version"])
        learning.record_deferral(settings.model_dir, project)
        learning.record_job_seconds(settings.model_dir, project, None, time.perf_counter() - started)
        track.phase("done")
        return {**summary, "adapter_deferred": str(exc)}
    done = publish(result, latest, {"warm_started_from": latest.name if init is not None else None,
                                    "new_labels": new_labels, "refresh": None, "adapter_from": None,
                                    "cycles_since_full": since_full}, trained_labels)
    track.phase("done")
    return {**done, "refreshed_first": summary["model_version"]} if summary else done


class AdapterDeferred(Exception):
    """An adapter training gave way to a label submitted meanwhile (`cycle.may_defer`)."""


_pruning: dict[int, threading.Thread] = {}  # project -> the thread deleting its stale versions
_pruning_lock = threading.Lock()
_writes: dict[int, threading.Lock] = {}  # project -> held while this process writes its predictions to Label Studio


def label_studio_writes(project: int) -> threading.Lock:
    """The lock a job's push and the background pruning of the same project take in turn, so that one
    version's bulk delete never runs beside the next version's bulk import: on Label Studio's default
    SQLite each holds the database's write lock for seconds at 10,000 tasks, and the one that waits
    more than 5 s fails ("database is locked"). A push waits for at most one delete in flight."""
    with _pruning_lock:
        return _writes.setdefault(int(project), threading.Lock())


def _prune_versions(ls: LabelStudio, store: ModelStore, project: int, held, keep: set[str],
                    put_off: Callable[[], bool] = lambda: False) -> None:
    """Delete from Label Studio the predictions of versions this backend no longer keeps (its version
    list and the tasks' prediction lists would otherwise grow with every training). Only versions older
    than the current one go, so this never races a training: names only grow. While `put_off()` (another
    training of the project waits or runs: an annotator is labeling) the rest waits for a later pruning,
    so that the next push does not queue behind deletes."""
    started, done = time.perf_counter(), 0
    kept = set(store.versions(project)) | set(keep)
    try:
        for old in held:
            if old.startswith("peal-") and version_number(old) >= 0 and old not in kept:
                if put_off():
                    log.info("project %s: pruning put off (a training is waiting); %d deleted so far", project, done)
                    break
                with label_studio_writes(project):
                    ls.delete_model_version(project, old)
                done += 1
    except Exception as exc:  # housekeeping: the next training's pruning catches up (it lists what is held)
        log.warning("project %s: pruning old versions' predictions failed: %s", project, exc)
    if done:
        log.info("project %s: deleted %d old version(s)' predictions in %.1f s", project, done, time.perf_counter() - started)


def prune_in_background(ls: LabelStudio, store: ModelStore, project: int, held, keep: set[str],
                        put_off: Callable[[], bool] = lambda: False) -> bool:
    """Run `_prune_versions` in a thread, off the training's critical path: Label Studio deletes
    predictions one by one (about 20 s per 1,000 on the 2-core machine), which used to hold the next
    training back. One pruning per project at a time; when one is still running this is skipped, and
    the next training's pruning catches up. A pruning cut short (the process ends) is caught up alike."""
    with _pruning_lock:
        running = _pruning.get(project)
        if running is not None and running.is_alive():
            return False
        thread = threading.Thread(target=_prune_versions, args=(ls, store, project, dict(held), set(keep), put_off),
                                  name=f"peal-prune-{project}", daemon=True)
        _pruning[project] = thread
        thread.start()
        return True


def wait_for_pruning(project: int, timeout: float | None = None) -> None:
    """Block until the project's background pruning (if any) has ended."""
    with _pruning_lock:
        thread = _pruning.get(project)
    if thread is not None:
        thread.join(timeout)


def _dashboard_files(settings: Settings, spec: LabelSpec, result, tasks: list[dict], pool_tasks: list[dict],
                     latest, store: ModelStore) -> tuple[dict, dict]:
    """What a version keeps for the dashboard (its pool predictions, for the learning curve and the
    stopping signal; the next tasks served) and its entry in the project's history."""
    files, entry = {}, {"n_labeled": len(tasks), "n_pool": len(pool_tasks), "trained": result.trained,
                        "strategy": result.strategy, "train_seconds": result.metrics.get("train_seconds"),
                        "steps": result.metrics.get("steps"), "refresh": result.metrics.get("refresh")}
    urls = []
    for t in pool_tasks:
        try:
            urls.append(task_image_url(t, spec))
        except PayloadError:
            urls.append(None)
    labeled_clusters = result.clusters[:len(result.clusters) - len(pool_tasks)] if result.clusters.size else result.clusters
    files[learning.SERVED_FILE] = learning.served_tasks(pool_tasks, urls, result.queue_scores, result.pool.probs,
                                                        result.pool_clusters, labeled_clusters, spec.labels,
                                                        result.strategy, result.trained)
    if result.trained:
        classes = learning.predicted_classes(result.pool.probs, spec.multiple, settings.threshold)
        predictions = {str(t["id"]): c for t, c in zip(pool_tasks, classes)}
        files[learning.PREDICTIONS_FILE] = {"trained_on": [t["id"] for t in tasks], "predictions": predictions}
        previous = store.read_json(latest, learning.PREDICTIONS_FILE) if latest is not None else None
        entry["has_previous_predictions"] = bool(previous and previous.get("predictions"))
        if entry["has_previous_predictions"]:
            entry["agreement"] = learning.agreement(previous["predictions"], predictions)
    return files, entry
