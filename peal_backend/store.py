"""Per-project versioned model checkpoints: MODEL_DIR/<project>/<version>/.

A version is written into a hidden temporary folder and renamed into place once every file is on
disk, so a reader never sees a half-written version and a crash leaves at worst a `.tmp-*` folder
(removed by the next save). Version numbers are allocated under a per-project file lock, so several
workers sharing MODEL_DIR never take the same number.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
META = "meta.json"
_VERSION_RE = re.compile(r"^(?P<prefix>.+)-v(?P<n>\d+)$")


@dataclass(frozen=True)
class ModelVersion:
    project: int
    name: str
    path: Path
    meta: dict

    @property
    def number(self) -> int:
        return version_number(self.name)

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / WEIGHTS))


def version_number(name: str) -> int:
    m = _VERSION_RE.match(name)
    return int(m.group("n")) if m else -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def project_dir(self, project: int) -> Path:
        return self.root / str(int(project))

    @contextmanager
    def _lock(self, project: int):
        d = self.project_dir(project)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield d
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def versions(self, project: int) -> list[str]:
        """Complete versions of a project, oldest first."""
        d = self.project_dir(project)
        if not d.is_dir():
            return []
        names = [p.name for p in d.iterdir()
                 if p.is_dir() and not p.name.startswith(".") and version_number(p.name) >= 0 and (p / META).exists()]
        return sorted(names, key=version_number)

    def projects(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())

    def get(self, project: int, name: str) -> ModelVersion:
        path = self.project_dir(project) / name
        with open(path / META) as f:
            return ModelVersion(int(project), name, path, json.load(f))

    def latest(self, project: int) -> ModelVersion | None:
        names = self.versions(project)
        return self.get(project, names[-1]) if names else None

    def save(self, project: int, prefix: str, weights: dict[str, torch.Tensor], meta: dict,
             files: dict[str, object] | None = None, keep: int = 0, after: int = 0) -> ModelVersion:
        """Write a new version atomically and return it. `files`: extra documents by file name, JSON, or
        .npy for a numpy array.
        Its number is above every version here and above `after` (numbers taken elsewhere, e.g. by
        versions Label Studio still holds from a MODEL_DIR that was lost)."""
        with self._lock(project) as d:
            for stale in d.glob(".tmp-*"):  # left by a writer that died; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            existing = self.versions(project)
            n = max([version_number(v) for v in existing] + [int(after)]) + 1
            name = f"{prefix}-v{n}"
            tmp = d / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
                meta = {**meta, "version": name, "project": int(project), "created_at": time.time()}
                docs = {META: meta, **(files or {})}
                for fname, doc in docs.items():
                    with open(tmp / fname, "wb" if isinstance(doc, np.ndarray) else "w") as f:
                        if isinstance(doc, np.ndarray):
                            np.save(f, doc, allow_pickle=False)
                        else:
                            json.dump(doc, f)
                        f.flush()
                        os.fsync(f.fileno())
                with open(tmp / WEIGHTS, "rb") as f:
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                os.rename(tmp, d / name)
                _fsync_dir(d)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if keep > 0:
                for old in self.versions(project)[:-keep]:
                    # renamed out of the listing first (atomic), then deleted: a prune killed midway leaves
                    # a hidden .tmp-* folder (removed by the next save), never a listed version without weights
                    trash = d / f".tmp-pruned-{uuid.uuid4().hex}"
                    os.rename(d / old, trash)
                    shutil.rmtree(trash, ignore_errors=True)
            return self.get(project, name)

    def read_array(self, version: ModelVersion, fname: str) -> np.ndarray | None:
        """A numpy array saved with the version, None if it has none by that name."""
        try:
            return np.load(version.path / fname, allow_pickle=False)
        except FileNotFoundError:
            return None

    def read_json(self, version: ModelVersion, fname: str, default=None):
        try:
            with open(version.path / fname) as f:
                return json.load(f)
        except FileNotFoundError:
            return default
