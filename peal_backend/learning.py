"""Is the model getting better as we label? The prequential learning curve, the stopping signal and the
per-project history file they are kept in.

Prequential ("predict, then learn") accuracy: every model version scores the unlabeled pool when it is
trained; the labels annotators submit after that are labels the version has not seen. When the next
cycle fetches them, the previous version's stored pool predictions are compared with them: one point
of the curve per version (accuracy and macro-F1 against the number of labels the version trained on).

Caveat, shown on the dashboard: labels picked by an uncertainty strategy are the hard cases, so a
point measured on them is biased low. A point measured on labels served in *random* order (the version
ranked the queue with `random`, which `PEAL_STRATEGY=auto` does while labels are few) is an unbiased
estimate: those points form the random-order baseline series, where the data allows one.

Stopping signal: Stabilizing Predictions (Bloodgood & Vijay-Shanker, 2009): stop when successive
versions agree (Cohen's kappa >= 0.99) on a stop set of unlabeled tasks for `window` versions in a row.
The stop set here is the tasks in both versions' pools (unlabeled for both), not a set fixed once.

The history lives in MODEL_DIR/<project>/history.json (written atomically under a lock), so it outlives
pruned versions and reads the same from every process sharing MODEL_DIR.
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
PREDICTIONS_FILE = "pool_predictions.json"  # task id -> predicted class indices, written with each trained version
SERVED_FILE = "served.json"                 # the next tasks Label Studio serves, written with each version
SERVED_TOP = 12
STOP_KAPPA = 0.99
STOP_WINDOW = 3
MAX_CYCLES = 2000  # cycles kept in the history file (the totals below count every cycle)
DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, math.inf)


# --- pure maths ------------------------------------------------------------------------------------------

def predicted_classes(probs: np.ndarray, multiple: bool, threshold: float = 0.5) -> list[list[int]]:
    """Predicted class indices per row: the argmax (single choice), or the classes over `threshold`
    (multiple choice; the argmax when none is, as the pushed result does)."""
    probs = np.asarray(probs)
    if not multiple:
        return [[int(i)] for i in probs.argmax(axis=1)] if probs.size else []
    out = []
    for row in probs:
        picked = [int(i) for i in np.flatnonzero(row >= threshold)]
        out.append(picked or [int(row.argmax())])
    return out


def macro_f1(predicted: list[Iterable[int]], truth: list[Iterable[int]]) -> float:
    """Macro-averaged F1 over the classes present in the truth or the predictions (sklearn's labels=None
    behaviour). For single choice this is the usual multiclass macro-F1; for multiple choice each class
    is a binary decision per item."""
    pred_sets, true_sets = [set(p) for p in predicted], [set(t) for t in truth]
    classes = sorted(set().union(*pred_sets, *true_sets)) if pred_sets else []
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(c in p and c in t for p, t in zip(pred_sets, true_sets))
        fp = sum(c in p and c not in t for p, t in zip(pred_sets, true_sets))
        fn = sum(c not in p and c in t for p, t in zip(pred_sets, true_sets))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def prequential_point(predictions: Mapping[str, list[int]], truth: Mapping[int, list[int]],
                      trained_on: Iterable[int]) -> dict | None:
    """A version's score on the labels it had not seen: the labeled tasks (`truth`: task id -> class
    indices) that it did not train on and that it predicted (were in its pool). None if there are none.
    Accuracy is exact match (the whole set of choices, for multiple choice)."""
    seen = {int(t) for t in trained_on}
    ids = sorted(t for t in truth if t not in seen and str(t) in predictions)
    if not ids:
        return None
    pred = [sorted(predictions[str(t)]) for t in ids]
    true = [sorted(truth[t]) for t in ids]
    correct = sum(p == t for p, t in zip(pred, true))
    return {"n": len(ids), "correct": int(correct), "accuracy": correct / len(ids), "macro_f1": macro_f1(pred, true),
            "tasks": ids}


def cohen_kappa(a: list, b: list) -> float | None:
    """Cohen's kappa between two labelings of the same items (any hashable labels); None without items.
    Two identical labelings with a single label agree perfectly: 1.0."""
    if len(a) != len(b):
        raise ValueError(f"labelings of different lengths: {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    labels = set(a) | set(b)
    expected = sum((a.count(c) / n) * (b.count(c) / n) for c in labels)
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return (observed - expected) / (1.0 - expected)


def agreement(previous: Mapping[str, list[int]], current: Mapping[str, list[int]]) -> dict | None:
    """Kappa between two versions' predictions on the tasks both predicted (the stop set)."""
    common = sorted(set(previous) & set(current), key=lambda t: int(t))
    if not common:
        return None
    a = [tuple(sorted(previous[t])) for t in common]
    b = [tuple(sorted(current[t])) for t in common]
    return {"kappa": cohen_kappa(a, b), "n": len(common)}


