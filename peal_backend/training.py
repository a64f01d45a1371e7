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


# --- the linear head: a logistic regression solved to convergence (pure) --------------------------------
ABSENT_CLASS_BIAS = -20.0  # logit of a class no label names yet: probability ~1e-9, never predicted


def fit_head(features: torch.Tensor, targets: torch.Tensor, n_classes: int, *, multilabel: bool = False,
             c: float = 1.0, calibration_weight: float = 0.0, max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (C, D) and bias (C,) of a linear head fitted to convergence on `features`.

    The recipe needs no per-project tuning: features are standardised with the labeled set's own mean
    and standard deviation (a constant feature keeps scale 1), then an L2-regularised logistic
    regression is solved with full-batch L-BFGS, with scikit-learn's objective
    0.5 ||W||^2 + c * sum(loss) (bias not penalised), so `c=1` reads like `LogisticRegression()`.
    The standardisation is folded back into the returned weights, which apply to raw features.
    Single choice: softmax over the classes that have labels; a class with none gets zero weights and
    ABSENT_CLASS_BIAS. Multiple choice: one binary logistic regression per class (sigmoid).
    `calibration_weight` adds C-PEAL's calibration loss (single choice) to the objective.
    """
    x = features.detach().to(torch.float64).cpu()
    n, d = x.shape
    if n == 0:
        raise ValueError("no labeled features to fit the head on")
    mu = x.mean(dim=0)
    sd = x.std(dim=0, unbiased=False)
    sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    z = (x - mu) / sd
    y = targets.detach().cpu()
    if multilabel:
        present = torch.arange(n_classes)
        y = y.to(torch.float64)
    else:
        present = torch.unique(y)
        remap = torch.full((n_classes,), -1, dtype=torch.long)
        remap[present] = torch.arange(len(present))
        y = remap[y.long()]
    k = len(present)
    w = torch.zeros(k, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    penalty = 1.0 / (c * n)  # sklearn's objective divided by c * n: mean loss + penalty/2 ||W||^2
    if k > 1 or multilabel:
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def objective():
            opt.zero_grad()
            logits = z @ w.T + b
            if multilabel:
                loss = F.binary_cross_entropy_with_logits(logits, y)
            else:
                loss = F.cross_entropy(logits, y)
                if calibration_weight:
                    loss = loss + calibration_weight * calibration_loss(logits, y)
            loss = loss + 0.5 * penalty * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(objective)
    weight = torch.zeros(n_classes, d, dtype=torch.float64)
    bias = torch.full((n_classes,), ABSENT_CLASS_BIAS, dtype=torch.float64)
    with torch.no_grad():
        raw_w = w / sd
        weight[present] = raw_w
        bias[present] = b - raw_w @ mu
    return weight.float(), bias.float()


def frozen_features(model: Classifier, pixels: torch.Tensor, batch_size: int,
                    prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The head's input features under the model as it is now (no gradient); finished from `prefix`
    (the tokens entering its first adapted block, `_frozen_prefix`) when given, so the frozen blocks
    do not run twice."""
    model.eval()
    with torch.inference_mode():
        if prefix is None:
            parts = [model.features(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
        else:
            parts = [model.features_from(prefix[i:i + batch_size], model.first_adapted)
                     for i in range(0, len(prefix), batch_size)]
    return torch.cat(parts).clone() if parts else torch.zeros(0, model.feature_dim)


def cycle_steps(settings: Settings, n: int, new_labels: int | None = None) -> int:
    """Optimiser steps of one fine-tuning cycle on `n` labels: `epochs` epochs and at least `min_steps`;
    for a warm-started cycle (`new_labels` given: labels the starting model has not trained on) that
    budget scaled by the share of new labels, at least `warm_min_steps` (and never more than the full one)."""
    bs = min(settings.batch_size, max(n, 1))
    full = max(settings.epochs * math.ceil(n / bs), settings.min_steps)
    if new_labels is None:
        return full
    return min(full, max(settings.warm_min_steps, math.ceil(full * min(new_labels, n) / max(n, 1))))


def fit(model: Classifier, pixels: torch.Tensor, targets: torch.Tensor, settings: Settings, *,
        multilabel: bool = False, progress: Callable[[int, int, float], None] | None = None,
        features: torch.Tensor | None = None, new_labels: int | None = None,
        prefix: torch.Tensor | None = None) -> dict:
    """Train the classifier on the labeled set: linear probe, then fine-tune (LP-FT). Deterministic.

    1. The head is fitted to convergence on the current features (`fit_head`; `features` may be given
       when the caller already has them, e.g. from the activation cache). For the linear adapter that
       is the whole training.
    2. LoRA and prompt tuning then fine-tune adapter and head together from that fitted head: SGD with
       momentum and a cosine schedule as in the C-PEAL reference, `epochs` epochs and at least
       `min_steps` steps, the head at `head_lr_multiplier` times the adapter's rate. A warm-started model
       (`new_labels`: how many labels it has not seen) gets a budget scaled to them (`cycle_steps`).
    `targets`: class ids (N,) for single choice, a multi-hot (N, C) float tensor for multiple choice.
    `prefix`: the labeled images' tokens entering the first adapted block, when the caller has them (the
    activation cache): the frozen blocks then do not run on the labeled set at all.
    """
    started = time.perf_counter()
    device = settings.device
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    pixels, targets = pixels.to(device), targets.to(device)
    n = len(features) if features is not None else len(prefix) if prefix is not None else len(pixels)
    if n == 0:
        raise ValueError("no labeled images to train on")
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    adapter_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    model.eval()
    # the frozen blocks' output, computed once: it feeds the head fit and every fine-tuning step
    if not adapter_params or model.adapter == "prompt":
        prefix = None
    elif prefix is None:
        prefix = _frozen_prefix(model, pixels, settings.inference_batch_size)
    else:
        prefix = prefix.to(device, _dtype(model))
    if features is None:
        features = frozen_features(model, pixels, settings.inference_batch_size, prefix)
    solve_head(model, features, targets, settings, multilabel=multilabel)
    head_seconds = time.perf_counter() - started
    if not adapter_params:  # linear probe: the fitted head is the model
        model.eval()
        return {"steps": 0, "n_labeled": n, "final_loss": _head_loss(model, features, targets, multilabel),
                "head_seconds": round(head_seconds, 3), "train_seconds": round(time.perf_counter() - started, 3)}

    groups = [{"params": head_params, "lr": settings.learning_rate * settings.head_lr_multiplier},
              {"params": adapter_params, "lr": settings.learning_rate}]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4)
    bs = min(settings.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = cycle_steps(settings, n, new_labels)
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
            "head_seconds": round(head_seconds, 3), "train_seconds": round(time.perf_counter() - started, 3)}


def solve_head(model: Classifier, features: torch.Tensor, targets: torch.Tensor, settings: Settings, *,
               multilabel: bool = False) -> None:
    """Set `model`'s head to the logistic regression solved on `features` (`fit_head`, with C-PEAL's
    calibration term when it is on): LP-FT's first step, and all of a head refresh."""
    calibration = settings.calibration_weight if settings.calibration and not multilabel else 0.0
    weight, bias = fit_head(features, targets, model.head.out_features, multilabel=multilabel,
                            c=settings.head_c, calibration_weight=calibration)
    with torch.no_grad():
        model.head.weight.copy_(weight.to(model.head.weight.device, model.head.weight.dtype))
        model.head.bias.copy_(bias.to(model.head.bias.device, model.head.bias.dtype))


def refresh_head(model: Classifier, features: torch.Tensor, targets: torch.Tensor, settings: Settings, *,
                 multilabel: bool = False) -> dict:
    """A head refresh: the adapter stays as it is, the head is solved again on `features` (the labeled
    images' features under this adapter, stored with the version that trained it)."""
    started = time.perf_counter()
    solve_head(model, features, targets, settings, multilabel=multilabel)
    model.eval()
    return {"steps": 0, "n_labeled": len(features), "final_loss": _head_loss(model, features, targets, multilabel),
            "head_seconds": round(time.perf_counter() - started, 3), "train_seconds": round(time.perf_counter() - started, 3)}


def head_outputs(model: Classifier, features: np.ndarray, *, multilabel: bool = False) -> Prediction:
    """The head applied to features already computed (a head refresh scores the pool from stored rows)."""
    with torch.inference_mode():
        feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        logits = model.head(feats.to(model.head.weight.device, model.head.weight.dtype)).float().cpu()
    return Prediction.from_logits(logits, feats.numpy(), multilabel=multilabel)


def _head_loss(model: Classifier, features: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> float:
    with torch.inference_mode():
        logits = model.head(features.to(model.head.weight.device, model.head.weight.dtype))
        if multilabel:
            return float(F.binary_cross_entropy_with_logits(logits, targets.float()))
        return float(F.cross_entropy(logits, targets))


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# --- inference --------------------------------------------------------------------------------------
def probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """The head's probabilities: a sigmoid per class (multiple choice) or a softmax over the classes."""
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


@dataclass
class Prediction:
    probs: np.ndarray       # (N, C) softmax (single choice) or sigmoid (multiple choice)
    logits: np.ndarray      # (N, C)
    embeddings: np.ndarray  # (N, D) the head's input features (float32)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, embeddings: np.ndarray, *, multilabel: bool = False) -> "Prediction":
        return cls(probabilities(logits, multilabel).numpy(), logits.numpy(), embeddings)

    @classmethod
    def concat(cls, parts: list["Prediction"]) -> "Prediction":
        """Chunks of one scoring, in order, as one Prediction (at least one part)."""
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("probs", "logits", "embeddings")))


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
    return Prediction.from_logits(torch.cat(logits), torch.cat(feats).numpy(), multilabel=multilabel)
