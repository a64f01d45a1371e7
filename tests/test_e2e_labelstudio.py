"""End to end (issue 5): a real Label Studio 1.23.2, the backend as a real gunicorn process, real
chest X-ray images (PneumoniaMNIST) behind local-files storage and file upload, connected the way a
user connects it (examples/connect_backend.py, through the SDK).

Timings of the annotation API calls are printed (run with -s to see them), never asserted.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATASETS
import requests
from PIL import Image

from peal_backend.labelstudio import LabelStudio
from tests.labelstudio_fixture import free_port, label_studio  # noqa: F401  (fixture)

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
DATASET = DATASETS / "pneumoniamnist.npz"
LABELS = ("normal", "pneumonia")  # PneumoniaMNIST's classes 0 and 1, as in examples/label_config.xml
N_LOCAL, N_UPLOAD = 45, 15
TRAIN_TIMEOUT = float(os.environ.get("PEAL_E2E_TRAIN_TIMEOUT", "300"))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


connect_backend = load_example("connect_backend")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def xrays() -> tuple[np.ndarray, np.ndarray]:
    if not DATASET.exists():
        pytest.skip(f"{DATASET} not found")
    with np.load(DATASET) as data:
        images, labels = data["train_images"], data["train_labels"][:, 0]
    # The file is sorted by class: take both classes, shuffled with a fixed seed.
    n = N_LOCAL + N_UPLOAD
    picked = np.concatenate([np.flatnonzero(labels == c)[:n // 2 + 1] for c in (0, 1)])
    picked = np.random.default_rng(0).permutation(picked)[:n]
    return images[picked].copy(), labels[picked].copy()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> tuple[str, int]:
    """(PEAL_BACKBONE, PEAL_IMAGE_SIZE): the packaged peal-mini once it ships, else a tiny random
    DINOv2 saved with save_pretrained (the plumbing under test does not care how good it is)."""
    from peal_backend.backbone import PACKAGED_BACKBONES
    if (PACKAGED_BACKBONES["peal-mini"] / "config.json").exists():
        return "peal-mini", 0  # its own input size
    from tests.backbone_fixture import save_tiny_dinov2
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2")), 28


@dataclass
class Backend:
    url: str
    process: subprocess.Popen
    auth: tuple[str, str] | None
    log_path: Path

    def get(self, path: str, **kw):
        return requests.get(self.url + path, auth=self.auth, timeout=30, **kw)

    def jobs(self, project: int) -> dict:
        r = self.get(f"/jobs/{project}")
        r.raise_for_status()
        return r.json()

    def metrics(self) -> dict:
        """The JSON status for people (/metrics is the Prometheus exposition)."""
        return self.get("/status").json()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def start_backend(server, backbone, tmp: Path, auth: tuple[str, str] | None = None, **extra: str) -> Backend:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PEAL_", "LABEL_STUDIO_", "BASIC_AUTH_"))}
    env.pop("REDIS_URL", None)  # embedded queue: trainings in the server process's background thread
    env.update({
        "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": server.token,
        "MODEL_DIR": str(tmp / "models"), "PEAL_BACKBONE": backbone[0], "PEAL_IMAGE_SIZE": str(backbone[1]),
        "PEAL_EPOCHS": "2", "PEAL_MIN_STEPS": "5", "PEAL_BATCH_SIZE": "16", "PEAL_SET_UNCERTAINTY_SAMPLING": "true",
        "LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1",
    })
    if auth:
        env.update({"BASIC_AUTH_USER": auth[0], "BASIC_AUTH_PASS": auth[1]})
    env.update(extra)
    log_path = tmp / f"backend-{port}.log"
    with open(log_path, "wb") as log:
        # The same command as the Dockerfile's CMD, on loopback.
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "8",
             "--timeout", "300", "_wsgi:app"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    backend = Backend(f"http://127.0.0.1:{port}", proc, auth, log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode}:\n{backend.log_tail()}")
        try:
            if requests.get(backend.url + "/health", timeout=2).ok:
                return backend
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop_backend(backend)
    raise RuntimeError(f"backend not healthy in 120 s:\n{backend.log_tail()}")


def stop_backend(backend: Backend) -> None:
    try:
        os.killpg(backend.process.pid, signal.SIGTERM)
        backend.process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(backend.process.pid, signal.SIGKILL)
        backend.process.wait(timeout=5)


def make_project(server, xrays, title: str, n_local: int, n_upload: int) -> tuple[int, dict[int, str]]:
    """A project whose tasks are real PNGs: n_local behind local-files storage, n_upload uploaded.
    Returns the project id and the true label of each task."""
    images, labels = xrays
    sdk = server.client
    pid = sdk.projects.create(title=title, label_config=(REPO / "examples" / "label_config.xml").read_text()).id
    folder = server.document_root / f"project-{pid}"
    folder.mkdir()
    truth_by_name = {}
    for i in range(n_local):
        (folder / f"xray-{i:03d}.png").write_bytes(png(images[i]))
        truth_by_name[f"xray-{i:03d}.png"] = LABELS[int(labels[i])]
    storage = sdk.import_storage.local.create(project=pid, path=str(folder), regex_filter=r".*\.png",
                                              use_blob_urls=True, title="x-rays")
    sdk.import_storage.local.sync(id=storage.id)
    files = []
    for j in range(n_local, n_local + n_upload):
        files.append((f"file{j}", (f"upload-{j:03d}.png", png(images[j]), "image/png")))
        truth_by_name[f"upload-{j:03d}.png"] = LABELS[int(labels[j])]
    r = requests.post(f"{server.url}/api/projects/{pid}/import", files=files,
                      headers={"Authorization": f"Token {server.token}"}, timeout=60)
    assert r.status_code == 201, r.text
    truth = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # storage sync may finish after its call returns
        tasks = list(LabelStudio(server.url, server.token).tasks(pid))
        if len(tasks) == n_local + n_upload:
            break
        time.sleep(0.5)
    assert len(tasks) == n_local + n_upload
    for task in tasks:
        name = task["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[-1] if "/data/upload/" in task["data"]["image"] \
            else task["data"]["image"].rsplit("/", 1)[-1]
        truth[task["id"]] = truth_by_name[name]
    kinds = [t["data"]["image"] for t in tasks]
    assert sum("/data/local-files/?d=" in u for u in kinds) == n_local
    assert sum(u.startswith("/data/upload/") for u in kinds) == n_upload
    return pid, truth


def annotate(server, task_ids, truth, states: list | None = None, backend=None, pid=None) -> list[float]:
    """Submit one annotation per task through the API; the seconds each call took. With `states`,
    the backend's training state just before each call is appended to it."""
    seconds = []
    for tid in task_ids:
        if states is not None:
            states.append(backend.jobs(pid)["state"])
        started = time.perf_counter()
        server.client.annotations.create(id=tid, result=[{
            "from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [truth[tid]]}}])
        seconds.append(time.perf_counter() - started)
    return seconds


def wait_for_runs(backend: Backend, pid: int, runs: int, timeout: float = TRAIN_TIMEOUT) -> dict:
    """Poll the backend until `runs` trainings finished for the project and none is waiting."""
    deadline = time.monotonic() + timeout
    status = {}
    while time.monotonic() < deadline:
        status = backend.jobs(pid)
        if status["failures"]:
            pytest.fail(f"training failed: {status['last_error']}\n{backend.log_tail()}")
        if status["runs"] >= runs and status["state"] == "idle":
            return status
        time.sleep(0.5)
    pytest.fail(f"no finished training #{runs} in {timeout:.0f} s: {status}\n{backend.log_tail()}")


def figures(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    return (f"{name}: n={len(ms)} median={statistics.median(ms):.0f} ms "
            f"max={ms[-1]:.0f} ms mean={statistics.fmean(ms):.0f} ms")


def unlabeled_with_predictions(client: LabelStudio, pid: int) -> dict[int, dict]:
    """The unlabeled tasks with their predictions inline (the client's split leaves predictions out)."""
    ids = {t["id"] for t in client.unlabeled_tasks(pid)}
    return {t["id"]: t for t in client.tasks(pid) if t["id"] in ids}


def check_queue_follows_the_strategy(server, client: LabelStudio, pid: int, version: str, label_next: int):
    """Every unlabeled task has a prediction at `version`; /next and the Data Manager order by score
    both serve the strategy's first pick (the lowest score)."""
    unlabeled = unlabeled_with_predictions(client, pid)
    scores = {}
    for tid, task in unlabeled.items():
        at_version = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(at_version) == 1, f"task {tid}: {len(at_version)} predictions at {version}"
        assert at_version[0]["result"] and at_version[0]["result"][0]["value"]["choices"][0] in LABELS
        scores[tid] = at_version[0]["score"]
    project = client.project(pid)
    assert project["model_version"] == version
    assert project["sampling"] == "Uncertainty sampling"
    lowest = min(scores, key=scores.get)
    assert scores[label_next] == scores[lowest]
    nxt = client.next_task(pid)
    assert nxt is not None and scores[nxt["id"]] == scores[lowest]
    assert nxt["id"] == label_next
    r = requests.get(f"{server.url}/api/tasks/", headers=client.auth_headers(), timeout=30, params={
        "project": pid, "fields": "all", "page_size": 200,
        "query": json.dumps({"ordering": ["tasks:predictions_score"]})})
    # Labeled tasks have no prediction at this version: a null score, which SQLite sorts first.
    ordered = [t["id"] for t in r.json()["tasks"] if t.get("predictions_score") is not None]
    assert ordered[0] == label_next
    assert [scores[t] for t in ordered] == sorted(scores.values())


def test_backend_learns_in_the_background_and_orders_the_queue(label_studio, xrays, backbone, tmp_path):
    server = label_studio
    client = LabelStudio(server.url, server.token)
    pid, truth = make_project(server, xrays, "e2e x-rays", N_LOCAL, N_UPLOAD)
    tids = sorted(truth)
    by_class = {lab: [t for t in tids if truth[t] == lab] for lab in LABELS}
    first = by_class["normal"][:3] + by_class["pneumonia"][:3]
    second = by_class["normal"][3:6] + by_class["pneumonia"][3:6]

    # Baseline: annotation saves with no backend connected.
    baseline = annotate(server, first[:2], truth)

    backend = start_backend(server, backbone, tmp_path)
    try:
        ml_id = connect_backend.connect(server.client, pid, backend.url)
        ml = server.client.ml.get(id=ml_id)
        assert str(ml.state).endswith("CO") or "CONNECTED" in str(ml.state).upper(), ml.state
        assert backend.metrics()["counts"].get("setup", 0) >= 1  # Label Studio called /setup

        # Opening a task without predictions makes Label Studio call /predict (untrained: empty result).
        opened = server.client.tasks.get(id=str(tids[-1]))
        assert opened.id == tids[-1]
        assert backend.metrics()["counts"].get("predict_requests", 0) >= 1

        idle = annotate(server, first[2:], truth)     # webhooks: trainings get queued
        status = backend.jobs(pid)
        assert status["state"] in ("queued", "running") or status["runs"] >= 1
        states: list = []
        during = annotate(server, second, truth, states, backend, pid)  # while the first training runs
        status = wait_for_runs(backend, pid, 1)
        version = status["last_result"]["model_version"]
        versions = backend.get(f"/versions?project={pid}").json()["versions"]
        assert version in versions
        # Coalesced annotations may have queued a second training: let the queue drain.
        status = wait_for_runs(backend, pid, status["runs"])
        version, label_next = status["last_result"]["model_version"], status["last_result"]["label_next"]
        assert status["last_result"]["n_labeled"] == len(first) + len(second)
        check_queue_follows_the_strategy(server, client, pid, version, label_next)

        # A task imported after training gets a real prediction from /predict at the new version.
        r = requests.post(f"{server.url}/api/projects/{pid}/import", headers={"Authorization": f"Token {server.token}"},
                          files=[("file", ("late.png", png(xrays[0][0]), "image/png"))], timeout=60)
        assert r.status_code == 201, r.text
        late = max(t["id"] for t in client.tasks(pid))
        server.client.tasks.get(id=str(late))
        preds = [p for p in server.client.predictions.list(task=late)]
        assert any(p.model_version == version and p.result for p in preds), preds

        # "Start training" in the UI is the SDK's ml.train: START_TRAINING reaches /webhook.
        runs = status["runs"]
        server.client.ml.train(id=ml_id)
        status = wait_for_runs(backend, pid, runs + 1)
        assert status["reason"] == "START_TRAINING"
        new_version = status["last_result"]["model_version"]
        assert new_version != version
        assert client.project(pid)["model_version"] == new_version

        print("\n" + "\n".join([
            figures("annotation save, no backend", baseline),
            figures("annotation save, backend idle", idle),
            figures("annotation save, after the first webhooks", during)
            + f" (training state before each: {', '.join(states)})",
            f"first training: {status['last_duration_s']} s (last run), backbone {backbone[0]}",
        ]))
    finally:
        stop_backend(backend)


def test_basic_auth_between_label_studio_and_the_backend(label_studio, xrays, backbone, tmp_path):
    server = label_studio
    client = LabelStudio(server.url, server.token)
    pid, truth = make_project(server, xrays, "e2e basic auth", 8, 4)
    auth = ("peal", "s3cret-pass")
    backend = start_backend(server, backbone, tmp_path, auth=auth)
    try:
        assert requests.post(backend.url + "/setup", json={}, timeout=10).status_code == 401
        # Connected as in the UI's "Basic auth" form: Label Studio sends the credentials to /setup...
        ml_id = server.client.ml.create(project=pid, url=backend.url, title="peal-backend", is_interactive=False,
                                        auth_method="BASIC_AUTH", basic_auth_user=auth[0], basic_auth_pass=auth[1]).id
        assert backend.metrics()["counts"].get("setup", 0) >= 1
        assert wait_for_runs(backend, pid, 1)["last_result"]["status"] == "ordered"  # the cold start
        # ...but not on the webhook it creates: the annotation event is refused (401), nothing queued.
        tids = sorted(truth)
        picks = [t for t in tids if truth[t] == "normal"][:2] + [t for t in tids if truth[t] == "pneumonia"][:2]
        annotate(server, picks[:1], truth)  # Label Studio delivers the webhook inside the save
        assert not any(k.startswith("webhook_") for k in backend.metrics()["counts"])
        assert backend.jobs(pid)["runs"] == 1 and backend.jobs(pid)["state"] == "idle"
        # With the header added (what connect_backend.connect does) annotations reach the backend.
        assert connect_backend.add_webhook_auth(server.client, pid, backend.url, auth) == 1
        annotate(server, picks[1:], truth)
        assert backend.metrics()["counts"].get("webhook_ANNOTATION_CREATED", 0) == len(picks) - 1
        status = wait_for_runs(backend, pid, 1)
        assert status["last_result"]["model_version"] == client.project(pid)["model_version"]
        server.client.ml.train(id=ml_id)
        status = wait_for_runs(backend, pid, status["runs"] + 1)
        assert status["reason"] == "START_TRAINING"
    finally:
        stop_backend(backend)


def predictions_at(client: LabelStudio, pid: int, version: str) -> dict[int, dict]:
    """task id -> its prediction at `version`, for every unlabeled task (each must have exactly one)."""
    out = {}
    for task in unlabeled_with_predictions(client, pid).values():
        at_version = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(at_version) == 1, f"task {task['id']}: {len(at_version)} predictions at {version}"
        out[task["id"]] = at_version[0]
    return out


def test_cold_start_orders_a_connected_project_before_any_label(label_studio, xrays, backbone, tmp_path):
    """Connected with no label: the backend orders the pool (coverage on the backbone's embeddings) and
    Label Studio serves the lowest score; one label of one class still shows no predicted choice;
    every pushed prediction carries a cluster."""
    server = label_studio
    client = LabelStudio(server.url, server.token)
    pid, truth = make_project(server, xrays, "e2e cold start", 10, 4)
    backend = start_backend(server, backbone, tmp_path, PEAL_CLUSTERS="0")
    try:
        connect_backend.connect(server.client, pid, backend.url)
        status = wait_for_runs(backend, pid, 1)  # /setup queued the ordering: no annotation was made
        result = status["last_result"]
        assert result["status"] == "ordered" and result["n_labeled"] == 0 and result["n_pool"] == len(truth)
        version = result["model_version"]
        assert version.startswith("peal-coldstart-v")
        preds = predictions_at(client, pid, version)
        assert set(preds) == set(truth)
        assert all(p["result"] == [] for p in preds.values())  # an order, no predicted choice
        assert all(isinstance(p["cluster"], int) for p in preds.values())
        assert len({p["cluster"] for p in preds.values()}) >= 2
        assert client.project(pid)["model_version"] == version
        scores = {t: p["score"] for t, p in preds.items()}
        nxt = client.next_task(pid)
        assert nxt["id"] == min(scores, key=scores.get) == result["label_next"]
        # /predict for a task of this project answers the same order, still without a choice
        r = requests.post(backend.url + "/predict", timeout=60, json={
            "project": f"{pid}.0", "label_config": (REPO / "examples" / "label_config.xml").read_text(),
            "tasks": [{"id": nxt["id"], "data": nxt["data"]}]})
        assert r.json()["results"][0]["result"] == [] and r.json()["results"][0]["score"] == scores[nxt["id"]]

        # One label of one class: re-ordered around it, but no classifier is trained or shown
        annotate(server, [nxt["id"]], truth)
        status = wait_for_runs(backend, pid, 2)
        assert status["last_result"]["status"] == "ordered" and status["last_result"]["n_labeled"] == 1
        preds = predictions_at(client, pid, status["last_result"]["model_version"])
        assert nxt["id"] not in preds and all(p["result"] == [] for p in preds.values())

        # A label of the other class: now a classifier, with choices, served in score order
        other = next(t for t in preds if truth[t] != truth[nxt["id"]])
        annotate(server, [other], truth)
        status = wait_for_runs(backend, pid, 3)
        assert status["last_result"]["status"] == "trained"
        version = status["last_result"]["model_version"]
        preds = predictions_at(client, pid, version)
        assert all(p["result"][0]["value"]["choices"][0] in LABELS for p in preds.values())
        assert all(isinstance(p["cluster"], int) for p in preds.values())
        # Label Studio serves the least-labeled cluster first, lowest score within: what the simulator
        # models with cycle.served_next (the annotator's tasks count in their predictions' highest cluster)
        from peal_backend.cycle import served_next
        solved: dict[int, int] = {}
        for task in client.tasks(pid):
            if task["id"] in (nxt["id"], other):
                c = max(p["cluster"] for p in task["predictions"] if p.get("cluster") is not None)
                solved[c] = solved.get(c, 0) + 1
        ids = sorted(preds)
        expected = served_next(np.array([preds[t]["score"] for t in ids]), np.array([preds[t]["cluster"] for t in ids]),
                               solved, 1)
        assert client.next_task(pid)["id"] == ids[int(expected[0])]
    finally:
        stop_backend(backend)
