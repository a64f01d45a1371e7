"""Hypothesis fuzzing of the payload handling of /predict, /webhook and /setup: no JSON value, and no
byte string, makes the server answer 5xx.

The server runs through Flask's test client with a real trained version (so /predict reaches the
model) and real images on a loopback server (so some tasks really predict). /predict payloads always
carry a label config: without one the server asks Label Studio for it, which is not payload handling
(and an unreachable Label Studio is rightly a 5xx).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from peal_backend.backbone import build_classifier
from peal_backend.config import Settings
from peal_backend.images import preprocess, to_pil
from peal_backend.jobs import make_queue
from peal_backend.model import model_settings
from peal_backend.server import create_app
from peal_backend.store import ModelStore
from peal_backend.training import fit
from tests.backbone_fixture import tiny_backbone  # noqa: F401
from tests.conftest import DATASETS, ImageServer

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image"><Choice value="normal"/><Choice value="pneumonia"/></Choices>
</View>"""
MULTI = CONFIG.replace('toName="image"', 'toName="image" choice="multiple"')
EVENTS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED"]
FUZZ = hyp_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = ImageServer(tmp_path_factory.mktemp("served"))
    with np.load(DATASETS / "pneumoniamnist.npz") as d:
        images = d["train_images"][:2]
    for i, arr in enumerate(images):
        path = server.dir / f"data/upload/7/img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(arr).save(path, format="PNG")
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_backbone, served):
    s = Settings(backbone=tiny_backbone, adapter="linear", model_dir=str(tmp_path_factory.mktemp("models")),
                 label_studio_url=served.base_url, fetch_timeout=1.0, log_level="ERROR", min_steps=5, epochs=1)
    with np.load(DATASETS / "pneumoniamnist.npz") as d:
        images, labels = d["train_images"][:16], d["train_labels"][:16, 0]
    model = build_classifier(s, 2)
    fit(model, preprocess([to_pil(a) for a in images], 28), torch.tensor(labels.astype(np.int64)), s)
    for project, multiple in ((7, False), (8, True)):
        meta = {"labels": ["normal", "pneumonia"], "multiple": multiple, "model_settings": model_settings(s)}
        ModelStore(s.model_dir).save(project, "peal-linear", model.trainable_state(), meta)
    queue = make_queue(s, job="tests.jobfuncs.scripted")  # webhooks queue a harmless real job
    yield create_app(s, queue=queue).test_client()
    queue.close()


# --- strategies ----------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)


def image_urls(served_base: str):
    return st.one_of(
        st.sampled_from(["/data/upload/7/img0.png", f"{served_base}/data/upload/7/img1.png",
                         "/data/upload/7/missing.png", "file:///etc/passwd", "http://localhost/x.png",
                         "//127.0.0.1/x", "data:image/png;base64,", "http://[::1", "http://a:b@/x",
                         f"{served_base}/status/500", "ftp://x/y"]),
        st.text(max_size=30),
        st.builds(lambda t: "data:image/png;base64," + t, st.text(max_size=30)),
        json_values)


projects = st.one_of(st.sampled_from([7, 8, "7.1700000000", "8", {"id": 7}, 0]),
                     st.integers(min_value=-10, max_value=10**30), st.text(max_size=12),
                     st.fixed_dictionaries({"id": json_values}), json_values)


def tasks(served_base: str):
    task = st.fixed_dictionaries(
        {"id": st.one_of(st.integers(), json_values),
         "data": st.one_of(st.fixed_dictionaries({"image": image_urls(served_base)}), json_values)},
        optional={"project": projects, "predictions": json_values, "annotations": json_values})
    return st.lists(st.one_of(task, json_values), max_size=4)


configs = st.one_of(st.sampled_from([CONFIG, MULTI, "<View/>", "<View><Image name=", "not xml"]),
                    json_values.filter(bool))


def predict_payloads(served_base: str):
    shaped = st.fixed_dictionaries({"tasks": st.one_of(tasks(served_base), json_values), "project": projects,
                                    "label_config": configs},
                                   optional={"params": json_values, "model_version": json_values})
    return shaped | json_values.filter(lambda v: not (isinstance(v, dict) and "tasks" in v and not v.get("label_config")))


webhooks = st.one_of(
    st.fixed_dictionaries({"action": st.one_of(st.sampled_from(EVENTS), json_values), "project": projects},
                          optional={"annotation": json_values, "task": json_values}),
    json_values)

setups = st.one_of(
    st.fixed_dictionaries({"project": projects, "schema": st.one_of(configs, json_values)},
                          optional={"hostname": json_values, "access_token": json_values,
                                    "extra_params": json_values, "label_config": json_values}),
    json_values)


def post(client, path, payload):
    r = client.post(path, data=json.dumps(payload), content_type="application/json")
    assert r.status_code < 500, (path, payload, r.status_code, r.get_data(as_text=True))
    body = r.json
    assert isinstance(body, dict)  # every answer, error or not, is a JSON object
    if r.status_code >= 400:
        assert body.get("error"), body
    return r


# --- the fuzz tests ------------------------------------------------------------------------------

def test_fuzz_predict(client, served):
    @FUZZ
    @given(payload=predict_payloads(served.base_url))
    def check(payload):
        r = post(client, "/predict", payload)
        if r.status_code == 200:  # a good answer has one result per task
            assert len(r.json["results"]) == len(payload["tasks"])
    check()


def test_fuzz_webhook(client):
    @FUZZ
    @given(payload=webhooks)
    def check(payload):
        post(client, "/webhook", payload)
    check()


def test_fuzz_setup(client):
    @FUZZ
    @given(payload=setups)
    def check(payload):
        post(client, "/setup", payload)
    check()


@pytest.mark.parametrize("path", ["/predict", "/webhook", "/setup"])
def test_fuzz_raw_bytes(client, path):
    @hyp_settings(max_examples=100, deadline=None, derandomize=True)
    @given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
    def check(raw):
        r = client.post(path, data=raw, content_type="application/json")
        assert r.status_code < 500, (raw, r.get_data(as_text=True))
    check()
