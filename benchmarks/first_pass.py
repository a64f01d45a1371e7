"""First-pass scoring: the frozen backbone over every pool image, per runtime, side by side in one run.

    python -m benchmarks.first_pass [--images 16] [--agree-images 256] [--reps 2] [--threads 1,2]
                                    [--out benchmarks/results/first_pass.md]

The first pass is `scoring.frozen_activations` (what fills the activation cache, and what `sharding`
runs): for the linear probe, the whole frozen DINOv2 and pooling. Measured on a DINOv2-small-shaped
model (random init: no pretrained weights here) at 224 px, on RetinaMNIST images upsampled as the
backend does. Options:
- backend paths, timed through `frozen_activations` with the setting shown: torch fp32
  (PEAL_PRECISION=fp32), torch bf16 (PEAL_PRECISION=bf16: a bf16 copy of the model, today's bf16 path),
  ONNX Runtime fp32 (PEAL_RUNTIME=onnxruntime);
- candidates, timed with their own few lines here: torch bf16 autocast on the fp32 model, eager instead
  of SDPA attention, torch dynamic int8 (`quantize_dynamic` on nn.Linear), ONNX Runtime dynamic int8
  (its `quantize_dynamic` on the exported graph), OpenVINO fp32 and bf16 (if `openvino` is installed;
  bf16 only where the CPU has it), torch.compile (--compile).
Repetitions are interleaved (every option once per round, thread counts alternating), best time per
option; each option is called once before timing (ONNX Runtime's first call exports the graph: that
one-time cost is printed separately).

Agreement: a linear head (`training.fit_head`) is fitted on fp32 torch features of labeled RetinaMNIST
train images; top-1 of that head on each option's features of --agree-images test images is compared
with fp32 torch, with the largest absolute feature difference. The bf16 options are too slow on a CPU
without bf16 hardware to check on hundreds of images; they are checked on --bf16-agree-images. The same
check runs on peal-mini (trained weights, 28 px) for ONNX Runtime and the int8 options.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from peal_backend import runtime
from peal_backend.backbone import build_classifier
from peal_backend.config import Settings
from peal_backend.images import preprocess, to_pil
from peal_backend.scoring import frozen_activations
from peal_backend.training import fit_head

from .pool_scoring import DATASETS, dinov2_small

BASELINE = "torch bf16 (PEAL_PRECISION=bf16, today's bf16 path)"
FP32 = "torch fp32 (PEAL_PRECISION=fp32)"
ORT = "ONNX Runtime fp32 (PEAL_RUNTIME=onnxruntime)"


def backend(settings: Settings, **changes):
    """The backend's first pass with these settings; ONNX Runtime's threads follow the round's thread count
    (PEAL_INFERENCE_THREADS), as torch's do."""
    s = settings.replace(**changes)
    return lambda clf, px: frozen_activations(clf, px, s.replace(inference_threads=torch.get_num_threads()))


def autocast_bf16(settings: Settings):
    def run(clf, px):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.cat([clf.features(px[i:i + settings.inference_batch_size])
                              for i in range(0, len(px), settings.inference_batch_size)]).float().numpy()
    return run


def eager(settings: Settings):
    models = {}

    def run(clf, px):
        if id(clf) not in models:
            models[id(clf)] = copy.deepcopy(clf)
            models[id(clf)].backbone.config._attn_implementation = "eager"
        with torch.inference_mode():
            m = models[id(clf)]
            return torch.cat([m.features(px[i:i + settings.inference_batch_size])
                              for i in range(0, len(px), settings.inference_batch_size)]).numpy()
    return run


def torch_int8(settings: Settings):
    models = {}

    def run(clf, px):
        if id(clf) not in models:
            models[id(clf)] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(clf), {torch.nn.Linear}, dtype=torch.qint8)
        with torch.inference_mode():
            m = models[id(clf)]
            return torch.cat([m.features(px[i:i + settings.inference_batch_size])
                              for i in range(0, len(px), settings.inference_batch_size)]).numpy()
    return run


def onnxruntime_int8(settings: Settings):
    """ONNX Runtime's dynamic int8 quantisation of the exported frozen blocks' MatMuls (weights int8,
    activations quantised per batch at run time)."""
    sessions = {}

    def run(clf, px):
        key = (id(clf), torch.get_num_threads())
        if key not in sessions:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            with tempfile.TemporaryDirectory() as tmp:
                src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
                src.write_bytes(runtime.export_onnx(clf, int(px.shape[-1])))
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
                sessions[key] = runtime.make_session(dst.read_bytes(), torch.get_num_threads())
        return runtime.run(sessions[key], px, settings.inference_batch_size)
    return run


