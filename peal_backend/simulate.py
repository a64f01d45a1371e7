"""The active-learning loop offline, on a labeled dataset: labels come from the dataset, not from people.

    peal-backend simulate --data retinamnist --backbone peal-mini --adapter linear,lora \
        --strategy random,entropy,entropy+cal --cycles 10 --seeds 5 --out runs/retina

Each configuration (adapter x strategy variant) and seed: a cold start of `budget` items (TypiClust on
the pretrained features, the same for every configuration of a seed), then `cycles` times: train
(`training.fit`, from the pretrained weights or warm-started) -> evaluate on the test split -> score
the training pool (`training.predict`) -> pick `budget` items (`acquisition.select`) -> reveal their
labels. Images go through `images.to_pil` / `images.preprocess`, as in the backend, once per run.

A strategy variant is `NAME[+cal][+bal]`: `+cal` adds the calibration loss, `+bal` class balancing.
`DIR/results.csv` gets one row per configuration, seed and cycle; a rerun into the same DIR skips the
(configuration, seed) pairs already complete, so a grid can be run as several commands, or resumed.
After each run the plots (`DIR/accuracy_<dataset>.png`) and tables (`DIR/summary.md`) are redrawn
from the whole CSV.

Frozen blocks are run once per run: the linear probe's head inputs, or the tokens entering the first
LoRA block with PEAL_LORA_LAST_K, are computed for the pool and the test split on first use and
reused by every seed and cycle, through the backend's own `scoring` functions. Prompt tuning and
LoRA on every block re-score with `predict`.
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import acquisition
from .backbone import BackboneLoadError, input_size, load_backbone
from .config import Settings, SettingsError
from .cycle import Adapter, CycleResult, ImageSet, adapter_of, refresh_plan, run_cycle, score_images, served_next, warm_plan
from .images import decode_image, preprocess, to_pil

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
COLUMNS = ("dataset", "config", "adapter", "strategy", "balance", "calibration", "warm_start", "seed", "cycle",
           "labels", "accuracy", "macro_f1", "ece", "unknown_ratio", "unknown_fraction",
           "train_seconds", "select_seconds", "eval_seconds", "budget", "backbone", "lora_last_k", "phase_strategy",
           "settings", "adapt_growth", "refresh")
# Settings that never change a simulated curve (where things live, how the server runs)
_NOT_RESULTS = ("label_studio_url", "label_studio_api_key", "model_dir", "log_level", "port", "basic_auth_user",
                "basic_auth_pass", "redis_url", "queue_name", "job_lock_ttl", "job_timeout", "cache_dir", "torch_threads",
                "adapter", "strategy", "balance", "calibration", "seed", "retrain_every", "push_predictions",
                "set_uncertainty_sampling", "keep_versions", "mislabeling", "duplicate_similarity", "quality_max_writes",
                "adapt_growth")  # a column of its own, in `run_key` (rows from before it existed ran with 0)


def settings_key(settings: Settings) -> str:
    """Short hash of every setting that can change a curve: rows of another configuration in the same
    results.csv are never taken for this one's."""
    import hashlib
    import json

    # only what differs from the defaults: a setting added later (with its default) changes no key
    defaults = Settings().redacted()
    relevant = {k: v for k, v in sorted(settings.redacted().items()) if k not in _NOT_RESULTS and v != defaults.get(k)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]


class SimulationError(ValueError):
    """Bad simulator input (dataset, flags); the message says what is wrong."""


