"""Pool scoring that reuses what does not change between cycles.

The blocks before a model's first adapted block are frozen, so their output for an image never
changes while the backbone stays the same:
- linear probe: the whole backbone is frozen; the cache holds each image's pooled features and a
  re-score only applies the head;
- LoRA on the last K blocks (PEAL_LORA_LAST_K): the cache holds the tokens entering block L-K and a
  re-score runs only K blocks.
Prompt tuning (prompts enter at block 0) and LoRA on every block have nothing frozen to reuse.

Entries are keyed by image content hash (sha256 of the fetched bytes) and stored as .npy shards,
read back through memory maps; a shard's .json list of hashes is written after its .npy, so a shard
without its list is incomplete and ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import torch

from .backbone import Classifier, resolve_backbone
from .config import Settings
from .training import Prediction, _autocast, _dtype, bf16_enabled


def cacheable(clf: Classifier) -> bool:
    return clf.adapter != "prompt" and clf.first_adapted > 0


def cache_key(settings: Settings, clf: Classifier, size: int) -> str:
    """What the cached activations depend on: backbone, input size, block index, pooling, precision."""
    ident = {"backbone": resolve_backbone(settings.backbone), "size": size, "block": clf.first_adapted,
             "layers": clf.n_layers, "features": settings.features, "bf16": bf16_enabled(settings)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class ActivationCache:
    """Per-image frozen activations on disk, keyed by content hash. Safe for several processes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[str, int]] = {}
        self._maps: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        for listing in self.root.glob("shard-*.json"):
            name = listing.stem
            if name in self._maps:
                continue
            with open(listing) as f:
                hashes = json.load(f)
            self._maps[name] = np.load(self.root / f"{name}.npy", mmap_mode="r")
            for row, h in enumerate(hashes):
                self._index.setdefault(h, (name, row))

    def missing(self, hashes: list[str]) -> list[int]:
        with self._lock:
            self._refresh()
            return [i for i, h in enumerate(hashes) if h not in self._index]

    def get(self, hashes: list[str]) -> np.ndarray:
        with self._lock:
            self._refresh()
            return np.stack([self._maps[s][r] for s, r in (self._index[h] for h in hashes)]).astype(np.float32)

    def put(self, hashes: list[str], values: np.ndarray) -> None:
        if not hashes:
            return
        # float16 halves the disk; activations beyond its range are kept in float32
        store = values.astype(np.float16) if np.abs(values).max() < 6e4 else values.astype(np.float32)
        name = f"shard-{uuid.uuid4().hex}"
        tmp = self.root / f".{name}.npy"
        np.save(tmp, store)
        os.replace(tmp, self.root / f"{name}.npy")
        tmp_list = self.root / f".{name}.json"
        with open(tmp_list, "w") as f:
            json.dump(list(hashes), f)
        os.replace(tmp_list, self.root / f"{name}.json")

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._index)


def frozen_activations(clf: Classifier, pixels: torch.Tensor, settings: Settings) -> np.ndarray:
    """What the cache stores for these images (see module doc)."""
    model = clf
    if bf16_enabled(settings) and _dtype(clf) == torch.float32:
        model = _bf16_frozen_twin(clf)
    dtype = _dtype(model)
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), settings.batch_size):
            h = model.embed(pixels[i:i + settings.batch_size].to(settings.device, dtype), until=clf.first_adapted)
            if clf.first_adapted == clf.n_layers:
                h = model.features_from(h, clf.n_layers)
            out.append(h.float().cpu().numpy())
    return np.concatenate(out)


def _bf16_frozen_twin(clf: Classifier) -> Classifier:
    import copy
    return copy.deepcopy(clf).to(torch.bfloat16)


def score_from_activations(clf: Classifier, acts: np.ndarray, settings: Settings, *, multilabel: bool = False) -> Prediction:
    """Finish the forward from cached activations: the adapted blocks (if any), pooling and the head."""
    clf.eval()
    feats, logits = [], []
    with torch.inference_mode(), _autocast(settings):
        for i in range(0, len(acts), settings.batch_size):
            h = torch.from_numpy(acts[i:i + settings.batch_size]).to(settings.device, _dtype(clf))
            f = h if clf.first_adapted == clf.n_layers else clf.features_from(h, clf.first_adapted)
            feats.append(f.float().cpu())
            logits.append(clf.head(f).float().cpu())
    lg = torch.cat(logits) if logits else torch.zeros(0, clf.head.out_features)
    probs = torch.sigmoid(lg) if multilabel else torch.softmax(lg, dim=1)
    emb = torch.cat(feats).numpy() if feats else np.zeros((0, clf.feature_dim), np.float32)
    return Prediction(probs.numpy(), lg.numpy(), emb)


def score_cached(clf: Classifier, settings: Settings, hashes: list[str], pixels, cache: ActivationCache, *,
                 multilabel: bool = False) -> Prediction:
    """Score images, computing frozen activations only for those not in the cache.

    `pixels` is a tensor of all images, or a callable giving the tensor for a list of positions (so
    cached images need not even be preprocessed)."""
    if not hashes:
        return score_from_activations(clf, np.zeros((0,), np.float32), settings, multilabel=multilabel)
    todo = cache.missing(hashes)
    if todo:
        px = pixels(todo) if callable(pixels) else pixels[todo]
        cache.put([hashes[i] for i in todo], frozen_activations(clf, px, settings))
    return score_from_activations(clf, cache.get(hashes), settings, multilabel=multilabel)
