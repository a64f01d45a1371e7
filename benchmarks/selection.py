"""Selection time: Featdist and coreset on pools of embeddings, against plain numpy, in the same run.

    python benchmarks/selection.py --sizes 10000,100000,1000000

For each pool size: synthetic embeddings (a Gaussian mixture, width 384), probabilities correlated
with the mixture component, `--labeled` labeled items; then `select("featdist"|"coreset", pool, budget)`
from peal_backend.acquisition against a straightforward numpy version of the same algorithm.
Reports seconds, peak memory above the process's resident size before the call (RSS high-water mark,
which sees faiss's allocations too) and the peak of Python-traced allocations (tracemalloc: numpy
arrays), and the speedup. A numpy baseline whose estimated peak exceeds `--numpy-limit-gb` is skipped,
and the output says so. With `--rank-size`, also times `rank()` (the whole queue) for every strategy.
This is a benchmark, not a test: figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peal_backend.acquisition import RANK_HEAD, STRATEGIES, Pool, rank, select  # noqa: E402


def _malloc_returns_memory():
    """Make glibc give freed blocks of 64 KiB and more back to the OS at once, so that the RSS
    high-water mark of one call is not hidden by memory a previous call freed but kept."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD; setting it also stops glibc's dynamic raise
        return libc
    except OSError:
        return None


_LIBC = _malloc_returns_memory()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(fn, repeats: int):
    """Best wall time of `repeats` calls, peak RSS above the start (MB), peak traced allocations (MB)."""
    best, rss_peak, traced_peak, out = float("inf"), 0.0, 0.0, None
    for _ in range(repeats):
        out = None
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass
        start_rss = _rss_kb("VmRSS")
        tracemalloc.start()
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        best = min(best, elapsed)
        rss_peak = max(rss_peak, (_rss_kb("VmHWM") - start_rss) / 1024)
        traced_peak = max(traced_peak, traced / 2**20)
    return best, rss_peak, traced_peak, out


# --- plain numpy versions of the same algorithms: what one writes without thinking about memory ----------

def featdist_numpy(emb, probs, labeled, labels, n):
    pred = probs.argmax(axis=1)
    unl = np.setdiff1d(np.arange(emb.shape[0]), labeled)
    fallback = emb[labeled].mean(axis=0)
    means = np.stack([emb[labeled[labels == c]].mean(axis=0) if (labels == c).any() else fallback
                      for c in range(probs.shape[1])])
    known = np.isin(pred[unl], labels)
    dist = np.linalg.norm(emb[unl] - means[pred[unl]], axis=1)
    priority = dist + (dist.max() + 1) * ~known
    return unl[np.argsort(-priority, kind="stable")][:n]


def featdist_numpy_bytes(n_unlabeled, dim):
    # gathered rows and gathered means, then their difference and its square: two (U, D) float32
    # arrays alive at once (numpy reuses temporaries); 295 MB measured at 100k
    return 2 * n_unlabeled * dim * 4


def coreset_numpy(emb, labeled, n):
    unl = np.setdiff1d(np.arange(emb.shape[0]), labeled)
    xu = emb[unl]
    mind = np.full(unl.size, np.inf, dtype=np.float32)
    for c in emb[labeled]:
        mind = np.minimum(mind, ((xu - c) ** 2).sum(axis=1))
    picks = []
    for _ in range(n):
        i = int(np.argmax(mind))
        picks.append(unl[i])
        mind = np.minimum(mind, ((xu - xu[i]) ** 2).sum(axis=1))
        mind[i] = -np.inf
    return np.asarray(picks)


def coreset_numpy_bytes(n_unlabeled, dim):
    return 2 * n_unlabeled * dim * 4  # the gathered pool, and its difference to a center (squared in place)


# --- data --------------------------------------------------------------------------------------------------

