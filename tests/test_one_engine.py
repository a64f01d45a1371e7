"""One engine: the simulator and a real training job, given the same labels, produce the same order.

The job runs against a real Label Studio (real PNGs behind local-files storage and upload, annotations
through the API, images fetched over HTTP and decoded); the simulator gets the same images as arrays.
Both go through `cycle.run_cycle`, so the queue (task order) and the clusters must be identical.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from peal_backend import learning, simulate as sim
from peal_backend.config import Settings
from peal_backend.jobs import TRAIN_JOB, MemoryStore, execute_job
from peal_backend.labelstudio import LabelStudio
from peal_backend.labelstudio_job import train_project
from peal_backend.cycle import adapter_of
from peal_backend.model import ADAPTER_FILE, CLUSTERS_FILE, FEATURE_HASHES_FILE, FEATURES_FILE, QUEUE_FILE, TRAINED_FILE
from peal_backend.store import ModelStore
from tests.labelstudio_fixture import label_studio  # noqa: F401  (fixture)
from tests.test_e2e_labelstudio import LABELS, annotate, backbone, make_project, xrays  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]


def image_index(task: dict) -> int:
    """Which of the `xrays` arrays a task shows (make_project names files xray-NNN / upload-NNN)."""
    return int(re.search(r"(?:xray|upload)-(\d+)\.png", task["data"]["image"]).group(1))


@pytest.mark.parametrize("strategy, n_labels", [("auto", 4), ("typiclust", 4), ("margin", 6)])
def test_simulator_and_training_job_produce_the_same_order(label_studio, xrays, backbone, tmp_path, strategy, n_labels):
    server = label_studio
    client = LabelStudio(server.url, server.token)
    pid, truth = make_project(server, xrays, f"one engine {strategy}", 16, 6)
    tasks = sorted(client.tasks(pid), key=lambda t: t["id"])
    by_class = {lab: [t["id"] for t in tasks if truth[t["id"]] == lab] for lab in LABELS}
    picked = by_class[LABELS[0]][:n_labels // 2] + by_class[LABELS[1]][:n_labels - n_labels // 2]
    annotate(server, picked, truth)

    settings = Settings(label_studio_url=server.url, label_studio_api_key=server.token, model_dir=str(tmp_path / "models"),
                        backbone=backbone[0], image_size=backbone[1], strategy=strategy, clusters=0)
    result = train_project(pid, settings, "test")
    assert result["status"] == "trained"
    store = ModelStore(settings.model_dir)
    version = store.latest(pid)
    queue = store.read_json(version, QUEUE_FILE)
    job_order = [int(t) for t in sorted(queue, key=queue.get)]
    job_clusters = store.read_json(version, CLUSTERS_FILE)

    # The simulator: the same images as arrays, in task order; the same labeled tasks
    images, labels = xrays
    order_of = [image_index(t) for t in tasks]
    data = sim.Dataset("xrays", images[order_of], np.array([LABELS.index(truth[t["id"]]) for t in tasks]),
                       images[:2], labels[:2].astype(np.int64), list(LABELS))
    prep = sim.prepare(data, settings, tmp_path / "sim-cache")
    labeled = np.array([i for i, t in enumerate(tasks) if t["id"] in picked])
    cycle = sim.simulated_cycle(prep, settings, labeled)
    unlabeled = np.setdiff1d(np.arange(len(tasks)), labeled)
    sim_order = [tasks[unlabeled[i]]["id"] for i in cycle.order]

    assert cycle.strategy == result["strategy"]
    assert sim_order == job_order
    assert {str(tasks[unlabeled[i]]["id"]): int(c) for i, c in enumerate(cycle.pool_clusters)} == job_clusters
    assert sim_order[0] == result["label_next"]


def test_incremental_cycles_warm_start_alike_in_the_job_and_the_simulator(label_studio, xrays, backbone, tmp_path):
    """PEAL_WARM_START: the job's second training starts from its first version's adapter with a step
    budget scaled to the one new label; the simulator, given the same labels and that adapter, ranks
    the pool the same; every PEAL_FULL_RETRAIN_EVERY-th cycle trains from the pretrained weights again."""
    server = label_studio
    client = LabelStudio(server.url, server.token)
    pid, truth = make_project(server, xrays, "incremental", 16, 6)
    tasks = sorted(client.tasks(pid), key=lambda t: t["id"])
    by_class = {lab: [t["id"] for t in tasks if truth[t["id"]] == lab] for lab in LABELS}
    annotate(server, by_class[LABELS[0]][:2] + by_class[LABELS[1]][:2], truth)
    settings = Settings(label_studio_url=server.url, label_studio_api_key=server.token, model_dir=str(tmp_path / "models"),
                        backbone=backbone[0], image_size=backbone[1], strategy="margin", warm_start=True,
                        full_retrain_every=2, min_steps=20, warm_min_steps=5, adapt_growth=0.0)
    store = ModelStore(settings.model_dir)

    first = train_project(pid, settings, "test")
    v1 = store.latest(pid)
    assert (v1.meta["warm_started_from"], v1.meta["cycles_since_full"], v1.meta["metrics"]["steps"]) == (None, 0, 20)

    added = by_class[LABELS[0]][2]
    annotate(server, [added], truth)
    second = train_project(pid, settings, "test")
    v2 = store.latest(pid)
    assert v2.meta["warm_started_from"] == first["model_version"] and v2.meta["new_labels"] == 1
    assert v2.meta["cycles_since_full"] == 1 and v2.meta["metrics"]["steps"] == 5  # max(5, 20 * 1/5)
    queue = store.read_json(v2, QUEUE_FILE)
    job_order = [int(t) for t in sorted(queue, key=queue.get)]

    prep = simulator_twin(xrays, tasks, truth, settings, tmp_path)
    labeled = np.array([i for i, t in enumerate(tasks) if t["id"] in set(by_class[LABELS[0]][:3] + by_class[LABELS[1]][:2])])
    cycle = sim.simulated_cycle(prep, settings, labeled, v1.weights(), new_labels=1)
    unlabeled = np.setdiff1d(np.arange(len(tasks)), labeled)
    assert [tasks[unlabeled[i]]["id"] for i in cycle.order] == job_order
    assert second["label_next"] == job_order[0]

    train_project(pid, settings, "test")  # the second cycle since the full one: full again
    v3 = store.latest(pid)
    assert (v3.meta["warm_started_from"], v3.meta["cycles_since_full"], v3.meta["metrics"]["steps"]) == (None, 0, 20)


def simulator_twin(xrays, tasks: list[dict], truth: dict, settings: Settings, tmp_path) -> sim.Prepared:
    """The simulator's view of a project's tasks: the same images as arrays, in task order."""
    images, labels = xrays
    data = sim.Dataset("xrays", images[[image_index(t) for t in tasks]],
                       np.array([LABELS.index(truth[t["id"]]) for t in tasks]), images[:2], labels[:2].astype(np.int64),
                       list(LABELS))
    return sim.prepare(data, settings, tmp_path / "sim-cache")


def growth_project(server, xrays, backbone, tmp_path, title: str):
    """A project of 22 x-rays with 2 labels of each class, and settings with PEAL_ADAPT_GROWTH=0.5:
    (client, project id, truth, tasks by id, task ids by class, settings)."""
    client = LabelStudio(server.url, server.token)
    pid, truth = make_project(server, xrays, title, 16, 6)
    tasks = sorted(client.tasks(pid), key=lambda t: t["id"])
    by_class = {lab: [t["id"] for t in tasks if truth[t["id"]] == lab] for lab in LABELS}
    annotate(server, by_class[LABELS[0]][:2] + by_class[LABELS[1]][:2], truth)
    settings = Settings(label_studio_url=server.url, label_studio_api_key=server.token, model_dir=str(tmp_path / "models"),
                        backbone=backbone[0], image_size=backbone[1], strategy="margin", adapter="lora",
                        adapt_growth=0.5, min_steps=20)
    return client, pid, truth, tasks, by_class, settings


def test_head_refresh_alike_in_the_job_and_the_simulator(label_studio, xrays, backbone, tmp_path):
    """PEAL_ADAPT_GROWTH: the job's first training trains LoRA and stores its features of every image; the
    next one (1 new label, under 0.5 x 4) keeps that LoRA and solves only the head again on the stored
    features; the simulator, running the same plan on the same labels, ranks the pool the same; once the
    labels have grown by half, LoRA trains again."""
    server = label_studio
    client, pid, truth, tasks, by_class, settings = growth_project(server, xrays, backbone, tmp_path, "head refresh")
    store = ModelStore(settings.model_dir)

    train_project(pid, settings, "test")
    v1 = store.latest(pid)
    assert v1.meta["refresh"] is None and v1.meta["metrics"]["steps"] == 20
    assert store.read_json(v1, ADAPTER_FILE) == store.read_json(v1, TRAINED_FILE) and len(store.read_json(v1, ADAPTER_FILE)) == 4
    features = store.read_array(v1, FEATURES_FILE)
    assert features.dtype == np.float16 and features.shape[0] == len(store.read_json(v1, FEATURE_HASHES_FILE)) == len(tasks)

    annotate(server, [by_class[LABELS[0]][2]], truth)
    second = train_project(pid, settings, "test")
    v2 = store.latest(pid)
    assert (v2.meta["refresh"], v2.meta["adapter_from"], v2.meta["metrics"]["steps"]) == ("head", v1.name, 0)
    assert store.read_json(v2, ADAPTER_FILE) == store.read_json(v1, ADAPTER_FILE)  # the adapter's labels, not the head's
    w1, w2 = v1.weights(), v2.weights()
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if not k.startswith("head."))  # LoRA kept
    assert not torch.equal(w1["head.weight"], w2["head.weight"])                    # the head solved again
    queue = store.read_json(v2, QUEUE_FILE)
    job_order = [int(t) for t in sorted(queue, key=queue.get)]

    prep = simulator_twin(xrays, tasks, truth, settings, tmp_path)
    index = {t["id"]: i for i, t in enumerate(tasks)}
    first_labeled = np.array(sorted(index[t] for t in by_class[LABELS[0]][:2] + by_class[LABELS[1]][:2]))
    first = sim.simulated_cycle(prep, settings, first_labeled)
    adapter = adapter_of(first, {str(tasks[i]["id"]): [int(prep.data.train_labels[i])] for i in first_labeled},
                         prep.train_hashes, first_labeled)
    labeled = np.array(sorted(index[t] for t in by_class[LABELS[0]][:3] + by_class[LABELS[1]][:2]))
    cycle = sim.simulated_cycle(prep, settings, labeled, adapter=adapter)
    assert cycle.metrics["refresh"] == "head"
    unlabeled = np.setdiff1d(np.arange(len(tasks)), labeled)
    assert [tasks[unlabeled[i]]["id"] for i in cycle.order] == job_order
    assert second["label_next"] == job_order[0]

    annotate(server, by_class[LABELS[1]][2:3], truth)  # 2 labels new since LoRA trained on 4: it trains again,
    third = train_project(pid, settings, "test")        # after a head refresh that serves meanwhile
    refreshed, v4 = store.get(pid, third["refreshed_first"]), store.latest(pid)
    assert (refreshed.meta["refresh"], len(store.read_json(refreshed, TRAINED_FILE))) == ("head", 6)
    assert (v4.meta["refresh"], v4.meta["metrics"]["steps"], v4.name) == (None, 20, third["model_version"])
    assert len(store.read_json(v4, ADAPTER_FILE)) == 6 and v4.number == refreshed.number + 1


def test_a_due_adapter_training_gives_way_to_a_new_label_until_it_lags_twice(label_studio, xrays, backbone, tmp_path):
    """When LoRA's training is due and another training is requested meanwhile (a label came), the job
    stops it and ends with the head refresh it pushed first; once the labels have grown by twice
    PEAL_ADAPT_GROWTH, LoRA trains even so. The job runs under the real queue code (`execute_job`) with
    a second request already queued, so the adapter meets it at its first step."""
    server = label_studio
    client, pid, truth, tasks, by_class, settings = growth_project(server, xrays, backbone, tmp_path, "deferred adapter")
    store, queue = ModelStore(settings.model_dir), MemoryStore()
    train_project(pid, settings, "test")  # LoRA on 4 labels

    def job_with_a_label_waiting(token: str) -> dict:
        assert queue.try_enqueue(pid, f"waiting-{token}", "annotation")[0]
        try:
            return execute_job(queue, pid, settings, "annotation", TRAIN_JOB, token)
        finally:
            queue.clear_queued(pid, f"waiting-{token}")

    annotate(server, by_class[LABELS[0]][2:4], truth)  # 2 new: due (>= 0.5 x 4), may wait (< 2 x 0.5 x 4)
    deferred = job_with_a_label_waiting("a")
    assert "adapter_deferred" in deferred and deferred["refresh"] == "head"
    assert store.latest(pid).name == deferred["model_version"] and client.project(pid)["model_version"] == deferred["model_version"]
    assert len(store.read_json(store.latest(pid), ADAPTER_FILE)) == 4  # LoRA still the one trained on 4

    annotate(server, by_class[LABELS[1]][2:4], truth)  # 4 new: LoRA lags twice the growth, trains regardless
    trained = job_with_a_label_waiting("b")
    assert "adapter_deferred" not in trained and trained["refresh"] is None
    assert len(store.read_json(store.latest(pid), ADAPTER_FILE)) == 8
    assert store.get(pid, trained["refreshed_first"]).meta["refresh"] == "head"
    totals = learning.read_history(settings.model_dir, pid)["totals"]  # what /metrics and the dashboard count
    assert (totals["head_refreshes"], totals["adapter_deferrals"]) == (2, 1)
    assert totals["job_seconds_count"] == 3  # three jobs (five versions), each counted once
