"""Backbones shipped inside the package, plus the preprocessing they were trained and probed with.

`peal-mini` (folder `peal-mini/` beside this file) is a small DINOv2-architecture model pretrained
by `scripts/pretrain_peal_mini.py` with DINO/iBOT self-distillation on an offline corpus.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

BACKBONES_DIR = Path(__file__).resolve().parent
PEAL_MINI_DIR = BACKBONES_DIR / "peal-mini"


def to_pixel_values(images: np.ndarray, size: int):
    """uint8 images (N,H,W) or (N,H,W,3) -> float tensor (N,3,size,size), preprocessed exactly as the
    backend preprocesses fetched images (peal_backend.images.preprocess)."""
    from ..images import preprocess, to_pil

    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3):
        raise ValueError(f"images must have shape (N,H,W) or (N,H,W,3), got {arr.shape}")
    return preprocess([to_pil(a) for a in arr], size)


def image_stats(x: "torch.Tensor") -> "torch.Tensor":
    """(n, 3, H, W) -> (n, 9): per channel, the mean and std over the image and the mean over its central
    half (where a fundus or a chest sits). Fundus grading lives largely in these numbers: a logistic
    regression on them beats one on all RetinaMNIST pixels at 20, 50 and 200 labels
    (`scripts/transfer_probe.py --stats`). The targets of the pretraining's --stats-weight."""
    import torch

    h, w = x.shape[-2:]
    centre = x[..., h // 4: h - h // 4, w // 4: w - w // 4]
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), centre.mean(dim=(2, 3))], dim=1)


def cls_mean_features(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Frozen features: CLS token concatenated with the mean patch token (final layer norm applied)."""
    import torch

    size = int(model.config.image_size)
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_pixel_values(images[start:start + batch_size], size)
            h = model(pixel_values=x).last_hidden_state
            out.append(torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1).numpy())
    return np.concatenate(out, axis=0)
