"""The dashboard's maths (prequential learning curve, stabilizing-predictions stopping signal, queue age,
job progress) as pure functions, the history file, and /metrics in the Prometheus text format: parsed with
prometheus_client's own parser, each metric checked to move when its event happens. Real Flask app,
real in-process queue running real (small) jobs, real files in MODEL_DIR. The whole loop against a real
Label Studio and a real browser is in test_dashboard_browser.py."""
from __future__ import annotations

import base64
import json
import os
import re

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import cohen_kappa_score, f1_score

from peal_backend import learning
from peal_backend.config import Settings
from peal_backend.jobs import make_queue
from peal_backend.progress import JobProgress, describe, plain_error, read_progress
from peal_backend.server import create_app
from peal_backend.store import ModelStore
from tests.backbone_fixture import tiny_backbone  # noqa: F401
from tests.conftest import forget_queue, wait_for

# --- pure maths --------------------------------------------------------------------------------------------


def test_macro_f1_matches_sklearn_for_single_choice():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth, pred = rng.integers(0, 4, 30), rng.integers(0, 4, 30)
        ours = learning.macro_f1([[p] for p in pred], [[t] for t in truth])
        assert ours == pytest.approx(f1_score(truth, pred, average="macro"))


def test_kappa_matches_sklearn_and_handles_constant_labelings():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = list(rng.integers(0, 3, 40)), list(rng.integers(0, 3, 40))
        assert learning.cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert learning.cohen_kappa([1, 1, 1], [1, 1, 1]) == 1.0
    assert learning.cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        learning.cohen_kappa([1], [1, 2])


def test_prequential_point_scores_only_labels_the_version_had_not_seen():
    predictions = {"1": [0], "2": [1], "3": [1], "4": [0]}  # the version's pool predictions
    truth = {1: [0], 2: [0], 3: [1], 9: [1], 10: [0]}       # labels now; 9 and 10 it trained on
    point = learning.prequential_point(predictions, truth, trained_on=[9, 10])
    assert point["tasks"] == [1, 2, 3] and point["n"] == 3 and point["correct"] == 2
    assert point["accuracy"] == pytest.approx(2 / 3)
    assert point["macro_f1"] == pytest.approx(f1_score([0, 0, 1], [0, 1, 1], average="macro"))
    assert learning.prequential_point(predictions, {9: [1]}, trained_on=[9]) is None
    # multiple choice: exact match of the set of choices
    multi = learning.prequential_point({"1": [0, 2], "2": [1]}, {1: [2, 0], 2: [1, 2]}, [])
    assert multi["accuracy"] == 0.5


def test_predicted_classes():
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert learning.predicted_classes(probs, multiple=False) == [[1], [0]]
    multi = np.array([[0.7, 0.6, 0.1], [0.2, 0.3, 0.1]])
    assert learning.predicted_classes(multi, multiple=True, threshold=0.5) == [[0, 1], [1]]


def test_stop_signal_needs_a_window_of_stable_versions():
    assert not learning.stop_signal([])["stop"]
    assert not learning.stop_signal([0.995, 0.999])["stop"]  # two of three
    s = learning.stop_signal([0.5, 0.995, 0.999, 1.0])
    assert s["stop"] and s["stable_versions"] == 3 and s["last_kappa"] == 1.0
    assert not learning.stop_signal([0.995, 0.999, 1.0, 0.9])["stop"]  # a later change resets it
    broken = learning.stop_signal([0.995, None, 0.999, 1.0])  # an unmeasured pair breaks a run
    assert not broken["stop"] and broken["stable_versions"] == 2


def test_agreement_uses_the_tasks_both_versions_predicted():
    a = {"1": [0], "2": [1], "3": [1], "4": [0]}
    b = {"2": [1], "3": [0], "4": [0], "5": [1]}
    got = learning.agreement(a, b)
    assert got["n"] == 3 and got["kappa"] == pytest.approx(cohen_kappa_score([1, 1, 0], [1, 0, 0]))
    assert learning.agreement({"1": [0]}, {"2": [0]}) is None


