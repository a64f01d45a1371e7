"""Small real job functions for the queue tests, importable as ``jobfuncs.<name>`` by workers.

Each run appends ``start`` and ``end`` lines to ``MODEL_DIR/runs.log`` (one write per line, O_APPEND,
so several worker processes can share the file) for the tests to count runs and check overlaps.
"""
import os
import time

LOG_NAME = "runs.log"


def _log(settings, *words) -> None:
    line = " ".join(str(w) for w in words) + "\n"
    fd = os.open(os.path.join(settings.model_dir, LOG_NAME), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def scripted(project_id, settings, reason):
    """Do what the reason says: ``sleep=<seconds>`` sleeps, ``fail`` raises (naming the API key)."""
    _log(settings, "start", project_id, f"{time.time():.6f}", os.getpid(), reason,
         f"epochs={settings.epochs}", f"key_set={bool(settings.label_studio_api_key)}")
    for word in reason.split():
        if word.startswith("sleep="):
            time.sleep(float(word.split("=", 1)[1]))
        if word == "fail":
            raise RuntimeError(f"training exploded (token {settings.label_studio_api_key})")
    _log(settings, "end", project_id, f"{time.time():.6f}", os.getpid(), reason)
    return {"project": project_id, "reason": reason, "pid": os.getpid()}


def read_runs(model_dir):
    """Parsed log lines: (kind, project, time, pid, rest-of-line)."""
    path = os.path.join(model_dir, LOG_NAME)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            kind, project, t, pid, *rest = line.split()
            rows.append((kind, int(project), float(t), int(pid), " ".join(rest)))
    return rows


def fenced(project_id, settings, reason):
    """Runs until the file named by ``wait=<path>`` exists, then writes like a training does: through
    the lease fence. ``saved`` is logged only if the fence let it through."""
    from pathlib import Path

    from peal_backend.jobs import check_lease

    _log(settings, "start", project_id, f"{time.time():.6f}", os.getpid(), reason)
    path = Path(reason.split("wait=", 1)[1])
    while not path.exists():
        time.sleep(0.05)
    try:
        check_lease()
    except Exception:
        _log(settings, "fenced", project_id, f"{time.time():.6f}", os.getpid(), reason)
        raise
    _log(settings, "saved", project_id, f"{time.time():.6f}", os.getpid(), reason)
    return {"project": project_id}


def progress(project_id, settings, reason):
    """Reports progress as the training job does, then waits for the file named by ``gate=<path>``."""
    from peal_backend.progress import JobProgress

    track = JobProgress(settings.model_dir, project_id)
    track.phase("fetching", "fetching 3 labeled and 9 unlabeled images")
    track.phase("training")
    track.step(3, 10, 0.5)
    gate = reason.split("gate=", 1)[1]
    while not os.path.exists(gate):
        time.sleep(0.02)
    return {"status": "trained"}


WATCHES = {}  # project -> (another_requested watch, the pruning's watch), kept past the job for the test


def watching(project_id, settings, reason):
    """Keep the job's watches (`jobs.request_watch`) for the test to ask after the job has ended."""
    from peal_backend.jobs import request_watch
    WATCHES[project_id] = (request_watch(), request_watch(running_too=True))
    return {"during": [WATCHES[project_id][0](), WATCHES[project_id][1]()]}
