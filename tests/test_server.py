"""The HTTP contract, through Flask's test client and through a real gunicorn process, with real
images served over loopback HTTP and a model version trained on real PneumoniaMNIST images."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch

from peal_backend.backbone import build_classifier
from peal_backend.config import Settings, SettingsError
from peal_backend.images import preprocess, to_pil
from peal_backend.jobs import make_queue
from peal_backend.model import model_settings, parse_label_config, LabelConfigError
from peal_backend.server import create_app
from peal_backend.store import ModelStore
from peal_backend.training import fit
from tests.backbone_fixture import tiny_backbone  # noqa: F401
from tests.conftest import DATASETS, free_port

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image"><Choice value="normal"/><Choice value="pneumonia"/></Choices>
</View>"""
PROJECT = "7.1700000000"


def pneumonia(n=40):
    with np.load(DATASETS / "pneumoniamnist.npz") as d:
        return d["train_images"][:n], d["train_labels"][:n, 0]


def train_version(settings: Settings, project=7) -> str:
    """Train a real version on real images, saved the way the training job saves it."""
    images, labels = pneumonia()
    model = build_classifier(settings, 2)
    fit(model, preprocess([to_pil(a) for a in images], 28), torch.tensor(labels.astype(np.int64)), settings)
    meta = {"labels": ["normal", "pneumonia"], "multiple": False, "model_settings": model_settings(settings)}
    return ModelStore(settings.model_dir).save(project, "peal-linear", model.trainable_state(), meta).name


@pytest.fixture
def settings(tmp_path, tiny_backbone, image_server):
    (tmp_path / "models").mkdir()
    return Settings(backbone=tiny_backbone, adapter="linear", model_dir=str(tmp_path / "models"),
                    label_studio_url=image_server.base_url, epochs=5, min_steps=20)


@pytest.fixture
def client(settings):
    queue = make_queue(settings, job="tests.jobfuncs.scripted")
    app = create_app(settings, queue=queue)
    yield app.test_client()
    queue.close()


def served_tasks(image_server, n=4):
    images, labels = pneumonia(n)
    tasks = []
    for i, arr in enumerate(images):
        ext = "png" if i % 2 == 0 else "jpg"
        pil = to_pil(arr)
        path = image_server.dir / f"data/upload/7/img{i}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        pil.save(path, format="PNG" if ext == "png" else "JPEG")
        # alternate relative Label Studio upload paths and absolute URLs
        url = f"/data/upload/7/img{i}.{ext}" if i % 2 == 0 else image_server.url(f"/data/upload/7/img{i}.{ext}")
        tasks.append({"id": 100 + i, "data": {"image": url}, "project": 7})
    return tasks, labels


# --- label config -------------------------------------------------------------------------------------
def test_label_config_parsing():
    spec = parse_label_config(CONFIG)
    assert (spec.image_key, spec.choices_name, spec.labels, spec.multiple) == ("image", "diagnosis", ("normal", "pneumonia"), False)
    multi = parse_label_config(CONFIG.replace('toName="image"', 'toName="image" choice="multiple"'))
    assert multi.multiple
    with pytest.raises(LabelConfigError, match="no <Image>"):
        parse_label_config('<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>')
    with pytest.raises(LabelConfigError, match="no <Choices>"):
        parse_label_config('<View><Image name="i" value="$i"/></View>')


# --- Flask test client --------------------------------------------------------------------------------
def test_health_and_index(client):
    for path in ("/health", "/"):
        r = client.get(path)
        assert r.status_code == 200 and r.json["status"] == "UP" and r.json["model_class"] == "PealModel"


def test_setup_rejects_bad_configs_then_a_missing_api_key(client, settings):
    r = client.post("/setup", json={"project": PROJECT, "schema": '<View><Image name="i" value="$i"/></View>'})
    assert r.status_code == 400 and "no <Choices>" in r.json["error"]
    # a backend without LABEL_STUDIO_API_KEY could never read annotations, so never train: connecting
    # fails, naming the setting (Label Studio shows the error instead of "Connected")
    r = client.post("/setup", json={"project": PROJECT, "schema": CONFIG, "hostname": "http://ls", "access_token": "x"})
    assert r.status_code == 400 and "LABEL_STUDIO_API_KEY is not set" in r.json["error"]