def test_queue_age():
    assert learning.queue_age([10.0, 20.0], data_as_of=25.0, now=100.0) == {"unseen_annotations": 0, "age_seconds": 0.0}
    assert learning.queue_age([10.0, 30.0, 40.0], data_as_of=25.0, now=100.0) == {"unseen_annotations": 2,
                                                                                    "age_seconds": 60.0}
    assert learning.queue_age([5.0], data_as_of=None, now=6.0)["unseen_annotations"] == 1


def test_curve_splits_random_order_points_into_the_baseline(tmp_path):
    def cycle(version, n, strategy, point=None, kappa=None, trained=True, has_prev=True):
        c = {"version": version, "n_labeled": n, "strategy": strategy, "trained": trained,
             "has_previous_predictions": has_prev, "train_seconds": 1.5}
        if point:
            c["prequential"] = point
        if kappa is not None:
            c["agreement"] = {"kappa": kappa, "n": 10}
        return c
    pt = {"n": 4, "accuracy": 0.5, "macro_f1": 0.4}
    h = {"cycles": [cycle("v1", 0, "random", trained=False, has_prev=False), cycle("v2", 4, "random", pt, has_prev=False),
                    cycle("v3", 8, "margin", {**pt, "accuracy": 0.75}, 0.8), cycle("v4", 12, "margin", kappa=0.995)]}
    c = learning.curve(h)
    assert [p["version"] for p in c["points"]] == ["v2", "v3"]
    assert [p["version"] for p in c["baseline"]] == ["v2"] and [p["version"] for p in c["active"]] == ["v3"]
    assert c["stop"]["stable_versions"] == 1 and not c["stop"]["stop"]


def test_history_file_records_cycles_points_and_durations(tmp_path):
    learning.record_cycle(tmp_path, 3, {"version": "a-v1", "n_labeled": 2, "n_pool": 10, "score_seconds": 2.0}, None)
    learning.record_cycle(tmp_path, 3, {"version": "a-v2", "n_labeled": 6, "n_pool": 6, "score_seconds": 1.0},
                          ("a-v1", {"n": 4, "accuracy": 0.75, "macro_f1": 0.7, "tasks": [1, 2, 3, 4]}))
    learning.record_job_seconds(tmp_path, 3, "a-v2", 7.0)
    h = learning.read_history(tmp_path, 3)
    assert h["cycles"][0]["prequential"] == {"n": 4, "accuracy": 0.75, "macro_f1": 0.7}  # task ids not kept
    assert h["cycles"][1]["job_seconds"] == 7.0
    t = h["totals"]
    assert (t["cycles"], t["pool_tasks_scored"], t["pool_scoring_seconds"]) == (2, 16, 3.0)
    assert t["job_seconds_count"] == 1 and t["job_seconds_sum"] == 7.0
    buckets = dict(zip(learning.DURATION_BUCKETS, t["job_seconds_buckets"]))
    assert buckets[5] == 0 and buckets[10] == 1 and buckets[float("inf")] == 1
    assert not any(p.name.endswith(".part") for p in (tmp_path / "3").iterdir())

    # a job that publishes a head refresh, then the adapter: both versions get their timings, one job is counted
    learning.record_cycle(tmp_path, 3, {"version": "a-v3", "n_labeled": 7, "n_pool": 5, "refresh": "head"},
                          ("a-v2", {"n": 1, "accuracy": 1.0, "macro_f1": 1.0, "tasks": [5]}))
    learning.record_job_seconds(tmp_path, 3, "a-v3", 2.5, {"train": 0.4, "push": 1.0}, job_ended=False)
    learning.record_cycle(tmp_path, 3, {"version": "a-v4", "n_labeled": 7, "n_pool": 5}, None)
    learning.record_job_seconds(tmp_path, 3, "a-v4", 30.0, {"train": 25.0, "push": 1.0})
    h = learning.read_history(tmp_path, 3)
    assert [c.get("timings", {}).get("train") for c in h["cycles"]] == [None, None, 0.4, 25.0]
    assert (h["totals"]["job_seconds_count"], h["totals"]["head_refreshes"]) == (2, 1)
    assert [p["head_only"] for p in learning.curve(h)["points"]] == [False, False]  # a-v1, a-v2 measured
    learning.record_cycle(tmp_path, 3, {"version": "a-v5", "n_labeled": 9, "n_pool": 3},
                          ("a-v4", {"n": 2, "accuracy": 0.5, "macro_f1": 0.5, "tasks": [6, 7]}))
    learning.record_cycle(tmp_path, 3, {"version": "a-v6", "n_labeled": 9, "n_pool": 3},
                          ("a-v3", {"n": 2, "accuracy": 0.5, "macro_f1": 0.5, "tasks": [6, 7]}))
    assert {p["version"]: p["head_only"] for p in learning.curve(learning.read_history(tmp_path, 3))["points"]} == \
        {"a-v1": False, "a-v2": False, "a-v3": True, "a-v4": False}


