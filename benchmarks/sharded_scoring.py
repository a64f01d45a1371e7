"""Sharded pool scoring: the training job alone vs the training job + 1 RQ worker, same pool, same run.

DINOv2-small architecture (random weights) at 224 px, linear probe (the whole backbone is the frozen
part that sharding computes), real RetinaMNIST images served over loopback HTTP, the real Redis on
127.0.0.1:6379 and a real `peal-backend worker`-equivalent subprocess.

    python -m benchmarks.sharded_scoring [--images 96] [--threads 1]
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

from benchmarks.pool_scoring import DATASETS, dinov2_small
from peal_backend.config import Settings
from peal_backend.images import content_hash, to_pil
from peal_backend.sharding import fill_cache_sharded

REDIS_URL = "redis://127.0.0.1:6379/0"


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        served = Path(tmp, "served")
        served.mkdir()
        with np.load(DATASETS / "retinamnist.npz") as d:
            arrays = d["train_images"][:args.images]
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        items = []
        for i, a in enumerate(arrays):
            to_pil(a).save(served / f"{i}.png")
            items.append((content_hash((served / f"{i}.png").read_bytes()), f"{base}/{i}.png"))
        settings = Settings(redis_url=REDIS_URL, queue_name=f"bench-{uuid.uuid4().hex[:8]}", adapter="linear",
                            backbone=dinov2_small(f"{tmp}/model", "sdpa"), label_studio_url=base, model_dir=tmp,
                            precision="bf16", log_level="WARNING")
        alone = timed_fill(settings, items, f"{tmp}/c1")
        code = (f"import torch; torch.set_num_threads({args.threads}); from peal_backend.config import Settings; "
                f"from peal_backend.jobs import run_worker; "
                f"run_worker(Settings(redis_url={REDIS_URL!r}, queue_name={settings.queue_name!r}, log_level='WARNING'))")
        worker = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.getcwd()))
        try:
            for attempt in range(5):  # until the worker has imported torch and loaded the model
                if timed_fill(settings, items, f"{tmp}/warm{attempt}", with_result=True)[1]["computed_by_helpers"]:
                    break
            helped, out = timed_fill(settings, items, f"{tmp}/c2", with_result=True)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            httpd.shutdown()
    n = len(items)
    print(f"images: {n}, torch threads per process: {args.threads}, cores: {os.cpu_count()}")
    print(f"training job alone:          {n / alone:6.2f} images/s")
    print(f"training job + 1 RQ worker:  {n / helped:6.2f} images/s  "
          f"({out['computed_here']} here, {out['computed_by_helpers']} by the worker)")
    print(f"speedup: {alone / helped:.2f}")


def timed_fill(settings, items, cache_dir, with_result=False):
    t = time.perf_counter()
    out = fill_cache_sharded(settings, 224, items, cache_dir, shard_size=8)
    dt = time.perf_counter() - t
    return (dt, out) if with_result else dt


if __name__ == "__main__":
    main()
