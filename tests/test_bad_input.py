"""Bad input at the HTTP edge: every case gets a clear 4xx (or, inside a /predict batch, an error
result for that task only) and never a 500 or a half-done batch.

Real images are served over loopback by `ImageServer`; the model is a real version trained on real
PneumoniaMNIST images with the tiny DINOv2. Cases that need Label Studio itself (annotations with
unknown labels, cancelled annotations, deleted tasks, a single class) are in the `labelstudio`
section at the end.
"""
from __future__ import annotations

import base64
import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch

from peal_backend.backbone import build_classifier
from peal_backend.config import Settings
from peal_backend.images import preprocess, to_pil
from peal_backend.jobs import make_queue
from peal_backend.model import model_settings
from peal_backend.server import MAX_BODY_BYTES, create_app
from peal_backend.store import ModelStore
from peal_backend.training import fit
from tests.backbone_fixture import tiny_backbone  # noqa: F401
from tests.conftest import DATASETS, ImageServer

PROJECT = "7.1700000000"
LABELS = ("normal", "pneumonia")
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image"><Choice value="normal"/><Choice value="pneumonia"/></Choices>
</View>"""
SECRET_KEY = "ls-api-key-SECRET-7f3a9"
SECRET_PASS = "basic-pass-SECRET-41c2"
MAX_BYTES = 200_000


def pneumonia(n):
    with np.load(DATASETS / "pneumoniamnist.npz") as d:
        return d["train_images"][:n], d["train_labels"][:n, 0]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries (almost) no data: a decompression bomb's
    header. Built by hand so the test does not have to allocate the pixels it declares."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = ImageServer(tmp_path_factory.mktemp("served"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_backbone, served):
    model_dir = tmp_path_factory.mktemp("models")
    s = Settings(backbone=tiny_backbone, adapter="linear", model_dir=str(model_dir),
                 label_studio_url=served.base_url, allowed_hosts="127.0.0.1:9",
                 fetch_timeout=1.0, max_image_bytes=MAX_BYTES, epochs=3, min_steps=10, log_level="WARNING")
    images, labels = pneumonia(24)
    model = build_classifier(s, 2)
    fit(model, preprocess([to_pil(a) for a in images], 28), torch.tensor(labels.astype(np.int64)), s)
    meta = {"labels": list(LABELS), "multiple": False, "model_settings": model_settings(s)}
    ModelStore(s.model_dir).save(7, "peal-linear", model.trainable_state(), meta)
    return s


@pytest.fixture(scope="module")
def client(settings):
    queue = make_queue(settings, job="tests.jobfuncs.scripted")
    yield create_app(settings, queue=queue).test_client()
    queue.close()


@pytest.fixture(scope="module")
def good_tasks(served):
    images, _ = pneumonia(4)
    tasks = []
    for i, arr in enumerate(images):
        path = served.dir / f"data/upload/7/good{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(arr).save(path, format="PNG")
        url = f"/data/upload/7/good{i}.png" if i % 2 == 0 else served.url(f"/data/upload/7/good{i}.png")
        tasks.append({"id": 100 + i, "data": {"image": url}, "project": 7})
    return tasks


def predict_batch(client, good_tasks, bad_tasks):
    """POST good[:2] + bad + good[2:]; check every good task got a real prediction; return the bad ones' results."""
    batch = good_tasks[:2] + bad_tasks + good_tasks[2:]
    r = client.post("/predict", json={"tasks": batch, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200, r.json
    results = r.json["results"]
    assert len(results) == len(batch)
    good = results[:2] + results[2 + len(bad_tasks):]
    for res in good:
        assert "error" not in res
        (region,) = res["result"]
        assert region["value"]["choices"][0] in LABELS and 0.0 <= res["score"] <= 1.0
        assert res["model_version"] == "peal-linear-v1"
    bad = results[2:2 + len(bad_tasks)]
    for res in bad:
        assert res["result"] == [] and res["score"] is None and res["model_version"] == "peal-linear-v1"
    return bad


# --- bad tasks inside a /predict batch: that task errs, the rest are predicted ---------------------

def _real_png(n_bytes_kept=None):
    images, _ = pneumonia(1)
    import io
    buf = io.BytesIO()
    to_pil(images[0]).save(buf, format="PNG")
    data = buf.getvalue()
    return data if n_bytes_kept is None else data[:n_bytes_kept]


def _real_jpeg_truncated():
    import io
    images, _ = pneumonia(1)
    buf = io.BytesIO()
    to_pil(np.kron(images[0], np.ones((8, 8), np.uint8))).save(buf, format="JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _redirect_loop(served):
    def loop(handler, query):
        handler.send_response(302)
        handler.send_header("Location", "/loop")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    served.routes["/loop"] = loop
    return served.url("/loop")


# name -> (task data builder given the server, substring the task's error must contain)
IMAGE_CASES = {
    "no_image_field": (lambda s: {"text": "x"}, "no image URL in data['image']"),
    "image_not_a_string": (lambda s: {"image": 12345}, "no image URL in data['image']"),
    "blank_image_url": (lambda s: {"image": "   "}, "no image URL"),
    "corrupt_png": (lambda s: {"image": s.add("bad/corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x13" * 500)},
                    "corrupt"),
    "truncated_png": (lambda s: {"image": s.add("bad/trunc.png", _real_png(60))}, "truncated"),
    "truncated_jpeg": (lambda s: {"image": s.add("bad/trunc.jpg", _real_jpeg_truncated())}, "truncated"),
    "empty_file": (lambda s: {"image": s.add("bad/empty.png", b"")}, "empty body"),
    "text_file": (lambda s: {"image": s.add("bad/notes.txt", b"hello, not an image\n")}, "not an image"),
    "pdf_file": (lambda s: {"image": s.add("bad/doc.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")}, "not an image"),
    "decompression_bomb": (lambda s: {"image": s.add("bad/bomb.png", png_header_only(100_000, 100_000))},
                           "too many pixels"),
    "enormous_file": (lambda s: {"image": s.url(f"/huge?bytes={MAX_BYTES * 3}")}, "too large"),
    "enormous_file_no_length": (lambda s: {"image": s.url(f"/huge?bytes={MAX_BYTES * 3}&length=0")}, "too large"),
    "http_404": (lambda s: {"image": s.url("/bad/missing.png")}, "HTTP 404"),
    "http_500": (lambda s: {"image": s.url("/status/500")}, "HTTP 500"),
    "unreachable_host": (lambda s: {"image": "http://127.0.0.1:9/x.png"}, "request failed"),
    "timeout": (lambda s: {"image": s.url("/slow/data/upload/7/good0.png?delay=5")}, "timed out"),
    "trickling_body": (lambda s: {"image": s.url("/trickle?chunks=50&interval=0.1")}, "timed out"),
    "disallowed_host": (lambda s: {"image": s.url("/data/upload/7/good0.png", host="localhost")},
                        "host 'localhost:"),
    "file_scheme": (lambda s: {"image": "file:///etc/passwd"}, "scheme 'file' is not allowed"),
    "ftp_scheme": (lambda s: {"image": "ftp://127.0.0.1/x.png"}, "scheme 'ftp' is not allowed"),
    "redirect_to_disallowed_host": (
        lambda s: {"image": s.url("/redirect?to=" + s.url("/data/upload/7/good1.png", host="localhost"))},
        "redirected to"),
    "redirect_to_file": (lambda s: {"image": s.url("/redirect?to=file:///etc/passwd")}, "scheme 'file'"),
    "redirect_loop": (lambda s: {"image": _redirect_loop(s)}, "more than 3 redirects"),
    "bad_data_uri": (lambda s: {"image": "data:image/png;base64,@@not-base64@@"}, "invalid base64"),
    "data_uri_not_image": (lambda s: {"image": "data:text/html;base64,PGgxPg=="}, "only data:image"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_task_gets_an_error_and_the_rest_of_the_batch_is_predicted(case, client, good_tasks, served):
    build, expected = IMAGE_CASES[case]
    (res,) = predict_batch(client, good_tasks, [{"id": 900, "data": build(served), "project": 7}])
    assert expected in res["error"], res["error"]


def test_disallowed_host_and_file_url_are_never_fetched(client, good_tasks, served):
    served.clear()
    other = served.url("/data/upload/7/good2.png", host="localhost")
    bad = predict_batch(client, good_tasks, [{"id": 901, "data": {"image": other}},
                                             {"id": 902, "data": {"image": "file:///etc/passwd"}}])
    assert "not allowed (add it to PEAL_ALLOWED_HOSTS)" in bad[0]["error"]
    assert "file" in bad[1]["error"] and "root:" not in json.dumps(bad)
    assert not [r for r in served.requests if r.host.startswith("localhost")]


def test_tasks_that_are_not_objects_get_errors(client, good_tasks):
    bad = predict_batch(client, good_tasks, [5, "task", None, {"id": 3, "data": "image.png"}, {"id": 4}])
    assert [("must be an object" in r["error"]) for r in bad[:3]] == [True] * 3
    assert all("no 'data' object" in r["error"] for r in bad[3:])


def test_every_bad_kind_in_one_batch(client, good_tasks, served):
    bad = [{"id": 1000 + i, "data": IMAGE_CASES[c][0](served)} for i, c in enumerate(sorted(IMAGE_CASES))
           if c not in ("timeout", "trickling_body")]  # the slow two have their own tests
    results = predict_batch(client, good_tasks, bad)
    assert all(r["error"] for r in results)


def test_a_batch_of_only_bad_tasks_answers_one_error_each(client):
    tasks = [{"id": i, "data": {"image": "file:///x"}} for i in range(3)]
    r = client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200 and [x["result"] for x in r.json["results"]] == [[], [], []]
    assert all("scheme 'file'" in x["error"] for x in r.json["results"])


def test_empty_task_list_is_fine(client):
    r = client.post("/predict", json={"tasks": [], "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200 and r.json["results"] == []


def test_model_trained_on_other_choices_answers_an_error_per_task(client, good_tasks):
    config = CONFIG.replace('<Choice value="pneumonia"/>', '<Choice value="covid"/>')
    r = client.post("/predict", json={"tasks": good_tasks, "project": PROJECT, "label_config": config})
    assert r.status_code == 200
    assert all(x["result"] == [] and "label choices changed" in x["error"] for x in r.json["results"])


# --- bad bodies: a 4xx naming the problem --------------------------------------------------------

@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
@pytest.mark.parametrize("raw, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"project": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object, got list"),
    (b'"text"', 400, "must be a JSON object, got str"),
    (b"null", 400, "must be a JSON object, got NoneType"),
])
def test_malformed_bodies(client, path, raw, status, message):
    r = client.post(path, data=raw, content_type="application/json")
    assert r.status_code == status and message in r.json["error"], (r.status_code, r.json)


@pytest.mark.parametrize("path", ["/predict", "/webhook"])
def test_huge_body_is_refused_with_413(client, path):
    big = b'{"tasks": ["' + b"x" * (MAX_BODY_BYTES + 10) + b'"]}'
    r = client.post(path, data=big, content_type="application/json")
    assert r.status_code == 413 and "too large" in r.json["error"] and "32 MiB" in r.json["error"]


@pytest.mark.parametrize("payload, message", [
    ({"project": PROJECT, "label_config": CONFIG}, "'tasks' must be a list"),
    ({"tasks": {"id": 1}, "project": PROJECT, "label_config": CONFIG}, "'tasks' must be a list"),
    ({"tasks": [], "project": "abc", "label_config": CONFIG}, "'project'"),
    ({"tasks": [], "project": -3, "label_config": CONFIG}, "'project'"),
    ({"tasks": [], "project": True, "label_config": CONFIG}, "'project'"),
    ({"tasks": [], "project": {"id": None}, "label_config": CONFIG}, "'project'"),
    ({"tasks": [], "project": PROJECT, "label_config": ["<View/>"]}, "no label config given"),
])
def test_predict_payload_errors_name_the_field(client, payload, message):
    r = client.post("/predict", json=payload)
    assert r.status_code == 400 and message in r.json["error"], r.json


HUGE_ID = "9" * 300


@pytest.mark.parametrize("method, path, payload", [
    ("post", "/webhook", {"action": "START_TRAINING", "project": HUGE_ID}),
    ("post", "/webhook", {"action": "ANNOTATION_CREATED", "project": int(HUGE_ID)}),
    ("post", "/predict", {"tasks": [], "project": HUGE_ID + ".1700000000", "label_config": CONFIG}),
    ("post", "/setup", {"project": str(2 ** 63), "schema": CONFIG}),
    ("get", f"/versions?project={HUGE_ID}", None),
    ("get", f"/jobs/{HUGE_ID}", None),
])
def test_huge_project_ids_are_a_400_naming_the_field(client, method, path, payload):
    # a 300-digit id made a file name too long: a 500
    r = getattr(client, method)(path, json=payload) if payload is not None else getattr(client, method)(path)
    assert r.status_code == 400 and "'project'" in r.json["error"], (r.status_code, r.json)


def test_largest_project_id_is_accepted(client):
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": 2 ** 63 - 1})
    assert r.status_code == 200


NO_IMAGE = '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>'
NO_CHOICES = '<View><Image name="i" value="$i"/><Labels name="l" toName="i"><Label value="a"/></Labels></View>'
UNLINKED = ('<View><Image name="i" value="$i"/><Text name="t" value="$t"/>'
            '<Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>')
ONE_CHOICE = '<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'


@pytest.mark.parametrize("config, message", [
    (NO_IMAGE, "no <Image> tag"),
    (NO_CHOICES, "no <Choices> tag"),
    (UNLINKED, "no <Choices> tag points at an <Image>"),
    (ONE_CHOICE, "needs at least two <Choice>"),
    ("<View><Image name=", "not valid XML"),
    ("", "no label config given"),
])
def test_unusable_label_configs(client, good_tasks, config, message):
    r = client.post("/setup", json={"project": PROJECT, "schema": config})
    assert r.status_code == 400 and message in r.json["error"], r.json
    if config:  # an empty one makes /predict ask Label Studio for the project's config instead
        r = client.post("/predict", json={"tasks": good_tasks, "project": PROJECT, "label_config": config})
        assert r.status_code == 400 and message in r.json["error"], r.json


@pytest.mark.parametrize("payload, status, message", [
    ({"project": 7}, 400, "'action' must be a string"),
    ({"action": {"x": 1}, "project": 7}, 400, "'action' must be a string"),
    ({"action": ["START_TRAINING"], "project": 7}, 400, "'action' must be a string"),
    ({"action": "START_TRAINING"}, 400, "'project'"),
    ({"action": "START_TRAINING", "project": -1}, 400, "'project'"),
    ({"action": "ANNOTATION_CREATED", "project": {"id": "x"}}, 400, "'project'"),
    ({"action": "PROJECT_DELETED", "project": {"id": 7}}, 200, None),
])
def test_webhook_payload_errors(client, payload, status, message):
    r = client.post("/webhook", json=payload)
    assert r.status_code == status, r.json
    if message:
        assert message in r.json["error"]


def test_unknown_routes_and_methods_are_json_4xx(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json["error"]
    r = client.get("/predict")
    assert r.status_code == 405 and r.json["error"]
    assert client.get("/jobs/abc").status_code == 404


# --- basic auth and secrets ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_client(settings):
    s = settings.replace(basic_auth_user="annotator", basic_auth_pass=SECRET_PASS + "-pässwörd",
                         label_studio_api_key=SECRET_KEY)
    queue = make_queue(s, job="tests.jobfuncs.scripted")
    yield create_app(s, queue=queue).test_client()
    queue.close()


def _basic(raw: bytes) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer abc"},
    {"Authorization": "Basic"},
    {"Authorization": "Basic !!!not-base64!!!"},
    _basic(b"\xff\xfe\xfd"),                                     # not UTF-8
    _basic(b"annotator"),                                        # no colon
    _basic(b"annotator:"),                                       # empty password
    _basic(b"annotator:" + SECRET_PASS.encode()),                # prefix of the password
    _basic(("annotator:" + SECRET_PASS + "-passworx").encode()),  # same length, last char wrong
    _basic(("someone:" + SECRET_PASS + "-pässwörd").encode()),    # right password, wrong user
])
def test_basic_auth_refuses_without_crashing(auth_client, headers):
    r = auth_client.post("/setup", json={"project": PROJECT, "schema": CONFIG}, headers=headers)
    assert r.status_code == 401 and r.json == {"error": "authentication required"}
    assert r.headers["WWW-Authenticate"].startswith("Basic")


def test_basic_auth_accepts_non_ascii_password(auth_client):
    # hmac.compare_digest raises TypeError on non-ASCII str; the server compares bytes
    good = _basic(("annotator:" + SECRET_PASS + "-pässwörd").encode())
    r = auth_client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": 7}, headers=good)
    assert r.status_code == 200 and r.json["status"] == "Unknown event"


def test_secrets_never_in_responses_or_logs(auth_client, served, caplog):
    caplog.set_level(logging.DEBUG)
    good = _basic(("annotator:" + SECRET_PASS + "-pässwörd").encode())
    served.routes["/data/upload/7/refused.png"] = lambda handler, query: handler.answer(401, b"no\n")
    tasks = [{"id": 1, "data": {"image": served.url(f"/data/upload/7/refused.png?token={SECRET_KEY}")}},
             {"id": 2, "data": {"image": f"http://user:{SECRET_PASS}@127.0.0.1:9/x.png"}},
             {"id": 3, "data": {"image": f"/data/upload/7/missing.png?sig={SECRET_KEY}"}}]
    bodies = [auth_client.post("/predict", json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG},
                               headers=good).get_data(as_text=True),
              auth_client.post("/setup", json={"project": PROJECT, "schema": CONFIG},
                               headers=_basic(f"annotator:{SECRET_PASS}".encode())).get_data(as_text=True),
              auth_client.get("/status", headers=good).get_data(as_text=True),
              auth_client.get("/metrics", headers=good).get_data(as_text=True),
              auth_client.get("/ui", headers=good).get_data(as_text=True)]
    # the label-studio auth header really was sent for the relative URL, so the key was in play
    assert any(r.headers.get("authorization") == f"Token {SECRET_KEY}" for r in served.requests)
    text = "\n".join(bodies) + "\n" + caplog.text
    assert "HTTP 404" in text and "HTTP 401" in text
    assert SECRET_KEY not in text and SECRET_PASS not in text


def test_predict_never_sends_the_token_to_a_host_hidden_behind_a_backslash(auth_client, served, tmp_path):
    # urllib.parse reads the host after the `@` (Label Studio); urllib3 connects to the one before the backslash
    with ImageServer(tmp_path / "other") as other:
        good = _basic(("annotator:" + SECRET_PASS + "-pässwörd").encode())
        image = f"http://127.0.0.1:{other.port}\\@127.0.0.1:{served.port}/data/upload/7/good0.png"
        r = auth_client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image}}], "project": PROJECT,
                                               "label_config": CONFIG}, headers=good)
        assert r.status_code == 200
        assert [req.headers.get("authorization") for req in other.requests] == []
        assert "backslash" in r.json["results"][0]["error"]