# --- job progress ------------------------------------------------------------------------------------------

def test_progress_reports_phases_steps_and_an_estimate(tmp_path):
    now = [100.0]
    track = JobProgress(tmp_path, 5, clock=lambda: now[0])
    track.phase("fetching", "fetching 3 labeled and 9 unlabeled images")
    assert read_progress(tmp_path, 5)["phase"] == "fetching"
    track.phase("training")
    now[0] = 102.0
    track.step(1, 20, 0.9)  # the first step is shown at once; there is no rate yet
    p = read_progress(tmp_path, 5)
    assert (p["step"], describe(p, running=True, typical_seconds=None, now=102.0)["eta_seconds"]) == (1, None)
    now[0] = 110.0
    track.step(5, 20, 0.7)
    p = read_progress(tmp_path, 5)
    assert (p["phase"], p["step"], p["total"]) == ("training", 5, 20)
    d = describe(p, running=True, typical_seconds=None, now=111.0)
    assert d["words"] == "training step 5 of 20" and d["elapsed_seconds"] == 11.0
    assert d["eta_seconds"] == pytest.approx(8.0 / 4 * 15 - 1.0)  # 2 s per step since the first, 15 to go
    now[0] = 120.0
    track.step(20, 20, 0.1)
    p = read_progress(tmp_path, 5)
    assert p["phase"] == "scoring"
    assert describe(p, running=True, typical_seconds=50.0, now=125.0)["eta_seconds"] == pytest.approx(25.0)
    assert describe(p, running=False, typical_seconds=50.0, now=125.0) == {"running": False}
    with pytest.raises(ValueError):
        track.phase("dreaming")


def test_plain_error():
    assert plain_error(None) is None
    assert plain_error("LabelStudioError: GET /api/projects/3/ -> 404: not found") == \
        "Label Studio did not answer as expected: GET /api/projects/3/ -> 404: not found"
    assert plain_error("ZeroDivisionError: division by zero").startswith("The training stopped with an unexpected error")
    assert plain_error("job x was abandoned: its worker stopped") == "job x was abandoned: its worker stopped"


# --- /metrics, /status, /ui through the app ----------------------------------------------------------------

def metrics(client, headers=None) -> dict:
    """{(sample name, frozenset(labels)): value} of a /metrics scrape, parsed by prometheus_client."""
    r = client.get("/metrics", headers=headers or {})
    assert r.status_code == 200 and r.content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float | None:
    return m.get((name, frozenset({k: str(v) for k, v in labels.items()}.items())))


@pytest.fixture
def app_settings(tmp_path, tiny_backbone):
    (tmp_path / "models").mkdir()
    return Settings(backbone=tiny_backbone, adapter="linear", model_dir=str(tmp_path / "models"),
                    label_studio_url="http://127.0.0.1:9")


