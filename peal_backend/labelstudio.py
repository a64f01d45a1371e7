"""The Label Studio API, as the backend uses it: tasks and annotations in, predictions and the
project's model version out.

Plain `requests` rather than label_studio_sdk: the backend works on the task dicts Label Studio sends
to /predict anyway, and needs its own control of retries (predictions must not be duplicated when a
timed-out bulk import did commit). Behaviour checked against Label Studio 1.23.2; see
docs/labelstudio-notes.md.
"""
from __future__ import annotations

import base64
import json
import math
import threading
import time
from datetime import datetime
from typing import Iterator

import requests

SAMPLING = ("Sequential sampling", "Uniform sampling", "Uncertainty sampling")
PAGE_SIZE = 1000     # tasks per page when listing a project (Label Studio 1.23 sets no maximum by default)
# Predictions per bulk import request. Label Studio 1.23's bulk import recomputes the counters of every
# task in the project after each request, so its cost is (requests x project size): 5,000 a request
# pushed 5,000 predictions 6.7x faster than 200 (benchmarks/prediction_import.py).
CHUNK_SIZE = 5000
BULK_TIMEOUT = 600.0  # seconds for one bulk import request (a large project's counter update included)
PARALLEL_REQUESTS = 4  # concurrent one-prediction requests (predictions with a cluster, mislabeling or neighbors)
# Prediction fields Label Studio 1.23's bulk import drops (it builds each Prediction from result, score and
# model_version only): only its per-prediction endpoint, POST /api/predictions/, stores them
ONE_BY_ONE_FIELDS = ("cluster", "mislabeling", "neighbors")
TOKEN_MARGIN = 30.0  # refresh an access token this many seconds before it expires


class LabelStudioError(Exception):
    """A Label Studio API call failed; the message names the call and the status, never the token."""


class _Transient(Exception):
    """A failure worth retrying: connection error, timeout, 5xx or 429."""


def _jwt_claims(token: str) -> dict | None:
    """The unverified claims of a JWT, or None if `token` is not one (legacy tokens are hex)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None


def _timestamp(value) -> float:
    if not value:
        return float("-inf")
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


def is_usable(annotation: dict) -> bool:
    """An annotation training can learn from: not cancelled (skipped) and with a non-empty result."""
    return not annotation.get("was_cancelled") and bool(annotation.get("result"))


def latest_usable_annotation(task: dict) -> dict | None:
    """The task's most recent usable annotation (by updated_at, else created_at, then id), or None."""
    usable = [a for a in task.get("annotations") or [] if is_usable(a)]
    if not usable:
        return None
    return max(usable, key=lambda a: (_timestamp(a.get("updated_at") or a.get("created_at")), a.get("id") or 0))