# --- Label Studio-side bad input, through the real training job ----------------------------------

from tests.labelstudio_fixture import label_studio  # noqa: E402,F401  (session fixture)


def _choice(label):
    return [{"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def ls_project(label_studio, served, n: int) -> tuple[int, list[int]]:
    """A project whose n tasks are real x-rays served by `served` (an allowed host)."""
    images, _ = pneumonia(n)
    urls = []
    for i, arr in enumerate(images):
        path = served.dir / f"ls/{id(served)}-{n}-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(arr).save(path, format="PNG")
        urls.append(served.url(f"/ls/{path.name}"))
    sdk = label_studio.client
    project = sdk.projects.create(title="bad input", label_config=CONFIG)
    if not urls:
        return project.id, []
    ids = sdk.projects.import_tasks(id=project.id, request=[{"image": u} for u in urls], return_task_ids=True).task_ids
    return project.id, list(ids)


def ls_settings(settings, label_studio, served, tmp_path):
    return settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
                            allowed_hosts=f"127.0.0.1:{served.port}", model_dir=str(tmp_path / "models"),
                            cache_dir=str(tmp_path / "cache"))


@pytest.mark.labelstudio
def test_training_skips_bad_annotations_and_deleted_tasks(label_studio, served, settings, tmp_path):
    from peal_backend.labelstudio_job import train_project

    pid, t = ls_project(label_studio, served, 10)
    sdk = label_studio.client
    sdk.annotations.create(id=t[0], result=_choice("normal"))
    sdk.annotations.create(id=t[1], result=_choice("pneumonia"))
    sdk.annotations.create(id=t[2], result=_choice("normal"))
    sdk.annotations.create(id=t[3], result=_choice("pneumonia"))
    sdk.annotations.create(id=t[4], result=_choice("covid"))                          # not a choice in the config
    sdk.annotations.create(id=t[5], result=_choice("pneumonia"), was_cancelled=True)  # skipped by the annotator
    sdk.annotations.create(id=t[6], result=[])                                        # empty
    sdk.annotations.create(id=t[7], result=_choice("normal"))
    sdk.tasks.delete(id=t[7])  # deleted between the webhook and the training
    sdk.tasks.delete(id=t[9])  # an unlabeled task deleted too
    s = ls_settings(settings, label_studio, served, tmp_path)
    out = train_project(pid, s, "ANNOTATION_CREATED")
    assert out["status"] == "trained" and out["n_labeled"] == 4
    # cancelled and empty annotations leave their task unlabeled: the pool is t5, t6, t8. The task whose
    # annotation names an unknown label is annotated (not in the pool) but not trained on.
    assert out["n_pool"] == 3 and out["predictions_pushed"] == 3
    pushed = [p for p in sdk.predictions.list(project=pid) if p.model_version == out["model_version"]]
    assert sorted(p.task for p in pushed) == sorted([t[5], t[6], t[8]])
    meta = ModelStore(s.model_dir).latest(pid).meta
    assert meta["metrics"]["skipped_annotations"] == 1


@pytest.mark.labelstudio
def test_single_class_so_far_orders_the_queue_without_a_classifier(label_studio, served, settings, tmp_path):
    """One class labeled so far: nothing to tell apart, so no classifier is trained or shown (a model
    trained on one class predicts it for every task with probability ~1); the queue is still ordered."""
    from peal_backend.labelstudio_job import train_project

    pid, t = ls_project(label_studio, served, 5)
    for tid in t[:3]:
        label_studio.client.annotations.create(id=tid, result=_choice("pneumonia"))
    s = ls_settings(settings, label_studio, served, tmp_path)
    out = train_project(pid, s, "START_TRAINING")
    assert out["status"] == "ordered" and out["n_labeled"] == 3 and out["n_pool"] == 2
    assert out["model_version"].startswith("peal-coldstart-v") and out["trainable_parameters"] == 0
    client = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    tasks = [{"id": tid, "data": {"image": sdk_task["data"]["image"]}}
             for tid, sdk_task in ((tid, label_studio.client.tasks.get(id=tid).model_dump()) for tid in t)]
    r = client.post("/predict", json={"tasks": tasks, "project": pid})  # label config read from Label Studio
    assert r.status_code == 200
    results = r.json["results"]
    assert all(x["result"] == [] and x["model_version"] == out["model_version"] for x in results)
    assert sorted(x["score"] for x in results[3:]) == [0.0, 1.0]  # the two unlabeled tasks: the queue's ends
    assert all(x["score"] is None for x in results[:3])  # labeled tasks are not in the queue


@pytest.mark.labelstudio
def test_project_with_no_usable_annotations_is_ordered_not_failed(label_studio, served, settings, tmp_path):
    from peal_backend.labelstudio_job import train_project

    pid, t = ls_project(label_studio, served, 3)
    label_studio.client.annotations.create(id=t[0], result=_choice("covid"))
    label_studio.client.annotations.create(id=t[1], result=_choice("normal"), was_cancelled=True)
    out = train_project(pid, ls_settings(settings, label_studio, served, tmp_path), "START_TRAINING")
    assert out["status"] == "ordered" and out["n_labeled"] == 0 and out["n_pool"] == 2  # t[0] was annotated
    assert out["skipped_annotations"] == 1


@pytest.mark.labelstudio
def test_project_with_no_task_at_all_is_skipped_not_failed(label_studio, served, settings, tmp_path):
    from peal_backend.labelstudio_job import train_project

    pid, _ = ls_project(label_studio, served, 0)
    out = train_project(pid, ls_settings(settings, label_studio, served, tmp_path), "connected")
    assert out["status"] == "skipped" and out["reason"] == "no task with a usable image"


@pytest.mark.labelstudio
def test_predict_for_a_project_label_studio_does_not_know_is_a_502(label_studio, settings, tmp_path, served):
    s = ls_settings(settings, label_studio, served, tmp_path)
    client = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "x"}}], "project": 987654})
    assert r.status_code == 502 and "GET /api/projects/987654/ -> 404" in r.json["error"]
    assert label_studio.token not in r.get_data(as_text=True)