@pytest.fixture
def app_client(app_settings):
    queue = make_queue(app_settings, job="tests.jobfuncs.scripted")
    yield create_app(app_settings, queue=queue).test_client()
    queue.close()


def test_each_metric_moves_when_its_event_happens(app_client, app_settings):
    client, model_dir = app_client, app_settings.model_dir
    m0 = metrics(client)
    assert value(m0, "peal_training_queue_depth") == 0
    assert value(m0, "peal_cache_bytes", cache="images") == 0

    # requests: count and latency per endpoint (the scrape itself counts once answered)
    client.get("/health")
    m = metrics(client)
    assert value(m, "peal_http_requests_total", endpoint="/health", method="GET", code=200) == 1
    assert value(m, "peal_http_request_duration_seconds_count", endpoint="/health") == 1
    assert value(m, "peal_http_requests_total", endpoint="/metrics", method="GET", code=200) == 1  # the first scrape
    client.get("/no/such/page")
    assert value(metrics(client), "peal_http_requests_total", endpoint="unmatched", method="GET", code=404) == 1

    # /predict: tasks scored (images that cannot be fetched still get an answer each)
    config = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
              '<Choice value="a"/><Choice value="b"/></Choices></View>')
    r = client.post("/predict", json={"project": 4, "label_config": config, "tasks": [
        {"id": 1, "data": {"image": "/data/upload/4/a.png"}}, {"id": 2, "data": {"image": "/data/upload/4/b.png"}}]})
    assert r.status_code == 200 and len(r.json["results"]) == 2
    m = metrics(client)
    assert value(m, "peal_predict_tasks_total") == 2
    assert value(m, "peal_http_request_duration_seconds_count", endpoint="/predict") == 1

    # trainings: a finished job and a failed one, counted per project
    client.post("/webhook", json={"action": "START_TRAINING", "project": 4})
    wait_for(lambda: client.get("/jobs/4").json["runs"] == 1, "the training")
    m = metrics(client)
    assert value(m, "peal_trainings_total", project=4) == 1 and value(m, "peal_training_failures_total", project=4) == 0
    assert value(m, "peal_webhook_events_total", action="START_TRAINING") == 1
    queue = client.application.extensions["peal"]["get_queue"]()
    queue.request_training(4, "fail")
    wait_for(lambda: client.get("/jobs/4").json["failures"] == 1, "the failed training")
    m = metrics(client)
    assert value(m, "peal_training_failures_total", project=4) == 1 and value(m, "peal_trainings_total", project=4) == 1
    assert value(m, "peal_training_last_duration_seconds", project=4) is not None

    # queue depth: a long training runs, one more waits behind it
    queue.request_training(4, "sleep=0.5")
    wait_for(lambda: client.get("/jobs/4").json["state"] == "running", "the long training to start")
    queue.request_training(4, "queued behind")
    m = metrics(client)
    assert value(m, "peal_training_running", project=4) == 1 and value(m, "peal_training_queue_depth") == 1
    wait_for(lambda: client.get("/jobs/4").json["runs"] == 3 and client.get("/jobs/4").json["state"] == "idle",
             "both trainings")
    assert value(metrics(client), "peal_training_queue_depth") == 0

    # versions per project
    store = ModelStore(model_dir)
    store.save(4, "peal-linear", {"w": torch.zeros(1)}, {"labels": ["a", "b"]})
    m = metrics(client)
    assert value(m, "peal_model_versions", project=4) == 1 and value(m, "peal_model_version_number", project=4) == 1

    # a cycle recorded as the training job records it: pool scoring, labels, the learning curve, durations
    v1 = store.latest(4).name
    learning.record_cycle(model_dir, 4, {"version": v1, "n_labeled": 6, "n_pool": 40, "score_seconds": 4.0,
                                         "trained": True, "strategy": "margin", "data_as_of": 1000.0}, None)
    m = metrics(client)
    assert value(m, "peal_pool_scored_tasks_total", project=4) == 40
    assert value(m, "peal_pool_scoring_seconds_total", project=4) == 4.0
    assert value(m, "peal_pool_scoring_tasks_per_second", project=4) == 10.0
    assert value(m, "peal_labels", project=4) == 6
    assert value(m, "peal_prequential_accuracy", project=4) is None
    assert value(m, "peal_training_duration_seconds_count", project=4) == 0
    assert value(m, "peal_head_refreshes_total", project=4) == 0 and value(m, "peal_adapter_deferrals_total", project=4) == 0
    learning.record_cycle(model_dir, 4, {"version": v1 + "-refresh", "n_labeled": 7, "n_pool": 39, "refresh": "head",
                                         "trained": True, "strategy": "margin", "data_as_of": 1001.0}, None)
    learning.record_deferral(model_dir, 4)
    m = metrics(client)
    assert value(m, "peal_head_refreshes_total", project=4) == 1 and value(m, "peal_adapter_deferrals_total", project=4) == 1
    learning.record_job_seconds(model_dir, 4, v1, 12.0)
    m = metrics(client)
    assert value(m, "peal_training_duration_seconds_count", project=4) == 1
    assert value(m, "peal_training_duration_seconds_bucket", project=4, le="10.0") == 0
    assert value(m, "peal_training_duration_seconds_bucket", project=4, le="30.0") == 1
    assert value(m, "peal_training_duration_seconds_sum", project=4) == 12.0

    # queue age: an annotation after the data the ranking was made from
    assert value(m, "peal_queue_unseen_annotations", project=4) == 0
    client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": 4})
    m = metrics(client)
    assert value(m, "peal_queue_unseen_annotations", project=4) == 1
    assert value(m, "peal_queue_age_seconds", project=4) >= 0
    assert value(m, "peal_webhook_events_total", action="ANNOTATION_CREATED") == 1

    # the next cycles: v1 gets its prequential point; three stable versions raise the stop signal
    assert value(m, "peal_stop_signal", project=4) == 0
    names = [v1]
    for i, kappa in enumerate((0.995, 0.999, 1.0)):
        names.append(store.save(4, "peal-linear", {"w": torch.zeros(1)}, {"labels": ["a", "b"]}).name)
        evaluated = (names[-2], {"n": 5, "accuracy": 0.6 + 0.1 * i, "macro_f1": 0.5 + 0.1 * i}) if i == 0 else None
        learning.record_cycle(model_dir, 4, {"version": names[-1], "n_labeled": 10 + 4 * i, "n_pool": 36 - 4 * i,
                                             "trained": True, "strategy": "margin", "has_previous_predictions": True,
                                             "agreement": {"kappa": kappa, "n": 30}, "score_seconds": 1.0}, evaluated)
        m = metrics(client)
        if i == 0:
            assert value(m, "peal_prequential_accuracy", project=4) == pytest.approx(0.6)
            assert value(m, "peal_prequential_macro_f1", project=4) == pytest.approx(0.5)
        assert value(m, "peal_prediction_agreement_kappa", project=4) == pytest.approx(kappa)
        assert value(m, "peal_stop_signal", project=4) == (1 if i == 2 else 0)

    # cache sizes: the image cache's ledger, the activation cache's files
    os.makedirs(app_settings.image_cache_dir, exist_ok=True)
    with open(os.path.join(app_settings.image_cache_dir, ".size"), "w") as f:
        f.write("12345")
    os.makedirs(app_settings.activation_cache_dir, exist_ok=True)
    with open(os.path.join(app_settings.activation_cache_dir, "shard.npy"), "wb") as f:
        f.write(b"\0" * 4096)
    from peal_backend import monitoring  # sizes are measured at most every CACHE_TTL seconds
    monitoring.CACHE_TTL, old = -1.0, monitoring.CACHE_TTL
    try:
        m = metrics(client)
    finally:
        monitoring.CACHE_TTL = old
    assert value(m, "peal_cache_bytes", cache="images") == 12345
    assert value(m, "peal_cache_bytes", cache="activations") == 4096

    # the JSON for people: /status (the old /metrics) and /status/<project> agree with the exposition
    s = client.get("/status").json
    assert s["latest_versions"]["4"] == names[-1] and s["caches"]["images"] == 12345
    o = client.get("/status/4").json
    assert o["curve"]["stop"]["stop"] and [p["version"] for p in o["curve"]["points"]] == [v1]
    wait_for(lambda: client.get("/jobs/4").json["runs"] == 4, "the training the annotation queued")
    o = client.get("/status/4").json
    assert o["job"]["runs"] == 4 and o["job"]["failures"] == 1
    assert o["job"]["last_error"].startswith("The training stopped with an unexpected error (RuntimeError): training exploded")


