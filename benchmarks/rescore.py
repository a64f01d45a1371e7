"""Re-score after a cycle: cached frozen activations vs a full forward, DINOv2-small architecture, 224 px.

For each adapter the pool's frozen activations are cached once (as after the first cycle); the
figure is the time of the next re-score, cached vs full forward, same images, same run.

    python benchmarks/rescore.py [--images 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from benchmarks.pool_scoring import DATASETS, dinov2_small
from peal_backend.backbone import build_classifier
from peal_backend.config import Settings
from peal_backend.images import content_hash, preprocess, to_pil
from peal_backend.scoring import ActivationCache, score_cached
from peal_backend.training import predict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    with np.load(DATASETS / "retinamnist.npz") as d:
        arrays = d["test_images"][:args.images]
    hashes = [content_hash(a.tobytes()) for a in arrays]
    pixels = preprocess([to_pil(a) for a in arrays], 224)
    n = len(pixels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = dinov2_small(tmp + "/model", "sdpa")
        base = Settings(backbone=folder, precision=args.precision, batch_size=32)
        for name, s in [("linear probe", base.replace(adapter="linear")),
                        *[(f"LoRA last K={k}", base.replace(adapter="lora", lora_last_k=k)) for k in (1, 2, 4)]]:
            clf = build_classifier(s, 5)
            predict(clf, pixels[:8], s)  # warm-up: kernel selection, first-call allocations
            full = float("inf")
            for _ in range(2):  # best of two
                t = time.perf_counter()
                predict(clf, pixels, s)
                full = min(full, time.perf_counter() - t)
            cache = ActivationCache(f"{tmp}/cache-{name.replace(' ', '-')}")
            score_cached(clf, s, hashes, pixels, cache)  # the first cycle fills the cache
            t = time.perf_counter()
            score_cached(clf, s, hashes, pixels, cache)
            cached = time.perf_counter() - t
            rows.append((name, n / full, n / cached))
    print(f"images: {n}, precision: {args.precision}, threads: {torch.get_num_threads()}")
    print(f"{'adapter':<16} {'full img/s':>11} {'cached img/s':>13} {'speedup':>8}")
    for name, f, c in rows:
        print(f"{name:<16} {f:11.2f} {c:13.2f} {c / f:7.1f}x")


if __name__ == "__main__":
    main()