@pytest.mark.labelstudio
def test_versions_never_repeat_what_label_studio_holds_and_pruned_ones_leave_it(label_studio, served, settings, tmp_path):
    """A backend that lost MODEL_DIR names its next version above every version Label Studio holds, and
    every unlabeled task gets that version's prediction; versions pruned from MODEL_DIR
    (PEAL_KEEP_VERSIONS) have their predictions deleted in Label Studio."""
    import shutil

    from peal_backend.labelstudio import LabelStudio
    from peal_backend.labelstudio_job import train_project, wait_for_pruning
    from peal_backend.store import ModelStore, version_number

    pid, t = ls_project(label_studio, served, 6)
    label_studio.client.annotations.create(id=t[0], result=_choice("pneumonia"))
    label_studio.client.annotations.create(id=t[1], result=_choice("normal"))
    s = ls_settings(settings, label_studio, served, tmp_path).replace(keep_versions=2)
    client = LabelStudio(label_studio.url, label_studio.token)
    names = []
    for _ in range(3):
        names.append(train_project(pid, s, "test")["model_version"])
        wait_for_pruning(pid)  # pruning runs beside the next training; here each one ends first
    assert [version_number(n) for n in names] == [1, 2, 3]
    assert set(client.model_versions(pid)) == set(ModelStore(s.model_dir).versions(pid)) == set(names[1:])

    shutil.rmtree(s.model_dir)  # the backend lost its versions; Label Studio still holds v2 and v3
    out = train_project(pid, s, "test")
    wait_for_pruning(pid)
    assert version_number(out["model_version"]) == 4 and out["predictions_pushed"] == out["n_pool"] == 4
    held = client.model_versions(pid)
    assert held[out["model_version"]] == 4 and set(held) == {out["model_version"]}
    assert client.project(pid)["model_version"] == out["model_version"]