def test_ui_renders_the_project_and_needs_auth(app_settings):
    s = app_settings.replace(basic_auth_user="lead", basic_auth_pass="pw-SECRET-42", label_studio_api_key="KEY-SECRET-9")
    queue = make_queue(s, job="tests.jobfuncs.scripted")
    try:
        client = create_app(s, queue=queue).test_client()
        store = ModelStore(s.model_dir)
        v = store.save(2, "peal-linear", {"w": torch.zeros(1)}, {"labels": ["a", "b"], "strategy": "margin"},
                       files={learning.SERVED_FILE: [{"rank": 1, "task": 77, "score": 0.01, "strategy": "margin",
                                                      "cluster": None, "image": "/data/upload/2/x.png",
                                                      "predicted": "a", "confidence": 0.55, "uncertainty": 0.45,
                                                      "margin": 0.1}]}).name
        learning.record_cycle(s.model_dir, 2, {"version": v, "n_labeled": 9, "n_pool": 1, "trained": True,
                                               "strategy": "margin", "train_seconds": 3.2}, None)
        for path in ("/ui", "/ui/2", "/ui/2/job", "/metrics", "/status", "/status/2", "/ui/thumb/2/77"):
            r = client.get(path)
            assert r.status_code == 401, path
        good = {"Authorization": "Basic " + base64.b64encode(b"lead:pw-SECRET-42").decode()}
        index = client.get("/ui", headers=good).get_data(as_text=True)
        assert 'href="/ui/2"' in index
        r = client.get("/ui/2", headers=good)
        html = r.get_data(as_text=True)
        assert r.status_code == 200 and r.content_type.startswith("text/html")
        assert 'data-task="77"' in html and "/ui/thumb/2/77" in html and "predicted a at 55.0 %" in html
        assert "No point yet" in html and "Keep labeling" in html
        assert "pw-SECRET-42" not in html and "KEY-SECRET-9" not in html and "***" in html
        assert "/data/upload/2/x.png" not in html  # image URLs stay in the backend
        # nothing is loaded from elsewhere: every src/href is a path on this backend, no CSS import
        refs = re.findall(r'(?:src|href)="([^"]*)"', html)
        assert refs and all(ref.startswith("/") for ref in refs), refs
        assert "@import" not in html and "url(" not in html
        # a thumbnail only for a task of the stored queue, never a URL from the request
        r = client.get("/ui/thumb/2/78", headers=good)
        assert r.status_code == 404
        r = client.get("/ui/thumb/2/77", headers=good)  # Label Studio at 127.0.0.1:9 is down: a clear 502
        assert r.status_code == 502 and "thumbnail of task 77" in r.json["error"] and "KEY-SECRET-9" not in r.json["error"]
        assert json.loads(json.dumps(client.get("/status/2", headers=good).json))["queue"][0]["task"] == 77
        assert "image" not in client.get("/status/2", headers=good).json["queue"][0]
    finally:
        queue.close()