class LabelStudio:
    """A small client for one Label Studio instance; safe to share between threads."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, retries: int = 3):
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"Label Studio URL must start with http:// or https://, got {url!r}")
        if not api_key:
            raise ValueError("Label Studio API key is empty (set LABEL_STUDIO_API_KEY)")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self._api_key = api_key.strip()
        self._claims = _jwt_claims(self._api_key)
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()
        self._session = requests.Session()

    @classmethod
    def from_settings(cls, settings) -> "LabelStudio":
        return cls(settings.label_studio_url, settings.label_studio_api_key,
                   timeout=getattr(settings, "label_studio_timeout", 30.0),
                   retries=getattr(settings, "label_studio_retries", 3))

    # --- authentication -------------------------------------------------------------------------

    def auth_headers(self) -> dict:
        """Headers authenticating a request: `Token` for a legacy key, `Bearer` for a personal access
        token (a JWT refresh token, exchanged for a short-lived access token that is cached)."""
        if self._claims is None:
            return {"Authorization": f"Token {self._api_key}"}
        if self._claims.get("token_type") == "access":
            return {"Authorization": f"Bearer {self._api_key}"}
        with self._lock:
            if self._access is None or time.time() > self._access_expires - TOKEN_MARGIN:
                self._refresh_access_token()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh_access_token(self) -> None:
        exp = self._claims.get("exp")
        if isinstance(exp, (int, float)) and exp < time.time():
            raise LabelStudioError("Label Studio personal access token has expired: create a new one")
        path = "/api/token/refresh/"
        try:
            r = self._session.post(self.url + path, json={"refresh": self._api_key}, timeout=self.timeout)
        except requests.RequestException as e:
            raise LabelStudioError(f"POST {path} failed: {type(e).__name__}") from None
        if r.status_code != 200:
            raise LabelStudioError(f"POST {path} -> {r.status_code}: {self._detail(r)} "
                                   "(is LABEL_STUDIO_API_KEY a valid personal access token?)")
        access = r.json().get("access", "")
        claims = _jwt_claims(access) or {}
        self._access = access
        # Unknown lifetime: assume Label Studio's default of five minutes.
        self._access_expires = float(claims.get("exp") or time.time() + 300)

    # --- HTTP with retries ------------------------------------------------------------------------

    def _detail(self, response: requests.Response) -> str:
        try:
            body = response.json()
            text = json.dumps(body.get("validation_errors") or body.get("detail") or body) if isinstance(body, dict) else json.dumps(body)
        except ValueError:
            text = response.text
        return self._redact(text[:300])

    def _redact(self, text: str) -> str:
        for secret in (self._api_key, self._access):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _send(self, method: str, path: str, timeout: float | None = None, **kwargs) -> requests.Response:
        """One request; raises _Transient for retryable failures, LabelStudioError for the rest.
        404 is returned to the caller, which knows whether it means 'none'."""
        call = f"{method} {path}"
        for auth_attempt in range(2):
            try:
                r = self._session.request(method, self.url + path, headers=self.auth_headers(),
                                          timeout=timeout or self.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as e:
                raise _Transient(f"{call} failed: {type(e).__name__}") from None
            except requests.RequestException as e:
                raise LabelStudioError(f"{call} failed: {type(e).__name__}") from None
            if r.status_code == 401 and self._claims is not None and auth_attempt == 0:
                with self._lock:  # the access token may have been revoked or expired early
                    self._access = None
                continue
            break
        if r.status_code >= 500 or r.status_code == 429:
            raise _Transient(f"{call} -> {r.status_code}: {self._detail(r)}")
        if r.status_code >= 400 and r.status_code != 404:
            raise LabelStudioError(f"{call} -> {r.status_code}: {self._detail(r)}")
        return r

    def _backoff(self, attempt: int) -> None:
        time.sleep(min(8.0, 0.5 * 2 ** attempt))

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        """A request retried with backoff on connection errors, timeouts, 5xx and 429.
        Only for idempotent calls (GET, PATCH, DELETE)."""
        for attempt in range(self.retries + 1):
            try:
                return self._send(method, path, **kwargs)
            except _Transient as e:
                if attempt == self.retries:
                    raise LabelStudioError(f"{e} (after {attempt + 1} attempts)") from None
                self._backoff(attempt)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs):
        r = self._request(method, path, **kwargs)
        if r.status_code == 404:
            raise LabelStudioError(f"{method} {path} -> 404: {self._detail(r)}")
        return r.json() if r.content else None

    # --- projects -------------------------------------------------------------------------------

    def project(self, project_id: int) -> dict:
        """The project: label_config, model_version, sampling, ..."""
        return self._json("GET", f"/api/projects/{int(project_id)}/")

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """Make `model_version` the project's current version. Label Studio 1.23 refuses (400) a
        version that no prediction and no connected ML backend has: create predictions first."""
        self._json("PATCH", f"/api/projects/{int(project_id)}/", json={"model_version": model_version})

    def model_versions(self, project_id: int) -> dict[str, int]:
        """Every model version the project's predictions carry, with how many predictions each has."""
        return self._json("GET", f"/api/projects/{int(project_id)}/model-versions/") or {}

    def delete_model_version(self, project_id: int, model_version: str) -> int:
        """Delete every prediction of `model_version` in the project; returns how many."""
        r = self._request("DELETE", f"/api/projects/{int(project_id)}/model-versions/",
                          json={"model_version": model_version})
        if r.status_code == 404:
            return 0
        body = r.json()  # 1.23 answers {"deleted_predictions": n}
        return int(next(iter(body.values()), 0)) if isinstance(body, dict) else int(body or 0)

    def set_sampling(self, project_id: int, sampling: str = "Uncertainty sampling") -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"sampling {sampling!r}: expected one of {', '.join(SAMPLING)}")
        self._json("PATCH", f"/api/projects/{int(project_id)}/", json={"sampling": sampling})

    def next_task(self, project_id: int) -> dict | None:
        """The task the labeling stream would serve next (GET /api/projects/<id>/next), or None."""
        r = self._request("GET", f"/api/projects/{int(project_id)}/next")
        return None if r.status_code == 404 else r.json()

    # --- tasks ----------------------------------------------------------------------------------

    def tasks(self, project_id: int, include: str | None = None, *, fields: str = "all",
              query: dict | None = None) -> Iterator[dict]:
        """Every task of the project (or those a Data Manager `query` selects), with annotations and
        predictions inline (`fields="all"`; "task_only" leaves both out) or only the fields in `include`,
        a page at a time, until the `total` Label Studio reports (a short page alone does not end the
        scan: Label Studio may cap the page size)."""
        page, seen = 1, 0
        while True:
            params = {"project": int(project_id), "fields": fields, "page": page, "page_size": PAGE_SIZE}
            if include:
                params["include"] = include
            if query:
                params["query"] = json.dumps(query)
            r = self._request("GET", "/api/tasks/", params=params)
            if r.status_code == 404:  # "Invalid page": past the end
                return
            body = r.json()
            tasks = body.get("tasks", [])
            yield from tasks
            seen += len(tasks)
            total = body.get("total")
            if not tasks or (total is not None and seen >= int(total)) or (total is None and len(tasks) < PAGE_SIZE):
                return
            page += 1

    def split_tasks(self, project_id: int) -> tuple[list[tuple[dict, dict]], list[dict]]:
        """(task, latest usable annotation) for the labeled tasks, and the unlabeled tasks.

        Two requests per page but no prediction in the bytes: one scan of every task without annotations
        or predictions (`task_only`: id, data and the annotation count), then the annotated tasks alone
        with their annotations. The first scan decides which side each task is on, so a task annotated
        between the two is unlabeled this cycle, never both. (One `fields=all` scan carried every
        prediction of every kept version: Label Studio 1.23's `include` cannot drop them and keep the
        annotations.)"""
        light = list(self.tasks(project_id, include="id,data,total_annotations", fields="task_only"))
        annotated = {t["id"] for t in light if (t.get("total_annotations") or 0) > 0}
        full: dict[int, dict] = {}
        if annotated:
            query = {"filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]}}
            full = {t["id"]: t for t in self.tasks(project_id, query=query) if t.get("id") in annotated}
        labeled, unlabeled = [], []
        for task in light:
            annotation = latest_usable_annotation(full[task["id"]]) if task["id"] in full else None
            if annotation is None:  # none, or only skipped or empty ones
                unlabeled.append(task)
            else:
                labeled.append((full[task["id"]], annotation))
        return labeled, unlabeled

    def labeled_tasks(self, project_id: int) -> list[tuple[dict, dict]]:
        """(task, annotation) for every task with a usable annotation: the latest one, skipping
        cancelled (skipped) and empty annotations."""
        return self.split_tasks(project_id)[0]

    def unlabeled_tasks(self, project_id: int) -> list[dict]:
        """Tasks without a usable annotation: the pool to score."""
        return self.split_tasks(project_id)[1]

    # --- predictions ----------------------------------------------------------------------------

    def tasks_with_prediction(self, project_id: int, model_version: str) -> set[int]:
        """Ids of the project's tasks that have a prediction at `model_version`."""
        found = set()
        for task in self.tasks(project_id, include="id,predictions_model_versions"):
            versions = (task.get("predictions_model_versions") or "").split(",")
            if model_version in (v.strip() for v in versions):
                found.add(task["id"])
        return found

    def create_predictions(self, project_id: int, predictions: list[dict], model_version: str, *,
                           new_version: bool = False) -> int:
        """Create predictions at `model_version` in bulk; returns how many this call created.

        At most one prediction per (task, model_version): tasks that already have one are skipped, and
        after a failed request (which may have committed on the server) the chunk is re-checked
        before it is sent again, so retries never duplicate.
        """
        if not model_version or "," in model_version:
            raise ValueError(f"model_version {model_version!r}: must be non-empty and contain no comma")
        rows = _validated(predictions)
        # a version Label Studio has never held has no prediction yet: no scan needed to skip existing ones
        have = self.tasks_with_prediction(project_id, model_version) if rows and not new_version else set()
        pending = [p for p in rows if p["task"] not in have]
        single = [p for p in pending if any(f in p for f in ONE_BY_ONE_FIELDS)]
        pending = [p for p in pending if not any(f in p for f in ONE_BY_ONE_FIELDS)]
        created = self._create_one_by_one(project_id, single, model_version) if single else 0
        path = f"/api/projects/{int(project_id)}/import/predictions"
        for start in range(0, len(pending), CHUNK_SIZE):
            created += self._post_once(project_id, model_version, path, pending[start:start + CHUNK_SIZE])
        return created

    def _create_one_by_one(self, project_id: int, rows: list[dict], model_version: str) -> int:
        """Predictions that carry a field of ONE_BY_ONE_FIELDS: Label Studio 1.23's bulk import drops those,
        and only its per-prediction endpoint stores them, so one request each (a few threads in parallel)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=PARALLEL_REQUESTS) as pool:
            return sum(pool.map(lambda row: self._post_once(project_id, model_version, "/api/predictions/", [row],
                                                            single=True), rows))

    def _post_once(self, project_id: int, model_version: str, path: str, rows: list[dict], *,
                   single: bool = False) -> int:
        """POST predictions (a list to the bulk import, or the one row of `rows` to the per-prediction
        endpoint with `single`), retried on transient failures; returns how many were created. A failed
        request may have committed on the server: before each retry the rows Label Studio now holds are
        counted as created and left out, so retries never duplicate."""
        created = 0
        for attempt in range(self.retries + 1):
            body = [{**p, "model_version": model_version} for p in rows]
            try:
                r = self._send("POST", path, json=body[0] if single else body,
                               timeout=None if single else max(self.timeout, BULK_TIMEOUT))
            except _Transient as e:
                if attempt == self.retries:
                    raise LabelStudioError(f"{e} (after {attempt + 1} attempts)") from None
                self._backoff(attempt)
                have = self._retry_check(project_id, model_version)
                created += sum(p["task"] in have for p in rows)
                rows = [p for p in rows if p["task"] not in have]
                if not rows:
                    return created
                continue
            if r.status_code == 404:
                raise LabelStudioError(f"POST {path} -> 404: {self._detail(r)}")
            return created + (len(rows) if single else int((r.json() or {}).get("created", len(rows))))
        return created

    def _retry_check(self, project_id: int, model_version: str) -> set[int]:
        try:
            return self.tasks_with_prediction(project_id, model_version)
        except LabelStudioError:
            return set()  # cannot tell; the next attempt's own failure will surface


def _validated(predictions: list[dict]) -> list[dict]:
    """Predictions as Label Studio wants them, with a clear error for the first bad one."""
    rows, seen = [], set()
    for i, p in enumerate(predictions):
        if not isinstance(p, dict):
            raise ValueError(f"predictions[{i}]: expected a dict, got {type(p).__name__}")
        task = p.get("task")
        if isinstance(task, bool) or not isinstance(task, int):
            raise ValueError(f"predictions[{i}]['task']: expected a task id (int), got {task!r}")
        if task in seen:
            raise ValueError(f"predictions[{i}]: task {task} appears twice")
        seen.add(task)
        if not isinstance(p.get("result"), list):
            raise ValueError(f"predictions[{i}]['result']: expected a list")
        row = {"task": task, "result": p["result"]}
        if p.get("score") is not None:
            score = float(p["score"])
            if not math.isfinite(score):
                raise ValueError(f"predictions[{i}]['score']: must be finite, got {p['score']!r}")
            row["score"] = score
        if p.get("cluster") is not None:  # Label Studio's uncertainty sampling spreads picks over clusters
            cluster = p["cluster"]
            if isinstance(cluster, bool) or not isinstance(cluster, int):
                raise ValueError(f"predictions[{i}]['cluster']: expected an int, got {cluster!r}")
            row["cluster"] = cluster
        if p.get("mislabeling") is not None:  # Label Studio's per-task label-quality score
            mislabeling = p["mislabeling"]
            if isinstance(mislabeling, bool) or not isinstance(mislabeling, (int, float)) or not math.isfinite(mislabeling):
                raise ValueError(f"predictions[{i}]['mislabeling']: expected a finite number, got {mislabeling!r}")
            row["mislabeling"] = float(mislabeling)
        if p.get("neighbors") is not None:  # task ids of near-duplicates
            neighbors = p["neighbors"]
            if not isinstance(neighbors, list) or any(isinstance(n, bool) or not isinstance(n, int) for n in neighbors):
                raise ValueError(f"predictions[{i}]['neighbors']: expected a list of task ids (int), got {neighbors!r}")
            row["neighbors"] = list(neighbors)
        rows.append(row)
    return rows