@pytest.mark.labelstudio
def test_pruning_waits_while_a_training_is_queued(label_studio, served, settings, tmp_path):
    """A job whose project has another training waiting (an annotator is labeling) leaves the old versions'
    predictions in Label Studio for a later pruning, so the next push does not queue behind deletes;
    the next job with nothing waiting deletes them. The jobs run under the real queue code."""
    from peal_backend.jobs import TRAIN_JOB, MemoryStore, execute_job
    from peal_backend.labelstudio import LabelStudio
    from peal_backend.labelstudio_job import wait_for_pruning
    from peal_backend.store import ModelStore

    pid, t = ls_project(label_studio, served, 6)
    label_studio.client.annotations.create(id=t[0], result=_choice("pneumonia"))
    label_studio.client.annotations.create(id=t[1], result=_choice("normal"))
    s = ls_settings(settings, label_studio, served, tmp_path).replace(keep_versions=1)
    client, queue = LabelStudio(label_studio.url, label_studio.token), MemoryStore()
    names = []
    for token in ("a", "b"):
        assert queue.try_enqueue(pid, f"waiting-{token}", "annotation")[0]  # a label came meanwhile
        names.append(execute_job(queue, pid, s, "annotation", TRAIN_JOB, token)["model_version"])
        wait_for_pruning(pid)
        queue.clear_queued(pid, f"waiting-{token}")
    assert set(client.model_versions(pid)) >= set(names) and ModelStore(s.model_dir).versions(pid) == names[1:]
    last = execute_job(queue, pid, s, "annotation", TRAIN_JOB, "c")["model_version"]  # nothing waiting
    wait_for_pruning(pid)
    assert set(client.model_versions(pid)) == {last}