def test_job_panel_and_metrics_follow_a_running_job(app_settings, tmp_path):
    queue = make_queue(app_settings, job="tests.jobfuncs.progress")
    try:
        client = create_app(app_settings, queue=queue).test_client()
        gate = tmp_path / "gate"
        queue.request_training(5, f"gate={gate}")
        wait_for(lambda: (read_progress(app_settings.model_dir, 5) or {}).get("step") == 3, "the job's progress")
        html = client.get("/ui/5/job").get_data(as_text=True)
        assert 'id="job-state" class="state-running">running<' in html
        assert 'data-phase="training">training step 3 of 10<' in html and 'id="job-eta">–<' in html  # no rate after one step, no past run
        m = metrics(client)
        assert value(m, "peal_training_running", project=5) == 1 and value(m, "peal_training_phase_step", project=5) == 3
        gate.touch()
        wait_for(lambda: client.get("/jobs/5").json["state"] == "idle", "the job to end")
        html = client.get("/ui/5/job").get_data(as_text=True)
        assert 'id="job-state" class="state-idle">idle<' in html and "job-phase" not in html
        assert value(metrics(client), "peal_training_running", project=5) == 0
    finally:
        queue.close()


def test_the_bookkeeping_never_fails_a_training(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where MODEL_DIR should be")
    assert learning.record_cycle(blocked, 1, {"version": "x-v1"}, None) is None
    assert learning.record_job_seconds(blocked, 1, "x-v1", 1.0) is None
    learning.note_annotation_event(blocked, 1)
    assert learning.read_history(blocked, 1)["cycles"] == []


def test_a_job_in_an_rq_worker_process_shows_on_the_servers_page_and_metrics(tmp_path):
    """Trainings run in `peal-backend worker` processes with REDIS_URL: the server still shows their
    phase and counts them (read from Redis and the shared MODEL_DIR, not from its own memory)."""
    import subprocess
    import sys
    import uuid

    import redis

    from tests.conftest import TEST_REDIS_URL

    try:
        r = redis.Redis.from_url(TEST_REDIS_URL)
        r.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {TEST_REDIS_URL}: {exc}")
    name = f"test-dash-{uuid.uuid4().hex[:10]}"
    s = Settings(redis_url=TEST_REDIS_URL, queue_name=name, model_dir=str(tmp_path / "models"),
                 label_studio_url="http://127.0.0.1:9")
    queue = make_queue(s, job="tests.jobfuncs.progress")
    code = ("from peal_backend.config import Settings; from peal_backend.jobs import run_worker; "
            f"run_worker(Settings(redis_url={TEST_REDIS_URL!r}, queue_name={name!r}, log_level='WARNING'))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    worker = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=open(tmp_path / "worker.log", "wb"),
                              stderr=subprocess.STDOUT)
    try:
        client = create_app(s, queue=queue).test_client()
        gate = tmp_path / "gate"
        queue.request_training(6, f"gate={gate}")
        wait_for(lambda: (read_progress(s.model_dir, 6) or {}).get("step") == 3, "the worker's progress", timeout=60)
        assert read_progress(s.model_dir, 6)["pid"] == worker.pid  # written by the worker, not by us
        html = client.get("/ui/6/job").get_data(as_text=True)
        assert 'class="state-running">running<' in html and "training step 3 of 10" in html
        m = metrics(client)
        assert value(m, "peal_training_running", project=6) == 1 and value(m, "peal_training_phase_step", project=6) == 3
        assert value(m, "peal_trainings_total", project=6) == 0
        gate.touch()
        wait_for(lambda: client.get("/jobs/6").json["runs"] == 1, "the worker's job to end", timeout=60)
        m = metrics(client)
        assert value(m, "peal_trainings_total", project=6) == 1 and value(m, "peal_training_running", project=6) == 0
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        queue.close()
        forget_queue(r, name)
        r.close()