def compiled(settings: Settings):
    models = {}

    def run(clf, px):
        if id(clf) not in models:
            models[id(clf)] = torch.compile(copy.deepcopy(clf).features)
        with torch.inference_mode():
            return torch.cat([models[id(clf)](px[i:i + settings.inference_batch_size])
                              for i in range(0, len(px), settings.inference_batch_size)]).numpy()
    return run


def openvino(settings: Settings, hint: str):
    import openvino as ov
    compiled_models = {}

    def run(clf, px):
        key = (id(clf), torch.get_num_threads())
        if key not in compiled_models:
            m = ov.convert_model(runtime._FrozenPrefix(copy.deepcopy(clf)).eval(), example_input=px[:2])
            compiled_models[key] = ov.Core().compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                                       "INFERENCE_PRECISION_HINT": hint})
        c = compiled_models[key]
        return np.concatenate([c(px[i:i + settings.inference_batch_size].numpy())[0]
                               for i in range(0, len(px), settings.inference_batch_size)])
    return run


def options(settings: Settings, args) -> dict:
    out = {FP32: backend(settings, runtime="torch", precision="fp32"),
           BASELINE: backend(settings, runtime="torch", precision="bf16"),
           "torch bf16 autocast (fp32 weights)": autocast_bf16(settings),
           "torch fp32, eager attention": eager(settings),
           "torch int8 dynamic (quantize_dynamic)": torch_int8(settings),
           ORT: backend(settings, runtime="onnxruntime"),
           "ONNX Runtime int8 dynamic (quantize_dynamic)": onnxruntime_int8(settings)}
    try:
        import openvino as ov
        out["OpenVINO fp32"] = openvino(settings, "f32")
        if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            out["OpenVINO bf16"] = openvino(settings, "bf16")
        else:
            print("OpenVINO bf16: not run, this CPU has no bf16 (OpenVINO's capabilities: "
                  f"{ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')})")
    except ImportError:
        print("OpenVINO: not installed, not run")
    if args.compile:
        out["torch.compile fp32"] = compiled(settings)
    return out


def images(name: str, split: str, n: int, size: int):
    with np.load(DATASETS / f"{name}.npz") as d:
        arrays, labels = d[f"{split}_images"][:n], d[f"{split}_labels"][:n, 0]
    return preprocess([to_pil(a) for a in arrays], size), torch.tensor(labels.astype(np.int64))


