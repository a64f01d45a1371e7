"""Label Studio payloads in, engine calls, Label Studio results out.

`PealModel` has the shape of a Label Studio ML backend model (setup / predict; training is the
background job in `labelstudio_job.py`). Label-config parsing uses label-studio-sdk's `LabelInterface`.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import torch

from . import acquisition
from .backbone import Classifier, build_classifier, input_size
from .config import Settings
from .images import ImageError, ImageFetcher, content_hash, preprocess
from .store import ModelStore, ModelVersion
from .training import Prediction, bf16_enabled

log = logging.getLogger(__name__)

QUEUE_FILE = "queue.json"  # task id -> queue score, written with each version by the training cycle
CLUSTERS_FILE = "clusters.json"  # task id -> Label Studio cluster, written beside it
TRAINED_FILE = "trained_labels.json"  # task id -> label indices the version trained on (incremental cycles)
ADAPTER_FILE = "adapter_labels.json"  # task id -> label indices its adapter trained on (head refreshes)
FEATURES_FILE = "adapted_features.npy"  # the head's input features of every image it scored (float16)
FEATURE_HASHES_FILE = "adapted_hashes.json"  # their images' content hashes, row by row
FETCH_THREADS = 8  # images of one /predict fetched at once


class LabelConfigError(ValueError):
    """The label config cannot be served by this backend; the message says what is missing."""


class PayloadError(ValueError):
    """A request body is not what Label Studio sends; the message names the field."""


@dataclass(frozen=True)
class LabelSpec:
    image_name: str      # <Image name=...>
    image_key: str       # task data key the image URL is under (value="$image" -> "image")
    choices_name: str    # <Choices name=...>
    labels: tuple[str, ...]
    multiple: bool       # choice="multiple"

    def labels_of(self, result: list) -> list[str]:
        """Labels chosen in an annotation's result list, for our <Choices> only; unknown labels raise."""
        chosen: list[str] = []
        for item in result or []:
            if not isinstance(item, dict) or item.get("from_name") != self.choices_name:
                continue
            for label in (item.get("value") or {}).get("choices") or []:
                if label not in self.labels:
                    raise PayloadError(f"annotation label {label!r} is not a choice of <Choices name={self.choices_name!r}> "
                                       f"(choices: {', '.join(self.labels)})")
                chosen.append(label)
        return chosen


def parse_label_config(xml: str) -> LabelSpec:
    from label_studio_sdk.label_interface import LabelInterface

    if not xml or not isinstance(xml, str):
        raise LabelConfigError("no label config given")
    try:
        li = LabelInterface(xml)
    except Exception as exc:
        raise LabelConfigError(f"label config is not valid XML/Label Studio config: {exc}") from exc
    choices = [c for c in li.controls if c.tag == "Choices"]
    images = {o.name: o for o in li.objects if o.tag == "Image"}
    if not images:
        raise LabelConfigError("label config has no <Image> tag: peal-backend classifies images")
    if not choices:
        raise LabelConfigError("label config has no <Choices> tag: peal-backend predicts image-level choices")
    for control in choices:
        targets = [name for name in control.to_name if name in images]
        if targets:
            image = images[targets[0]]
            labels = tuple(control.labels)
            if len(labels) < 2:
                raise LabelConfigError(f"<Choices name={control.name!r}> needs at least two <Choice> values")
            return LabelSpec(image_name=image.name, image_key=(image.value or "").lstrip("$"),
                             choices_name=control.name, labels=labels,
                             multiple=control.attr.get("choice", "single") == "multiple")
    raise LabelConfigError("no <Choices> tag points at an <Image> (check toName)")


MAX_PROJECT_ID = 2 ** 63


def project_id(value) -> int:
    """Label Studio sends the project as "12.1700000000" (id.created), 12, or {"id": 12, ...}."""
    if isinstance(value, dict):
        value = value.get("id")
    try:
        pid = int(str(value).split(".", 1)[0])
    except (TypeError, ValueError):
        pid = -1
    # Label Studio ids are positive; -5 used to reach the queue and 500, and a 300-digit id made a file
    # name too long (500). Ids fit Label Studio's 64-bit database keys.
    if pid < 0 or pid >= MAX_PROJECT_ID or isinstance(value, bool):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise PayloadError(f"'project' must identify a project (e.g. \"12.1700000000\"), got {shown}")
    return pid


def version_prefix(settings: Settings) -> str:
    if settings.adapter == "lora":
        return f"peal-lora-r{settings.lora_rank}"
    if settings.adapter == "prompt":
        return f"peal-prompt-p{settings.prompt_tokens}"
    return "peal-linear"


