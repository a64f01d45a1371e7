"""PEAL_RUNTIME: the frozen first pass in ONNX Runtime agrees with float32 torch, and every case it
cannot serve (a GPU, ONNX Runtime missing, an export that fails) falls back to torch with a log line."""
from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from peal_backend import runtime
from peal_backend.backbone import build_classifier
from peal_backend.config import Settings, SettingsError
from peal_backend.images import content_hash, preprocess, to_pil
from peal_backend.scoring import ActivationCache, cache_key, frozen_activations, score_cached
from peal_backend.training import fit_head
from tests.backbone_fixture import tiny_backbone  # noqa: F401
from tests.conftest import DATASETS

pytest.importorskip("onnxruntime")
RETINA = DATASETS / "retinamnist.npz"


def retina(split: str, n: int):
    with np.load(RETINA) as d:
        arrays, labels = d[f"{split}_images"][:n], d[f"{split}_labels"][:n, 0]
    return preprocess([to_pil(a) for a in arrays], 28), torch.tensor(labels.astype(np.int64)), arrays


@pytest.mark.skipif(not RETINA.exists(), reason=f"{RETINA} not present")
def test_onnxruntime_agrees_with_fp32_torch_on_real_images():
    """peal-mini (trained weights), RetinaMNIST: a head fitted on fp32 torch features gives the same top-1
    on ONNX Runtime's features of 300 test images, and the features match."""
    s = Settings(backbone="peal-mini", adapter="linear", precision="fp32", inference_batch_size=64)
    clf = build_classifier(s, 5).eval()
    train_px, train_y, _ = retina("train", 300)
    test_px, _, _ = retina("test", 301)  # 301: the last batch is a partial one (the batch axis is dynamic)
    torch_feats = frozen_activations(clf, test_px, s.replace(runtime="torch"))
    ort_feats = frozen_activations(clf, test_px, s.replace(runtime="onnxruntime"))
    w, b = fit_head(torch.from_numpy(frozen_activations(clf, train_px, s.replace(runtime="torch"))), train_y, 5)
    top_torch = (torch.from_numpy(torch_feats) @ w.T + b).argmax(1)
    top_ort = (torch.from_numpy(ort_feats) @ w.T + b).argmax(1)
    assert ort_feats.shape == torch_feats.shape == (301, clf.feature_dim)
    assert (top_ort == top_torch).float().mean() >= 0.99
    assert np.abs(ort_feats - torch_feats).max() < 1e-4


def test_lora_prefix_in_onnxruntime_matches_torch_and_leaves_the_model_alone(tiny_backbone):
    """LoRA on the last block: the cached prefix (tokens entering it) from ONNX Runtime equals torch's,
    and exporting neither changes the caller's model nor trips over its LoRA layers."""
    s = Settings(backbone=tiny_backbone, adapter="lora", lora_last_k=1, inference_batch_size=4)
    clf = build_classifier(s, 3).eval()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    px = torch.randn(10, 3, 28, 28)
    out = frozen_activations(clf, px, s.replace(runtime="onnxruntime"))
    ref = frozen_activations(clf, px, s.replace(runtime="torch"))
    assert out.shape == ref.shape == (10, 1 + 16, 32)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in clf.state_dict().items())
    assert all(p.dtype == torch.float32 for p in clf.parameters())


@pytest.mark.skipif(not RETINA.exists(), reason=f"{RETINA} not present")
def test_cached_scoring_through_onnxruntime_equals_torch(tmp_path, tiny_backbone):
    """The one inference path (score_cached) gives the same predictions whichever runtime filled the
    cache, and the two runtimes never share a cache folder."""
    px, _, arrays = retina("train", 20)
    hashes = [content_hash(a.tobytes()) for a in arrays]
    s = Settings(backbone=tiny_backbone, adapter="linear")
    clf = build_classifier(s, 5)
    preds = {}
    for rt in ("torch", "onnxruntime"):
        st = s.replace(runtime=rt)
        preds[rt] = score_cached(clf, st, hashes, px, ActivationCache(tmp_path / cache_key(st, clf, 28)))
    np.testing.assert_allclose(preds["onnxruntime"].probs, preds["torch"].probs, atol=1e-4)
    np.testing.assert_allclose(preds["onnxruntime"].embeddings, preds["torch"].embeddings, atol=1e-2)  # float16 cache
    assert cache_key(s.replace(runtime="torch"), clf, 28) != cache_key(s.replace(runtime="onnxruntime"), clf, 28)


