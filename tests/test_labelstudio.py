"""peal_backend.labelstudio against a real Label Studio 1.23.2 (tests marked `labelstudio`), plus the
pure parts (token parsing, the latest-annotation rule, input validation) that need no server."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from peal_backend import labelstudio
from peal_backend.config import Settings
from peal_backend.labelstudio import LabelStudio, LabelStudioError, latest_usable_annotation
from tests.labelstudio_fixture import label_studio  # noqa: F401  (fixture)

LABEL_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
                '<Choice value="normal"/><Choice value="pneumonia"/></Choices></View>')


def choice(label: str) -> list[dict]:
    return [{"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def new_project(server, n_tasks: int, title: str = "peal test") -> tuple[int, list[int]]:
    sdk = server.client
    project = sdk.projects.create(title=title, label_config=LABEL_CONFIG)
    imported = sdk.projects.import_tasks(id=project.id, request=[{"image": f"http://example.invalid/{i}.png"}
                                                                 for i in range(n_tasks)], return_task_ids=True)
    return project.id, list(imported.task_ids)


def predictions_at(server, project: int, version: str) -> list:
    return [p for p in server.client.predictions.list(project=project) if p.model_version == version]


class FlakyProxy:
    """A real HTTP proxy in front of Label Studio that forwards every request, but for the first
    `failures` POSTs to a path containing `fail_path` it answers 502 (or stalls past the client's
    timeout) AFTER Label Studio has processed the request: a commit the client never hears of."""

    def __init__(self, target: str, fail_path: str, failures: int = 1, mode: str = "502", stall: float = 3.0):
        self.target, self.fail_path, self.failures, self.mode, self.stall = target, fail_path, failures, mode, stall
        self.posts = 0
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = requests.request(self.command, proxy.target + self.path, headers=headers, data=body, timeout=60)
                inject = self.command == "POST" and proxy.fail_path in self.path and proxy.failures > 0
                if self.command == "POST" and proxy.fail_path in self.path:
                    proxy.posts += 1
                if inject:
                    proxy.failures -= 1
                    if proxy.mode == "stall":
                        proxy._stop.wait(proxy.stall)
                    else:
                        r_status, r_body = 502, b'{"detail": "bad gateway"}'
                        self._answer(r_status, r_body)
                        return
                self._answer(r.status_code, r.content)

            def _answer(self, status, body):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first: that is the point of "stall"

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()


# --- pure parts, no server --------------------------------------------------------------------------

def test_latest_usable_annotation_skips_cancelled_and_empty_and_prefers_latest_update():
    usable_old = {"id": 1, "result": choice("normal"), "created_at": "2024-01-01T00:00:00Z",
                  "updated_at": "2024-01-03T00:00:00Z"}
    usable_new_id = {"id": 2, "result": choice("pneumonia"), "created_at": "2024-01-02T00:00:00Z",
                     "updated_at": "2024-01-02T00:00:00Z"}
    cancelled = {"id": 3, "result": choice("pneumonia"), "was_cancelled": True, "updated_at": "2024-02-01T00:00:00Z"}
    empty = {"id": 4, "result": [], "updated_at": "2024-02-01T00:00:00Z"}
    # The older annotation was edited last, so it is the annotator's latest word.
    assert latest_usable_annotation({"annotations": [usable_old, usable_new_id, cancelled, empty]}) is usable_old
    # Equal times: the higher id wins.
    tie = {**usable_new_id, "updated_at": usable_old["updated_at"]}
    assert latest_usable_annotation({"annotations": [usable_old, tie]}) is tie
    assert latest_usable_annotation({"annotations": [cancelled, empty]}) is None
    assert latest_usable_annotation({}) is None


def test_auth_headers_for_legacy_token_and_bad_settings():
    client = LabelStudio("http://127.0.0.1:1/", "abc123")
    assert client.auth_headers() == {"Authorization": "Token abc123"}
    assert client.url == "http://127.0.0.1:1"
    with pytest.raises(ValueError, match="LABEL_STUDIO_API_KEY"):
        LabelStudio("http://127.0.0.1:1", "")
    with pytest.raises(ValueError, match="http"):
        LabelStudio("localhost:8080", "abc")
    settings = Settings(label_studio_url="http://ls.example:8080", label_studio_api_key="k")
    assert LabelStudio.from_settings(settings).url == "http://ls.example:8080"


@pytest.mark.parametrize("bad, message", [
    ([{"task": "1", "result": []}], r"predictions\[0\]\['task'\]"),
    ([{"task": True, "result": []}], r"predictions\[0\]\['task'\]"),
    ([{"task": 1, "result": "normal"}], r"predictions\[0\]\['result'\]"),
    ([{"task": 1, "result": [], "score": float("nan")}], r"predictions\[0\]\['score'\]"),
    ([{"task": 1, "result": []}, {"task": 1, "result": []}], r"task 1 appears twice"),
    (["x"], r"predictions\[0\]: expected a dict"),
])
def test_create_predictions_rejects_bad_input_before_any_request(bad, message):
    client = LabelStudio("http://127.0.0.1:1", "k", retries=0)  # nothing listens there
    with pytest.raises(ValueError, match=message):
        client.create_predictions(1, bad, "v1")
    with pytest.raises(ValueError, match="comma"):
        client.create_predictions(1, [], "v1,v2")


def test_connection_errors_are_retried_then_reported_without_the_token(image_server):
    calls = []

    def flaky(handler, query):
        calls.append(time.monotonic())
        if len(calls) < 3:
            handler.answer(503, b'{"detail": "warming up"}', "application/json")
        else:
            handler.answer(200, json.dumps({"id": 7, "label_config": "<View/>"}).encode(), "application/json")

    image_server.routes["/api/projects/7/"] = flaky
    client = LabelStudio(image_server.base_url, "secret-token-value", retries=3)
    assert client.project(7)["id"] == 7
    assert len(calls) == 3
    assert calls[2] - calls[1] >= calls[1] - calls[0] > 0.4  # backoff grows

    image_server.routes["/api/projects/8/"] = lambda h, q: h.answer(500, b"secret-token-value leaked", "text/plain")
    client = LabelStudio(image_server.base_url, "secret-token-value", retries=1)
    with pytest.raises(LabelStudioError) as err:
        client.project(8)
    assert "GET /api/projects/8/" in str(err.value) and "500" in str(err.value)
    assert "secret-token-value" not in str(err.value)

    closed = LabelStudio("http://127.0.0.1:9", "secret-token-value", timeout=1, retries=1)
    with pytest.raises(LabelStudioError, match="GET /api/projects/1/ failed: ConnectionError") as err:
        closed.project(1)
    assert "secret-token-value" not in str(err.value)


# --- against the real server ------------------------------------------------------------------------

@pytest.mark.labelstudio
def test_project_and_errors_name_the_call(label_studio):
    pid, _ = new_project(label_studio, 1)
    client = LabelStudio(label_studio.url, label_studio.token)
    project = client.project(pid)
    assert project["label_config"] == LABEL_CONFIG
    assert project["model_version"] == "" and project["sampling"] == "Sequential sampling"
    with pytest.raises(LabelStudioError, match=r"GET /api/projects/999999/ -> 404") as err:
        client.project(999999)
    assert label_studio.token not in str(err.value)
    bad = LabelStudio(label_studio.url, "0" * 40)
    with pytest.raises(LabelStudioError, match="401"):
        bad.project(pid)


@pytest.mark.labelstudio
def test_labeled_and_unlabeled_split_with_the_latest_annotation(label_studio, monkeypatch):
    monkeypatch.setattr(labelstudio, "PAGE_SIZE", 2)  # several pages with a few tasks
    sdk = label_studio.client
    pid, t = new_project(label_studio, 7)
    sdk.annotations.create(id=t[0], result=choice("normal"))
    sdk.annotations.create(id=t[1], result=choice("pneumonia"), was_cancelled=True)
    sdk.annotations.create(id=t[2], result=[])
    twice = sdk.annotations.create(id=t[3], result=choice("pneumonia"))
    sdk.annotations.update(id=twice.id, result=choice("normal"))
    sdk.annotations.update(id=twice.id, result=choice("pneumonia"))
    older = sdk.annotations.create(id=t[4], result=choice("normal"))
    newer = sdk.annotations.create(id=t[4], result=choice("pneumonia"))
    time.sleep(0.01)
    sdk.annotations.update(id=older.id, result=choice("normal"))  # the older one is now the latest word
    # t[5] has nothing; t[6] has a usable annotation followed by a skip.
    kept = sdk.annotations.create(id=t[6], result=choice("pneumonia"))
    sdk.annotations.create(id=t[6], result=[], was_cancelled=True)

    client = LabelStudio(label_studio.url, label_studio.token)
    labeled = {task["id"]: ann for task, ann in client.labeled_tasks(pid)}
    assert set(labeled) == {t[0], t[3], t[4], t[6]}
    assert labeled[t[3]]["id"] == twice.id and labeled[t[3]]["result"] == choice("pneumonia")
    assert labeled[t[4]]["id"] == older.id != newer.id
    assert labeled[t[6]]["id"] == kept.id
    unlabeled = [task["id"] for task in client.unlabeled_tasks(pid)]
    assert sorted(unlabeled) == sorted([t[1], t[2], t[5]])
    task = next(iter(client.unlabeled_tasks(pid)))
    assert task["data"]["image"].startswith("http://example.invalid/")


@pytest.mark.labelstudio
def test_the_split_does_not_download_predictions(label_studio, monkeypatch):
    """Every kept version's predictions used to ride along on every task of the scan (issue 14.16)."""
    import requests

    pid, t = new_project(label_studio, 6)
    label_studio.client.annotations.create(id=t[0], result=choice("normal"))
    client = LabelStudio(label_studio.url, label_studio.token)
    for version in ("v1", "v2", "v3"):
        client.create_predictions(pid, [{"task": tid, "result": choice("normal"), "score": 0.5} for tid in t], version)
    bodies = []
    original = requests.Session.request

    def recorded(self, method, url, *args, **kwargs):
        r = original(self, method, url, *args, **kwargs)
        bodies.append(r.content)
        return r

    monkeypatch.setattr(requests.Session, "request", recorded)  # records, the real request still runs
    labeled, unlabeled = client.split_tasks(pid)
    assert [task["id"] for task, _ in labeled] == [t[0]] and sorted(x["id"] for x in unlabeled) == sorted(t[1:])
    assert all("predictions" not in x for x in unlabeled)
    # only the labeled task's body carries predictions: the unlabeled ones' never left Label Studio
    assert sum(b.count(b'"model_version":"v') + b.count(b'"model_version": "v') for b in bodies) <= 3


