"""Torch CPU threads for the server and the worker: which count is fastest, alone and on a shared CPU.

    nice -n 10 python -m benchmarks.torch_threads [--reps 3] [--out benchmarks/results/torch_threads.md]

Two workloads the backend runs, each in a fresh process with `torch.set_num_threads(T)`:
- a training cycle: `cycle.run_cycle` (what the worker runs) with the default adapter (LoRA) on peal-mini,
  100 labeled Fashion-MNIST images and a pool of 1,000;
- pool scoring: `cycle.score_images` of 64 images through the DINOv2-small architecture at 224 px
  (PEAL_PRECISION=auto), what /predict and the re-score do with the default backbone.
Each runs with T = 1 and T = the number of cores, with nothing else started ("alone") and beside one
competing process that keeps one core busy ("shared"), repetitions interleaved, medians reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKLOAD = r'''
import json, sys, time, hashlib
import numpy as np, torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
from peal_backend.config import Settings
from peal_backend.cycle import ImageSet, run_cycle, score_images
from peal_backend.backbone import build_classifier
from peal_backend.images import preprocess, to_pil
from peal_backend.simulate import load_dataset
if cfg["work"] == "cycle":
    s = Settings(backbone="peal-mini", adapter="lora", model_dir=cfg["tmp"])
    data = load_dataset("fashion-mnist", 1100, 10)
    px = preprocess([to_pil(a) for a in data.train_images[:1100]], 28)
    hashes = [hashlib.sha1(bytes([i % 256, i // 256])).hexdigest() for i in range(1100)]
    labeled, pool = ImageSet.from_tensor(hashes[:100], px[:100]), ImageSet.from_tensor(hashes[100:], px[100:])
    t0 = time.perf_counter()
    run_cycle(s, labeled, torch.as_tensor(data.train_labels[:100]), pool, 10)
else:
    s = Settings(backbone=cfg["dinov2"], adapter="linear", model_dir=cfg["tmp"], precision="auto")
    clf = build_classifier(s, 2)
    px = torch.rand(64, 3, 224, 224)
    images = ImageSet.from_tensor([str(i) for i in range(64)], px)
    score_images(clf, s, ImageSet.from_tensor(["w"], px[:1]), None)  # warm
    t0 = time.perf_counter()
    score_images(clf, s, images, None)
print("SECONDS", time.perf_counter() - t0)
'''

COMPETITOR = r'''
import numpy as np, os
os.environ["OMP_NUM_THREADS"] = "1"
a = np.random.rand(400, 400)
while True:
    a = (a @ a) / 400.0
'''


def run_once(work: str, threads: int, tmp: str, dinov2: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, json.dumps({"work": work, "threads": threads, "tmp": tmp,
                                                                      "dinov2": dinov2})],
                         env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in out.stdout.splitlines() if x.startswith("SECONDS")), None)
    if line is None:
        raise SystemExit(f"{work} with {threads} threads failed:\n{out.stderr[-2000:]}")
    return float(line.split()[1])


def main() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.pool_scoring import dinov2_small

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cores = os.cpu_count() or 2
    counts = sorted({1, cores})
    times: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dinov2 = dinov2_small(os.path.join(tmp, "dinov2-small"), "sdpa")
        for condition in ("alone", "shared"):
            competitor = None
            if condition == "shared":
                competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR],
                                              env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
            try:
                for rep in range(args.reps):
                    for work in ("cycle", "scoring"):
                        for t in (counts if rep % 2 == 0 else counts[::-1]):  # interleaved, order alternating
                            s = run_once(work, t, tmp, dinov2)
                            times.setdefault((work, condition, t), []).append(s)
                            print(f"{work} {condition} threads={t}: {s:.2f} s", flush=True)
            finally:
                if competitor:
                    competitor.kill()
                    competitor.wait()
    text = report(times, counts, cores, args)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(times: dict, counts: list[int], cores: int, args) -> str:
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = ["# Torch CPU threads: server and worker defaults", "",
             f"`nice -n 10 python -m benchmarks.torch_threads --reps {args.reps}` on {cores} cores ({cpu}); "
             "medians of interleaved repetitions, each a fresh process. \"shared\": beside one process keeping a "
             "core busy (as Label Studio, a second worker or other jobs do on a small machine).", "",
             "| workload | CPU | " + " | ".join(f"{t} thread{'s' if t > 1 else ''} (s)" for t in counts)
             + f" | {counts[-1]} vs 1 |", "|---|---|" + "---|" * len(counts) + "---|"]
    names = {"cycle": "training cycle (peal-mini, LoRA, 100 labels + 1,000 pool)",
             "scoring": "pool scoring (DINOv2-small shape, 224 px, 64 images)"}
    for work in ("cycle", "scoring"):
        for condition in ("alone", "shared"):
            med = [statistics.median(times[(work, condition, t)]) for t in counts]
            lines.append(f"| {names[work]} | {condition} | " + " | ".join(f"{m:.2f}" for m in med)
                         + f" | {med[0] / med[-1]:.2f}x faster |" if len(med) > 1 else "|")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