@pytest.mark.labelstudio
def test_setup_names_a_token_label_studio_refuses(label_studio, settings, tmp_path, served):
    """A wrong LABEL_STUDIO_API_KEY used to pass /setup ("Connected") and fail the first training
    minutes later; now connecting fails with the setting named."""
    from peal_backend.backbone import load_backbone
    load_backbone(settings.backbone)  # loaded: the /setup checks fit their time budget
    s = ls_settings(settings, label_studio, served, tmp_path).replace(label_studio_api_key="0" * 40)
    pid, _ = ls_project(label_studio, served, 0)
    client = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    r = client.post("/setup", json={"project": pid, "schema": CONFIG})
    assert r.status_code == 400 and "LABEL_STUDIO_API_KEY" in r.json["error"] and "0" * 40 not in r.json["error"]
    good = create_app(ls_settings(settings, label_studio, served, tmp_path),
                      queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    r = good.post("/setup", json={"project": pid, "schema": CONFIG})
    assert r.status_code == 200 and r.json["model_version"].startswith("peal-")
    # a project this Label Studio does not hold: LABEL_STUDIO_URL points at another instance
    r = good.post("/setup", json={"project": 10 ** 9, "schema": CONFIG})
    assert r.status_code == 400 and "LABEL_STUDIO_URL" in r.json["error"] and str(10 ** 9) in r.json["error"]


def test_setup_names_a_backbone_that_cannot_load(settings, tmp_path):
    s = settings.replace(backbone=str(tmp_path / "no-such-model"))
    client = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    r = client.post("/setup", json={"project": PROJECT, "schema": CONFIG})
    assert r.status_code == 503 and "PEAL_BACKBONE" in r.json["error"]


# --- a slow image host: one request's deadline, a cap on tasks, threads kept for /health --------------

@pytest.fixture
def held_host(served):
    """`/data/upload/7/held.png` answers only once `release` is set (a host that hangs)."""
    import threading

    release = threading.Event()
    served.routes["/data/upload/7/held.png"] = lambda handler, query: (release.wait(60),
                                                                         handler.serve_file("/data/upload/7/good0.png"))
    yield release
    release.set()
    del served.routes["/data/upload/7/held.png"]


def test_a_hanging_host_costs_its_tasks_not_the_request(settings, good_tasks, held_host):
    s = settings.replace(fetch_timeout=60.0, predict_deadline=1.0)
    client = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    held = [{"id": 900 + i, "data": {"image": f"/data/upload/7/held.png?n={i}"}} for i in range(3)]
    r = client.post("/predict", json={"tasks": good_tasks + held, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200
    results = r.json["results"]
    assert all(x["result"] and "error" not in x for x in results[:len(good_tasks)])
    assert all(x["result"] == [] and "PEAL_PREDICT_DEADLINE" in x["error"] for x in results[len(good_tasks):])


def test_a_hanging_host_with_many_tasks_first_does_not_starve_another_host(settings, good_tasks, held_host, served):
    from peal_backend.model import FETCH_THREADS

    # the same loopback server under a second name: a second host to the backend
    other = f"localhost:{served.port}"
    s = settings.replace(fetch_timeout=60.0, predict_deadline=5.0, allowed_hosts=other)
    client = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    held = [{"id": 900 + i, "data": {"image": f"http://{other}/data/upload/7/held.png?n={i}"}}
            for i in range(FETCH_THREADS + 4)]  # more than there are fetch threads, listed first
    r = client.post("/predict", json={"tasks": held + good_tasks, "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 200
    results = r.json["results"]
    assert all(x["result"] and "error" not in x for x in results[len(held):])
    assert all(x["result"] == [] and "PEAL_PREDICT_DEADLINE" in x["error"] for x in results[:len(held)])


def test_hosts_take_turns_in_the_fetch_order():
    from peal_backend.model import interleave_by_host

    urls = {0: "http://a/1", 1: "http://a/2", 2: "http://a/3", 3: "/data/upload/1", 4: "http://B/1", 5: "http://b/2",
            7: "/data/upload/2"}
    assert interleave_by_host(urls) == [0, 3, 4, 1, 7, 5, 2]
    assert interleave_by_host({}) == []


def test_too_many_tasks_in_one_request_is_a_400_naming_the_cap(settings, good_tasks):
    s = settings.replace(predict_max_tasks=2)
    client = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    r = client.post("/predict", json={"tasks": good_tasks[:3], "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 400 and "PEAL_PREDICT_MAX_TASKS" in r.json["error"]


def test_predicts_stuck_on_a_slow_host_leave_health_and_webhooks_answering(settings, good_tasks, held_host, served):
    import threading

    from tests.conftest import wait_for

    s = settings.replace(fetch_timeout=60.0, predict_deadline=60.0, predict_concurrency=1)
    client = create_app(s, queue=make_queue(s, job="tests.jobfuncs.scripted")).test_client()
    stuck = {}
    first = threading.Thread(target=lambda: stuck.setdefault("r", client.post("/predict", json={
        "tasks": [{"id": 1, "data": {"image": "/data/upload/7/held.png?stuck"}}], "project": PROJECT, "label_config": CONFIG})))
    first.start()
    wait_for(lambda: served.count("/data/upload/7/held.png") >= 1, "the first /predict to reach the slow host")
    r = client.post("/predict", json={"tasks": good_tasks[:1], "project": PROJECT, "label_config": CONFIG})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "PEAL_PREDICT_CONCURRENCY" in r.json["error"]
    assert client.get("/health").status_code == 200
    held_host.set()
    first.join(60)
    assert stuck["r"].status_code == 200 and stuck["r"].json["results"][0]["result"]
