"""Every setting, read once from the environment.

Label Studio's conventional names are kept (LABEL_STUDIO_URL, MODEL_DIR, ...); our own start with
PEAL_. `Settings.from_env()` is the only place that reads the environment; everything else receives a
`Settings`. The README's settings table is generated from `SETTINGS` below
(`python -m peal_backend.config --markdown`), so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


def _env(name: str, default: Any, doc: str, kind: type | str = str, choices: tuple = ()):
    return field(default=default, metadata={"env": name, "doc": doc, "kind": kind, "choices": choices})


@dataclass(frozen=True)
class Settings:
    # --- Label Studio and the server -------------------------------------------------------------
    label_studio_url: str = _env("LABEL_STUDIO_URL", "http://localhost:8080",
                                 "Base URL of Label Studio, used for its API and to fetch /data/... images.")
    label_studio_api_key: str = _env("LABEL_STUDIO_API_KEY", "",
                                     "Label Studio API token: legacy token or personal access token (JWT refresh token).")
    model_dir: str = _env("MODEL_DIR", "./models",
                          "Where model versions are stored: MODEL_DIR/<project>/<version>/. Share it between server and workers.")
    log_level: str = _env("LOG_LEVEL", "INFO", "Python logging level.")
    port: int = _env("PORT", 9090, "Port for `peal-backend serve`.", int)
    basic_auth_user: str = _env("BASIC_AUTH_USER", "", "With BASIC_AUTH_PASS, every endpoint but /health requires HTTP basic auth (one without the other is refused).")
    basic_auth_pass: str = _env("BASIC_AUTH_PASS", "", "Password for basic auth.")
    redis_url: str = _env("REDIS_URL", "",
                          "If set, training jobs go to an RQ queue on this Redis and `peal-backend worker` runs them; "
                          "if empty, an in-process background worker runs them (embedded default).")
    queue_name: str = _env("PEAL_QUEUE", "peal", "RQ queue name.")
    job_lock_ttl: float = _env("PEAL_JOB_LOCK_TTL", 30.0, "Seconds a running training's lease lives without its heartbeat; "
                               "a killed worker's project is free again after this.", float)
    job_timeout: int = _env("PEAL_JOB_TIMEOUT", 21600, "RQ kills a training job running longer than this (seconds).", int)

    # --- Model ---------------------------------------------------------------------------------
    backbone: str = _env("PEAL_BACKBONE", "facebook/dinov2-small",
                         "DINOv2 backbone: a hub id, a local folder saved with save_pretrained, or `peal-mini-4` / "
                         "`peal-mini-3` / `peal-mini-2` / `peal-mini` (small backbones shipped in the package, work "
                         "offline; peal-mini-4 recommended).")
    adapter: str = _env("PEAL_ADAPTER", "lora", "How the backbone is adapted: lora, linear (probe, frozen backbone) or prompt (visual prompt tuning).",
                        str, ("lora", "linear", "prompt"))
    lora_rank: int = _env("PEAL_LORA_RANK", 8, "LoRA rank r.", int)
    lora_alpha: float = _env("PEAL_LORA_ALPHA", 16.0, "LoRA alpha (scale = alpha / r).", float)
    lora_dropout: float = _env("PEAL_LORA_DROPOUT", 0.1, "Dropout on the LoRA branch.", float)
    lora_targets: str = _env("PEAL_LORA_TARGETS", "query,value", "Comma-separated module names that get LoRA: query, key, value, dense (or q_proj, k_proj, v_proj, o_proj), fc1, fc2.")
    lora_last_k: int = _env("PEAL_LORA_LAST_K", 2, "Put LoRA only in the last K transformer blocks (0 = all blocks). The blocks "
                            "before them are frozen, so their output comes from the activation cache: a cycle trains and "
                            "re-scores K blocks instead of all (BENCHMARKS.md, \"Queue freshness\").", int)
    prompt_tokens: int = _env("PEAL_PROMPT_TOKENS", 8, "Number of learnable prompt tokens for the prompt adapter.", int)
    prompt_deep: bool = _env("PEAL_PROMPT_DEEP", False, "Deep visual prompts (new tokens at every block) instead of shallow (first block only).", bool)
    features: str = _env("PEAL_FEATURES", "cls+mean", "What the head sees: cls (CLS token) or cls+mean (CLS and mean patch token).",
                         str, ("cls", "cls+mean"))
    image_size: int = _env("PEAL_IMAGE_SIZE", 0, "Images are resized to this square size, rounded down to a multiple of the patch size "
                          "(0 = the backbone's own size, capped at 224: 224 for hub DINOv2, 28 for peal-mini).", int)
    batch_size: int = _env("PEAL_BATCH_SIZE", 32, "Training batch size.", int)
    inference_batch_size: int = _env("PEAL_INFERENCE_BATCH_SIZE", 128, "Batch size for scoring the pool and /predict "
                                     "(on the 2-core CPU, bf16 DINOv2-small ran 12 images/s at 32, 22 at 128).", int)
    torch_threads: int = _env("PEAL_TORCH_THREADS", 1, "Torch CPU threads of the server and of each worker, for training "
                              "and torch inference (0 = torch's default, one per core). On the 2-core machine a training "
                              "cycle ran 1.5x faster with 2 threads when alone but 1.5x slower beside one busy process "
                              "(Label Studio, a second worker), so 1; raise it on a machine of its own. ONNX Runtime "
                              "inference has its own PEAL_INFERENCE_THREADS (BENCHMARKS.md, \"Torch threads\").", int)
    device: str = _env("PEAL_DEVICE", "cpu", "Torch device: cpu, cuda, cuda:0, ...")
    precision: str = _env("PEAL_PRECISION", "fp32", "Inference precision: fp32, bf16 (autocast) or auto (bf16 where the CPU supports it).",
                          str, ("fp32", "bf16", "auto"))
    runtime: str = _env("PEAL_RUNTIME", "auto", "What runs inference over many images: the frozen first pass (filling the "
                        "activation cache) and the re-score of LoRA's last K blocks from it. onnxruntime: exported to ONNX "
                        "(float32; the frozen blocks once per process, the adapted blocks once per model state) and run "
                        "by ONNX Runtime; torch: in PEAL_PRECISION. auto: onnxruntime on a CPU unless bf16 is enabled "
                        "(PEAL_PRECISION), and only for 256 images or more at once; torch otherwise. On a GPU, or where "
                        "ONNX Runtime is missing or an export fails, torch runs (with a log line). Training, prompts "
                        "and LoRA on every block always run in torch (BENCHMARKS.md, \"First pass\", \"Queue freshness\").",
                        str, ("auto", "torch", "onnxruntime"))
    inference_threads: int = _env("PEAL_INFERENCE_THREADS", 0, "ONNX Runtime's threads for inference (0 = one per core this "
                                  "process may use). Large inference batches ran faster on every core even beside a "
                                  "busy process; PEAL_TORCH_THREADS stays for training (BENCHMARKS.md, \"Torch threads\").", int)
    threshold: float = _env("PEAL_THRESHOLD", 0.5, "Multiple-choice configs: choices with probability above this are predicted.", float)

    # --- Training --------------------------------------------------------------------------------
    epochs: int = _env("PEAL_EPOCHS", 10, "Epochs of LoRA / prompt fine-tuning per training cycle (the linear head is solved, not trained in epochs).", int)
    min_steps: int = _env("PEAL_MIN_STEPS", 50, "At least this many optimiser steps per cycle, however few labels there are.", int)
    learning_rate: float = _env("PEAL_LR", 0.002, "SGD learning rate (momentum 0.9, weight decay 5e-4, cosine schedule).", float)
    head_c: float = _env("PEAL_HEAD_C", 1.0, "Inverse L2 strength of the linear head, a logistic regression on standardised features "
                         "solved to convergence (scikit-learn's C).", float)
    head_lr_multiplier: float = _env("PEAL_HEAD_LR_MULT", 10.0, "While LoRA or prompts are fine-tuned (after the head is fitted), the head learns this many times faster than the adapter.", float)
    calibration: bool = _env("PEAL_CALIBRATION", False, "Add C-PEAL's uncertainty-calibration loss to cross-entropy.", bool)
    calibration_weight: float = _env("PEAL_CALIBRATION_WEIGHT", 1.0, "Weight lambda of the calibration loss (annealed from 0 over the first epochs).", float)
    warm_start: bool = _env("PEAL_WARM_START", False, "Incremental cycles: start from the last version's adapter (when it "
                            "has the same settings and labels) with a step budget scaled to the share of labels that are "
                            "new (at least PEAL_WARM_MIN_STEPS), instead of training from the pretrained weights.", bool)
    warm_min_steps: int = _env("PEAL_WARM_MIN_STEPS", 10, "Fewest optimiser steps of a warm-started cycle.", int)
    full_retrain_every: int = _env("PEAL_FULL_RETRAIN_EVERY", 5, "With PEAL_WARM_START, every Nth cycle still trains from the "
                                   "pretrained weights with the full step budget (0 = never), so drift cannot build up.", int)
    adapt_growth: float = _env("PEAL_ADAPT_GROWTH", 0.25, "Head refreshes between adapter trainings: while the labels that are "
                               "new or changed since the adapter (LoRA, prompts) last trained stay fewer than this fraction of "
                               "the labels it trained on, a cycle keeps that adapter and only solves the head again on the "
                               "adapted features stored with the version (seconds, no forward pass). Once it is due, the "
                               "job publishes such a refresh first and then trains the adapter, giving way to a label "
                               "submitted meanwhile until the labels have grown by twice this fraction (0 = the adapter "
                               "trains every cycle; BENCHMARKS.md \"Head refreshes\", \"Queue freshness\").", float)
    seed: int = _env("PEAL_SEED", 0, "Random seed for training and selection.", int)
    retrain_every: int = _env("PEAL_RETRAIN_EVERY", 1, "Retrain after this many new or changed annotations (START_TRAINING always retrains).", int)
    keep_versions: int = _env("PEAL_KEEP_VERSIONS", 5, "Model versions kept per project; older ones are pruned.", int)
    push_predictions: bool = _env("PEAL_PUSH_PREDICTIONS", True, "After training, score the unlabeled pool and push predictions to Label Studio.", bool)
    cold_start: bool = _env("PEAL_COLD_START", True, "When a project is connected (/setup) with no version yet, order its queue at once, "
                            "before any label (needs LABEL_STUDIO_API_KEY).", bool)
    set_uncertainty_sampling: bool = _env("PEAL_SET_UNCERTAINTY_SAMPLING", False, "After training, set the project's sampling to \"Uncertainty sampling\".", bool)

    # --- Acquisition -----------------------------------------------------------------------------
    strategy: str = _env("PEAL_STRATEGY", "auto", "Acquisition strategy ordering the queue. `auto`: PEAL_AUTO_START while labels are few, "
                         "PEAL_AUTO_UNCERTAINTY once every class has labels (PEAL_AUTO_SWITCH).", str,
                         ("auto", "random", "entropy", "margin", "least_confidence", "featdist", "coreset", "badge", "typiclust",
                          "probcover", "dropquery"))
    auto_start: str = _env("PEAL_AUTO_START", "random", "`auto`'s order while labels are few (and before two classes are labeled): "
                           "random, or a coverage strategy (typiclust, probcover). Random measured safest with peal-mini (BENCHMARKS.md).",
                           str, ("random", "typiclust", "probcover"))
    auto_uncertainty: str = _env("PEAL_AUTO_UNCERTAINTY", "margin", "`auto`'s strategy once every class has labels.", str,
                                 ("margin", "entropy", "badge", "dropquery", "random"))
    auto_switch_per_class: float = _env("PEAL_AUTO_SWITCH", 3.0, "`auto` switches to PEAL_AUTO_UNCERTAINTY once every class is "
                                        "labeled and there are this many labels per class on average.", float)
    clusters: int = _env("PEAL_CLUSTERS", -1, "Label Studio `cluster` on pushed predictions: k-means clusters of the backbone's "
                         "embeddings; Label Studio then serves the least-labeled cluster first (0 = k from the pool size, k > 0 = k "
                         "clusters, -1 = none). Costs one request per prediction; measured no gain (README, BENCHMARKS.md).", int)
    balance: bool = _env("PEAL_BALANCE", False, "Class-balance the strategy's picks (PEAL / C-PEAL scheme).", bool)
    candidate_fraction: float = _env("PEAL_CANDIDATE_FRACTION", 0.1, "Class balancing chooses among this top fraction of the strategy's ranking.", float)

    # --- Label quality (Label Studio's `mislabeling` and `neighbors` prediction fields) -------------------
    mislabeling: bool = _env("PEAL_MISLABELING", False, "After each training, score every labeled task for how likely its label is "
                             "wrong (1 - the out-of-sample probability of its label from 5-fold fits of the head) and write it into Label "
                             "Studio's `mislabeling` on a `peal-quality-vN` prediction (README, \"Review labels\"). Off by "
                             "default: the five head fits run inside the cycle (tens of seconds at a few hundred labels on "
                             "the 2-core machine) and delay the queue's freshness.", bool)
    duplicate_similarity: float = _env("PEAL_DUPLICATE_SIMILARITY", 0.0, "Labeled tasks get Label Studio's `neighbors`: the tasks "
                                       "whose whitened backbone embedding has at least this cosine similarity with theirs "
                                       "(near-duplicates; 0 = off, 0.98 found 95-100 % of resized and re-encoded copies, "
                                       "BENCHMARKS.md).", float)
    quality_max_writes: int = _env("PEAL_QUALITY_MAX_WRITES", 200, "Most labeled tasks given a quality prediction per training: "
                                   "those with near-duplicates, then the most likely mislabeled. Label Studio stores these fields "
                                   "only one request per prediction.", int)

    # --- Images ----------------------------------------------------------------------------------
    cache_dir: str = _env("PEAL_CACHE_DIR", "", "Cache folder: fetched images and frozen backbone activations (default: MODEL_DIR/.cache).")
    image_cache_mb: float = _env("PEAL_IMAGE_CACHE_MB", 2000.0, "Disk space of the fetched-image cache, in MB; least recently "
                                 "used images are evicted past it. Images are stored once per content, whatever their URL.", float)
    activation_cache: bool = _env("PEAL_ACTIVATION_CACHE", True, "Reuse frozen backbone activations between cycles (linear probe, LoRA on the last K blocks).", bool)
    allowed_hosts: str = _env("PEAL_ALLOWED_HOSTS", "",
                              "Comma-separated extra hosts images may be fetched from; the Label Studio host is always allowed. `*` allows any host.")
    predict_deadline: float = _env("PEAL_PREDICT_DEADLINE", 30.0, "Seconds one /predict may spend fetching its images; tasks "
                                   "not fetched by then get an error result, the others their prediction.", float)
    predict_max_tasks: int = _env("PEAL_PREDICT_MAX_TASKS", 1000, "Most tasks in one /predict request (more: 400).", int)
    predict_concurrency: int = _env("PEAL_PREDICT_CONCURRENCY", 6, "Most /predict requests a server process runs at once; "
                                    "more are answered 503 at once, keeping threads free for /health and /webhook.", int)
    fetch_timeout: float = _env("PEAL_FETCH_TIMEOUT", 10.0, "Seconds before an image fetch gives up.", float)
    max_image_bytes: int = _env("PEAL_MAX_IMAGE_BYTES", 50_000_000, "Largest image file fetched, in bytes.", int)
    max_image_pixels: int = _env("PEAL_MAX_IMAGE_PIXELS", 100_000_000, "Largest decoded image, in pixels (decompression-bomb guard).", int)
    decode_max_side: int = _env("PEAL_DECODE_MAX_SIDE", 1024, "Fetched images are decoded reduced (by a whole factor) until their longer side "
                                "is under twice this, so a small file declaring many pixels cannot take gigabytes. "
                                "At least PEAL_IMAGE_SIZE.", int)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise SettingsError(f"{f.metadata['env']}={getattr(self, f.name)!r}: expected one of {', '.join(choices)}")
        if self.image_size < 0 or self.batch_size <= 0 or self.inference_batch_size <= 0:
            raise SettingsError("PEAL_IMAGE_SIZE must be >= 0, PEAL_BATCH_SIZE and PEAL_INFERENCE_BATCH_SIZE positive")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            # one of the two alone used to leave every endpoint open while looking configured
            given, missing = (("BASIC_AUTH_USER", "BASIC_AUTH_PASS") if self.basic_auth_user
                              else ("BASIC_AUTH_PASS", "BASIC_AUTH_USER"))
            raise SettingsError(f"{given} is set but {missing} is empty: set both to require basic auth, or neither")
        if self.decode_max_side <= 0 or self.decode_max_side < self.image_size:
            raise SettingsError(f"PEAL_DECODE_MAX_SIDE={self.decode_max_side}: must be positive and at least "
                                f"PEAL_IMAGE_SIZE ({self.image_size})")
        if not 0 <= self.adapt_growth <= 100:
            raise SettingsError(f"PEAL_ADAPT_GROWTH={self.adapt_growth}: must be between 0 (off) and 100")
        if self.lora_last_k < 0 or self.warm_min_steps < 1 or self.full_retrain_every < 0:
            raise SettingsError("PEAL_LORA_LAST_K and PEAL_FULL_RETRAIN_EVERY must be >= 0, PEAL_WARM_MIN_STEPS >= 1")
        if not 0 <= self.duplicate_similarity <= 1:
            raise SettingsError(f"PEAL_DUPLICATE_SIMILARITY={self.duplicate_similarity}: must be in [0, 1] (0 = off)")
        if self.quality_max_writes < 0:
            raise SettingsError(f"PEAL_QUALITY_MAX_WRITES={self.quality_max_writes}: must be >= 0")
        if not 0 < self.candidate_fraction <= 1:
            raise SettingsError(f"PEAL_CANDIDATE_FRACTION={self.candidate_fraction}: must be in (0, 1]")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name in environ and environ[name] != "":
                values[f.name] = _parse(name, environ[name], f.metadata["kind"])
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def lora_target_modules(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def allowed_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    @property
    def image_cache_dir(self) -> str:
        return os.path.join(self.cache_dir or os.path.join(self.model_dir, ".cache"), "images")

    @property
    def activation_cache_dir(self) -> str:
        return os.path.join(self.cache_dir or os.path.join(self.model_dir, ".cache"), "activations")

    def redacted(self) -> dict:
        """Settings as a dict with secrets hidden, safe to log or return over HTTP."""
        out = dataclasses.asdict(self)
        for key in ("label_studio_api_key", "basic_auth_pass"):
            if out[key]:
                out[key] = "***"
        for key in ("redis_url", "label_studio_url"):
            out[key] = hide_url_secrets(out[key])
        return out


def hide_url_secrets(url: str) -> str:
    """`url` with its user:password and its query (redis-py reads `?password=`) shown as ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    # the host is after the last @: a password may itself contain @
    netloc = "***@" + parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """PEAL_* variables that are no setting (a typo, or a setting that was removed, like PEAL_BUDGET):
    the server and the worker warn about them instead of silently ignoring them."""
    environ = os.environ if environ is None else environ
    known = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    return sorted(k for k in environ if k.startswith("PEAL_") and k not in known and not k.startswith("PEAL_TEST_")
                  and k not in ("PEAL_DATASETS", "PEAL_REQUIRE_LABEL_STUDIO", "PEAL_E2E_TRAIN_TIMEOUT"))


def _parse(name: str, raw: str, kind) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r}: expected true or false")
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a {kind.__name__}") from None


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default if f.default != "" else "(empty)"
        doc = f.metadata["doc"]
        if f.metadata["choices"]:
            doc += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        rows.append(f"| `{f.metadata['env']}` | `{default}` | {doc} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    if "--markdown" in sys.argv:
        print(markdown_table())