@pytest.mark.labelstudio
def test_predictions_are_created_once_and_model_version_patched(label_studio):
    pid, t = new_project(label_studio, 5)
    client = LabelStudio(label_studio.url, label_studio.token)
    preds = [{"task": tid, "result": choice("normal"), "score": 0.1 * i} for i, tid in enumerate(t)]
    with pytest.raises(LabelStudioError, match=r"PATCH /api/projects/\d+/ -> 400"):
        client.set_model_version(pid, "v1")  # Label Studio refuses a version nothing has
    assert client.create_predictions(pid, preds[:2], "v1") == 2
    assert client.create_predictions(pid, preds, "v1") == 3  # the first two already exist
    assert client.create_predictions(pid, preds, "v1") == 0
    assert client.create_predictions(pid, preds[:1], "v2") == 1  # another version is another key
    stored = predictions_at(label_studio, pid, "v1")
    assert sorted(p.task for p in stored) == sorted(t)
    assert {p.task: round(p.score, 6) for p in stored} == {tid: round(0.1 * i, 6) for i, tid in enumerate(t)}
    client.set_model_version(pid, "v1")
    assert client.project(pid)["model_version"] == "v1"
    with pytest.raises(LabelStudioError, match="task"):
        client.create_predictions(pid, [{"task": 10**9, "result": []}], "v3")  # not this project's task


