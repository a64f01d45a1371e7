"""Where the frozen first pass runs: torch, or ONNX Runtime.

The first pass of a cycle pushes every pool image through the frozen blocks (`scoring.frozen_activations`,
which fills the activation cache and which `sharding` runs; a linear probe's whole backbone and pooling,
or the blocks before LoRA on the last K). Those blocks never change while the backbone stays the same,
so with PEAL_RUNTIME=onnxruntime they are exported once per process to ONNX (float32) and run by ONNX
Runtime, with PEAL_TORCH_THREADS threads; features match torch's float32 ones to ~1e-5.
`auto` (the default) picks ONNX Runtime on a CPU where bf16 is not enabled (on a CPU without bf16
hardware it measured faster than torch, BENCHMARKS.md), torch on a GPU and where PEAL_PRECISION
enables bf16 (AMX / AVX-512 bf16 CPUs, where torch's bf16 path was the fast one). ONNX Runtime missing,
a GPU device or an export that fails: torch runs, with one log line saying why. Adapted blocks (LoRA
on every block, prompts) and training always run in torch.

int8 (ONNX Runtime's and torch's dynamic quantisation of the linear layers) was faster still, but its
top-1 agreement with float32 was 94-96% on real images (BENCHMARKS.md), below the 99% bar: not offered.
"""
from __future__ import annotations

import copy
import io
import logging
import threading
import warnings

import numpy as np
import torch
from torch import nn

from .backbone import Classifier, loaded_fingerprint
from .config import Settings

log = logging.getLogger(__name__)

_sessions: dict[tuple, object] = {}  # (what the frozen graph depends on) -> ONNX Runtime session, or None: failed
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


def export_onnx(clf: Classifier, size: int) -> bytes:
    """`clf`'s frozen prefix as an ONNX model taking (n, 3, size, size) pixels."""
    prefix = _FrozenPrefix(copy.deepcopy(clf)).eval().float()  # a copy: the caller's model is left as it is
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about shapes it records as constants (size is in the key)
        # the TorchScript exporter: one trace, a dynamic batch axis
        torch.onnx.export(prefix, (torch.zeros(2, 3, size, size),), buf, input_names=["pixels"], output_names=["out"],
                          dynamic_axes={"pixels": {0: "n"}, "out": {0: "n"}}, opset_version=17, dynamo=False)
    return buf.getvalue()


def make_session(model: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # a CPU shared with Label Studio and other workers: idle threads sleep rather than spin
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def session(clf: Classifier, settings: Settings, size: int):
    """The ONNX Runtime session for `clf`'s frozen prefix at `size` px (exported on first use in this
    process), or None if the export failed (logged once; the caller then runs torch)."""
    threads = max(1, torch.get_num_threads())
    key = (loaded_fingerprint(settings.backbone), clf.first_adapted, clf.n_layers, clf.use_mean, size, threads)
    with _lock:
        if key not in _sessions:
            try:
                _sessions[key] = make_session(export_onnx(clf, size), threads)
                log.info("frozen first pass: %d of %d blocks%s exported to ONNX Runtime (%d px, %d threads)",
                         clf.first_adapted, clf.n_layers, " and pooling" if clf.first_adapted == clf.n_layers else "",
                         size, threads)
            except Exception as exc:  # an exporter or runtime that cannot take this model: torch still can
                _sessions[key] = None
                log.warning("PEAL_RUNTIME=%s: exporting the frozen blocks failed (%s: %s); the first pass runs in torch",
                            settings.runtime, type(exc).__name__, exc)
        return _sessions[key]


def run(sess, pixels: torch.Tensor, batch_size: int) -> np.ndarray:
    out = [sess.run(None, {"pixels": pixels[i:i + batch_size].float().numpy()})[0]
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out).astype(np.float32, copy=False)
