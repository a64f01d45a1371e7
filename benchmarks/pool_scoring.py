"""Pool scoring throughput: DINOv2-small architecture at 224 px, plain fp32 eager vs the backend's path.

Both sides score the same real images (RetinaMNIST, upsampled as the backend does) in the same run.
"plain" = eager attention, fp32, torch.no_grad, batch 8: what a straightforward implementation does.
"optimised" = what `peal_backend.training.predict` does with PEAL_PRECISION=bf16 (SDPA attention,
inference_mode, a bf16 copy of the model, batch PEAL_INFERENCE_BATCH_SIZE). Also measured in the same
run: the bf16 matmul roofline of this CPU, and top-1 agreement of bf16 with fp32 on a second sample,
with a linear head fitted (fp32) on the timing sample's real RetinaMNIST labels, so that the logits
mean something.

    python benchmarks/pool_scoring.py [--images 128] [--batch 128] [--agree-images 256]

Ends with a line `speedup: X.XX` (optimised images/s / plain images/s).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from peal_backend.backbone import build_classifier
from peal_backend.config import Settings
from peal_backend.images import preprocess, to_pil
from peal_backend.training import fit, predict

DATASETS = Path(os.environ.get("PEAL_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


def dinov2_small(folder: str, attn: str) -> str:
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=14, image_size=224)
    Dinov2Model(cfg).save_pretrained(folder)
    return folder


def matmul_gflops(dtype, n=2048, reps=10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def forward_gflop(tokens=257, d=384, layers=12, mlp=1536) -> float:
    """Multiply-adds x2 of one DINOv2-small forward at 224 px (patch embedding + blocks)."""
    per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d
    patch = 256 * (3 * 14 * 14) * d
    return 2 * (layers * per_block + patch) / 1e9


def timed(fn, reps=2) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--agree-images", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    with np.load(DATASETS / "retinamnist.npz") as d:
        arrays, labels = d["train_images"][:args.images], d["train_labels"][:args.images, 0]
        agree_arrays = d["test_images"][:args.agree_images]
    pixels = preprocess([to_pil(a) for a in arrays], 224)
    agree_pixels = preprocess([to_pil(a) for a in agree_arrays], 224)
    n = len(pixels)

    with tempfile.TemporaryDirectory() as tmp:
        folder = dinov2_small(tmp, "sdpa")
        base = Settings(backbone=folder, adapter="linear", features="cls", inference_batch_size=args.batch,
                        epochs=30, min_steps=100)
        opt_model = build_classifier(base.replace(precision="bf16"), 5)
        plain = build_classifier(base, 5)
        plain.backbone.config._attn_implementation = "eager"
        plain.load_state_dict(opt_model.state_dict())

        def run_plain():
            with torch.no_grad():
                return torch.cat([plain(pixels[i:i + 8]) for i in range(0, n, 8)])

        fp32_opt = base.replace(precision="fp32")
        bf16 = base.replace(precision="bf16")
        t_plain = timed(run_plain)
        t_fp32 = timed(lambda: predict(opt_model, pixels, fp32_opt))
        t_bf16 = timed(lambda: predict(opt_model, pixels, bf16))
        fit(opt_model, pixels, torch.tensor(labels.astype(np.int64)), fp32_opt)
        ref = predict(opt_model, agree_pixels, fp32_opt).probs.argmax(1)
        agree = float((predict(opt_model, agree_pixels, bf16).probs.argmax(1) == ref).mean())

    peak_bf16 = matmul_gflops(torch.bfloat16)
    peak_fp32 = matmul_gflops(torch.float32)
    gf = forward_gflop()
    ips = {"plain fp32 eager (no_grad, batch 8)": n / t_plain,
           f"fp32 sdpa inference_mode (batch {args.batch})": n / t_fp32,
           f"bf16 sdpa inference_mode, backend path (batch {args.batch})": n / t_bf16}
    print(f"threads: {torch.get_num_threads()}  images: {n}  forward: {gf:.1f} GFLOP/image")
    print(f"matmul roofline: fp32 {peak_fp32:.0f} GFLOP/s, bf16 {peak_bf16:.0f} GFLOP/s")
    print(f"{'path':<52} {'images/s':>9} {'GFLOP/s':>8} {'% bf16 roofline':>16}")
    for name, v in ips.items():
        print(f"{name:<52} {v:9.2f} {v * gf:8.0f} {100 * v * gf / peak_bf16:15.1f}%")
    print(f"bf16 top-1 agreement with fp32: {agree * 100:.1f}% of {len(agree_pixels)} images")
    print(f"speedup: {ips[list(ips)[2]] / ips[list(ips)[0]]:.2f}")


if __name__ == "__main__":
    main()
