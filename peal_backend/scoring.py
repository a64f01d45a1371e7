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
without its list is incomplete and ignored. Every /predict of new images adds a small shard, so once
a folder holds more than COMPACT_AT shards they are merged into one (under a file lock; readers that
still map an old shard keep reading it, and a reader that finds one gone re-indexes).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .backbone import Classifier, loaded_fingerprint
from .config import Settings
from .training import Prediction, _autocast, _dtype, bf16_enabled


log = logging.getLogger(__name__)

FILL_CHUNK = 1024  # images preprocessed and pushed through the frozen blocks at once
COMPACT_AT = 64  # shards in one cache folder before they are merged
CACHE_FORMAT = 2  # bump when what an entry holds changes: old folders are then never read
FINISH_CHUNK = 1024  # cached entries read back and finished at once (bounds a re-score's memory)


def cacheable(clf: Classifier) -> bool:
    return clf.adapter != "prompt" and clf.first_adapted > 0


def cache_key(settings: Settings, clf: Classifier, size: int) -> str:
    """What the cached activations depend on: the weights this process loaded, input size, block index,
    pooling, precision, and the entry format."""
    ident = {"format": CACHE_FORMAT, "backbone": loaded_fingerprint(settings.backbone), "size": size,
             "block": clf.first_adapted, "layers": clf.n_layers, "features": settings.features, "bf16": bf16_enabled(settings)}
    if (rt := runtime.resolve(settings)) != "torch":  # torch's keys stay as they were, so its caches stay valid
        ident["runtime"] = rt
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class ActivationCache:
    """Per-image frozen activations on disk, keyed by content hash. Safe for several processes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[str, int]] = {}
        self._maps: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    _open: dict[str, "ActivationCache"] = {}
    _open_lock = threading.Lock()

    @classmethod
    def shared(cls, root: str | os.PathLike) -> "ActivationCache":
        """One instance per folder in this process, so shards already indexed are not read again."""
        key = os.path.abspath(root)
        with cls._open_lock:
            if key not in cls._open:
                cls._open[key] = cls(key)
            return cls._open[key]

    def _read_shard(self, listing: Path) -> tuple[list[str], np.ndarray] | None:
        """A complete shard's hashes and memory-mapped rows; None if a compaction merged it away
        meanwhile (its rows are then in the merged shard)."""
        try:
            with open(listing) as f:
                hashes = json.load(f)
            return hashes, np.load(self.root / f"{listing.stem}.npy", mmap_mode="r")
        except FileNotFoundError:
            return None

    def _refresh(self) -> None:
        for listing in self.root.glob("shard-*.json"):
            name = listing.stem
            if name in self._maps or (shard := self._read_shard(listing)) is None:
                continue
            hashes, self._maps[name] = shard
            for row, h in enumerate(hashes):
                self._index.setdefault(h, (name, row))

    def _write_shard(self, hashes: list[str], store: np.ndarray) -> str:
        name = f"shard-{uuid.uuid4().hex}"
        tmp = self.root / f".{name}.npy"
        np.save(tmp, store)
        os.replace(tmp, self.root / f"{name}.npy")
        tmp_list = self.root / f".{name}.json"
        with open(tmp_list, "w") as f:
            json.dump(list(hashes), f)
        os.replace(tmp_list, self.root / f"{name}.json")
        return name

    def shard_count(self) -> int:
        return sum(1 for _ in self.root.glob("shard-*.json"))

    def compact(self) -> int:
        """Merge every complete shard into one; returns how many were merged (0: another process is
        compacting, or there was nothing to merge). Old shards are removed only after the merged one
        is complete, list last, so no entry is ever missing from the folder."""
        with open(self.root / ".compact.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            names, hashes, parts, seen = [], [], [], set()
            for listing in sorted(self.root.glob("shard-*.json")):
                if (shard := self._read_shard(listing)) is None:
                    continue
                rows, arr = shard
                names.append(listing.stem)
                keep = [i for i, h in enumerate(rows) if h not in seen]
                seen.update(rows)
                hashes += [rows[i] for i in keep]
                parts.append(np.asarray(arr[keep]))
            if len(names) < 2:
                return 0
            dtype = np.result_type(*(p.dtype for p in parts))
            merged = self._write_shard(hashes, np.concatenate([p.astype(dtype) for p in parts]))
            for name in names:  # the list first: a listed shard always has its array
                (self.root / f"{name}.json").unlink(missing_ok=True)
                (self.root / f"{name}.npy").unlink(missing_ok=True)
        with self._lock:  # this process: forget the old shards (open maps stay valid until dropped)
            self._maps = {k: v for k, v in self._maps.items() if k not in names}
            self._index = {h: loc for h, loc in self._index.items() if loc[0] not in names}
            self._refresh()
        log.info("activation cache %s: merged %d shards into %s (%d entries)", self.root, len(names), merged, len(hashes))
        return len(names)

    def missing(self, hashes: list[str]) -> list[int]:
        with self._lock:
            self._refresh()
            return [i for i, h in enumerate(hashes) if h not in self._index]

    def get(self, hashes: list[str]) -> np.ndarray:
        """Rows for `hashes`, in order, as float32: one fancy-indexed read per shard (indexing a memory
        map row by row cost 10 us a row, most of a cached re-score of a 20k pool)."""
        with self._lock:
            self._refresh()
            locs = [self._index[h] for h in hashes]
            maps = {s: self._maps[s] for s in {s for s, _ in locs}}
        if not locs:
            return np.zeros((0,), np.float32)
        shard_of = np.array([s for s, _ in locs])
        rows = np.array([r for _, r in locs], dtype=np.int64)
        out = np.empty((len(locs), *next(iter(maps.values())).shape[1:]), np.float32)
        for name, arr in maps.items():
            mine = np.flatnonzero(shard_of == name)
            out[mine] = arr[rows[mine]]
        return out

    def put(self, hashes: list[str], values: np.ndarray) -> None:
        if not hashes:
            return
        # float16 halves the disk; activations beyond its range are kept in float32
        store = values.astype(np.float16) if np.abs(values).max() < 6e4 else values.astype(np.float32)
        self._write_shard(hashes, store)
        if self.shard_count() > COMPACT_AT:
            self.compact()

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._index)


def frozen_activations(clf: Classifier, pixels: torch.Tensor, settings: Settings) -> np.ndarray:
    """What the cache stores for these images (see module doc), computed by the runtime PEAL_RUNTIME
    resolves to (`runtime`): ONNX Runtime, or torch in PEAL_PRECISION."""
    if runtime.use_onnxruntime(settings, len(pixels)):
        sess = runtime.session(clf, settings, int(pixels.shape[-1]))
        if sess is not None:
            return runtime.run(sess, pixels, settings.inference_batch_size)
    model = clf
    if bf16_enabled(settings) and _dtype(clf) == torch.float32:
        model = _bf16_frozen_twin(clf)
    dtype = _dtype(model)
    out = []
    with torch.inference_mode():
        bs = settings.inference_batch_size
        for i in range(0, len(pixels), bs):
            h = model.embed(pixels[i:i + bs].to(settings.device, dtype), until=clf.first_adapted)
            if clf.first_adapted == clf.n_layers:
                h = model.features_from(h, clf.n_layers)
            out.append(h.float().cpu().numpy())
    return np.concatenate(out)


def _bf16_frozen_twin(clf: Classifier) -> Classifier:
    import copy
    return copy.deepcopy(clf).to(torch.bfloat16)


def score_from_activations(clf: Classifier, acts: np.ndarray, settings: Settings, *, multilabel: bool = False) -> Prediction:
    """Finish the forward from cached activations: the adapted blocks (if any), pooling and the head;
    the adapted blocks in ONNX Runtime where `runtime.use_onnxruntime` says so."""
    clf.eval()
    sess = None
    if clf.first_adapted < clf.n_layers and runtime.use_onnxruntime(settings, len(acts)):
        sess = runtime.suffix_session(clf, settings, tuple(acts.shape[1:]))
    feats, logits = [], []
    if sess is not None:
        emb, lg = runtime.run_suffix(sess, acts, settings.inference_batch_size)
        feats, logits = [torch.from_numpy(emb)], [torch.from_numpy(lg)]
    else:
        with torch.inference_mode(), _autocast(settings):
            bs = settings.inference_batch_size
            for i in range(0, len(acts), bs):
                h = torch.from_numpy(acts[i:i + bs]).to(settings.device, _dtype(clf))
                f = h if clf.first_adapted == clf.n_layers else clf.features_from(h, clf.first_adapted)
                feats.append(f.float().cpu())
                logits.append(clf.head(f).float().cpu())
    lg = torch.cat(logits) if logits else torch.zeros(0, clf.head.out_features)
    emb = torch.cat(feats).numpy() if feats else np.zeros((0, clf.feature_dim), np.float32)
    return Prediction.from_logits(lg, emb, multilabel=multilabel)


def finish_frozen(clf: Classifier, tokens: np.ndarray, start: int, settings: Settings) -> np.ndarray:
    """What the cache stores for a fully frozen model (a linear probe: pooled features), from the tokens
    entering block `start` (another model's cache entries): the frozen blocks start..L-1 and pooling."""
    assert clf.first_adapted == clf.n_layers, "only a fully frozen model is finished from another cache"
    out = []
    with torch.inference_mode():
        for i in range(0, len(tokens), settings.inference_batch_size):
            h = torch.from_numpy(tokens[i:i + settings.inference_batch_size]).to(settings.device, _dtype(clf))
            out.append(clf.features_from(h, start).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, clf.feature_dim), np.float32)