def stop_signal(kappas: list[float | None], threshold: float = STOP_KAPPA, window: int = STOP_WINDOW) -> dict:
    """Stabilizing Predictions: stop when the last `window` agreements between successive versions are
    all at least `threshold`. `kappas`: one per trained version after the first, oldest first (None
    where it could not be measured, which breaks a run)."""
    run = 0
    for k in reversed(kappas):
        if k is None or k < threshold:
            break
        run += 1
    stop = run >= window
    return {"stop": stop, "stable_versions": run, "window": window, "threshold": threshold,
            "last_kappa": kappas[-1] if kappas else None,
            "reason": (f"the last {run} versions agreed with their predecessor on the unlabeled pool with "
                       f"kappa >= {threshold}: more labels are no longer changing the predictions" if stop else
                       f"{run} of {window} successive versions stable (kappa >= {threshold}): more labels still change "
                       "the predictions")}


def curve(history: dict) -> dict:
    """The learning curve from a history: points (versions that have been evaluated) oldest first,
    split into the strategy-ordered series and the random-order baseline, plus the stopping signal."""
    cycles = history.get("cycles", [])
    points = []
    for c in cycles:
        p = c.get("prequential")
        if not p:
            continue
        points.append({"version": c["version"], "n_labeled": c["n_labeled"], "n_eval": p["n"],
                       "accuracy": p["accuracy"], "macro_f1": p["macro_f1"], "strategy": c.get("strategy"),
                       "random_order": c.get("strategy") == "random", "train_seconds": c.get("train_seconds"),
                       "head_only": bool(c.get("refresh")), "created_at": c.get("created_at")})
    kappas = [c.get("agreement", {}).get("kappa") if c.get("agreement") else None
              for c in cycles if c.get("trained") and c.get("has_previous_predictions")]
    return {"points": points, "active": [p for p in points if not p["random_order"]],
            "baseline": [p for p in points if p["random_order"]], "stop": stop_signal(kappas)}


# --- the history file ------------------------------------------------------------------------------------

def _empty() -> dict:
    return {"cycles": [], "totals": {"cycles": 0, "pool_tasks_scored": 0, "pool_scoring_seconds": 0.0,
                                     "job_seconds_sum": 0.0, "job_seconds_count": 0,
                                     "job_seconds_buckets": [0] * len(DURATION_BUCKETS),
                                     "head_refreshes": 0, "adapter_deferrals": 0}}


def history_path(model_dir: str | os.PathLike, project: int) -> Path:
    return Path(model_dir) / str(int(project)) / HISTORY_FILE


