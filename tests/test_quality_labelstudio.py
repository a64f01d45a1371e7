"""Label quality in a real Label Studio 1.23.2: after a training, the labeled tasks carry a prediction with
`mislabeling` (and `neighbors` for a planted near-duplicate) at a version of their own, readable and
sortable through the API, while the project's model_version and the unlabeled queue stay the
backend's; the next training replaces them instead of adding to them.

The training job runs in the test process (`labelstudio_job.train_project`, what the worker runs) against
a Label Studio started with `DATA_MANAGER_FILTER_ALLOWLIST=predictions__mislabeling`, the setting the
README tells reviewers to use; `test_sorting_by_mislabeling_needs_the_allowlist` shows the default
server refusing it.
"""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from peal_backend.config import Settings
from peal_backend.labelstudio import LabelStudio
from peal_backend.labelstudio_job import quality_predictions, quality_version, train_project, wait_for_pruning
from peal_backend.model import parse_label_config
from tests.labelstudio_fixture import ensure_template, label_studio, require_label_studio, start_server, stop_server  # noqa: F401
from tests.test_e2e_labelstudio import LABELS, REPO, annotate, load_example, backbone, make_project, predictions_at, xrays  # noqa: F401

ALLOWLIST = "predictions__mislabeling"


@pytest.fixture(scope="module")
def review_studio(tmp_path_factory):
    """A Label Studio whose Data Manager may sort and filter by predictions__mislabeling."""
    exe = require_label_studio()
    root = tmp_path_factory.mktemp("label-studio-review")
    data_dir = root / "data"
    shutil.copytree(ensure_template(exe, root), data_dir)
    (root / "files").mkdir()
    previous = os.environ.get("DATA_MANAGER_FILTER_ALLOWLIST")
    os.environ["DATA_MANAGER_FILTER_ALLOWLIST"] = ALLOWLIST  # the server's environment is built from ours
    try:
        server = start_server(exe, data_dir, root / "files", root / "label-studio.log")
    finally:
        if previous is None:
            os.environ.pop("DATA_MANAGER_FILTER_ALLOWLIST")
        else:
            os.environ["DATA_MANAGER_FILTER_ALLOWLIST"] = previous
    try:
        yield server
    finally:
        stop_server(server)


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def task_ids_ordered(server, pid: int, query: dict) -> list[int]:
    r = requests.get(f"{server.url}/api/tasks/", headers={"Authorization": f"Token {server.token}"}, timeout=60,
                     params={"project": pid, "fields": "task_only", "page_size": 500, "query": json.dumps(query)})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["tasks"]]


def quality_of(client: LabelStudio, pid: int) -> dict[int, list[dict]]:
    """task id -> its predictions at a peal-quality version."""
    out: dict[int, list[dict]] = {}
    for task in client.tasks(pid):
        out[task["id"]] = [p for p in task["predictions"] if p["model_version"].startswith("peal-quality-")]
    return out


@pytest.mark.labelstudio
@pytest.mark.slow
def test_labeled_tasks_get_mislabeling_and_neighbors_without_disturbing_the_queue(review_studio, xrays, backbone,
                                                                                   tmp_path):
    server = review_studio
    client = LabelStudio(server.url, server.token)
    pid, truth = make_project(server, xrays, "label quality", 24, 4)
    source = next(t for t in client.tasks(pid) if t["data"]["image"].endswith("xray-000.png"))["id"]
    r = requests.post(f"{server.url}/api/projects/{pid}/import", headers={"Authorization": f"Token {server.token}"},
                      files=[("file", ("copy.jpg", jpeg(xrays[0][0]), "image/jpeg"))], timeout=60)
    assert r.status_code == 201, r.text
    copy = max(t["id"] for t in client.tasks(pid))
    truth[copy] = truth[source]

    tids = sorted(t for t in truth if t != copy)
    by_class = {lab: [t for t in tids if truth[t] == lab] for lab in LABELS}
    labeled = sorted(set(by_class[LABELS[0]][:9] + by_class[LABELS[1]][:9]) | {source})
    wrong = [t for t in labeled if t != source][:2]  # two labels planted wrong
    given = {t: (LABELS[1 - LABELS.index(truth[t])] if t in wrong else truth[t]) for t in labeled}
    annotate(server, labeled, given)

    settings = Settings(label_studio_url=server.url, label_studio_api_key=server.token, model_dir=str(tmp_path / "models"),
                        backbone=backbone[0], image_size=backbone[1], set_uncertainty_sampling=True,
                        epochs=2, min_steps=5, batch_size=16, mislabeling=True, duplicate_similarity=0.98)
    result = train_project(pid, settings, "test")
    assert result["status"] == "trained" and result["n_labeled"] == len(labeled)
    version = result["model_version"]
    judged = quality_version(version)
    assert judged.startswith("peal-quality-v") and judged != version
    assert result["quality_predictions"] == len(labeled)  # every label scored (both classes have 2+)

    # the queue is the backend's as before: model_version, one prediction per unlabeled task, /next
    assert client.project(pid)["model_version"] == version
    pool = predictions_at(client, pid, version)
    assert set(pool) == set(truth) - set(labeled)
    assert client.next_task(pid)["id"] == result["label_next"]

    # every labeled task: one quality prediction, with the out-of-sample choice and a score in [0, 1]
    found = quality_of(client, pid)
    assert all(not found[t] for t in pool)
    scores = {}
    for t in labeled:
        assert [p["model_version"] for p in found[t]] == [judged]
        p = found[t][0]
        assert 0.0 <= p["mislabeling"] <= 1.0 and p["result"][0]["value"]["choices"][0] in LABELS
        scores[t] = p["mislabeling"]
    assert copy in found[source][0]["neighbors"]  # the JPEG copy in the pool is the labeled image's neighbour
    assert len(set(scores.values())) > 1
    print(f"\nmislabeling of the planted wrong labels: {[round(scores[t], 3) for t in wrong]}, "
          f"rank {[sorted(scores, key=scores.get, reverse=True).index(t) + 1 for t in wrong]} of {len(scores)}")

    # the Data Manager's ordering and filter, through the API (what a saved view runs)
    ordered = task_ids_ordered(server, pid, {"ordering": ["-tasks:predictions__mislabeling"]})
    assert sorted(ordered) == sorted(truth)  # every task once
    assert [scores[t] for t in ordered[:len(labeled)]] == sorted(scores.values(), reverse=True)
    above = task_ids_ordered(server, pid, {"filters": {"conjunction": "and", "items": [
        {"filter": "filter:tasks:predictions__mislabeling", "operator": "greater", "type": "Number", "value": 0.5}]}})
    assert set(above) == {t for t, s in scores.items() if s > 0.5}

    # examples/review_labels.py: the top labels with what a reviewer needs, and a Data Manager tab
    review = load_example("review_labels")
    top = review.to_review(server.client, pid, 3)
    assert [r["task"] for r in top] == sorted(scores, key=scores.get, reverse=True)[:3]
    assert all(r["given"] == given[r["task"]] and r["model"] in LABELS for r in top)
    view = review.create_tab(server.client, pid)
    r = requests.get(f"{server.url}/api/tasks/", headers={"Authorization": f"Token {server.token}"}, timeout=60,
                     params={"project": pid, "view": view, "fields": "task_only", "page_size": 500})
    assert [t["id"] for t in r.json()["tasks"]][:len(labeled)] == ordered[:len(labeled)]

    # the next training replaces the quality predictions; at most PEAL_QUALITY_MAX_WRITES of them, tasks
    # with near-duplicates first, then the highest scores
    annotate(server, [pool_task for pool_task in sorted(pool) if pool_task != copy][:1], truth)
    second = train_project(pid, settings.replace(quality_max_writes=3), "test")
    wait_for_pruning(pid)  # the previous quality version is deleted in the background
    judged2 = quality_version(second["model_version"])
    assert second["quality_predictions"] == 3 and judged2 != judged
    assert judged not in client.model_versions(pid) and judged2 in client.model_versions(pid)
    found = quality_of(client, pid)
    written = {t for t, preds in found.items() if preds}
    assert all(len(preds) <= 1 for preds in found.values()) and len(written) == 3
    assert source in written
    assert client.project(pid)["model_version"] == second["model_version"]