def agreement(clf, fns: dict, names: list, train, test, n_classes: int, bf16_n: int) -> dict:
    """name -> (top-1 agreement with fp32 torch, images compared, max abs feature difference)."""
    (tr_px, tr_y), (te_px, _) = train, test
    ref_fn = fns[FP32]
    w, b = fit_head(torch.from_numpy(ref_fn(clf, tr_px)), tr_y, n_classes)
    ref = torch.from_numpy(ref_fn(clf, te_px))
    out = {}
    for name in names:
        n = bf16_n if "bf16" in name else len(te_px)
        f = torch.from_numpy(np.asarray(fns[name](clf, te_px[:n]), dtype=np.float32))
        top = (f @ w.T + b).argmax(1) == (ref[:n] @ w.T + b).argmax(1)
        out[name] = (float(top.float().mean()), n, float((f - ref[:n]).abs().max()))
        print(f"  agreement {name}: {out[name][0] * 100:.1f}% of {n}, max |diff| {out[name][2]:.2e}", flush=True)
    return out


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        cpu, flags = "unknown CPU", []
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{cpu}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none of the AVX-512/AMX ones'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="images timed per option")
    ap.add_argument("--batch", type=int, default=16, help="PEAL_INFERENCE_BATCH_SIZE of every option")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--agree-images", type=int, default=256)
    ap.add_argument("--train-images", type=int, default=128)
    ap.add_argument("--bf16-agree-images", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile on a small CPU)")
    ap.add_argument("--only", default="", help="comma-separated parts of option names to run (default: all), "
                    "e.g. 'bf16 (PEAL,ONNX Runtime fp32'")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    load_before = os.getloadavg()
    started = time.time()
    px, _ = images("retinamnist", "train", args.images, 224)

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(backbone=dinov2_small(tmp, "sdpa"), adapter="linear", inference_batch_size=args.batch)
        clf = build_classifier(settings, 5).eval()
        fns = options(settings, args)
        if args.only:  # the reference (fp32) always runs: agreement is measured against it
            fns = {k: v for k, v in fns.items() if k == FP32 or any(w.lower() in k.lower() for w in args.only.split(","))}
        names = list(fns)
        first, times = {}, {}
        for t in threads:  # first calls: exports, quantisation, compilation
            torch.set_num_threads(t)
            for name in names:
                a = time.perf_counter()
                fns[name](clf, px[:2])
                first[(name, t)] = time.perf_counter() - a
        for rep in range(args.reps):
            for t in (threads if rep % 2 == 0 else threads[::-1]):
                torch.set_num_threads(t)
                for name in names:
                    a = time.perf_counter()
                    fns[name](clf, px)
                    s = time.perf_counter() - a
                    times[(name, t)] = min(times.get((name, t), float("inf")), s)
                    print(f"round {rep} threads {t} {name}: {len(px) / s:.2f} images/s", flush=True)
        print(report(args, threads, names, times, first, {}, {}, len(px), load_before, os.getloadavg(),
                     time.time() - started), flush=True)  # the timings, before the (slow) agreement checks
        torch.set_num_threads(max(threads))
        print("agreement, DINOv2-small shape (random init), 224 px:", flush=True)
        agree = agreement(clf, fns, [n for n in names if n != FP32],
                          images("retinamnist", "train", args.train_images, 224),
                          images("retinamnist", "test", args.agree_images, 224), 5, args.bf16_agree_images)
    mini = Settings(backbone="peal-mini", adapter="linear", inference_batch_size=args.batch)
    mini_clf = build_classifier(mini, 5).eval()
    mini_fns = {FP32: backend(mini, runtime="torch", precision="fp32"), ORT: backend(mini, runtime="onnxruntime"),
                "torch int8 dynamic (quantize_dynamic)": torch_int8(mini),
                "ONNX Runtime int8 dynamic (quantize_dynamic)": onnxruntime_int8(mini)}
    print("agreement, peal-mini (trained weights), 28 px:", flush=True)
    mini_agree = agreement(mini_clf, mini_fns, list(mini_fns)[1:], images("retinamnist", "train", 1000, 28),
                           images("retinamnist", "test", 400, 28), 5, 0)
    text = report(args, threads, names, times, first, agree, mini_agree, len(px), load_before, os.getloadavg(),
                  time.time() - started)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(args, threads, names, times, first, agree, mini_agree, n, load_before, load_after, seconds) -> str:
    cmd = "python -m benchmarks.first_pass" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("images", args.images), ("batch", args.batch), ("reps", args.reps),
                                                      ("threads", args.threads), ("agree_images", args.agree_images)))
    cmd += " --compile" if args.compile else ""
    cmd += f" --only '{args.only}'" if args.only else ""
    lines = ["# First-pass scoring: runtimes side by side", "",
             f"Command: `{cmd} --out benchmarks/results/first_pass.md` ({seconds / 60:.0f} min)", "",
             f"Machine: {machine()}. Shared with other work: load average {load_before[0]:.1f} "
             f"(1 min) at the start, {load_after[0]:.1f} at the end, so absolute figures are noisy; the ratios "
             "are from the same run, repetitions interleaved, best of "
             f"{args.reps}. DINOv2-small shape (random init), 224 px, {n} RetinaMNIST images, batch {args.batch}, "
             "the linear probe's first pass (whole frozen backbone and pooling, `scoring.frozen_activations`).", "",
             "| option | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}: images/s | vs bf16 | vs fp32" for t in threads)
             + " | first call (s) | top-1 agreement with fp32 | max abs feature diff |",
             "|---|" + "---|---|---|" * len(threads) + "---|---|---|"]
    for name in names:
        row = [name]
        for t in threads:
            ips = n / times[(name, t)]
            row += [f"{ips:.2f}", f"{times[(BASELINE, t)] / times[(name, t)]:.2f}x",
                    f"{times[(FP32, t)] / times[(name, t)]:.2f}x"]
        row.append(f"{first[(name, threads[0])]:.1f}")
        if name in agree:
            a, k, d = agree[name]
            row += [f"{a * 100:.1f}% of {k}", f"{d:.2e}"]
        elif name == FP32:
            row += ["(reference)", "0"]
        else:
            row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    top = max(threads)
    if ORT in names and min(threads) == 1 and top > 1:
        lines += ["", f"Defaults before and now: the first pass ran in torch on 1 thread (PEAL_RUNTIME=torch, "
                  f"PEAL_TORCH_THREADS=1); now `auto` runs it in ONNX Runtime on every core ({top} here). Now vs then: "
                  f"**{times[(FP32, 1)] / times[(ORT, top)]:.2f}x** torch fp32 on 1 thread, "
                  f"**{times[(BASELINE, 1)] / times[(ORT, top)]:.2f}x** the bf16 path on 1 thread."]
    if not mini_agree:
        return "\n".join(lines) + "\n"
    lines += ["", "Same check on peal-mini (trained weights, 28 px; head fitted on 1,000 RetinaMNIST train images):", "",
              "| option | top-1 agreement with fp32 | max abs feature diff |", "|---|---|---|"]
    for name, (a, k, d) in mini_agree.items():
        lines.append(f"| {name} | {a * 100:.1f}% of {k} | {d:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