def test_auto_picks_onnxruntime_on_cpu_unless_bf16_and_torch_on_gpu():
    assert runtime.resolve(Settings(runtime="auto", precision="fp32")) == "onnxruntime"
    assert runtime.resolve(Settings(runtime="auto", precision="bf16")) == "torch"
    assert runtime.resolve(Settings(runtime="auto", device="cuda")) == "torch"
    assert runtime.resolve(Settings(runtime="torch")) == "torch"


def test_gpu_device_keeps_torch_with_a_log_line(caplog, tiny_backbone):
    runtime._said.clear()
    with caplog.at_level(logging.WARNING, logger="peal_backend.runtime"):
        assert runtime.resolve(Settings(runtime="onnxruntime", device="cuda:0")) == "torch"
    assert "PEAL_RUNTIME=onnxruntime" in caplog.text and "PEAL_DEVICE=cuda:0" in caplog.text


def assert_torch_ran_and_said(tiny_backbone, caplog, *said: str) -> None:
    """PEAL_RUNTIME=onnxruntime asked for, torch's activations come back, and the log says each of `said`."""
    s = Settings(backbone=tiny_backbone, adapter="linear", runtime="onnxruntime")
    clf = build_classifier(s, 3).eval()
    px = torch.randn(3, 3, 28, 28)
    with caplog.at_level(logging.WARNING, logger="peal_backend.runtime"):
        out = frozen_activations(clf, px, s)
    np.testing.assert_allclose(out, frozen_activations(clf, px, s.replace(runtime="torch")), atol=1e-6)
    assert all(text in caplog.text for text in said)


def test_missing_onnxruntime_falls_back_to_torch_with_a_log_line(monkeypatch, caplog, tiny_backbone):
    runtime._said.clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert_torch_ran_and_said(tiny_backbone, caplog, "PEAL_RUNTIME=onnxruntime", "runs in torch")


def test_failed_export_falls_back_to_torch_with_a_log_line(monkeypatch, caplog, tiny_backbone):
    def broken(clf, size):
        raise RuntimeError("unsupported operator")
    monkeypatch.setattr(runtime, "export_onnx", broken)
    monkeypatch.setattr(runtime, "_sessions", runtime.OrderedDict())
    assert_torch_ran_and_said(tiny_backbone, caplog, "unsupported operator", "runs in torch")


def test_unknown_runtime_is_refused_naming_the_variable():
    with pytest.raises(SettingsError, match="PEAL_RUNTIME"):
        Settings.from_env({"PEAL_RUNTIME": "tensorrt"})


def test_uncached_linear_probe_scoring_runs_the_runtime_and_equals_predict(monkeypatch, tiny_backbone):
    """Without a cache folder, score_images still sends a linear probe's frozen pass through the runtime."""
    from peal_backend.cycle import ImageSet, score_images
    from peal_backend.training import predict

    calls = []
    real = runtime.run
    monkeypatch.setattr(runtime, "run", lambda sess, px, bs: calls.append(len(px)) or real(sess, px, bs))
    s = Settings(backbone=tiny_backbone, adapter="linear", runtime="onnxruntime")
    clf = build_classifier(s, 3).eval()
    px = torch.randn(5, 3, 28, 28)
    got = score_images(clf, s, ImageSet.from_tensor([str(i) for i in range(5)], px), None)
    want = predict(clf, px, s.replace(runtime="torch"))
    assert calls == [5]
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-5)
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-4)


def lora_with_weights(tiny_backbone, **overrides):
    """A LoRA-on-the-last-block classifier whose adapter is not the identity (B is zero at init)."""
    s = Settings(backbone=tiny_backbone, adapter="lora", lora_last_k=1, inference_batch_size=4, **overrides)
    clf = build_classifier(s, 3).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in clf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return s, clf


