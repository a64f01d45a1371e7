"""Bad input at start (issue 18): the backend stays up, logs the problem and names it on /health
(200, status DEGRADED, the problems) and /setup (an error naming the setting). The same checks run in
a real container, with a read-only volume and a wrong LABEL_STUDIO_URL, in scripts/docker_e2e.sh."""
from __future__ import annotations

import logging

from peal_backend.config import Settings
from peal_backend.preflight import label_studio_problem, model_dir_problem
from peal_backend.server import create_app
from tests.backbone_fixture import tiny_backbone  # noqa: F401  (fixture)
from tests.conftest import wait_for
from tests.labelstudio_fixture import free_port

CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="c" toName="image"><Choice value="a"/><Choice value="b"/></Choices></View>"""


def test_model_dir_is_created_and_checked_for_writes(tmp_path):
    assert model_dir_problem(str(tmp_path / "new" / "models")) is None
    assert (tmp_path / "new" / "models").is_dir() and not list((tmp_path / "new" / "models").iterdir())
    (tmp_path / "a-file").write_text("x")
    problem = model_dir_problem(str(tmp_path / "a-file" / "models"))
    assert problem.startswith(f"MODEL_DIR={tmp_path}/a-file/models does not exist and cannot be created")
    assert "volume" in problem


def test_label_studio_check_tells_nothing_there_from_an_answer(image_server):
    dead = f"http://127.0.0.1:{free_port()}"
    problem = label_studio_problem(dead, timeout=2)
    assert problem.startswith(f"cannot reach Label Studio at LABEL_STUDIO_URL={dead}")
    assert label_studio_problem(image_server.base_url, timeout=2) is None  # a 404 is an answer


def test_health_degraded_and_setup_refused_on_bad_input(tmp_path, tiny_backbone, caplog):
    (tmp_path / "a-file").write_text("x")
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(backbone=tiny_backbone, adapter="linear", model_dir=str(tmp_path / "a-file" / "models"),
                        label_studio_url=dead, label_studio_api_key="0" * 40)
    with caplog.at_level(logging.ERROR, logger="peal_backend.preflight"):
        client = create_app(settings).test_client()
        health = wait_for(lambda: (lambda h: h if len(h.get("problems", [])) == 2 else None)(client.get("/health").json),
                          "both problems on /health")
    assert health["status"] == "DEGRADED" and health["model_class"] == "PealModel"
    assert any(p.startswith("MODEL_DIR=") for p in health["problems"])
    assert any("LABEL_STUDIO_URL=" + dead in p for p in health["problems"])
    logged = [r.getMessage() for r in caplog.records]
    assert any("MODEL_DIR=" in m for m in logged) and any("LABEL_STUDIO_URL=" in m for m in logged)
    r = client.post("/setup", json={"project": "3.1", "schema": CONFIG})
    assert r.status_code == 503 and r.json["error"].startswith("MODEL_DIR=")


def test_setup_names_an_unreachable_label_studio(tmp_path, tiny_backbone):
    dead = f"http://127.0.0.1:{free_port()}"
    settings = Settings(backbone=tiny_backbone, adapter="linear", model_dir=str(tmp_path / "models"),
                        label_studio_url=dead, label_studio_api_key="0" * 40, cold_start=False)
    client = create_app(settings).test_client()
    wait_for(lambda: client.get("/health").json["status"] == "DEGRADED", "DEGRADED")
    r = client.post("/setup", json={"project": "3.1", "schema": CONFIG})
    assert r.status_code == 502 and f"LABEL_STUDIO_URL={dead}" in r.json["error"]
