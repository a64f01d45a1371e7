"""Where inference runs: torch, or ONNX Runtime.

Two parts of a cycle's scoring can run in ONNX Runtime (float32, on the CPU):
- the frozen first pass (`scoring.frozen_activations`, which fills the activation cache and which
  `sharding` runs; a linear probe's whole backbone and pooling, or the blocks before LoRA on the last
  K). Those blocks never change while the backbone stays the same, so they are exported once per
  process;
- the re-score of the adapted blocks from the cache (`scoring.score_from_activations`: LoRA's last K
  blocks with the adapter merged into the weights, pooling and the head), exported once per model
  state: a cycle's new weights are one export (about 1.4 s for two DINOv2-small blocks), a pool of
  thousands of re-scored images pays for it.
ONNX Runtime runs with PEAL_INFERENCE_THREADS threads (default: one per core), torch's training keeps
PEAL_TORCH_THREADS: large inference batches gained from every core even on a shared CPU, a training
cycle's many small operations lost (BENCHMARKS.md, "Torch threads"). Outputs match torch's float32
ones to ~1e-5.

`auto` (the default) picks ONNX Runtime on a CPU where bf16 is not enabled (on a CPU without bf16
hardware it measured faster than torch, BENCHMARKS.md) and for at least AUTO_MIN_IMAGES images at once
(fewer, as a /predict of a few tasks, are not worth an export); torch on a GPU and where
PEAL_PRECISION enables bf16 (AMX / AVX-512 bf16 CPUs, where torch's bf16 path was the fast one).
ONNX Runtime missing, a GPU device or an export that fails: torch runs, with one log line saying why.
LoRA on every block, prompts and training always run in torch.

int8 (ONNX Runtime's and torch's dynamic quantisation of the linear layers) was faster still, but its
top-1 agreement with float32 was 94-96% on real images (BENCHMARKS.md), below the 99% bar: not offered.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import threading
import warnings
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from torch import nn

from .backbone import Classifier, loaded_fingerprint
from .config import Settings

log = logging.getLogger(__name__)

AUTO_MIN_IMAGES = 256  # `auto` runs fewer images at once in torch: an export would cost more than it saves
SUFFIX_SESSIONS = 4  # adapted-block sessions kept per process (the newest model states)

_sessions: OrderedDict[tuple, object] = OrderedDict()  # (what the frozen graph depends on) -> ONNX Runtime session, or None: failed
_suffixes: OrderedDict[tuple, object] = OrderedDict()  # (model state, ...) -> session or None, newest last
_lock = threading.Lock()
_said: set[tuple] = set()  # fallback messages already logged


def _say_once(key: tuple, msg: str, *args) -> None:
    if key not in _said:
        _said.add(key)
        log.warning(msg, *args)


def resolve(settings: Settings) -> str:
    """The runtime the frozen first pass will use: `torch` or `onnxruntime`."""
    from .training import bf16_enabled

    wanted = settings.runtime
    if wanted == "torch":
        return "torch"
    device = torch.device(settings.device).type
    if device != "cpu":
        if wanted != "auto":
            _say_once(("device", wanted, device), "PEAL_RUNTIME=%s runs on the CPU only; PEAL_DEVICE=%s keeps "
                      "the torch path", wanted, settings.device)
        return "torch"
    if wanted == "auto":
        if bf16_enabled(settings):  # bf16 hardware (AMX, AVX-512 bf16), or bf16 asked for: torch's bf16 path
            return "torch"
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        _say_once(("import", wanted), "PEAL_RUNTIME=%s: %s; the frozen first pass runs in torch "
                  "(pip install onnxruntime onnx)", wanted, exc)
        return "torch"
    return "onnxruntime"


def use_onnxruntime(settings: Settings, n_images: int) -> bool:
    """Whether `n_images` scored at once go through ONNX Runtime: PEAL_RUNTIME resolves to it, and either
    it was asked for by name or (`auto`) the batch is large enough to be worth an export."""
    if n_images == 0 or resolve(settings) != "onnxruntime":
        return False
    return settings.runtime == "onnxruntime" or n_images >= AUTO_MIN_IMAGES


def inference_threads(settings: Settings) -> int:
    """ONNX Runtime's threads: PEAL_INFERENCE_THREADS, or one per core this process may use (0)."""
    if settings.inference_threads > 0:
        return settings.inference_threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity call (macOS)
        return max(1, os.cpu_count() or 1)


class _FrozenPrefix(nn.Module):
    """What the activation cache stores for an image (see `scoring`): the tokens entering the first
    adapted block, or the pooled features when the whole backbone is frozen."""

    def __init__(self, clf: Classifier):
        super().__init__()
        self.clf = clf

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        clf = self.clf
        h = clf.embed(pixels, until=clf.first_adapted)
        if clf.first_adapted == clf.n_layers:
            h = clf.features_from(h, clf.n_layers)
        return h


class _AdaptedSuffix(nn.Module):
    """The rest of the forward from cached tokens: the adapted blocks, pooling and the head."""

    def __init__(self, clf: Classifier):
        super().__init__()
        self.clf = clf

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.clf.features_from(tokens, self.clf.first_adapted)
        return features, self.clf.head(features)


