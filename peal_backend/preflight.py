"""What would keep this backend from ever training, found at start and reported, not crashed on.

A container that exits on a bad setting restarts in a loop that tells the user little; one that stays
up, logs the problem once and names it on `/health` and `/setup` is found and fixed. Two checks:

* ``MODEL_DIR`` (the image's volume): it must exist or be creatable, and be writable by this user —
  a read-only mount, or a host folder owned by root mounted over it, fails here, not minutes later in
  the first training.
* ``LABEL_STUDIO_URL``: Label Studio must answer there. Re-checked in the background (it may start
  after the backend, as in docker-compose); the log says when it becomes reachable or unreachable.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import requests

from .config import Settings, hide_url_secrets

log = logging.getLogger(__name__)

RECHECK_SECONDS = 15.0  # how often the Label Studio check runs again
LS_TIMEOUT = 2.0


def model_dir_problem(model_dir: str) -> str | None:
    """None if versions can be written under ``model_dir``, else what is wrong and how to fix it."""
    path = os.path.abspath(model_dir)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return (f"MODEL_DIR={model_dir} does not exist and cannot be created ({exc.strerror}): mount a "
                "writable volume there (docker: -v peal-models:/data/models) or point MODEL_DIR at a writable folder")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".peal-write-check-"):
            pass
    except OSError as exc:
        uid = os.getuid() if hasattr(os, "getuid") else "?"
        return (f"MODEL_DIR={model_dir} is not writable by this process (uid {uid}: {exc.strerror}): model versions "
                "could not be saved, so nothing would train. Mount it read-write, owned by that user "
                "(a named volume is; a host folder needs chown), or point MODEL_DIR elsewhere")
    return None


def label_studio_problem(url: str, timeout: float = LS_TIMEOUT) -> str | None:
    """What is wrong if nothing answers at ``url`` (refused, unknown host), else None. Any HTTP answer,
    or a slow one, counts as there: Label Studio's own /health needs no token, so this tells a wrong
    address from a refused token (which `/setup` checks separately)."""
    try:
        requests.get(url.rstrip("/") + "/health", timeout=timeout, allow_redirects=False)
    except requests.ConnectionError as exc:
        return (f"cannot reach Label Studio at LABEL_STUDIO_URL={hide_url_secrets(url)} ({type(exc).__name__}): "
                "set it to an address of Label Studio that this backend can reach (in docker-compose: the "
                "service name, http://label-studio:8080)")
    except requests.RequestException:
        return None  # slow, not absent: left to the training to report
    return None


class PreflightError(Exception):
    """A problem found by the preflight checks that a request cannot work around: a 503 naming it."""


class Preflight:
    """The current problems, for `/health` and `/setup`; each logged when it appears and when it clears.

    Checked once at start (`run_once`), then again when asked for and older than RECHECK_SECONDS
    (`refresh`, in the background: `/health` never waits for it), so a volume fixed or a Label Studio
    started later clears its problem without a restart."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self._checked_at = float("-inf")
        self._running = False

    def _set(self, name: str, problem: str | None) -> None:
        with self._lock:
            before = self._problems.get(name)
            if problem:
                self._problems[name] = problem
            else:
                self._problems.pop(name, None)
        if problem and problem != before:
            log.error("preflight: %s", problem)
        elif before and not problem:
            log.warning("preflight: %s is fine now", name)

    def check_model_dir(self) -> str | None:
        problem = model_dir_problem(self.settings.model_dir)
        self._set("MODEL_DIR", problem)
        return problem

    def check_label_studio(self) -> str | None:
        problem = label_studio_problem(self.settings.label_studio_url)
        self._set("LABEL_STUDIO_URL", problem)
        return problem

    def problems(self) -> list[str]:
        with self._lock:
            return list(self._problems.values())

    def run_once(self) -> list[str]:
        with self._lock:
            self._running = True
        try:
            self.check_model_dir()
            self.check_label_studio()
        finally:
            with self._lock:
                self._running, self._checked_at = False, time.monotonic()
        return self.problems()

    def refresh(self) -> None:
        """Run the checks again in a daemon thread if the last run is stale and none is running."""
        with self._lock:
            if self._running or time.monotonic() - self._checked_at < RECHECK_SECONDS:
                return
            self._running = True
        threading.Thread(target=self._run_logged, name="peal-preflight", daemon=True).start()

    def _run_logged(self) -> None:
        try:
            self.run_once()
        except Exception:  # noqa: BLE001 - a check never takes the server down
            log.exception("preflight check failed")
            with self._lock:
                self._running = False