# Settings that define a saved model's architecture: stored with each version, restored on load.
MODEL_SETTINGS = ("backbone", "adapter", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_last_k",
                  "prompt_tokens", "prompt_deep", "features", "image_size")


def model_settings(settings: Settings) -> dict:
    return {k: getattr(settings, k) for k in MODEL_SETTINGS}


def choices_result(spec: LabelSpec, probs: np.ndarray, threshold: float) -> list[dict]:
    """One Label Studio `choices` region for a task: the top choice, or all above threshold (multiple)."""
    if spec.multiple:
        picked = [int(i) for i in np.flatnonzero(probs >= threshold)] or [int(np.argmax(probs))]
    else:
        picked = [int(np.argmax(probs))]
    return [{"from_name": spec.choices_name, "to_name": spec.image_name, "type": "choices",
             "value": {"choices": [spec.labels[i] for i in picked]},
             "score": float(np.mean([probs[i] for i in picked]))}]


def uncertainty_score(probs: np.ndarray, multiple: bool) -> np.ndarray:
    """Per-task queue score in [0, 1] when no ranked queue is available: 1 - normalised uncertainty,
    so the most uncertain task has the lowest score and is labelled first."""
    if multiple:
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        u = (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).mean(axis=1)
    else:
        u = acquisition.entropy(probs) / np.log(max(probs.shape[1], 2))
    return np.clip(1.0 - u, 0.0, 1.0)


@dataclass
class LoadedModel:
    version: ModelVersion
    classifier: Classifier
    spec_labels: tuple[str, ...]
    multiple: bool
    settings: Settings
    queue: dict[str, float] = field(default_factory=dict)
    size: int = 0


def load_version(store: ModelStore, version: ModelVersion, settings: Settings) -> LoadedModel:
    """Rebuild a saved version's classifier with the architecture settings it was trained with."""
    arch = settings.replace(**version.meta["model_settings"])
    labels = tuple(version.meta["labels"])
    clf = build_classifier(arch, len(labels))
    clf.load_trainable(version.weights())
    clf.eval()
    if bf16_enabled(arch):  # served models only infer: whole-bf16 weights are the fastest CPU path
        clf.to(torch.bfloat16)
    return LoadedModel(version=version, classifier=clf, spec_labels=labels, multiple=bool(version.meta.get("multiple")),
                       settings=arch, queue=store.read_json(version, QUEUE_FILE, {}) or {},
                       size=input_size(arch, clf.backbone.config))


