"""The dashboard in a real headless browser (Debian's chromium through Selenium and chromium-driver)
against the backend under gunicorn, trained on a real Label Studio project of real chest X-rays, with
basic auth on. Labels are given in the order the dashboard's queue shows, as an annotator would.

Checked: the learning curve's numbers equal the backend's JSON and, independently, the predictions each
version pushed to Label Studio scored against the labels submitted after it; the queue shows the tasks
and scores the JSON names, with thumbnails that load; the job panel shows the runs; /metrics agrees.
A screenshot is kept in tests/artifacts/dashboard.png.
"""
from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peal_backend.dashboard import size
from peal_backend.labelstudio import LabelStudio
from tests.conftest import wait_for
from tests.labelstudio_fixture import label_studio  # noqa: F401  (fixture)
from tests.test_e2e_labelstudio import (LABELS, annotate, backbone, connect_backend, make_project,  # noqa: F401
                                        start_backend, stop_backend, wait_for_runs, xrays)

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

CHROMIUM = os.environ.get("PEAL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PEAL_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
BATCH = 4


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        msg = f"no headless browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("PEAL_REQUIRE_LABEL_STUDIO"):
            pytest.fail(msg + "; PEAL_REQUIRE_LABEL_STUDIO is set", pytrace=False)
        pytest.skip(msg)


def browser(auth: tuple[str, str]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2400", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    return driver


def pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def test_dashboard_in_a_real_browser(label_studio, xrays, backbone, tmp_path):
    require_browser()
    server = label_studio
    client = LabelStudio(server.url, server.token)
    pid, truth = make_project(server, xrays, "dashboard x-rays", 24, 8)
    auth = ("lead", "dash-pass-7")
    backend = start_backend(server, backbone, tmp_path, auth=auth, PEAL_RETRAIN_EVERY=str(BATCH),
                            PEAL_KEEP_VERSIONS="10")
    driver = None
    try:
        # Label Studio gives /setup 3 s: on a busy machine the first one (loading the backbone) may take
        # longer, so it is made once here first, as Label Studio will make it (it also queues the cold start)
        import requests
        config = server.client.projects.get(id=pid).label_config
        r = requests.post(backend.url + "/setup", json={"project": pid, "schema": config}, auth=auth, timeout=300)
        assert r.status_code == 200, r.text
        ml_id = server.client.ml.create(project=pid, url=backend.url, title="peal-backend", is_interactive=False,
                                        auth_method="BASIC_AUTH", basic_auth_user=auth[0], basic_auth_pass=auth[1]).id
        assert connect_backend.add_webhook_auth(server.client, pid, backend.url, auth) == 1
        assert ml_id
        runs = wait_for_runs(backend, pid, 1)["runs"]  # the cold start orders the queue
        # batch 1: two labels of each class, so that a classifier is trained; then batches in queue order
        tids = sorted(truth)
        batches = [[t for t in tids if truth[t] == LABELS[0]][:2] + [t for t in tids if truth[t] == LABELS[1]][:2]]
        versions = []
        for n in range(4):
            if n:
                queue = backend.get(f"/status/{pid}").json()["queue"]
                batches.append([q["task"] for q in queue[:BATCH]])
            annotate(server, batches[-1], truth)
            status = wait_for_runs(backend, pid, runs + 1)
            runs = status["runs"]
            versions.append(status["last_result"]["model_version"])
            assert status["last_result"]["status"] == "trained"
        o = backend.get(f"/status/{pid}").json()
        assert o["latest_version"] == versions[-1] and o["n_labeled"] == BATCH * 4

        # the curve: every version but the newest has a point, scored on the batch labeled after it
        points = o["curve"]["points"]
        assert [p["version"] for p in points] == versions[:-1]
        predictions = {}
        for task in client.tasks(pid):
            for p in task["predictions"]:
                if p["result"]:
                    predictions[(p["model_version"], task["id"])] = p["result"][0]["value"]["choices"][0]
        for p, version, later, n_labeled in zip(points, versions, batches[1:], (4, 8, 12)):
            right = sum(predictions[(version, t)] == truth[t] for t in later)
            assert (p["n_labeled"], p["n_eval"]) == (n_labeled, len(later))
            assert p["accuracy"] == pytest.approx(right / len(later))
        # the first trained version ranked in random order (PEAL_STRATEGY=auto while labels are few)
        assert points[0]["random_order"] and [p["version"] for p in o["curve"]["baseline"]] == [versions[0]]

        driver = browser(auth)
        driver.get(f"{backend.url}/ui/{pid}")
        from selenium.webdriver.common.by import By
        assert driver.find_element(By.ID, "latest-version").text == versions[-1]
        assert driver.find_element(By.ID, "n-labeled").text == str(BATCH * 4)
        rows = driver.find_elements(By.CSS_SELECTOR, "#curve-table tr.curve-row")
        assert [r.get_attribute("data-version") for r in rows] == [p["version"] for p in points]
        for row, p in zip(rows, points):
            cell = {c.get_attribute("data-k"): c.text for c in row.find_elements(By.CSS_SELECTOR, "td[data-k]")}
            assert cell == {"n_labeled": str(p["n_labeled"]), "n_eval": str(p["n_eval"]),
                            "accuracy": pct(p["accuracy"]), "macro_f1": pct(p["macro_f1"])}
        assert len(driver.find_elements(By.CSS_SELECTOR, "#curve-chart .pt")) == 2 * len(o["curve"]["active"]) + \
            len(o["curve"]["baseline"])
        stop = driver.find_element(By.ID, "stop-signal")
        assert stop.get_attribute("data-stop") == str(int(o["curve"]["stop"]["stop"]))

        cards = driver.find_elements(By.CSS_SELECTOR, ".queue .task")
        assert [int(c.get_attribute("data-task")) for c in cards] == [q["task"] for q in o["queue"]]
        assert [float(c.get_attribute("data-score")) for c in cards] == pytest.approx([q["score"] for q in o["queue"]], abs=1e-6)
        assert len(cards) == min(12, o["n_pool"]) and not set(o["queue"][i]["task"] for i in range(len(cards))) & \
            {t for b in batches for t in b}
        wait_for(lambda: driver.execute_script(
            "return Array.from(document.querySelectorAll('.queue img')).every(i => i.complete && i.naturalWidth > 0)"),
            "every thumbnail to load", timeout=60.0)

        assert driver.find_element(By.ID, "job-state").text == "idle"
        assert driver.find_element(By.ID, "job-runs").text == str(runs)
        assert driver.find_element(By.ID, "job-failures").text == "0"
        assert driver.find_element(By.ID, "job-last").text == "finished"
        assert driver.find_element(By.ID, "versions-kept").text == str(len(o["versions"]))
        caches = backend.get("/status").json()["caches"]
        assert caches["images"] > 0  # the training fetched the images through the cache
        assert driver.find_element(By.ID, "cache-images").text.startswith(size(caches["images"]) + " of ")
        assert auth[1] not in driver.page_source and server.token not in driver.page_source

        ARTIFACTS.mkdir(exist_ok=True)
        driver.set_window_size(1400, 900)  # then the whole page, beyond the viewport
        size_css = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        png = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": 0, "width": size_css["width"], "height": size_css["height"], "scale": 1}})["data"]
        shot = ARTIFACTS / "dashboard.png"
        shot.write_bytes(base64.b64decode(png))
        assert shot.stat().st_size > 10_000
        shutil.copy(shot, tmp_path / "dashboard.png")

        # the same figures in /metrics, parsed by prometheus_client
        text = backend.get("/metrics").text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        key = (("project", str(pid)),)
        assert samples[("peal_trainings_total", key)] == runs
        assert samples[("peal_training_failures_total", key)] == 0
        assert samples[("peal_model_versions", key)] == len(o["versions"])
        assert samples[("peal_labels", key)] == BATCH * 4
        assert samples[("peal_prequential_accuracy", key)] == pytest.approx(points[-1]["accuracy"])
        assert samples[("peal_stop_signal", key)] == int(o["curve"]["stop"]["stop"])
        assert samples[("peal_training_duration_seconds_count", key)] == len(versions) + 1  # and the cold start
        assert samples[("peal_pool_scored_tasks_total", key)] > 0
        assert samples[("peal_queue_unseen_annotations", key)] == 0
        assert samples[("peal_http_requests_total", (("code", "200"), ("endpoint", "/ui/<int:pid>"),
                                                     ("method", "GET")))] >= 1
    finally:
        if driver is not None:
            driver.quit()
        stop_backend(backend)
