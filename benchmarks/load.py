"""Bounded loopback load run of /predict on a real gunicorn backend.

Starts `python -m peal_backend.cli serve` on 127.0.0.1 with a model version trained here on real
PneumoniaMNIST images, serves the task images from a loopback HTTP server, and has N client threads
POST /predict back to back for a fixed time. Reports requests/s, tasks/s, latency percentiles and
errors (a non-200 answer, a transport error, or a task answered without a prediction), and writes
them as markdown.

    nice -n 10 python -m benchmarks.load --clients 50 --seconds 60 --out benchmarks/results/load.md

Only 127.0.0.1 is contacted. The backbone is the tests' tiny random DINOv2 unless --backbone names a
saved one: the run measures the HTTP path, fetching, decoding and the model call under concurrency.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peal_backend.backbone import build_classifier, input_size, load_backbone  # noqa: E402
from peal_backend.config import Settings  # noqa: E402
from peal_backend.images import preprocess, to_pil  # noqa: E402
from peal_backend.model import model_settings  # noqa: E402
from peal_backend.store import ModelStore  # noqa: E402
from peal_backend.training import fit  # noqa: E402
from tests.backbone_fixture import save_tiny_dinov2  # noqa: E402
from tests.conftest import DATASETS, ImageServer, free_port  # noqa: E402

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image"><Choice value="normal"/><Choice value="pneumonia"/></Choices>
</View>"""
PROJECT = 7


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(np.ceil(q / 100 * len(sorted_values))) - 1))
    return sorted_values[k]


def train_version(settings: Settings) -> str:
    with np.load(DATASETS / "pneumoniamnist.npz") as d:
        images, labels = d["train_images"][:40], d["train_labels"][:40, 0]
    model = build_classifier(settings, 2)
    size = 28
    fit(model, preprocess([to_pil(a) for a in images], size), torch.tensor(labels.astype(np.int64)), settings)
    meta = {"labels": ["normal", "pneumonia"], "multiple": False, "model_settings": model_settings(settings)}
    return ModelStore(settings.model_dir).save(PROJECT, "peal-linear", model.trainable_state(), meta).name