class PealModel:
    """Serves the newest complete version of each project's model."""

    def __init__(self, settings: Settings, fetcher: ImageFetcher | None = None):
        self.settings = settings
        self.store = ModelStore(settings.model_dir)
        self.fetcher = fetcher or ImageFetcher(settings)
        self._loaded: dict[int, LoadedModel] = {}
        self._lock = threading.Lock()

    def current(self, project: int) -> LoadedModel | None:
        latest = self.store.latest(project)
        if latest is None or not latest.meta.get("trained", True):
            return None
        with self._lock:
            cached = self._loaded.get(project)
            # name and creation time: a version rebuilt under a reused name (a wiped MODEL_DIR) is another model
            if cached is None or (cached.version.name, cached.version.meta.get("created_at")) != (
                    latest.name, latest.meta.get("created_at")):
                cached = load_version(self.store, latest, self.settings)
                self._loaded[project] = cached
            return cached

    def model_version(self, project: int) -> str:
        latest = self.store.latest(project)
        return latest.name if latest else f"{version_prefix(self.settings)}-untrained"

    def setup(self, project: int, label_config: str) -> str:
        parse_label_config(label_config)  # raises LabelConfigError with the reason
        return self.model_version(project)

    def score(self, loaded: LoadedModel, images: list, hashes: list[str]) -> Prediction:
        """The cycle's one inference path (`cycle.score_images`): through the activation cache where the
        model has a frozen prefix."""
        from .cycle import ImageSet, score_images

        batch = ImageSet(list(hashes), lambda positions: preprocess([images[i] for i in positions], loaded.size), loaded.size)
        cache = self.settings.activation_cache_dir if self.settings.activation_cache else None
        return score_images(loaded.classifier, loaded.settings, batch, cache, multilabel=loaded.multiple)

    def fetch_tasks(self, tasks: list, spec: LabelSpec) -> list:
        """Every task's (bytes, image), or the error that task gets, fetched FETCH_THREADS at a time under
        one deadline for the whole request (PEAL_PREDICT_DEADLINE): a slow host costs its own tasks, not
        the request, and never more than the deadline."""
        from concurrent.futures import ThreadPoolExecutor, wait

        out: list = [None] * len(tasks)
        urls: dict[int, str] = {}
        for i, task in enumerate(tasks):
            try:
                urls[i] = task_image_url(task, spec)
            except PayloadError as exc:
                out[i] = exc
        pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="peal-fetch")
        # hosts take turns: a slow host's tasks queued first would otherwise hold every fetch thread
        # until the deadline, and the other hosts' tasks would never start
        futures = {pool.submit(self.fetcher.fetch_both, urls[i]): i for i in interleave_by_host(urls)}
        done, late = wait(futures, timeout=self.settings.predict_deadline)
        pool.shutdown(wait=False, cancel_futures=True)  # fetches in flight end within PEAL_FETCH_TIMEOUT
        for future in done:
            try:
                out[futures[future]] = future.result()
            except (ImageError, PayloadError) as exc:
                out[futures[future]] = exc
        for future in late:
            out[futures[future]] = ImageError(task_image_url(tasks[futures[future]], spec),
                                              f"not fetched within the request's deadline "
                                              f"(PEAL_PREDICT_DEADLINE={self.settings.predict_deadline:g} s)")
        return out

    def predict(self, tasks: list, project: int, label_config: str) -> list[dict]:
        """One result per task, in order. A task whose image fails gets an empty result (and an `error`),
        never failing the batch."""
        spec = parse_label_config(label_config)
        loaded = self.current(project)
        if loaded is None:
            latest = self.store.latest(project)
            if latest is not None:  # a queue order without a classifier (fewer than two classes labeled)
                queue = self.store.read_json(latest, QUEUE_FILE, {}) or {}
                return [{"result": [], "score": queue.get(str(_task_id(t))), "model_version": latest.name} for t in tasks]
            log.info("project %s: no trained model yet, returning no predictions for %d task(s)", project, len(tasks))
            return [{"result": [], "score": None, "model_version": self.model_version(project)} for _ in tasks]
        if loaded.spec_labels != spec.labels:
            log.warning("project %s: label config choices changed since %s was trained; retrain to serve them",
                        project, loaded.version.name)
            return [{"result": [], "score": None, "model_version": loaded.version.name,
                     "error": "label choices changed since the model was trained"} for _ in tasks]
        results: list[dict | None] = [None] * len(tasks)
        images, hashes, positions = [], [], []
        for i, got in enumerate(self.fetch_tasks(tasks, spec)):
            if isinstance(got, Exception):
                log.warning("project %s task %s: %s", project, _task_id(tasks[i]), got)
                results[i] = {"result": [], "score": None, "model_version": loaded.version.name, "error": str(got)}
            else:
                data, image = got
                images.append(image)
                hashes.append(content_hash(data))
                positions.append(i)
        if images:
            out = self.score(loaded, images, hashes)
            fallback = None if loaded.queue else uncertainty_score(out.probs, loaded.multiple)
            for j, i in enumerate(positions):
                tid = _task_id(tasks[i])
                # one scale for every score: the task's place in the queue, 0 = label next, 1 = last. A task
                # imported after the last ordering goes last until the re-order TASKS_CREATED queued places
                # it; only a backend that pushes no queue (PEAL_PUSH_PREDICTIONS=false) scores by uncertainty
                score = loaded.queue.get(str(tid), 1.0) if loaded.queue else float(fallback[j])
                results[i] = {"result": choices_result(spec, out.probs[j], self.settings.threshold),
                              "score": float(score), "model_version": loaded.version.name}
        return results  # type: ignore[return-value]


def interleave_by_host(urls: dict[int, str]) -> list[int]:
    """The keys of `urls` with their hosts taking turns (round robin, in first-seen order), each host's
    own order kept. Relative URLs (Label Studio's media) count as one host."""
    by_host: dict[str, list[int]] = {}
    for i, url in urls.items():
        try:
            host = urlsplit(url).netloc.lower()
        except ValueError:
            host = url
        by_host.setdefault(host, []).append(i)
    queues = list(by_host.values())
    return [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]


def task_image_url(task: dict, spec: LabelSpec) -> str:
    if not isinstance(task, dict):
        raise PayloadError(f"task must be an object, got {type(task).__name__}")
    data = task.get("data")
    if not isinstance(data, dict):
        raise PayloadError(f"task {task.get('id')!r} has no 'data' object")
    url = data.get(spec.image_key)
    if not isinstance(url, str) or not url.strip():
        raise PayloadError(f"task {task.get('id')!r} has no image URL in data[{spec.image_key!r}]")
    return url


def _task_id(task) -> object:
    return task.get("id") if isinstance(task, dict) else None