def make_pool(size, dim, n_classes, n_labeled, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32) * 2.0
    y = rng.integers(0, n_classes, size)
    emb = rng.standard_normal((size, dim), dtype=np.float32)
    for s in range(0, size, 65536):
        emb[s:s + 65536] += centres[y[s:s + 65536]]
    logits = 3.0 * np.eye(n_classes)[y] + rng.standard_normal((size, n_classes)) * 1.5
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labeled = rng.choice(size, n_labeled, replace=False)
    head = centres / dim  # a linear head for DropQuery: the class centres, scaled to logits of a few units
    return Pool(probs, emb, logits.astype(np.float32), labeled, y[labeled], head_weight=head)


# --- the run -------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated pool sizes")
    ap.add_argument("--dim", type=int, default=384, help="embedding width")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--labeled", type=int, default=100, help="labeled items in the pool")
    ap.add_argument("--budget", type=int, default=100, help="n, the items each strategy selects")
    ap.add_argument("--numpy-limit-gb", type=float, default=4.0, help="skip numpy baselines needing more")
    ap.add_argument("--rank-size", type=int, default=100000, help="time rank() for every strategy at this size (0: skip)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategies for the rank() table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    strategies = [s for s in args.strategies.split(",") if s.strip()]

    print(f"# selection benchmark: dim={args.dim} classes={args.classes} labeled={args.labeled} "
          f"budget={args.budget}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; numpy {np.__version__}, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads)")
    print("| pool size | method | seconds | peak RSS MB | peak traced MB | speedup vs numpy | picks equal numpy |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    notes = []
    limit = args.numpy_limit_gb * 2**30
    for size in sizes:
        pool = make_pool(size, args.dim, args.classes, args.labeled, args.seed)
        repeats = 3 if size <= 10_000 else 1
        unl = pool.unlabeled.size
        for name, ours, baseline, need in (
            ("featdist",
             lambda: select("featdist", pool, args.budget),
             lambda: featdist_numpy(pool.embeddings, pool.probs, pool.labeled, pool.labels, args.budget),
             featdist_numpy_bytes(unl, args.dim)),
            ("coreset",
             lambda: select("coreset", pool, args.budget),
             lambda: coreset_numpy(pool.embeddings, pool.labeled, args.budget),
             coreset_numpy_bytes(unl, args.dim)),
        ):
            t, rss, traced, picks = measure(ours, repeats)
            if need > limit:
                notes.append(f"numpy {name} at {size:,} skipped: it would need about {need / 2**30:.1f} GB "
                             f"(> {args.numpy_limit_gb:g} GB)")
                print(f"| {size:,} | {name} (peal_backend, faiss) | {t:.3f} | {rss:.0f} | {traced:.0f} | "
                      f"numpy skipped | - |", flush=True)
                continue
            tn, rssn, tracedn, picks_n = measure(baseline, repeats)
            same = np.mean(np.isin(picks, picks_n))
            print(f"| {size:,} | {name} (peal_backend, faiss) | {t:.3f} | {rss:.0f} | {traced:.0f} | "
                  f"{tn / t:.1f}x | {same:.0%} |", flush=True)
            print(f"| {size:,} | {name} (plain numpy) | {tn:.3f} | {rssn:.0f} | {tracedn:.0f} | 1.0x | |", flush=True)
        if size == args.rank_size:
            rank_rows = [(s, measure(lambda: rank(s, pool), 1)) for s in strategies]
        del pool
    for note in notes:
        print(f"- {note}")

    if args.rank_size:
        if args.rank_size not in sizes:
            pool = make_pool(args.rank_size, args.dim, args.classes, args.labeled, args.seed)
            rank_rows = [(s, measure(lambda: rank(s, pool), 1)) for s in strategies]
        print(f"\n`rank()` (the whole queue) on {args.rank_size:,} items; batch strategies order their first "
              f"{RANK_HEAD} picks, entropy the rest")
        print("| strategy | seconds | peak RSS MB | peak traced MB |")
        print("|---|---:|---:|---:|")
        for s, (t, rss, traced, _) in rank_rows:
            print(f"| {s} | {t:.3f} | {rss:.0f} | {traced:.0f} |")


if __name__ == "__main__":
    main()