def _export(module: nn.Module, example: torch.Tensor, inputs: list[str], outputs: list[str]) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about shapes it records as constants (shapes are in the keys)
        # the TorchScript exporter: one trace, a dynamic batch axis
        torch.onnx.export(module, (example,), buf, input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "n"} for name in inputs + outputs}, opset_version=17, dynamo=False)
    return buf.getvalue()


def export_onnx(clf: Classifier, size: int) -> bytes:
    """`clf`'s frozen prefix as an ONNX model taking (n, 3, size, size) pixels."""
    prefix = _FrozenPrefix(copy.deepcopy(clf)).eval().float()  # a copy: the caller's model is left as it is
    return _export(prefix, torch.zeros(2, 3, size, size), ["pixels"], ["out"])


def export_suffix(clf: Classifier, tokens: tuple[int, int]) -> bytes:
    """`clf`'s adapted blocks (LoRA merged into a copy's weights), pooling and head as an ONNX model taking
    (n, *tokens) cached activations and giving (features, logits)."""
    from peft.tuners.lora import LoraLayer

    twin = copy.deepcopy(clf).eval().float()
    for module in twin.modules():
        if isinstance(module, LoraLayer):
            module.merge()  # W + BA: the graph has no LoRA branch (eval: no dropout either)
    return _export(_AdaptedSuffix(twin), torch.zeros(2, *tokens), ["tokens"], ["features", "logits"])


def state_digest(clf: Classifier) -> str:
    """A hash of what a cycle changes (adapter and head weights): one suffix export per model state."""
    h = hashlib.sha256()
    for name, value in sorted(clf.trainable_state().items()):
        h.update(name.encode())
        h.update(value.float().numpy().tobytes())
    return h.hexdigest()


def make_session(model: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # a CPU shared with Label Studio and other workers: idle threads sleep rather than spin
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _cached_session(table: OrderedDict, key: tuple, export: Callable[[], bytes], threads: int, settings: Settings,
                    what: str, done: str, keep: int | None = None):
    """The session under `key` in `table`, exported and made on first use (the `keep` newest kept, when
    bounded), or None if that failed: logged, and remembered so it is not tried again."""
    with _lock:
        if key in table:
            table.move_to_end(key)
            return table[key]
        try:
            table[key] = make_session(export(), threads)
            log.log(logging.INFO if keep is None else logging.DEBUG, "%s", done)
        except Exception as exc:  # an exporter or runtime that cannot take this model: torch still can
            table[key] = None
            log.warning("PEAL_RUNTIME=%s: exporting %s failed (%s: %s); %s in torch", settings.runtime, what,
                        type(exc).__name__, exc, "the first pass runs" if keep is None else "they run")
        while keep is not None and len(table) > keep:
            table.popitem(last=False)
        return table[key]


def session(clf: Classifier, settings: Settings, size: int):
    """The ONNX Runtime session for `clf`'s frozen prefix at `size` px (exported on first use in this
    process), or None if the export failed (logged once; the caller then runs torch)."""
    threads = inference_threads(settings)
    key = (loaded_fingerprint(settings.backbone), clf.first_adapted, clf.n_layers, clf.use_mean, size, threads)
    done = (f"frozen first pass: {clf.first_adapted} of {clf.n_layers} blocks"
            f"{' and pooling' if clf.first_adapted == clf.n_layers else ''} exported to ONNX Runtime ({size} px, {threads} threads)")
    return _cached_session(_sessions, key, lambda: export_onnx(clf, size), threads, settings, "the frozen blocks", done)


def suffix_session(clf: Classifier, settings: Settings, tokens: tuple[int, int]):
    """The ONNX Runtime session for `clf`'s adapted blocks in their current state (exported on first use;
    the SUFFIX_SESSIONS newest states are kept), or None if the export failed (logged once per state;
    the caller then runs torch)."""
    threads = inference_threads(settings)
    key = (state_digest(clf), loaded_fingerprint(settings.backbone), clf.first_adapted, clf.n_layers, clf.use_mean,
           tuple(tokens), threads)
    done = (f"adapted blocks {clf.first_adapted}..{clf.n_layers - 1} exported to ONNX Runtime "
            f"({tuple(tokens)} tokens, {threads} threads)")
    return _cached_session(_suffixes, key, lambda: export_suffix(clf, tokens), threads, settings, "the adapted blocks",
                           done, keep=SUFFIX_SESSIONS)


def run_suffix(sess, tokens: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) for cached activations, a batch at a time."""
    parts = [sess.run(None, {"tokens": np.ascontiguousarray(tokens[i:i + batch_size], dtype=np.float32)})
             for i in range(0, len(tokens), batch_size)]
    return np.concatenate([f for f, _ in parts]), np.concatenate([lg for _, lg in parts])


def run(sess, pixels: torch.Tensor, batch_size: int) -> np.ndarray:
    out = [sess.run(None, {"pixels": pixels[i:i + batch_size].float().numpy()})[0]
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out).astype(np.float32, copy=False)