def read_history(model_dir: str | os.PathLike, project: int) -> dict:
    try:
        with open(history_path(model_dir, project)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return _empty()
    base = _empty()
    base["cycles"] = data.get("cycles", [])
    base["totals"].update(data.get("totals", {}))
    return base


def atomic_write_json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def _locked(model_dir, project: int):
    d = Path(model_dir) / str(int(project))
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".history.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_history(model_dir, project: int, change: Callable[[dict], None]) -> dict:
    """Read, change (in place) and write back the project's history, under its lock."""
    with _locked(model_dir, project):
        history = read_history(model_dir, project)
        change(history)
        history["cycles"] = history["cycles"][-MAX_CYCLES:]
        atomic_write_json(history_path(model_dir, project), history)
        return history


def _best_effort(fn):
    """The dashboard's bookkeeping never fails a training: a file that cannot be written is logged."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            log.warning("cannot record the learning curve (%s): %s", fn.__name__, exc)
            return None
    return wrapper


@_best_effort
def record_cycle(model_dir, project: int, entry: dict, evaluated: tuple[str, dict] | None) -> dict:
    """Append a cycle (a new version) and, with `evaluated` = (previous version, prequential point),
    give the previous version its point; count the pool scoring in the totals."""
    def change(h: dict) -> None:
        if evaluated is not None:
            for c in reversed(h["cycles"]):
                if c["version"] == evaluated[0]:
                    c["prequential"] = {k: v for k, v in evaluated[1].items() if k != "tasks"}
                    break
        h["cycles"].append(entry)
        t = h["totals"]
        t["cycles"] += 1
        t["pool_tasks_scored"] += int(entry.get("n_pool") or 0)
        t["pool_scoring_seconds"] += float(entry.get("score_seconds") or 0.0)
        t["head_refreshes"] += 1 if entry.get("refresh") else 0
    return update_history(model_dir, project, change)


@_best_effort
def record_deferral(model_dir, project: int) -> dict:
    """An adapter training that gave way to a label submitted meanwhile (PEAL_ADAPT_GROWTH)."""
    def change(h: dict) -> None:
        h["totals"]["adapter_deferrals"] += 1
    return update_history(model_dir, project, change)


@_best_effort
def record_job_seconds(model_dir, project: int, version: str | None, seconds: float, timings: dict | None = None,
                       *, job_ended: bool = True) -> dict:
    """Seconds from the job's start until `version` was published (fetch to push) and its phases' seconds
    (`timings`: fetch, train, score, save, push, switch), in that version's history entry; with
    `job_ended`, `seconds` also goes into the training-duration histogram (once per job: a job may
    publish a head refresh before the adapter it trains)."""
    def change(h: dict) -> None:
        for c in reversed(h["cycles"]):
            if version is not None and c["version"] == version:
                c["job_seconds"] = round(seconds, 3)
                if timings is not None:
                    c["timings"] = dict(timings)
                break
        if not job_ended:
            return
        t = h["totals"]
        t["job_seconds_sum"] += seconds
        t["job_seconds_count"] += 1
        buckets = t["job_seconds_buckets"]
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1  # cumulative, as Prometheus wants them
    return update_history(model_dir, project, change)


# --- annotations the ranking has not seen (queue age) ----------------------------------------------------

ANNOTATIONS_FILE = ".annotations.json"
MAX_EVENTS = 5000


@_best_effort
def note_annotation_event(model_dir, project: int, when: float | None = None) -> None:
    """Record that an annotation was created/updated/deleted now (the server calls it per webhook)."""
    when = time.time() if when is None else when
    path = Path(model_dir) / str(int(project)) / ANNOTATIONS_FILE
    with _locked(model_dir, project):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            doc = {"events": []}
        doc["events"] = (doc.get("events", []) + [when])[-MAX_EVENTS:]
        atomic_write_json(path, doc)


def annotation_events(model_dir, project: int) -> list[float]:
    try:
        with open(Path(model_dir) / str(int(project)) / ANNOTATIONS_FILE) as f:
            return [float(t) for t in json.load(f).get("events", [])]
    except (OSError, ValueError, TypeError):
        return []


def queue_age(events: list[float], data_as_of: float | None, now: float) -> dict:
    """How stale the current ranking is: annotations recorded after the data the latest version was
    ranked from (`data_as_of`), and the seconds since the newest of them (0 when it has seen all)."""
    unseen = [t for t in events if data_as_of is None or t > data_as_of]
    return {"unseen_annotations": len(unseen), "age_seconds": max(0.0, now - max(unseen)) if unseen else 0.0}


# --- what the training job writes for the dashboard ------------------------------------------------------

def served_tasks(pool_tasks: list[dict], image_urls: list[str | None], scores: np.ndarray, probs: np.ndarray,
                 pool_clusters: np.ndarray, labeled_clusters: np.ndarray, labels: tuple[str, ...], strategy: str,
                 trained: bool, n: int = SERVED_TOP) -> list[dict]:
    """The first `n` tasks Label Studio's uncertainty sampling will serve (an annotator who labeled the
    labeled tasks; `cycle.served_next`), with why: score, strategy, model confidence, cluster."""
    from .cycle import served_next

    solved: dict[int, int] = {}
    for c in np.asarray(labeled_clusters, dtype=np.int64):
        solved[int(c)] = solved.get(int(c), 0) + 1
    clusters = pool_clusters if np.asarray(pool_clusters).size else None
    out = []
    for rank, i in enumerate(served_next(scores, clusters, solved, n), start=1):
        i = int(i)
        row = {"rank": rank, "task": int(pool_tasks[i]["id"]), "score": float(scores[i]), "strategy": strategy,
               "cluster": int(pool_clusters[i]) if clusters is not None else None, "image": image_urls[i]}
        if trained:
            p = np.sort(np.asarray(probs[i], dtype=np.float64))[::-1]
            row.update(predicted=labels[int(np.argmax(probs[i]))], confidence=float(p[0]),
                       uncertainty=float(1.0 - p[0]), margin=float(p[0] - p[1]) if p.size > 1 else None)
        out.append(row)
    return out


def previous_evaluation(store, latest, truth: dict[int, list[int]]) -> tuple[str, dict] | None:
    """(latest version's name, its prequential point on `truth`), or None when it predicted nothing
    (a cold-start version) or none of its pool has been labeled since."""
    if latest is None:
        return None
    doc = store.read_json(latest, PREDICTIONS_FILE)
    if not doc or not doc.get("predictions"):
        return None
    point = prequential_point(doc["predictions"], truth, doc.get("trained_on") or [])
    return (latest.name, point) if point else None
