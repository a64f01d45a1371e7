"""One training cycle and batched inference, shared by the backend and the simulator.

Losses are pure functions; `fit` and `predict` take a `Classifier` and pixel tensors.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import Classifier
from .config import Settings


def configure_torch(settings: Settings) -> None:
    """Process-wide torch settings; called once by the server and the worker at start."""
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)


# --- losses (pure) -------------------------------------------------------------------------------
def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row, in nats; stable for extreme logits."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def calibration_loss(logits: torch.Tensor, targets: torch.Tensor, *, normalize: bool = False,
                     cap: float = 5.0, eps: float = 1e-6) -> torch.Tensor:
    """C-PEAL's uncertainty-calibration loss.

    u = entropy of each prediction (divided by log C if `normalize`, so tanh does not saturate with
    many classes). Wrong predictions pay -log(tanh(u)), pushing their uncertainty up; correct ones
    pay -log(1 - tanh(u)), pushing it down. The two group means are summed, capped, and a NaN
    becomes 0 so that one bad batch cannot poison training.
    """
    u = prediction_entropy(logits)
    if normalize and logits.shape[1] > 1:
        u = u / math.log(logits.shape[1])
    wrong = logits.argmax(dim=1) != targets
    loss = logits.new_zeros(())
    if wrong.any():
        loss = loss + (-torch.log(torch.tanh(u[wrong]) + eps)).mean()
    if (~wrong).any():
        loss = loss + (-torch.log(1 - torch.tanh(u[~wrong]) + eps)).mean()
    loss = torch.clamp(loss, max=cap)
    return torch.nan_to_num(loss, nan=0.0)


def calibration_ramp(step: int, total_steps: int) -> float:
    """Weight factor for the calibration term: 0 -> 1 over the first third of training."""
    warm = max(1, total_steps // 3)
    return min(1.0, step / warm)


# --- training ---------------------------------------------------------------------------------------
def _autocast(settings: Settings):
    if bf16_enabled(settings):
        return torch.autocast(device_type=torch.device(settings.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_enabled(settings: Settings) -> bool:
    if settings.precision == "bf16":
        return True
    if settings.precision == "auto":
        if torch.device(settings.device).type == "cuda":
            return torch.cuda.is_bf16_supported()
        return "AMX" in torch.backends.cpu.get_cpu_capability() or _cpu_has_bf16()
    return False


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _frozen_prefix(model: Classifier, pixels: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    """Activations entering the first adapted block, computed once: the blocks before it are frozen.

    Not possible for prompt tuning, where the trainable prompts enter at the very first block.
    """
    if model.adapter == "prompt":
        return None
    with torch.inference_mode():
        parts = [model.embed(pixels[i:i + batch_size], until=model.first_adapted)
                 for i in range(0, len(pixels), batch_size)]
    return torch.cat(parts).clone()  # clone: inference tensors cannot enter autograd


def fit(model: Classifier, pixels: torch.Tensor, targets: torch.Tensor, settings: Settings, *,
        multilabel: bool = False, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train adapter + head on the labeled set. Deterministic for `settings.seed`.

    `targets`: class ids (N,) for single choice, a multi-hot (N, C) float tensor for multiple choice.
    SGD with momentum and a cosine schedule as in the C-PEAL reference; the head, which starts from
    nothing every cycle, learns `head_lr_multiplier` times faster than the adapter.
    """
    started = time.perf_counter()
    device = settings.device
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    pixels, targets = pixels.to(device), targets.to(device)
    n = len(pixels)
    if n == 0:
        raise ValueError("no labeled images to train on")
    prefix = _frozen_prefix(model, pixels, settings.inference_batch_size)

    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head_params, "lr": settings.learning_rate * settings.head_lr_multiplier}]
    if adapter_params:
        groups.append({"params": adapter_params, "lr": settings.learning_rate})
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4)
    bs = min(settings.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = max(settings.epochs * steps_per_epoch, settings.min_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)

    model.train()
    step, losses = 0, []
    while step < total:
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, bs):
            if step >= total:
                break
            idx = order[start:start + bs]
            if prefix is not None:
                logits = model.head(model.features_from(prefix[idx], model.first_adapted))
            else:
                logits = model(pixels[idx])
            y = targets[idx]
            if multilabel:
                loss = F.binary_cross_entropy_with_logits(logits, y.float())
            else:
                loss = F.cross_entropy(logits, y)
                if settings.calibration:
                    weight = settings.calibration_weight * calibration_ramp(step, total)
                    loss = loss + weight * calibration_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(step, total, losses[-1])
    model.eval()
    return {"steps": total, "n_labeled": n, "final_loss": float(np.mean(losses[-steps_per_epoch:])),
            "train_seconds": round(time.perf_counter() - started, 3)}


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# --- inference --------------------------------------------------------------------------------------
@dataclass
class Prediction:
    probs: np.ndarray       # (N, C) softmax (single choice) or sigmoid (multiple choice)
    logits: np.ndarray      # (N, C)
    embeddings: np.ndarray  # (N, D) the head's input features (float32)


def predict(model: Classifier, pixels: torch.Tensor, settings: Settings, *, multilabel: bool = False) -> Prediction:
    """Batched, gradient-free scoring.

    With bf16 enabled, a model already in bf16 (as the server loads it) runs as is; an fp32 model
    scores a large batch through a bf16 copy (whole-bf16 weights ran about 1.5x faster than autocast
    on this CPU) and a small one under autocast.
    """
    model.eval()
    bs = settings.inference_batch_size
    if bf16_enabled(settings) and _dtype(model) == torch.float32 and len(pixels) > bs:
        model = copy.deepcopy(model).to(torch.bfloat16)
    dtype = _dtype(model)
    context = _autocast(settings) if dtype == torch.float32 else contextlib.nullcontext()
    feats, logits = [], []
    with torch.inference_mode(), context:
        for i in range(0, len(pixels), bs):
            f = model.features(pixels[i:i + bs].to(settings.device, dtype))
            feats.append(f.float().cpu())
            logits.append(model.head(f).float().cpu())
    if not feats:
        c = model.head.out_features
        return Prediction(np.zeros((0, c), np.float32), np.zeros((0, c), np.float32),
                          np.zeros((0, model.feature_dim), np.float32))
    lg = torch.cat(logits)
    probs = torch.sigmoid(lg) if multilabel else torch.softmax(lg, dim=1)
    return Prediction(probs.numpy(), lg.numpy(), torch.cat(feats).numpy())
