"""The HTTP contract Label Studio speaks to an ML backend: /health, /setup, /predict, /webhook,
/versions (+ /jobs for training status); for operators /metrics (Prometheus text format), /status
(JSON for people) and the dashboard at /ui. Errors are JSON with a message naming the problem.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FuturesTimeout

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import __version__
from .backbone import BackboneLoadError, load_backbone
from .config import Settings, hide_url_secrets, unknown_variables
from .images import ImageFetcher
from .jobs import QueueError
from . import dashboard, learning
from .monitoring import make_registry
from .preflight import Preflight, PreflightError, label_studio_problem
from .training import configure_torch
from .labelstudio import LabelStudioError
from .model import LabelConfigError, PayloadError, PealModel, project_id

log = logging.getLogger(__name__)

TRAINING_EVENTS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}
# Events that run a cycle at once, whatever PEAL_RETRAIN_EVERY says: "Start training", and new tasks
# (they must be placed in the queue)
IMMEDIATE_EVENTS = {"START_TRAINING", "TASKS_CREATED"}
MAX_BODY_BYTES = 32 * 1024 * 1024
SETUP_SECONDS = 2.5  # Label Studio waits 3 s for /setup: what the whole answer may take here
SETUP_CHECK_SECONDS = 1.5  # of which the checks of the backbone and of Label Studio get at most this


class LabelStudioUnreachable(Exception):
    """LABEL_STUDIO_URL does not answer at all (refused, unknown host): a 502 naming the setting."""


def _check_basic_auth(settings: Settings) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    # compare both fields in constant time, and always both, so timing says nothing about which failed
    ok_user = hmac.compare_digest(user.encode(), settings.basic_auth_user.encode())
    ok_pass = hmac.compare_digest(password.encode(), settings.basic_auth_pass.encode())
    return ok_user and ok_pass


class _Stats:
    """Request counters and recent /predict latencies for /status."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.predict_ms: deque[float] = deque(maxlen=1000)

    def count(self, key: str, n: int = 1):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def snapshot(self) -> dict:
        with self.lock:
            lat = sorted(self.predict_ms)
            out = {"counts": dict(self.counts)}
        if lat:
            out["predict_latency_ms"] = {"p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                                         "n": len(lat)}
        return out


def create_app(settings: Settings | None = None, queue=None) -> Flask:
    settings = settings or Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # at DEBUG it logs full URLs, signed ones included
    configure_torch(settings)
    if unknown := unknown_variables():
        log.warning("ignoring environment variables that are no setting of peal-backend: %s", ", ".join(unknown))
    preflight = Preflight(settings)

    def warm_up() -> None:
        preflight.run_once()  # MODEL_DIR and LABEL_STUDIO_URL: logged now, named on /health and /setup
        # The first /setup comes from Label Studio, which gives up after 3 s: importing torch, transformers
        # and the training code and loading the backbone took longer than that on a busy 2-core machine.
        # Done at start, in the background (/health answers meanwhile).
        try:
            from . import cycle  # noqa: F401  (the modules /setup, /predict and trainings use)
            load_backbone(settings.backbone)
        except BackboneLoadError as exc:
            log.error("%s", exc)  # /setup and /predict answer 503 with it
        except Exception:  # noqa: BLE001 - a warm-up never takes the server down; requests report it
            log.exception("warming up the backbone failed")

    threading.Thread(target=warm_up, name="peal-warm-up", daemon=True).start()
    app = Flask("peal_backend")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    stats = _Stats()
    state: dict = {"queue": queue, "model": None, "ls": None}
    state_lock = threading.RLock()

    def ls_client():
        from .labelstudio import LabelStudio
        with state_lock:
            if state["ls"] is None:
                state["ls"] = LabelStudio.from_settings(settings)
            return state["ls"]

    def get_model() -> PealModel:
        with state_lock:
            if state["model"] is None:
                auth = ls_client().auth_headers if settings.label_studio_api_key else None
                state["model"] = PealModel(settings, ImageFetcher(settings, auth))
            return state["model"]

    def get_queue():
        with state_lock:
            if state["queue"] is None:
                from .jobs import make_queue
                state["queue"] = make_queue(settings)
            return state["queue"]

    def get_store():
        return get_model().store

    def get_fetcher():
        return get_model().fetcher

    registry, request_metrics, caches = make_registry(settings, get_queue, get_store)
    app.extensions["peal"] = {"settings": settings, "get_queue": get_queue, "get_model": get_model, "stats": stats,
                              "registry": registry}

    def body() -> dict:
        # Parsed here rather than with get_json(silent=True): that lets RecursionError (deeply nested
        # arrays) escape as a 500 and hides why a body is not JSON.
        raw = request.get_data(cache=True)
        if request.content_length is None and len(raw) >= MAX_BODY_BYTES:
            # werkzeug stops reading a chunked body at the limit without saying so: refuse it, not parse half
            raise RequestEntityTooLarge()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise PayloadError(f"request body is not valid JSON ({reason}); send a JSON object") from None
        if not isinstance(data, dict):
            raise PayloadError(f"request body must be a JSON object, got {type(data).__name__}")
        return data

    @app.before_request
    def start_timer():  # registered before auth(): refused requests are counted too
        g.peal_started = time.perf_counter()

    @app.after_request
    def count_request(response):
        started = g.get("peal_started")
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            request_metrics.observe(rule, request.method, response.status_code, time.perf_counter() - started)
        return response

    @app.before_request
    def auth():
        if settings.basic_auth_user and request.endpoint not in ("health", "index"):
            if not _check_basic_auth(settings):
                resp = jsonify(error="authentication required")
                resp.status_code = 401
                resp.headers["WWW-Authenticate"] = 'Basic realm="peal-backend"'
                return resp
        return None

    @app.errorhandler(PayloadError)
    @app.errorhandler(LabelConfigError)
    def bad_request(exc):
        stats.count("errors_4xx")
        return jsonify(error=str(exc)), 400

    @app.errorhandler(BackboneLoadError)
    @app.errorhandler(PreflightError)
    def backbone_error(exc):
        log.error("%s", exc)
        return jsonify(error=str(exc)), 503

    @app.errorhandler(LabelStudioError)
    def label_studio_error(exc):
        # Label Studio down or refusing us is not our bug: a 502 naming the call (the message never holds the token)
        log.error("Label Studio: %s", exc)
        return jsonify(error=f"Label Studio request failed: {exc}"), 502

    @app.errorhandler(LabelStudioUnreachable)
    def label_studio_unreachable(exc):
        log.error("%s", exc)
        return jsonify(error=str(exc)), 502

    @app.errorhandler(QueueError)
    def queue_error(exc):
        log.error("training queue unavailable: %s", exc)
        return jsonify(error=f"training queue unavailable: {exc}"), 503

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if exc.code == 413:  # werkzeug's text does not say what the limit is
            return jsonify(error=f"request body too large: the limit is {MAX_BODY_BYTES // (1024 * 1024)} MiB"), 413
        return jsonify(error=exc.description or exc.name), exc.code

    @app.errorhandler(Exception)
    def internal_error(exc):
        log.exception("unhandled error on %s", request.path)
        stats.count("errors_5xx")
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500

    @app.get("/")
    def index():
        return health()

    @app.get("/health")
    def health():
        # DEGRADED, with the problems, still answers 200: Label Studio then goes on to /setup, whose error
        # names the problem where the user connects; the image's HEALTHCHECK fails on it (docker ps: unhealthy)
        preflight.refresh()
        problems = preflight.problems()
        return jsonify(status="DEGRADED" if problems else "UP", model_class="PealModel", version=__version__,
                       backbone=settings.backbone, adapter=settings.adapter, strategy=settings.strategy,
                       **({"problems": problems} if problems else {}))

    setup_checks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="peal-setup-check")

    def check_setup(pid: int) -> None:
        """What would make the first training fail, as an error naming the setting to fix."""
        load_backbone(settings.backbone)  # BackboneLoadError: 503 naming PEAL_BACKBONE
        if not settings.label_studio_api_key:
            return  # refused by setup() itself, whether or not this check finishes in time
        from .labelstudio import LabelStudio
        if problem := label_studio_problem(settings.label_studio_url, timeout=SETUP_CHECK_SECONDS):
            raise LabelStudioUnreachable(problem)
        quick = LabelStudio(settings.label_studio_url, settings.label_studio_api_key, timeout=SETUP_CHECK_SECONDS, retries=0)
        try:
            quick.project(pid)
        except LabelStudioError as exc:
            if any(f"-> {code}" in str(exc) for code in (401, 403)):
                raise PayloadError(f"LABEL_STUDIO_API_KEY is not accepted by Label Studio at LABEL_STUDIO_URL "
                                   f"({exc}); give the backend a valid token") from None
            if "-> 404" in str(exc):
                raise PayloadError(f"project {pid} is not in the Label Studio at LABEL_STUDIO_URL="
                                   f"{hide_url_secrets(settings.label_studio_url)}: point LABEL_STUDIO_URL at the "
                                   "Label Studio that connects this backend") from None
            log.warning("project %s: /setup could not check Label Studio: %s", pid, exc)

    @app.post("/setup")
    def setup():
        started = time.perf_counter()
        data = body()
        pid = project_id(data.get("project"))
        if problem := preflight.check_model_dir():  # no version could be saved: say so now, not at training
            raise PreflightError(problem)
        model = get_model()
        version = model.setup(pid, data.get("schema") or data.get("label_config"))
        # What would make the first training fail minutes later, answered now, where Label Studio shows
        # it while connecting. Label Studio gives /setup 3 s, so the checks get what is left of SETUP_SECONDS,
        # at most SETUP_CHECK_SECONDS: one still running then (a first backbone load on a busy machine) is
        # left to the training to report.
        try:
            budget = min(SETUP_CHECK_SECONDS, SETUP_SECONDS - (time.perf_counter() - started))
            setup_checks.submit(check_setup, pid).result(timeout=max(0.05, budget))
        except FuturesTimeout:
            log.info("project %s: /setup checks still running after %.1f s; answering without them", pid,
                     time.perf_counter() - started)
        if not settings.label_studio_api_key:
            # without a token the backend cannot read the project's annotations: it would never train
            raise PayloadError("LABEL_STUDIO_API_KEY is not set: the backend cannot read this project's annotations "
                               "(so it would never train), fetch Label Studio's images or push predictions. Set it to a "
                               "Label Studio access token (Account & Settings) and restart the backend")
        stats.count("setup")
        # (Label Studio calls /setup several times while connecting: one ordering is enough)
        if (settings.cold_start and settings.label_studio_api_key and model.store.latest(pid) is None
                and get_queue().status(pid).get("state") == "idle"):
            # a project just connected: order its queue now (no label needed), so that Label Studio
            # serves representative tasks first instead of random ones
            get_queue().request_training(pid, "connected")
            stats.count("cold_start_requests")
        return jsonify(model_version=version)

    predict_slots = threading.BoundedSemaphore(max(1, settings.predict_concurrency))

    @app.post("/predict")
    def predict():
        if not predict_slots.acquire(blocking=False):
            stats.count("predict_busy")
            resp = jsonify(error=f"busy: {settings.predict_concurrency} /predict requests are running "
                                 "(PEAL_PREDICT_CONCURRENCY); retry shortly")
            resp.status_code, resp.headers["Retry-After"] = 503, "1"
            return resp
        try:
            return _predict()
        finally:
            predict_slots.release()

    def _predict():
        started = time.perf_counter()
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            raise PayloadError("'tasks' must be a list of task objects")
        if len(tasks) > settings.predict_max_tasks:
            raise PayloadError(f"{len(tasks)} tasks in one request: at most {settings.predict_max_tasks} "
                               "(PEAL_PREDICT_MAX_TASKS); send them in batches")
        pid = project_id(data.get("project") or (tasks[0].get("project") if tasks and isinstance(tasks[0], dict) else None))
        config = data.get("label_config")
        if not config:
            if not settings.label_studio_api_key:  # LabelStudio() would raise ValueError: a 500
                raise PayloadError("no 'label_config' in the request, and LABEL_STUDIO_API_KEY is not set "
                                   "to read it from Label Studio")
            config = ls_client().project(pid).get("label_config")
        results = get_model().predict(tasks, pid, config)
        stats.count("predict_requests")
        stats.count("predict_tasks", len(tasks))
        request_metrics.predict_tasks.inc(len(tasks))
        stats.predict_ms.append(round((time.perf_counter() - started) * 1000, 3))
        version = next((r["model_version"] for r in results if r.get("model_version")), None)
        return jsonify(results=results, model_version=version)

    @app.post("/webhook")
    def webhook():
        data = body()
        action = data.get("action")
        if not isinstance(action, str):  # a list or object here made the set lookup raise TypeError (500)
            raise PayloadError(f"'action' must be a string such as \"ANNOTATION_CREATED\", got {type(action).__name__}")
        if action not in TRAINING_EVENTS | IMMEDIATE_EVENTS:
            return jsonify(status="Unknown event", action=action), 200
        pid = project_id(data.get("project"))
        queue = get_queue()
        request_metrics.webhooks.labels(action).inc()
        if action in TRAINING_EVENTS:  # for the queue's age: annotations the current ranking has not seen
            learning.note_annotation_event(settings.model_dir, pid)
        if action in IMMEDIATE_EVENTS:
            outcome = queue.request_training(pid, action)
        else:
            outcome = {"queued": queue.note_annotation(pid)}
        stats.count(f"webhook_{action}")
        return jsonify(status="ok", action=action, project=pid, **outcome), 201

    @app.get("/jobs")
    def jobs():
        return jsonify(get_queue().status())

    @app.get("/jobs/<int:pid>")
    def job(pid: int):
        return jsonify(get_queue().status(project_id(pid)))

    @app.get("/versions")
    def versions():
        store = get_model().store
        wanted = request.args.get("project")
        projects = [project_id(wanted)] if wanted else store.projects()
        by_project = {str(p): store.versions(p) for p in projects}
        flat = [v for vs in by_project.values() for v in vs]
        return jsonify(versions=flat, projects=by_project)

    @app.get("/status")
    def status():
        store = get_model().store
        latest = {str(p): (v.name if (v := store.latest(p)) else None) for p in store.projects()}
        return jsonify(**stats.snapshot(), latest_versions=latest, jobs=get_queue().status(),
                       caches=caches.get(), settings=settings.redacted())

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    dashboard.register(app, settings, get_queue, get_store, get_fetcher, caches)

    return app