@pytest.mark.labelstudio
def test_sorting_by_mislabeling_needs_the_allowlist(label_studio):
    """Label Studio's default refuses a Data Manager ordering through a relation, naming the setting."""
    server = label_studio
    pid = server.client.projects.create(title="no allowlist", label_config=(REPO / "examples" / "label_config.xml").read_text()).id
    r = requests.get(f"{server.url}/api/tasks/", headers={"Authorization": f"Token {server.token}"}, timeout=60,
                     params={"project": pid, "query": json.dumps({"ordering": ["-tasks:predictions__mislabeling"]})})
    assert r.status_code == 400 and "DATA_MANAGER_FILTER_ALLOWLIST" in r.text and ALLOWLIST in r.text


class _Result:
    def __init__(self, scores, probs, neighbors):
        from peal_backend.quality import Mislabeling
        self.mislabeling = Mislabeling(np.asarray(scores, float), np.asarray(probs, float))
        self.neighbors = neighbors


def test_quality_predictions_order_cap_and_payload():
    spec = parse_label_config((REPO / "examples" / "label_config.xml").read_text())
    result = _Result([0.2, np.nan, 0.9, 0.6], [[0.8, 0.2], [np.nan, np.nan], [0.1, 0.9], [0.3, 0.7]], {1: [4], 3: [0]})
    rows = quality_predictions(spec, result, [10, 11, 12, 13], [14], max_writes=10, threshold=0.5)
    # near-duplicates first (by score), then by score; the unscored task 11 only for its neighbour
    assert [r["task"] for r in rows] == [13, 11, 12, 10]
    assert rows[0]["neighbors"] == [10] and rows[1]["neighbors"] == [14] and "neighbors" not in rows[2]
    assert rows[1]["mislabeling"] == 0.0 and rows[1]["result"] == []
    assert rows[2]["result"][0]["value"]["choices"] == [LABELS[1]] and rows[2]["mislabeling"] == 0.9
    assert [r["task"] for r in quality_predictions(spec, result, [10, 11, 12, 13], [14], 2, 0.5)] == [13, 11]
    assert quality_predictions(spec, result, [10, 11, 12, 13], [14], 0, 0.5) == []


@pytest.mark.parametrize("field, value, message", [
    ("mislabeling", float("nan"), "expected a finite number"), ("mislabeling", "high", "expected a finite number"),
    ("mislabeling", True, "expected a finite number"), ("neighbors", 5, "expected a list of task ids"),
    ("neighbors", [1, "2"], "expected a list of task ids")])
def test_bad_quality_fields_are_refused_before_any_request(field, value, message):
    from peal_backend.labelstudio import _validated
    with pytest.raises(ValueError, match=rf"predictions\[0\]\['{field}'\]: {message}"):
        _validated([{"task": 1, "result": [], field: value}])
    assert _validated([{"task": 1, "result": [], "mislabeling": 0.25, "neighbors": [2, 3]}]) == [
        {"task": 1, "result": [], "mislabeling": 0.25, "neighbors": [2, 3]}]