def test_adapted_blocks_in_onnxruntime_match_torch_and_follow_each_new_state(tiny_backbone):
    """The re-score from cached tokens (LoRA's blocks merged into a copy, pooling, head) gives torch's
    predictions; after the weights change (a new cycle) it gives the new model's, not the old export's;
    and the caller's model keeps its unmerged LoRA weights."""
    from peal_backend.scoring import score_from_activations

    s, clf = lora_with_weights(tiny_backbone)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    acts = np.random.default_rng(0).normal(size=(11, 17, 32)).astype(np.float32)  # 11: a partial last batch
    for _ in range(2):
        ort = score_from_activations(clf, acts, s.replace(runtime="onnxruntime"))
        ref = score_from_activations(clf, acts, s.replace(runtime="torch"))
        assert ort.probs.shape == ref.probs.shape == (11, 3)
        np.testing.assert_allclose(ort.logits, ref.logits, atol=1e-4)
        np.testing.assert_allclose(ort.embeddings, ref.embeddings, atol=1e-4)
        assert all(torch.equal(v, before[k]) for k, v in clf.state_dict().items())
        with torch.no_grad():  # the next cycle's weights
            clf.head.weight.mul_(-2.0)
            next(p for n, p in clf.named_parameters() if "lora_A" in n).add_(0.3)
        before = {k: v.clone() for k, v in clf.state_dict().items()}
    assert len(runtime._suffixes) >= 2


def test_auto_runs_onnxruntime_only_for_large_batches_on_cpu():
    auto = Settings(runtime="auto", precision="fp32")
    assert not runtime.use_onnxruntime(auto, runtime.AUTO_MIN_IMAGES - 1)
    assert runtime.use_onnxruntime(auto, runtime.AUTO_MIN_IMAGES)
    assert runtime.use_onnxruntime(auto.replace(runtime="onnxruntime"), 1)  # asked for by name: always
    assert not runtime.use_onnxruntime(auto.replace(runtime="onnxruntime"), 0)
    assert not runtime.use_onnxruntime(auto.replace(device="cuda"), 10_000)
    assert not runtime.use_onnxruntime(auto.replace(runtime="torch"), 10_000)


def test_a_large_rescore_under_auto_goes_through_onnxruntime(monkeypatch, tiny_backbone):
    """The default setting: a pool of AUTO_MIN_IMAGES cached rows is re-scored by ONNX Runtime (with one
    session for the state), a few rows by torch, and both give the same predictions."""
    from peal_backend.scoring import score_from_activations

    s, clf = lora_with_weights(tiny_backbone)
    if s.runtime != "auto":
        pytest.skip("PEAL_RUNTIME is set in this environment")
    calls = []
    real = runtime.run_suffix
    monkeypatch.setattr(runtime, "run_suffix", lambda sess, t, bs: calls.append(len(t)) or real(sess, t, bs))
    acts = np.random.default_rng(1).normal(size=(runtime.AUTO_MIN_IMAGES, 17, 32)).astype(np.float32)
    big = score_from_activations(clf, acts, s.replace(inference_batch_size=64))
    small = score_from_activations(clf, acts[:5], s)
    assert calls == [runtime.AUTO_MIN_IMAGES]
    np.testing.assert_allclose(big.probs[:5], small.probs, atol=1e-5)


def test_inference_threads_default_to_the_cores_this_process_may_use():
    import os
    assert runtime.inference_threads(Settings(inference_threads=3)) == 3
    assert runtime.inference_threads(Settings(inference_threads=0)) == len(os.sched_getaffinity(0))


def test_failed_suffix_export_rescores_in_torch_with_a_log_line(monkeypatch, caplog, tiny_backbone):
    from peal_backend.scoring import score_from_activations

    def broken(clf, tokens):
        raise RuntimeError("unsupported operator in the adapted blocks")
    monkeypatch.setattr(runtime, "export_suffix", broken)
    monkeypatch.setattr(runtime, "_suffixes", runtime.OrderedDict())
    s, clf = lora_with_weights(tiny_backbone, runtime="onnxruntime")
    acts = np.random.default_rng(2).normal(size=(6, 17, 32)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="peal_backend.runtime"):
        got = score_from_activations(clf, acts, s)
    want = score_from_activations(clf, acts, s.replace(runtime="torch"))
    np.testing.assert_array_equal(got.logits, want.logits)
    assert "unsupported operator in the adapted blocks" in caplog.text and "run in torch" in caplog.text