class Backend:
    """A real gunicorn process group running the backend; stopped with SIGTERM to the group."""

    def __init__(self, settings: Settings, threads: int, workers: int, log_path: Path, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MODEL_DIR": settings.model_dir, "PEAL_BACKBONE": settings.backbone,
               "PEAL_ADAPTER": settings.adapter, "LABEL_STUDIO_URL": settings.label_studio_url,
               "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO), **(extra_env or {})}
        self.command = [sys.executable, "-m", "peal_backend.cli", "serve", "--host", "127.0.0.1",
                        "--port", str(self.port), "--threads", str(threads), "--workers", str(workers)]
        self.proc = subprocess.Popen(self.command, env=env, start_new_session=True,
                                     stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}; see {log_path}")
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("gunicorn did not answer /health within 60 s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def client_loop(url: str, tasks: list[dict], tasks_per_request: int, stop_at: float, offset: int,
                latencies: list[float], errors: list[str], lock: threading.Lock) -> None:
    session = requests.Session()
    i = offset
    while time.monotonic() < stop_at:
        batch = [tasks[(i + j) % len(tasks)] for j in range(tasks_per_request)]
        i += tasks_per_request
        started = time.perf_counter()
        try:
            r = session.post(url + "/predict", json={"tasks": batch, "project": f"{PROJECT}.1700000000",
                                                     "label_config": CONFIG}, timeout=60)
            took = time.perf_counter() - started
            problem = None
            if r.status_code != 200:
                problem = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                results = r.json()["results"]
                if len(results) != len(batch) or any(len(x["result"]) != 1 or "error" in x for x in results):
                    problem = f"incomplete results: {str(results)[:200]}"
        except requests.RequestException as exc:
            took, problem = time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
        with lock:
            if problem:
                errors.append(problem)
            else:
                latencies.append(took)


def run(args) -> str:
    work = Path(tempfile.mkdtemp(prefix="peal-load-"))
    images_server = ImageServer(work / "served")
    if args.dinov2_small:
        from benchmarks.pool_scoring import dinov2_small
        args.backbone = dinov2_small(str(work / "dinov2-small"), "sdpa")
    backbone = args.backbone or save_tiny_dinov2(work / "tiny-dinov2")
    settings = Settings(backbone=backbone, adapter="linear", model_dir=str(work / "models"),
                        label_studio_url=images_server.base_url, epochs=3, min_steps=20)
    version = train_version(settings)
    with np.load(DATASETS / "pneumoniamnist.npz") as d:
        arrays = d["test_images"][:args.images] if "test_images" in d.files else d["train_images"][-args.images:]
    tasks = []
    for i, arr in enumerate(arrays):
        name = f"data/upload/{PROJECT}/x{i}.png"
        (images_server.dir / name).parent.mkdir(parents=True, exist_ok=True)
        to_pil(arr).save(images_server.dir / name, format="PNG")
        tasks.append({"id": 1000 + i, "data": {"image": "/" + name}, "project": PROJECT})

    extra_env = {"PEAL_ACTIVATION_CACHE": "false" if args.no_activation_cache else "true",
                 "PEAL_PRECISION": args.precision}
    backend = Backend(settings, args.threads, args.workers, work / "gunicorn.log", extra_env)
    try:
        # warm-up: the first request loads the model and fills the image cache
        for k in range(0, len(tasks), 8):
            r = requests.post(backend.url + "/predict", json={"tasks": tasks[k:k + 8], "project": PROJECT,
                                                             "label_config": CONFIG}, timeout=120)
            r.raise_for_status()
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        started = time.monotonic()
        stop_at = started + args.seconds
        threads = [threading.Thread(target=client_loop, args=(backend.url, tasks, args.tasks_per_request, stop_at,
                                                              n * 7, latencies, errors, lock), daemon=True)
                   for n in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        server_metrics = requests.get(backend.url + "/status", timeout=10).json()
    finally:
        backend.stop()
        images_server.close()

    lat = sorted(latencies)
    n_ok, n_err = len(lat), len(errors)
    ms = lambda q: 1000 * percentile(lat, q)  # noqa: E731
    rows = [
        ("clients (threads, back to back)", args.clients),
        ("duration", f"{elapsed:.1f} s"),
        ("tasks per request", args.tasks_per_request),
        ("gunicorn", f"{args.workers} worker(s) x {args.threads} threads (gthread)"),
        ("activation cache / precision", f"{'off' if args.no_activation_cache else 'on'} / {args.precision}"),
        ("requests ok", n_ok),
        ("errors", n_err),
        ("requests/s", f"{n_ok / elapsed:.1f}"),
        ("tasks/s", f"{n_ok * args.tasks_per_request / elapsed:.1f}"),
        ("latency p50", f"{ms(50):.1f} ms"),
        ("latency p90", f"{ms(90):.1f} ms"),
        ("latency p99", f"{ms(99):.1f} ms"),
        ("latency max", f"{1000 * lat[-1]:.1f} ms" if lat else "n/a"),
        ("server-side errors_5xx (from /metrics)", server_metrics.get("counts", {}).get("errors_5xx", 0)),
    ]
    backbone_name = ("the DINOv2-small architecture (random weights)" if args.dinov2_small
                     else args.backbone or "the tests' tiny random DINOv2")
    command = "nice -n 10 python -m benchmarks.load " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Load: /predict on a real gunicorn over loopback",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other work), Python "
        f"{platform.python_version()}, torch {torch.__version__}. Model: version `{version}` (linear probe "
        f"on {backbone_name}, served at {input_size(settings, load_backbone(backbone).config)} px), images: "
        f"{len(tasks)} real PneumoniaMNIST PNGs served from a loopback HTTP server as Label Studio "
        "`/data/upload/...` URLs (disk-cached by the backend after the warm-up).",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    if errors:
        lines += ["", "First errors:", "", *[f"- `{e}`" for e in errors[:5]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0, help="bounded: at most 120")
    p.add_argument("--tasks-per-request", type=int, default=1)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker")
    p.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    p.add_argument("--backbone", default="", help="a saved DINOv2 folder (default: the tests' tiny one)")
    p.add_argument("--dinov2-small", action="store_true", help="use the DINOv2-small architecture (224 px)")
    p.add_argument("--no-activation-cache", action="store_true", help="PEAL_ACTIVATION_CACHE=false on the server")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    p.add_argument("--out", default="", help="also write the markdown here")
    args = p.parse_args(argv)
    args.seconds = min(args.seconds, 120.0)
    report = run(args)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
