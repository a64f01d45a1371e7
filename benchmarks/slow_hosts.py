"""/predict against image hosts that drip: the per-request deadline, and /health kept answering.

    nice -n 10 python -m benchmarks.slow_hosts [--deadline 30] [--out benchmarks/results/slow_hosts.md]

A real gunicorn backend (`peal-backend serve`, default settings but the deadline) with a model version
trained here; a loopback image host whose "dripping" URLs send their headers at once and then one byte
every 0.5 s for `--drip` seconds (a read timeout never fires: only a deadline on the whole request
ends it; the per-image PEAL_FETCH_TIMEOUT of 10 s does, image by image), and whose other URLs answer at
once. `--clients` threads each POST one /predict of `--drip-tasks` dripping and 4 good tasks at once, while a poller GETs /health every 0.25 s. Run twice,
side by side: with PEAL_PREDICT_DEADLINE at `--deadline`, and with it out of the way (10x the drip),
which is how the backend behaved before it had a request deadline (timeouts per image only).
"""
from __future__ import annotations

import argparse
import http.server
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.load import CONFIG, PROJECT, Backend, percentile, train_version  # noqa: E402
from peal_backend.config import Settings  # noqa: E402
from peal_backend.images import to_pil  # noqa: E402
from tests.backbone_fixture import save_tiny_dinov2  # noqa: E402
from tests.conftest import DATASETS, ImageServer  # noqa: E402


class DripHost:
    """Loopback HTTP: /drip/<n>.png sends a 100 kB header then a byte every 0.5 s for `drip` seconds."""

    def __init__(self, drip: float):
        stop = self.stop_event = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                ends = time.monotonic() + drip
                try:
                    while time.monotonic() < ends and not stop.is_set():
                        self.wfile.write(b"\x00")
                        self.wfile.flush()
                        stop.wait(0.5)
                except OSError:
                    pass  # the backend gave up on it: what the deadline is for

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.stop_event.set()
        self.server.shutdown()


def one_run(settings: Settings, label: str, deadline: float, args, good: list[dict], drip: DripHost, work: Path) -> dict:
    extra = {"PEAL_PREDICT_DEADLINE": str(deadline), "PEAL_ALLOWED_HOSTS": drip.host}
    backend = Backend(settings, threads=8, workers=1, log_path=work / f"gunicorn-{label}.log", extra_env=extra)
    try:
        requests.post(backend.url + "/predict", json={"tasks": good, "project": PROJECT, "label_config": CONFIG},
                      timeout=120).raise_for_status()  # warm: model loaded, good images cached
        outcomes: list[dict] = []
        health: list[float] = []
        done = threading.Event()
        lock = threading.Lock()

        def client(n: int) -> None:
            tasks = [{"id": 5000 + 100 * n + j, "data": {"image": f"http://{drip.host}/drip/{n}-{j}.png"}}
                     for j in range(args.drip_tasks)] + good
            t0 = time.perf_counter()
            try:
                r = requests.post(backend.url + "/predict", timeout=args.client_timeout,
                                  json={"tasks": tasks, "project": PROJECT, "label_config": CONFIG})
                out = {"status": r.status_code, "s": time.perf_counter() - t0}
                if r.ok:
                    res = r.json()["results"]
                    out["predicted"] = sum(bool(x["result"]) for x in res)
                    out["errors"] = sum("error" in x for x in res)
            except requests.RequestException as exc:
                out = {"status": type(exc).__name__, "s": time.perf_counter() - t0}
            with lock:
                outcomes.append(out)

        def poll() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    requests.get(backend.url + "/health", timeout=60)
                    health.append(time.perf_counter() - t0)
                except requests.RequestException:
                    health.append(float("inf"))
                done.wait(0.25)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        clients = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        done.set()
        poller.join()
    finally:
        backend.stop()
    answered = sorted(o["s"] for o in outcomes if o["status"] == 200)
    h = sorted(health)
    row = {"label": label, "deadline": deadline,
           "ok": len(answered), "busy": sum(o["status"] == 503 for o in outcomes),
           "failed": sum(o["status"] not in (200, 503) for o in outcomes),
           "predict_max": answered[-1] if answered else float("nan"),
           "predict_p50": percentile(answered, 50),
           "good_predicted": min((o.get("predicted", 0) for o in outcomes if o["status"] == 200), default=0),
           "health_p50": percentile(h, 50), "health_max": h[-1] if h else float("nan")}
    print(f"{label}: {row}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deadline", type=float, default=30.0, help="PEAL_PREDICT_DEADLINE for the 'with' run")
    p.add_argument("--drip", type=float, default=60.0, help="seconds each dripping URL keeps sending")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--drip-tasks", type=int, default=96, help="dripping tasks per /predict (besides 4 good ones)")
    p.add_argument("--client-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peal-slow-"))
    images = ImageServer(work / "served")
    drip = DripHost(args.drip)
    try:
        settings = Settings(backbone=save_tiny_dinov2(work / "tiny-dinov2"), adapter="linear",
                            model_dir=str(work / "models"), label_studio_url=images.base_url, epochs=3, min_steps=20)
        train_version(settings)
        with np.load(DATASETS / "pneumoniamnist.npz") as d:
            arrays = d["train_images"][-4:]
        good = []
        for i, arr in enumerate(arrays):
            name = f"data/upload/{PROJECT}/good{i}.png"
            (images.dir / name).parent.mkdir(parents=True, exist_ok=True)
            to_pil(arr).save(images.dir / name, format="PNG")
            good.append({"id": 100 + i, "data": {"image": "/" + name}})
        rows = [one_run(settings, "with the request deadline", args.deadline, args, good, drip, work),
                one_run(settings, "deadline out of the way (per-image timeouts only)", 10 * args.drip, args, good, drip, work)]
    finally:
        drip.close()
        images.close()
    text = report(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(rows: list[dict], args) -> str:
    command = "nice -n 10 python -m benchmarks.slow_hosts " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = ["# /predict with dripping image hosts: the request deadline", "",
             f"`{command}`: a real gunicorn backend (1 worker x 8 threads, PEAL_PREDICT_CONCURRENCY=6 as default); "
             f"{args.clients} clients at once, each one /predict of {args.drip_tasks} tasks whose images drip a byte every "
             f"0.5 s (each fetch ends at PEAL_FETCH_TIMEOUT, 10 s; 8 fetched at a time) and 4 good tasks; /health polled every 0.25 s throughout. Both runs side by "
             "side in one process.", "",
             "| PEAL_PREDICT_DEADLINE | /predict answered (200) | answered 503 busy at once | failed | /predict p50 s | "
             "/predict max s | good tasks predicted per answer | /health p50 s | /health max s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['deadline']:.0f} s ({r['label']}) | {r['ok']} | {r['busy']} | {r['failed']} | "
                     f"{r['predict_p50']:.1f} | {r['predict_max']:.1f} | {r['good_predicted']} of 4 | "
                     f"{r['health_p50']:.3f} | {r['health_max']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
