"""What the running training job is doing: its phase (fetching, training step k of n, scoring,
saving, pushing), written by the job to MODEL_DIR/<project>/.progress.json (replaced atomically) and
read by the server for /ui, /status and /metrics, whichever process (server thread or RQ worker on a
machine sharing MODEL_DIR) runs the job.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .learning import atomic_write_json

PROGRESS_FILE = ".progress.json"
PHASES = ("fetching", "training", "scoring", "saving", "pushing", "done")
MIN_INTERVAL = 0.5  # seconds between two writes for step updates (phase changes always write)


def progress_path(model_dir, project: int) -> Path:
    return Path(model_dir) / str(int(project)) / PROGRESS_FILE


class JobProgress:
    """The job's reporter. `step` fits `training.fit`'s `progress(step, total, loss)` callback."""

    def __init__(self, model_dir, project: int, clock=time.time):
        self.path = progress_path(model_dir, project)
        self.clock = clock
        self.started_at = clock()
        self.state = {"pid": os.getpid(), "started_at": self.started_at, "phase": None, "detail": "",
                      "step": None, "total": None}
        self._last_write = 0.0

    def phase(self, name: str, detail: str = "", **extra) -> None:
        if name not in PHASES:
            raise ValueError(f"phase {name!r}: expected one of {', '.join(PHASES)}")
        now = self.clock()
        self.state.update(phase=name, detail=detail, phase_started_at=now, step=None, total=None, **extra)
        self._write(now)

    def step(self, step: int, total: int, loss: float | None = None) -> None:
        now = self.clock()
        if self.state.get("phase") != "training":
            self.state.update(phase="training", phase_started_at=now, detail="")
        first = self.state.get("step") is None  # the first step of this phase is always shown
        if first:  # the step rate is measured from here (the phase began with the backbone's features)
            self.state.update(first_step=int(step), first_step_at=now)
        self.state.update(step=int(step), total=int(total))
        if loss is not None:
            self.state["loss"] = float(loss)
        if step >= total:  # the last step: what follows in the cycle is scoring the pool
            self.state["training_seconds"] = now - self.state["phase_started_at"]
            self.state.update(phase="scoring", phase_started_at=now, detail="scoring the unlabeled pool")
            self._write(now)
        elif first or now - self._last_write >= MIN_INTERVAL:
            self._write(now)

    def _write(self, now: float) -> None:
        self.state["updated_at"] = now
        self._last_write = now
        try:
            atomic_write_json(self.path, self.state)
        except OSError:  # the job must not fail because its progress cannot be shown
            pass


def read_progress(model_dir, project: int) -> dict | None:
    try:
        with open(progress_path(model_dir, project)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def describe(progress: dict | None, running: bool, typical_seconds: float | None, now: float) -> dict:
    """The job panel's figures: phase in words, step k of n, elapsed and estimated remaining seconds.
    The estimate is the step rate while training, else the typical job duration minus the elapsed time."""
    if not running or not progress:
        return {"running": False}
    elapsed = max(0.0, now - float(progress.get("started_at", now)))
    phase = progress.get("phase") or "starting"
    step, total = progress.get("step"), progress.get("total")
    words = {"fetching": "fetching tasks and images from Label Studio", "training": "training",
             "scoring": "scoring the unlabeled pool", "saving": "saving the new version",
             "pushing": "pushing predictions to Label Studio", "done": "finishing"}.get(phase, phase)
    if phase == "training" and step and total:
        words = f"training step {step} of {total}"
    eta = None
    first, first_at = progress.get("first_step"), progress.get("first_step_at")
    if phase == "training" and step and total and step < total and first is not None and step > first:
        rate = max(0.0, float(progress.get("updated_at", now)) - float(first_at)) / (step - first)  # s per step
        eta = rate * (total - step) - max(0.0, now - float(progress.get("updated_at", now)))
        eta = max(0.0, eta)
    elif typical_seconds:
        eta = max(0.0, typical_seconds - elapsed)
    if phase != "training" and progress.get("detail"):
        words = progress["detail"]
    return {"running": True, "phase": phase, "words": words, "step": step, "total": total,
            "elapsed_seconds": elapsed, "eta_seconds": eta}


_PLAIN = {
    "LabelStudioError": "Label Studio did not answer as expected",
    "ImageError": "an image could not be fetched or read",
    "LeaseLost": "another training of this project took over; this one stopped without saving",
    "BackboneLoadError": "the backbone model could not be loaded",
    "QueueError": "the training queue was unavailable",
    "PayloadError": "the project's data is not usable",
    "LabelConfigError": "the project's labeling configuration is not supported",
    "MemoryError": "the machine ran out of memory",
    "ConnectionError": "a connection failed",
    "TimeoutError": "an operation timed out",
    "JobTimeoutException": "the training ran past PEAL_JOB_TIMEOUT and was stopped",
}


def plain_error(error: str | None) -> str | None:
    """A job's recorded error ("Type: message") as a sentence a person can act on."""
    if not error:
        return None
    kind, sep, message = error.partition(": ")
    if not sep or " " in kind:
        return error
    lead = _PLAIN.get(kind, f"the training stopped with an unexpected error ({kind})")
    return f"{lead[0].upper()}{lead[1:]}: {message}" if message else lead[0].upper() + lead[1:] + "."