def test_setup_names_a_label_studio_url_nothing_answers(settings):
    from peal_backend.backbone import load_backbone
    load_backbone(settings.backbone)  # loaded: the /setup checks fit their time budget
    s = settings.replace(label_studio_url=f"http://127.0.0.1:{free_port()}/ls", label_studio_api_key="k" * 40)
    c = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    r = c.post("/setup", json={"project": PROJECT, "schema": CONFIG})
    assert r.status_code == 502 and "LABEL_STUDIO_URL=" in r.json["error"] and "k" * 40 not in r.json["error"]


def test_malformed_bodies_get_clear_400s(client):
    r = client.post("/predict", data="{not json", content_type="application/json")
    assert r.status_code == 400 and "JSON object" in r.json["error"]
    r = client.post("/predict", json={"tasks": "nope", "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 400 and "'tasks' must be a list" in r.json["error"]
    r = client.post("/setup", json={"project": "abc", "schema": CONFIG})
    assert r.status_code == 400 and "'project'" in r.json["error"]
    r = client.post("/webhook", json=[1, 2])
    assert r.status_code == 400


def test_predict_before_training_returns_no_result(client, image_server):
    tasks, _ = served_tasks(image_server, 2)
    r = client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200
    assert [x["result"] for x in r.json["results"]] == [[], []]


def test_predict_serves_trained_version_and_isolates_bad_tasks(client, settings, image_server):
    name = train_version(settings)
    tasks, labels = served_tasks(image_server, 6)
    image_server.add("notes.txt", b"this is not an image")
    bad = [{"id": 900, "data": {"other": "x"}},                                         # no image field
           {"id": 901, "data": {"image": image_server.url("/notes.txt")}},              # not an image
           {"id": 902, "data": {"image": "http://127.0.0.1:9/unreachable.png"}}]         # unreachable host
    batch = tasks[:3] + bad + tasks[3:]
    r = client.post("/predict", json={"tasks": batch, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200
    results = r.json["results"]
    assert len(results) == len(batch)
    good = results[:3] + results[6:]
    for res in good:
        assert res["model_version"] == name
        (region,) = res["result"]
        assert region["from_name"] == "diagnosis" and region["to_name"] == "image" and region["type"] == "choices"
        assert region["value"]["choices"][0] in ("normal", "pneumonia")
        assert 0.5 <= region["score"] <= 1.0 and 0.0 <= res["score"] <= 1.0
    for res, why in zip(results[3:6], ("no image URL", "not an image", "")):
        assert res["result"] == [] and why in res["error"]
    # the image fetch used the Label Studio host for relative URLs
    assert image_server.count("/data/upload/7/img0.png") == 1


def test_predict_score_orders_most_uncertain_first(client, settings, image_server):
    train_version(settings)
    tasks, _ = served_tasks(image_server, 6)
    res = client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG}).json["results"]
    conf = np.array([r["result"][0]["score"] for r in res])
    score = np.array([r["score"] for r in res])
    # lower score = label next = less confident top choice
    assert np.array_equal(np.argsort(score, kind="stable"), np.argsort(conf, kind="stable"))


def test_webhook_events(client, settings):
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert r.status_code == 200 and r.json["status"] == "Unknown event"
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7},
                                      "annotation": {"id": 1}, "task": {"id": 100}})
    assert r.status_code == 201 and r.json["queued"] is True
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert r.status_code == 201
    deadline = time.time() + 20
    while time.time() < deadline and client.get("/jobs/7").json.get("runs", 0) < 1:
        time.sleep(0.1)
    status = client.get("/jobs/7").json
    assert status["runs"] >= 1
    assert client.get("/status").json["counts"]["webhook_ANNOTATION_CREATED"] == 1