@pytest.mark.labelstudio
@pytest.mark.parametrize("mode", ["502", "stall"])
def test_a_retry_after_a_committed_but_failed_import_creates_no_duplicates(label_studio, monkeypatch, mode):
    monkeypatch.setattr(labelstudio, "CHUNK_SIZE", 3)
    pid, t = new_project(label_studio, 7)
    proxy = FlakyProxy(label_studio.url, "/import/predictions", failures=1, mode=mode, stall=4.0)
    try:
        client = LabelStudio(proxy.url, label_studio.token, timeout=2.0, retries=3)
        preds = [{"task": tid, "result": choice("pneumonia"), "score": 0.5} for tid in t]
        assert client.create_predictions(pid, preds, "v1") == 7
    finally:
        proxy.close()
    assert proxy.posts == 3  # 3 chunks; the failed one was not re-sent because it had committed
    stored = predictions_at(label_studio, pid, "v1")
    assert sorted(p.task for p in stored) == sorted(t)  # exactly one per task


@pytest.mark.labelstudio
def test_next_task_follows_uncertainty_sampling_at_the_project_model_version(label_studio):
    pid, t = new_project(label_studio, 5)
    client = LabelStudio(label_studio.url, label_studio.token)
    scores = [0.7, 0.2, 0.9, 0.4, 0.5]
    client.create_predictions(pid, [{"task": tid, "result": choice("normal"), "score": s}
                                    for tid, s in zip(t, scores)], "v1")
    # An older version ranks another task first: it must be ignored once v1 is current.
    client.create_predictions(pid, [{"task": t[2], "result": choice("normal"), "score": 0.01}], "v0")
    client.set_model_version(pid, "v1")
    client.set_sampling(pid)
    assert client.project(pid)["sampling"] == "Uncertainty sampling"
    assert client.next_task(pid)["id"] == t[1]
    label_studio.client.annotations.create(id=t[1], result=choice("normal"))
    assert client.next_task(pid)["id"] == t[3]
    # Data Manager ordering by the same column agrees.
    r = requests.get(f"{label_studio.url}/api/tasks/", headers=client.auth_headers(), params={
        "project": pid, "fields": "all", "query": json.dumps({"ordering": ["tasks:predictions_score"]})})
    assert [task["id"] for task in r.json()["tasks"]] == [t[1], t[3], t[4], t[0], t[2]]
    with pytest.raises(ValueError, match="sampling"):
        client.set_sampling(pid, "Most uncertain")
    for tid in t:
        if tid != t[1]:
            label_studio.client.annotations.create(id=tid, result=choice("normal"))
    assert client.next_task(pid) is None


@pytest.mark.labelstudio
def test_personal_access_token_is_exchanged_and_cached(label_studio):
    pat = label_studio.personal_access_token()
    pid, _ = new_project(label_studio, 1)
    client = LabelStudio(label_studio.url, pat)
    first = client.auth_headers()["Authorization"]
    assert first.startswith("Bearer ") and pat not in first
    assert client.auth_headers()["Authorization"] == first  # cached, not exchanged per call
    assert client.project(pid)["id"] == pid
    client._access_expires = time.time() + 5  # within the refresh margin: exchanged again
    second = client.auth_headers()["Authorization"]
    assert second != first and client.project(pid)["id"] == pid
    broken = LabelStudio(label_studio.url, pat[:-4] + "AAAA")
    with pytest.raises(LabelStudioError, match=r"POST /api/token/refresh/ -> 401") as err:
        broken.project(pid)
    assert pat[:-4] not in str(err.value)