def score_cached(clf: Classifier, settings: Settings, hashes: list[str], pixels, cache: ActivationCache, *,
                 multilabel: bool = False, source: tuple[Classifier, ActivationCache] | None = None) -> Prediction:
    """Score images, computing frozen activations only for those not in the cache.

    `pixels` is a tensor of all images, or a callable giving the tensor for a list of positions (so
    cached images need not even be preprocessed). `source` (a model with a shorter frozen prefix, e.g.
    LoRA on the last K blocks, and its cache): a fully frozen `clf`'s missing entries are finished from
    that cache's entries, which are filled first where missing, so one pass of the frozen blocks fills
    both caches (the first trained cycle then does not push the pool through them again)."""
    if not hashes:
        return score_from_activations(clf, np.zeros((0,), np.float32), settings, multilabel=multilabel)
    todo = cache.missing(hashes)
    for start in range(0, len(todo), FILL_CHUNK):  # chunks bound the memory of a first, uncached pass
        chunk = todo[start:start + FILL_CHUNK]
        names = [hashes[i] for i in chunk]
        if source is None:
            px = pixels(chunk) if callable(pixels) else pixels[chunk]
            cache.put(names, frozen_activations(clf, px, settings))
            continue
        src_clf, src_cache = source
        need = src_cache.missing(names)
        if need:
            positions = [chunk[j] for j in need]
            px = pixels(positions) if callable(pixels) else pixels[positions]
            src_cache.put([names[j] for j in need], frozen_activations(src_clf, px, settings))
        cache.put(names, finish_frozen(clf, src_cache.get(names), src_clf.first_adapted, settings))
    # finished a chunk at a time: with LoRA on the last K blocks an entry is a whole token sequence
    # (257 x 384 floats at 224 px, 395 KB), so the whole pool at once would be gigabytes
    parts = [score_from_activations(clf, cache.get(hashes[i:i + FINISH_CHUNK]), settings, multilabel=multilabel)
             for i in range(0, len(hashes), FINISH_CHUNK)]
    return Prediction.concat(parts)