# --- datasets ----------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """Images as uint8 arrays or PIL images, labels as class ids 0..C-1."""
    name: str
    train_images: Sequence
    train_labels: np.ndarray
    test_images: Sequence
    test_labels: np.ndarray
    classes: list[str]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def datasets_dir() -> Path:
    """`$PEAL_DATASETS`, else `../shared/datasets` beside the repository."""
    env = os.environ.get("PEAL_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "datasets"


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot"]


def resolve_data(spec: str) -> Path:
    """A path as given, else a name in the datasets folder (`retinamnist` -> DIR/retinamnist.npz);
    `fashion-mnist` is Debian's package folder (IDX files)."""
    if spec in ("fashion-mnist", "fashionmnist"):
        if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
            raise SimulationError(f"--data {spec}: {FASHION_MNIST_DIR} has no IDX files; "
                                  "install the Debian package dataset-fashion-mnist")
        return FASHION_MNIST_DIR
    path = Path(spec)
    if path.exists():
        return path
    for candidate in (datasets_dir() / spec, datasets_dir() / f"{spec}.npz"):
        if candidate.exists():
            return candidate
    raise SimulationError(f"--data {spec!r}: no such file or folder (nor in the datasets folder {datasets_dir()}, "
                          "set PEAL_DATASETS to change it)")


def load_dataset(spec: str, limit_train: int = 0, limit_test: int = 0) -> Dataset:
    """An `.npz` with train_/test_images and train_/test_labels, or a folder with one sub-folder per
    class (or `train/` and `test/` folders that each have them; otherwise a fixed 20 % per class is
    held out as test). `limit_*` keep a seeded random subset of that size (0 = everything)."""
    path = resolve_data(spec)
    if path.is_file():
        data = _load_npz(path)
    elif (path / "train-images-idx3-ubyte.gz").exists():
        data = _load_idx(path)
    else:
        data = _load_folder(path)
    rng = np.random.default_rng(0)
    for split, limit in (("train", limit_train), ("test", limit_test)):
        labels = getattr(data, f"{split}_labels")
        if limit and limit < len(labels):
            keep = np.sort(rng.choice(len(labels), int(limit), replace=False))
            images = getattr(data, f"{split}_images")
            setattr(data, f"{split}_images", [images[i] for i in keep] if isinstance(images, list) else images[keep])
            setattr(data, f"{split}_labels", labels[keep])
    if len(data.train_labels) == 0 or len(data.test_labels) == 0:
        raise SimulationError(f"{path}: the train and test splits must both hold images")
    return data


def _load_npz(path: Path) -> Dataset:
    try:
        npz = np.load(path)
    except Exception as exc:
        raise SimulationError(f"{path}: not a readable .npz file ({exc})") from None
    with npz:
        missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in npz]
        if missing:
            raise SimulationError(f"{path}: the .npz lacks {', '.join(missing)} (it has {', '.join(npz.files)})")
        arrays = {k: npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise SimulationError(f"{path}: {split}_images must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise SimulationError(f"{path}: {len(images)} {split}_images but {len(labels)} {split}_labels")
        if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
            raise SimulationError(f"{path}: {split}_labels must be non-negative integer class ids")
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    n_classes = int(max(arrays["train_labels"].max(initial=0), arrays["test_labels"].max(initial=0))) + 1
    return Dataset(path.stem, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                   arrays["test_labels"], [str(c) for c in range(n_classes)])


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: magic, dims as big-endian int32, then uint8 data), gzipped or not."""
    import gzip

    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise SimulationError(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SimulationError(f"{path}: header says {dims}, file holds {data.size} values")
    return data.reshape(dims)


def _load_idx(path: Path) -> Dataset:
    """Fashion-MNIST's four IDX files (train/t10k images and labels)."""
    arrays = {split: (_read_idx(path / f"{prefix}-images-idx3-ubyte.gz"),
                      _read_idx(path / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
              for split, prefix in (("train", "train"), ("test", "t10k"))}
    return Dataset("fashion-mnist", *arrays["train"], *arrays["test"], list(FASHION_MNIST_CLASSES))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    classes = {d.name: _image_files(d) for d in sorted(folder.iterdir()) if d.is_dir()}
    if len(classes) < 2:
        raise SimulationError(f"{folder}: expected one sub-folder of images per class (at least 2), found {len(classes)}")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise SimulationError(f"{folder}: class folder(s) with no image: {', '.join(empty)}")
    return classes


def _decode(path: Path):
    return decode_image(path.read_bytes(), max_pixels=Settings().max_image_pixels, source=str(path))


def _load_folder(path: Path) -> Dataset:
    if (path / "train").is_dir() and (path / "test").is_dir():
        train, test = _class_folders(path / "train"), _class_folders(path / "test")
        if set(test) - set(train):
            raise SimulationError(f"{path}: test classes {sorted(set(test) - set(train))} have no train folder")
    else:
        train, test = {}, {}
        rng = np.random.default_rng(0)
        for name, files in _class_folders(path).items():
            order = rng.permutation(len(files))
            n_test = max(1, round(0.2 * len(files))) if len(files) > 1 else 0
            test[name] = [files[i] for i in sorted(order[:n_test])]
            train[name] = [files[i] for i in sorted(order[n_test:])]
    classes = sorted(train)
    split = {}
    for key, groups in (("train", train), ("test", test)):
        files = [(f, classes.index(c)) for c in classes for f in groups.get(c, [])]
        split[key] = ([_decode(f) for f, _ in files], np.array([c for _, c in files], dtype=np.int64))
    return Dataset(path.name, *split["train"], *split["test"], classes)


def pixels_of(images: Sequence, size: int, chunk: int = 512) -> torch.Tensor:
    """The backend's preprocessing (to_pil for arrays, then preprocess), chunked to bound memory."""
    parts = []
    for s in range(0, len(images), chunk):
        pil = [im if not isinstance(im, np.ndarray) else to_pil(im) for im in images[s:s + chunk]]
        parts.append(preprocess(pil, size))
    return torch.cat(parts) if parts else torch.zeros(0, 3, size, size)


# --- metrics (pure) ---------------------------------------------------------------------------------

def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: confidence (max probability) in `n_bins` equal bins of (0, 1]; the mean over items of
    |accuracy - mean confidence| of each item's bin. 0 for no items."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.shape[0] == 0:
        return 0.0
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # bin b holds (b/n, (b+1)/n]
    total = 0.0
    for b in np.unique(bins):
        mask = bins == b
        total += mask.sum() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total / probs.shape[0])


def test_metrics(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    from sklearn.metrics import f1_score

    pred = probs.argmax(axis=1)
    return {"accuracy": float((pred == labels).mean()),
            "macro_f1": float(f1_score(labels, pred, labels=list(range(n_classes)), average="macro", zero_division=0)),
            "ece": expected_calibration_error(probs, labels)}


test_metrics.__test__ = False  # not a pytest test, whatever its name


# --- configurations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One configuration of the grid. `auto`: (coverage, uncertainty, switch) for an `auto:C:U:S` spec."""
    adapter: str
    strategy: str
    balance: bool = False
    calibration: bool = False
    auto: tuple = ()

    @property
    def name(self) -> str:
        spec = self.strategy + (":" + ":".join(str(a) for a in self.auto) if self.auto else "")
        return f"{self.adapter}/{spec}" + ("+cal" if self.calibration else "") + ("+bal" if self.balance else "")

    def settings(self, settings: Settings) -> Settings:
        s = settings.replace(adapter=self.adapter, strategy=self.strategy, balance=self.balance, calibration=self.calibration)
        if self.auto:
            s = s.replace(auto_start=self.auto[0], auto_uncertainty=self.auto[1], auto_switch_per_class=float(self.auto[2]))
        return s


def parse_variants(adapters: str, strategies: str, balance: bool = False, calibration: bool = False) -> list[Variant]:
    """Comma-separated adapters x strategy variants (`NAME[+cal][+bal]`); the flags apply to all."""
    adapter_names = [a.strip() for a in adapters.split(",") if a.strip()]
    bad = [a for a in adapter_names if a not in ("linear", "lora", "prompt")]
    if bad or not adapter_names:
        raise SimulationError(f"--adapter {adapters!r}: expected a comma-separated list of linear, lora, prompt")
    out = []
    for adapter in adapter_names:
        for spec in (s.strip() for s in strategies.split(",")):
            if not spec:
                continue
            name, *tags = spec.split("+")
            auto: tuple = ()
            if name.startswith("auto:"):  # auto:COVERAGE:UNCERTAINTY:SWITCH, the PEAL_AUTO_* settings
                parts = name.split(":")
                try:
                    auto = (parts[1], parts[2], float(parts[3]))
                    Settings(auto_start=auto[0], auto_uncertainty=auto[1], auto_switch_per_class=auto[2])
                except (IndexError, ValueError) as exc:
                    raise SimulationError(f"--strategy {spec!r}: expected auto:COVERAGE:UNCERTAINTY:SWITCH ({exc})") from None
                name = "auto"
            if name not in acquisition.STRATEGIES and name != "auto":
                raise SimulationError(f"--strategy {spec!r}: unknown strategy {name!r}; expected one of "
                                      f"auto, {', '.join(acquisition.STRATEGIES)}, optionally with +cal and/or +bal")
            if set(tags) - {"cal", "bal"}:
                raise SimulationError(f"--strategy {spec!r}: unknown suffix; only +cal (calibration loss) and +bal (class balancing)")
            out.append(Variant(adapter, name, balance or "bal" in tags, calibration or "cal" in tags, auto))
    if not out:
        raise SimulationError(f"--strategy {strategies!r}: no strategy given")
    return list(dict.fromkeys(out))


# --- the loop -------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A dataset made ready once per run: pixels and content hashes of both splits, and the folder of
    the activation cache the cycles share (as the backend's cache, keyed by content hash)."""
    data: Dataset
    train_pixels: torch.Tensor
    test_pixels: torch.Tensor
    train_hashes: list[str]
    test_hashes: list[str]
    cache_dir: str

    def images(self, split: str, idx: np.ndarray | None = None) -> ImageSet:
        pixels, hashes = getattr(self, f"{split}_pixels"), getattr(self, f"{split}_hashes")
        if idx is None:
            return ImageSet.from_tensor(hashes, pixels)
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet([hashes[i] for i in idx], lambda positions: pixels[torch.from_numpy(idx[positions])],
                        int(pixels.shape[-1]))


def image_hash(image) -> str:
    """Content hash of a dataset image (its pixels and shape): the activation cache's key, as the fetched
    bytes' hash is in the backend."""
    import hashlib

    arr = np.asarray(image)
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()


def prepare(data: Dataset, settings: Settings, cache_dir: str | Path) -> Prepared:
    size = input_size(settings, load_backbone(settings.backbone).config)
    return Prepared(data, pixels_of(data.train_images, size), pixels_of(data.test_images, size),
                    [image_hash(im) for im in data.train_images], [image_hash(im) for im in data.test_images],
                    str(cache_dir))


def simulated_cycle(prep: Prepared, settings: Settings, labeled: np.ndarray, init: dict | None = None,
                    new_labels: int | None = None, adapter: Adapter | None = None) -> CycleResult:
    """The backend's cycle on the train split, `labeled` (train indices, in the order Label Studio lists
    their tasks) labeled, the rest the pool (in index order). With `adapter` it is a head refresh."""
    labeled = np.asarray(labeled, dtype=np.int64)
    unlabeled = np.setdiff1d(np.arange(len(prep.data.train_labels)), labeled)
    targets = torch.from_numpy(prep.data.train_labels[labeled])
    lab, pool = prep.images("train", labeled), prep.images("train", unlabeled)
    refresh = adapter.rows(lab.hashes + pool.hashes) if adapter is not None else None
    if refresh is not None:
        init = adapter.state
    return run_cycle(settings, lab, targets, pool, prep.data.n_classes, init=init, cache_dir=prep.cache_dir,
                     new_labels=new_labels, refresh=refresh)


def run_seed(prep: Prepared, settings: Settings, variant: Variant, seed: int, cycles: int, budget: int) -> Iterator[dict]:
    """One configuration and seed, as a Label Studio project would go: no label at first, so the first
    cycle only orders the pool; then `cycles` times the annotator labels the `budget` tasks Label Studio
    would serve from the backend's order (`cycle.served_next`, clusters included) and the backend runs
    its cycle (`cycle.run_cycle`, what the training job runs) on what is labeled. A row per cycle,
    evaluated on the test split at `budget * (cycle + 1)` labels. While fewer than two classes are
    labeled there is no classifier: the row scores predicting the one labeled class for everything
    (what any classifier trained on those labels would do)."""
    data = prep.data
    # label quality changes no queue and no curve: not computed here (benchmarks/mislabeling.py measures it)
    s = variant.settings(settings).replace(seed=seed, retrain_every=budget, mislabeling=False, duplicate_similarity=0.0)
    n_train = len(data.train_labels)
    labeled = np.zeros(0, dtype=np.int64)
    solved: dict[int, int] = {}  # cluster -> tasks the annotator labeled in it, as Label Studio counts
    adapter = None  # the last adapter trained, for head refreshes (PEAL_ADAPT_GROWTH)
    last = None  # (adapter state, task -> label it trained on, cycles since its full training): what
    result = simulated_cycle(prep, s, labeled)  # the backend keeps in a version. The project just connected
    for cycle in range(cycles):
        t0 = time.perf_counter()
        unlabeled = np.setdiff1d(np.arange(n_train), labeled)
        if not unlabeled.size:
            break
        served = served_next(result.queue_scores, result.pool_clusters if s.clusters >= 0 else None, solved, budget)
        row_pick = {"unknown_ratio": "", "unknown_fraction": ""}
        if result.trained:
            known = acquisition.unknown_ratio(served, result.pool.probs, data.train_labels[unlabeled])
            row_pick = {"unknown_ratio": known["ratio"], "unknown_fraction": known["fraction"]}
        labeled = np.concatenate([labeled, unlabeled[served]])
        t1 = time.perf_counter()
        trained_labels = {str(i): [int(data.train_labels[i])] for i in labeled}
        warm, new_labels, since_full = warm_plan(s, last[1] if last else None, trained_labels, last[2] if last else None)
        refresh = refresh_plan(s, adapter.labels if adapter else None, trained_labels)
        result = simulated_cycle(prep, s, labeled, last[0] if warm else None, new_labels, adapter if refresh else None)
        t2 = time.perf_counter()
        if result.trained:
            probs = score_images(result.classifier, s, prep.images("test"), prep.cache_dir).probs
        else:
            probs = np.zeros((len(data.test_labels), data.n_classes))
            probs[:, int(data.train_labels[labeled[0]])] = 1.0
        t3 = time.perf_counter()
        if result.trained:  # as the job saves it (the backend keeps a version's adapter and its labels)
            last = (result.classifier.trainable_state(), trained_labels, since_full)
            if not result.metrics.get("refresh"):  # a new adapter, and its features of every image
                adapter = adapter_of(result, trained_labels, prep.train_hashes, labeled)
        yield {"cycle": cycle, "labels": int(labeled.size), **test_metrics(probs, data.test_labels, data.n_classes),
               **row_pick, "phase_strategy": result.strategy if result.trained else f"{result.strategy} (no classifier)",
               "refresh": result.metrics.get("refresh") or "",
               "train_seconds": t2 - t1, "eval_seconds": t3 - t2, "select_seconds": t1 - t0}


def simulate(data: Dataset, settings: Settings, variants: Sequence[Variant], seeds: Sequence[int], cycles: int,
             budget: int = 0, out_dir: str | Path = "runs/simulate", progress: bool = True) -> Path:
    """Run every (variant, seed) not already complete in `out_dir/results.csv`, appending rows as each
    finishes; then redraw the plots and the summary. Returns the CSV's path."""
    from tqdm import tqdm

    if cycles < 1:
        raise SimulationError(f"--cycles {cycles}: must be at least 1")
    present = np.unique(data.train_labels)
    if present.size < 2:
        raise SimulationError(f"{data.name}: the train split holds {present.size} class(es); active learning of a "
                              "classifier needs at least two")
    budget = budget or data.n_classes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = read_results(csv_path)
    common = {"dataset": data.name, "warm_start": settings.warm_start, "adapt_growth": settings.adapt_growth,
              "budget": budget, "backbone": settings.backbone,
              "settings": settings_key(settings)}

    def describe(v: Variant, seed: int) -> dict:
        return {**common, "config": v.name, "adapter": v.adapter, "strategy": v.strategy, "balance": v.balance,
                "calibration": v.calibration, "seed": seed, "lora_last_k": settings.lora_last_k if v.adapter == "lora" else ""}

    done = {}
    for r in rows:
        done[run_key(r)] = done.get(run_key(r), 0) + 1
    # seeds outermost: a grid stopped early still has every configuration on its first seeds
    todo = [(v, seed) for seed in seeds for v in variants
            if done.get(run_key(describe(v, seed)), 0) < min(cycles, math.ceil(len(data.train_labels) / budget))]
    if todo:
        prep = prepare(data, settings, out / "activations")
        bar = tqdm(total=len(todo) * cycles, disable=not progress, desc=data.name, unit="cycle", dynamic_ncols=True)
        for v, seed in todo:
            new = []
            for r in run_seed(prep, settings, v, seed, cycles, budget):
                new.append({**describe(v, seed), **r})
                bar.set_postfix_str(f"{v.name} seed {seed} labels {r['labels']} acc {r['accuracy']:.3f}")
                bar.update(1)
            save_run(csv_path, new)
        bar.close()
        rows = read_results(csv_path)
    plot_results(rows, out)
    (out / "summary.md").write_text(summary_markdown(rows))
    return csv_path


# --- outputs ---------------------------------------------------------------------------------------------

def run_key(row: dict) -> tuple:
    """What makes two runs the same run."""
    return tuple(str(row[k]) for k in ("dataset", "config", "warm_start", "budget", "backbone", "lora_last_k", "settings", "seed")) \
        + (f"{float(row.get('adapt_growth') or 0):g}",)


def save_run(csv_path: Path, new: list[dict]) -> None:
    """Add one run's rows to the CSV (replacing a partial earlier run of it). The folder is locked
    while the CSV is rewritten, so runs on different datasets can share one CSV from parallel processes."""
    import fcntl

    fd = os.open(Path(csv_path).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        k = run_key(new[0])
        write_results(csv_path, [r for r in read_results(csv_path) if run_key(r) != k] + new)
    finally:
        os.close(fd)  # releases the lock

def read_results(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_results(path: Path, rows: list[dict]) -> None:
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)  # a run killed mid-write leaves the previous CSV intact


def curves(rows: list[dict]) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """dataset -> config -> labels -> accuracies over seeds."""
    out: dict = {}
    for r in rows:
        acc = out.setdefault(r["dataset"], {}).setdefault(r["config"], {}).setdefault(int(r["labels"]), [])
        acc.append(float(r["accuracy"]))
    return {d: {c: {n: np.asarray(a) for n, a in sorted(pts.items())} for c, pts in cfgs.items()}
            for d, cfgs in out.items()}


REFERENCE = "linear/random"


def plot_results(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per dataset, one panel per adapter: mean accuracy against labels, shaded +- std over
    seeds; the linear probe with random sampling dashed in every panel as the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset, cfgs in curves(rows).items():
        adapters = [a for a in ("linear", "lora", "prompt") if any(c.startswith(a + "/") for c in cfgs)]
        fig, axes = plt.subplots(1, len(adapters), figsize=(5.2 * len(adapters), 4.2), sharey=True, squeeze=False)
        variants = list(dict.fromkeys(c.split("/", 1)[1] for c in cfgs))  # one colour per variant in every panel
        colours = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
        for ax, adapter in zip(axes[0], adapters):
            names = [c for c in cfgs if c.startswith(adapter + "/")]
            for name in names:
                pts = cfgs[name]
                i = variants.index(name.split("/", 1)[1])
                x = np.array(list(pts))
                mean = np.array([a.mean() for a in pts.values()])
                std = np.array([a.std() for a in pts.values()])
                n_seeds = max(len(a) for a in pts.values())
                ax.plot(x, mean, marker=".", color=colours(i), label=f"{name.split('/', 1)[1]} (n={n_seeds})")
                ax.fill_between(x, mean - std, mean + std, color=colours(i), alpha=0.12)
            if REFERENCE in cfgs and adapter != "linear":
                ref = cfgs[REFERENCE]
                ax.plot(list(ref), [a.mean() for a in ref.values()], "k--", lw=1, label="linear/random (reference)")
            ax.set_title(f"{dataset}: {adapter}")
            ax.set_xlabel("labels")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        axes[0][0].set_ylabel("test accuracy (mean, shaded ± std over seeds)")
        fig.tight_layout()
        path = out / f"accuracy_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def labels_to_reach(points: dict[int, np.ndarray], target: float) -> int | None:
    """Fewest labels at which the mean accuracy is at least `target` (None if never)."""
    for n, acc in sorted(points.items()):
        if acc.mean() >= target - 1e-9:
            return n
    return None


def summary_markdown(rows: list[dict]) -> str:
    """Per dataset: mean ± std accuracy at each label count, the labels each configuration needs to
    reach linear/random's final accuracy, and seconds per cycle."""
    lines = []
    for dataset, cfgs in curves(rows).items():
        ds_rows = [r for r in rows if r["dataset"] == dataset]
        budgets = sorted({n for pts in cfgs.values() for n in pts})
        ref = cfgs.get(REFERENCE)
        target = ref[max(ref)].mean() if ref else None
        lines += [f"### {dataset}", ""]
        if target is not None:
            lines += [f"Reference: linear/random reaches {target:.3f} at {max(ref)} labels.", ""]
        head = (["config", "seeds"] + [str(n) for n in budgets]
                + ["labels to reach ref", "macro-F1 at end", "ECE at end", "unknown frac", "s/cycle"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, pts in sorted(cfgs.items()):
            mine = [r for r in ds_rows if r["config"] == name]
            cells = [f"{pts[n].mean():.3f} ± {pts[n].std():.3f}" if n in pts else "" for n in budgets]
            reach = labels_to_reach(pts, target) if target is not None else None
            unknown = [float(r["unknown_fraction"]) for r in mine if r["unknown_fraction"] not in ("", None)]
            secs = np.mean([float(r["train_seconds"]) + float(r["select_seconds"]) + float(r["eval_seconds"]) for r in mine])
            seeds = len({r["seed"] for r in mine})
            last = [r for r in mine if int(r["labels"]) == max(pts)]
            f1, ece = (np.mean([float(r[k]) for r in last]) for k in ("macro_f1", "ece"))
            lines.append("| " + " | ".join([name, str(seeds)] + cells + [
                "—" if target is None else (str(reach) if reach is not None else "not reached"),
                f"{f1:.3f}", f"{ece:.3f}", f"{np.mean(unknown):.2f}" if unknown else "", f"{secs:.1f}"]) + " |")
        lines += ["", timing_markdown(ds_rows), ""]
    return "\n".join(lines)


def timing_markdown(rows: list[dict]) -> str:
    """Mean seconds per cycle by adapter, without cycle 0 (which also computes each run's frozen
    activations once)."""
    lines = ["| adapter | cycles | train s | select s (score pool + pick) | eval s (test split) | total s/cycle |",
             "|---|---|---|---|---|---|"]
    for adapter in ("linear", "lora", "prompt"):
        mine = [r for r in rows if r["adapter"] == adapter and str(r["cycle"]) != "0"]
        if not mine:
            continue
        t = {k: float(np.mean([float(r[f"{k}_seconds"]) for r in mine])) for k in ("train", "select", "eval")}
        lines.append(f"| {adapter} | {len(mine)} | {t['train']:.2f} | {t['select']:.2f} | {t['eval']:.2f} | {sum(t.values()):.2f} |")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="run the active-learning loop offline on a labeled dataset",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an .npz (train_/test_images/labels), an image folder with one "
                   "sub-folder per class, or a dataset name in $PEAL_DATASETS (default ../shared/datasets)")
    p.add_argument("--backbone", default=None, help="DINOv2 hub id, folder or peal-mini (default: $PEAL_BACKBONE)")
    p.add_argument("--adapter", default=None, help="comma-separated: linear, lora, prompt (default: $PEAL_ADAPTER)")
    p.add_argument("--strategy", default=None, help="comma-separated NAME[+cal][+bal] with NAME one of "
                   f"{', '.join(acquisition.STRATEGIES)} (default: $PEAL_STRATEGY)")
    p.add_argument("--balance", action="store_true", help="class-balance every strategy's picks")
    p.add_argument("--calibration", action="store_true", help="add the calibration loss for every strategy")
    p.add_argument("--warm-start", action="store_true", help="start each cycle from the previous model")
    p.add_argument("--budget", type=int, default=0, help="labels per retrain (PEAL_RETRAIN_EVERY in the backend; default: the number of classes)")
    p.add_argument("--cycles", type=int, default=10, help="training cycles per run (default 10)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--first-seed", type=int, default=0, help="start the seeds here (default 0)")
    p.add_argument("--limit-train", type=int, default=0, help="use a seeded random N of the training pool")
    p.add_argument("--limit-test", type=int, default=0, help="use a seeded random N of the test split")
    p.add_argument("--out", required=True, help="output folder: results.csv, accuracy_<dataset>.png, summary.md")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a busy shared CPU one "
                   "thread avoids OpenMP stalls; measured 2.5x faster scoring and 6x faster LoRA training than 2 here)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=command)


def command(args, settings: Settings) -> None:
    import sys

    try:
        if args.seeds < 1 or args.threads < 1 or args.budget < 0 or args.limit_train < 0 or args.limit_test < 0:
            raise SimulationError("--seeds and --threads must be positive; --budget, --limit-train and --limit-test non-negative")
        settings = settings.replace(backbone=args.backbone or settings.backbone,
                                    warm_start=args.warm_start or settings.warm_start)
        variants = parse_variants(args.adapter or settings.adapter, args.strategy or settings.strategy,
                                  args.balance, args.calibration)
        data = load_dataset(args.data, args.limit_train, args.limit_test)
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        torch.set_num_threads(args.threads)  # only once the input is known good: this is process-wide
        path = simulate(data, settings, variants, seeds, args.cycles, args.budget, args.out,
                        progress=not args.quiet)
    except (SimulationError, SettingsError, BackboneLoadError) as exc:
        sys.exit(f"peal-backend simulate: {exc}")
    print(f"wrote {path}")