def test_versions_and_status(client, settings):
    name = train_version(settings)
    assert client.get("/versions").json["versions"] == [name]
    m = client.get("/status").json
    assert m["latest_versions"] == {"7": name} and "label_studio_api_key" in m["settings"]


def test_status_hides_passwords_in_urls(settings):
    exposed = settings.replace(redis_url="redis://:p@ssREDISPW@127.0.0.1:6379/0?password=QUERYPW",
                               label_studio_url="http://admin:LSPW@127.0.0.1:1/ls")
    queue = make_queue(settings, job="tests.jobfuncs.scripted")  # the embedded queue: nothing to connect to
    try:
        r = create_app(exposed, queue=queue).test_client().get("/status")
    finally:
        queue.close()
    assert r.status_code == 200
    shown = r.json["settings"]
    assert shown["redis_url"] == "redis://***@127.0.0.1:6379/0?***"
    assert shown["label_studio_url"] == "http://***@127.0.0.1:1/ls"
    assert not [pw for pw in ("REDISPW", "ssREDISPW", "QUERYPW", "LSPW") if pw in r.get_data(as_text=True)]


def test_basic_auth(settings, tmp_path):
    s = settings.replace(basic_auth_user="annotator", basic_auth_pass="s3cret")
    c = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    assert c.get("/health").status_code == 200  # health checks stay open
    assert c.post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 401
    bad = base64.b64encode(b"annotator:wrong").decode()
    assert c.post("/setup", json={"project": PROJECT, "schema": CONFIG},
                  headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"annotator:s3cret").decode()
    r = c.get("/versions", headers={"Authorization": f"Basic {good}"})
    assert r.status_code == 200


@pytest.mark.parametrize("env, given, missing", [
    ({"BASIC_AUTH_PASS": "s3cret"}, "BASIC_AUTH_PASS", "BASIC_AUTH_USER"),
    ({"BASIC_AUTH_USER": "annotator"}, "BASIC_AUTH_USER", "BASIC_AUTH_PASS"),
])
def test_half_configured_basic_auth_refuses_to_start(env, given, missing):
    # one of the two alone left every endpoint open
    message = f"{given} is set but {missing} is empty"
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH_")}
    for command in ("serve", "worker"):  # the CLI reads the settings before it starts either
        done = subprocess.run([sys.executable, "-m", "peal_backend.cli", command], env={**clean, **env},
                              capture_output=True, text=True)
        assert done.returncode != 0 and message in done.stderr, (command, done.stderr[-500:])


def test_worker_rebuilds_a_basic_auth_servers_settings_without_its_credentials(settings):
    from peal_backend.jobs import settings_from_payload, settings_payload
    server = settings.replace(basic_auth_user="annotator", basic_auth_pass="s3cret")
    payload = settings_payload(server)
    assert "s3cret" not in str(payload) and "annotator" not in str(payload)
    rebuilt = settings_from_payload(payload, local=Settings())
    assert (rebuilt.basic_auth_user, rebuilt.basic_auth_pass, rebuilt.backbone) == ("", "", server.backbone)


