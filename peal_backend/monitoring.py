"""What /ui, /status and /metrics show: one overview per project, built from what is persisted (the job
queue's status in memory or Redis, MODEL_DIR's versions, history and progress files), and the Prometheus
exposition of it.

Request counters and latency histograms live in this server process (a per-app CollectorRegistry):
under gunicorn with several workers each worker counts its own requests, and a scrape reaches one of
them; run one worker per container, or sum over the instances. Everything about trainings, versions,
the learning curve and caches is read from shared state at scrape time, so it is the same whichever
process (server thread or RQ worker) trained.
"""
from __future__ import annotations

import os
import threading
import time
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import learning
from .progress import describe, plain_error, read_progress

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CACHE_TTL = 30.0  # seconds a measured cache size is reused (the activation cache is walked to measure it)


def _iso_ts(value) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


class CacheSizes:
    """Bytes on disk of the image and activation caches, measured at most every CACHE_TTL seconds."""

    def __init__(self, settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._at = -1e18
        self._value: dict = {}

    def get(self) -> dict:
        with self._lock:
            if time.monotonic() - self._at > CACHE_TTL:
                self._value = {"images": _dir_bytes(self.settings.image_cache_dir, ledger=True),
                               "activations": _dir_bytes(self.settings.activation_cache_dir)}
                self._at = time.monotonic()
            return dict(self._value)


def _dir_bytes(path: str, ledger: bool = False) -> int:
    if ledger:  # the image cache keeps its blobs' total in a ledger file (images.ImageFetcher)
        try:
            with open(os.path.join(path, ".size")) as f:
                return int(f.read())
        except (OSError, ValueError):
            pass
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def project_overview(settings, queue, store, project: int, now: float | None = None) -> dict:
    """Everything the dashboard shows about one project (JSON-able; no image URL, no secret)."""
    now = time.time() if now is None else now
    history = learning.read_history(settings.model_dir, project)
    lc = learning.curve(history)
    status = queue.status(project)
    running = status.get("state") == "running"
    progress = read_progress(settings.model_dir, project)
    if running and progress and (_iso_ts(status.get("started_at")) or 0) > float(progress.get("updated_at", 0)) + 1:
        progress = {"started_at": _iso_ts(status.get("started_at")), "phase": None}  # not written by this run yet
    done = [c["job_seconds"] for c in history["cycles"] if c.get("job_seconds")]
    typical = sorted(done[-5:])[len(done[-5:]) // 2] if done else None
    job = describe(progress, running, typical, now)
    versions = store.versions(project)
    latest = store.get(project, versions[-1]) if versions else None
    served = [{k: v for k, v in row.items() if k != "image"}
              for row in (store.read_json(latest, learning.SERVED_FILE, []) or [])] if latest else []
    cycle = next((c for c in reversed(history["cycles"]) if latest and c["version"] == latest.name), None)
    age = learning.queue_age(learning.annotation_events(settings.model_dir, project),
                             cycle.get("data_as_of") if cycle else None, now)
    return {
        "project": project,
        "latest_version": latest.name if latest else None,
        "versions": versions,
        "labels": latest.meta.get("labels") if latest else None,
        "n_labeled": cycle.get("n_labeled") if cycle else None,
        "n_pool": cycle.get("n_pool") if cycle else None,
        "strategy": latest.meta.get("strategy") if latest else None,
        "curve": lc,
        "queue": served,
        "queue_age": age,
        "job": {**job, "state": status.get("state"), "queued": bool(status.get("queued")), "reason": status.get("reason"),
                "started_at": status.get("started_at"), "runs": status.get("runs"), "failures": status.get("failures"),
                "last_outcome": status.get("last_outcome"), "last_duration_s": status.get("last_duration_s"),
                "last_finished_at": status.get("last_finished_at"), "last_error": plain_error(status.get("last_error")),
                "last_failed_at": status.get("last_failed_at"), "typical_seconds": typical},
        "totals": history["totals"],
    }


def all_projects(queue, store) -> list[int]:
    known = set(store.projects())
    try:
        known |= {int(p) for p in queue.status().get("projects", {})}
    except Exception:  # the queue's own errors are answered by its endpoints
        pass
    return sorted(known)


class RequestMetrics:
    """Per-endpoint request counts and latencies, in this process."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("peal_http_requests", "HTTP requests answered, by endpoint, method and status code",
                                ["endpoint", "method", "code"], registry=registry)
        self.latency = Histogram("peal_http_request_duration_seconds", "Time to answer a request, by endpoint",
                                 ["endpoint"], buckets=REQUEST_BUCKETS, registry=registry)
        self.predict_tasks = Counter("peal_predict_tasks", "Tasks scored by /predict", registry=registry)
        self.webhooks = Counter("peal_webhook_events", "Label Studio webhook events received, by action",
                                ["action"], registry=registry)

    def observe(self, endpoint: str, method: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)


class StateCollector:
    """Trainings, versions, the learning curve, the queue and caches, read at scrape time."""

    def __init__(self, settings, get_queue, get_store, caches: CacheSizes):
        self.settings, self.get_queue, self.get_store, self.caches = settings, get_queue, get_store, caches

    def describe(self):
        return []  # computed at scrape time only (no scrape at registration)

    def collect(self):
        queue, store = self.get_queue(), self.get_store()
        now = time.time()
        g = {name: GaugeMetricFamily(name, doc, labels=["project"]) for name, doc in (
            ("peal_training_running", "1 while a training of the project runs"),
            ("peal_training_queued", "1 while a training of the project waits to run"),
            ("peal_training_phase_step", "Training step reached by the running job (0 when not training)"),
            ("peal_training_last_duration_seconds", "Duration of the project's last training job"),
            ("peal_model_versions", "Model versions kept for the project"),
            ("peal_model_version_number", "Number of the project's newest version (the N of -vN)"),
            ("peal_labels", "Labels the newest version trained on"),
            ("peal_pool_size", "Unlabeled tasks the newest version scored"),
            ("peal_pool_scoring_tasks_per_second", "Pool tasks scored per second in the newest cycle"),
            ("peal_queue_age_seconds", "Seconds since the newest annotation the current ranking has not seen (0: none)"),
            ("peal_queue_unseen_annotations", "Annotation events since the data the current ranking was made from"),
            ("peal_prequential_accuracy", "Accuracy of the newest evaluated version on labels submitted after it"),
            ("peal_prequential_macro_f1", "Macro-F1 of the newest evaluated version on labels submitted after it"),
            ("peal_prediction_agreement_kappa", "Cohen's kappa between the two newest versions' pool predictions"),
            ("peal_stop_signal", "1 when more labels stopped changing the model (stabilizing predictions)"),
        )}
        trainings = CounterMetricFamily("peal_trainings", "Training jobs that finished", labels=["project"])
        failures = CounterMetricFamily("peal_training_failures", "Training jobs that failed or were abandoned",
                                       labels=["project"])
        scored = CounterMetricFamily("peal_pool_scored_tasks", "Unlabeled tasks scored by training cycles",
                                     labels=["project"])
        scoring = CounterMetricFamily("peal_pool_scoring_seconds", "Seconds training cycles spent outside fitting "
                                      "(backbone features and scoring)", labels=["project"])
        refreshes = CounterMetricFamily("peal_head_refreshes", "Cycles that kept the adapter and solved only the head "
                                        "(PEAL_ADAPT_GROWTH)", labels=["project"])
        deferrals = CounterMetricFamily("peal_adapter_deferrals", "Adapter trainings that gave way to a label submitted "
                                        "meanwhile", labels=["project"])
        durations = HistogramMetricFamily("peal_training_duration_seconds", "Duration of successful training jobs",
                                          labels=["project"])
        depth = 0
        for project in all_projects(queue, store):
            p = str(project)
            o = project_overview(self.settings, queue, store, project, now)
            job, t = o["job"], o["totals"]
            depth += 1 if job["queued"] else 0
            g["peal_training_running"].add_metric([p], 1.0 if job["state"] == "running" else 0.0)
            g["peal_training_queued"].add_metric([p], 1.0 if job["queued"] else 0.0)
            g["peal_training_phase_step"].add_metric([p], float(job.get("step") or 0) if job.get("running") else 0.0)
            if job.get("last_duration_s") is not None:
                g["peal_training_last_duration_seconds"].add_metric([p], float(job["last_duration_s"]))
            trainings.add_metric([p], float(job.get("runs") or 0))
            failures.add_metric([p], float(job.get("failures") or 0))
            g["peal_model_versions"].add_metric([p], float(len(o["versions"])))
            if o["latest_version"]:
                from .store import version_number
                g["peal_model_version_number"].add_metric([p], float(version_number(o["latest_version"])))
            if o["n_labeled"] is not None:
                g["peal_labels"].add_metric([p], float(o["n_labeled"]))
                g["peal_pool_size"].add_metric([p], float(o["n_pool"] or 0))
            scored.add_metric([p], float(t["pool_tasks_scored"]))
            scoring.add_metric([p], float(t["pool_scoring_seconds"]))
            refreshes.add_metric([p], float(t["head_refreshes"]))
            deferrals.add_metric([p], float(t["adapter_deferrals"]))
            last = next((c for c in reversed(learning.read_history(self.settings.model_dir, project)["cycles"])
                         if c.get("score_seconds")), None)
            if last and last.get("n_pool"):
                g["peal_pool_scoring_tasks_per_second"].add_metric([p], last["n_pool"] / last["score_seconds"])
            buckets = [(("+Inf" if b == float("inf") else repr(float(b))), float(n))
                       for b, n in zip(learning.DURATION_BUCKETS, t["job_seconds_buckets"])]
            durations.add_metric([p], buckets, sum_value=float(t["job_seconds_sum"]))
            g["peal_queue_age_seconds"].add_metric([p], float(o["queue_age"]["age_seconds"]))
            g["peal_queue_unseen_annotations"].add_metric([p], float(o["queue_age"]["unseen_annotations"]))
            points = o["curve"]["points"]
            if points:
                g["peal_prequential_accuracy"].add_metric([p], float(points[-1]["accuracy"]))
                g["peal_prequential_macro_f1"].add_metric([p], float(points[-1]["macro_f1"]))
            stop = o["curve"]["stop"]
            if stop["last_kappa"] is not None:
                g["peal_prediction_agreement_kappa"].add_metric([p], float(stop["last_kappa"]))
            g["peal_stop_signal"].add_metric([p], 1.0 if stop["stop"] else 0.0)
        yield from g.values()
        yield from (trainings, failures, scored, scoring, refreshes, deferrals, durations)
        yield GaugeMetricFamily("peal_training_queue_depth", "Projects with a training waiting to run", value=float(depth))
        caches = GaugeMetricFamily("peal_cache_bytes", "Bytes on disk of a cache", labels=["cache"])
        for name, size in self.caches.get().items():
            caches.add_metric([name], float(size))
        yield caches


def make_registry(settings, get_queue, get_store) -> tuple[CollectorRegistry, RequestMetrics, CacheSizes]:
    registry = CollectorRegistry(auto_describe=False)
    requests = RequestMetrics(registry)
    caches = CacheSizes(settings)
    registry.register(StateCollector(settings, get_queue, get_store, caches))
    return registry, requests, caches