# --- a real gunicorn process --------------------------------------------------------------------------
@contextlib.contextmanager
def serving(settings, stdout=None):
    """`peal-backend serve` on loopback (a real gunicorn), until /health answers; its URL."""
    port = free_port()
    env = {**os.environ, "MODEL_DIR": settings.model_dir, "PEAL_BACKBONE": settings.backbone,
           "PEAL_ADAPTER": "linear", "LABEL_STUDIO_URL": settings.label_studio_url, "LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "peal_backend.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout else None, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            raise RuntimeError("gunicorn did not come up")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def gunicorn_backend(settings):
    with serving(settings) as url:
        yield url


def test_real_gunicorn_serves_the_contract(gunicorn_backend, settings, image_server):
    url = gunicorn_backend
    assert requests.get(url + "/health", timeout=5).json()["status"] == "UP"
    name = train_version(settings)
    r = requests.post(url + "/setup", json={"project": PROJECT, "schema": CONFIG}, timeout=10)
    assert r.status_code == 400 and "LABEL_STUDIO_API_KEY" in r.json()["error"]  # this backend has none
    tasks, _ = served_tasks(image_server, 4)
    r = requests.post(url + "/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG}, timeout=60)
    assert r.status_code == 200
    assert [len(x["result"]) for x in r.json()["results"]] == [1, 1, 1, 1]
    assert r.json()["model_version"] == name
    r = requests.post(url + "/predict", data=b"\xff\xfe garbage", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400


@pytest.mark.parametrize("setting, expected", [(None, 1), ("0", None), ("2", 2)])
def test_the_server_runs_torch_on_one_thread_by_default(settings, setting, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("PEAL_TORCH_THREADS", "OMP_NUM_THREADS")}
    env.update({"MODEL_DIR": settings.model_dir, "PEAL_BACKBONE": settings.backbone})
    if setting is not None:
        env["PEAL_TORCH_THREADS"] = setting
    out = subprocess.run([sys.executable, "-c", "import torch; default = torch.get_num_threads(); "
                          "from peal_backend.server import create_app; create_app(); print(default, torch.get_num_threads())"],
                         env=env, capture_output=True, text=True, timeout=300)
    default, threads = map(int, out.stdout.split()[-2:])
    assert threads == (default if expected is None else expected)


def test_serve_logs_one_line_per_request(settings, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "wb") as out, serving(settings, stdout=out) as url:
        assert requests.get(url + "/no-such-page?secret=XYZ", timeout=10).status_code == 404
        assert requests.post(url + "/webhook", json={"action": "PROJECT_UPDATED", "project": 1}, timeout=10).ok
    lines = log.read_text().splitlines()
    assert any('"GET /health" 200' in line for line in lines)
    assert sum('"GET /no-such-page" 404' in line for line in lines) == 1
    assert sum('"POST /webhook" 200' in line for line in lines) == 1
    assert "XYZ" not in log.read_text()


def test_real_gunicorn_refuses_a_chunked_body_over_the_limit_with_413(gunicorn_backend):
    from peal_backend.server import MAX_BODY_BYTES

    def chunks():  # no Content-Length: requests sends a generator with Transfer-Encoding: chunked
        yield b'{"tasks": ["'
        block = b"x" * (1 << 20)
        for _ in range(MAX_BODY_BYTES // len(block)):
            yield block
        yield b'"]}'

    r = requests.post(gunicorn_backend + "/webhook", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "32 MiB" in r.json()["error"], (r.status_code, r.text[:300])
    small = requests.post(gunicorn_backend + "/webhook", data=iter([b'{"action": "PROJECT_UPDATED", "project": 7}']),
                          headers={"Content-Type": "application/json"})
    assert small.status_code == 200  # a chunked body under the limit is read whole


def test_webhook_answers_at_once_while_a_training_runs(client, settings):
    """Label Studio waits at most 1 s for a webhook; a running training must not hold it up."""
    queue = client.application.extensions["peal"]["get_queue"]()
    queue.request_training(8, "sleep=3")  # the test job sleeps 3 s: a training in progress
    deadline = time.time() + 20
    while client.get("/jobs/8").json.get("state") != "running" and time.time() < deadline:
        time.sleep(0.02)
    assert client.get("/jobs/8").json["state"] == "running"
    slowest = 0.0
    for i in range(10):
        t = time.perf_counter()
        r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 8},
                                          "annotation": {"id": i}, "task": {"id": i}})
        slowest = max(slowest, time.perf_counter() - t)
        assert r.status_code == 201
    assert client.get("/jobs/8").json["state"] == "running"  # the training was still going all along
    print(f"slowest webhook answer while training: {slowest * 1000:.1f} ms")  # figures: benchmarks/load.py
