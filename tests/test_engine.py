"""Backbone loading, adapters, training, the calibration loss and the version store."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from peal_backend.backbone import BackboneLoadError, build_classifier, input_size, load_backbone
from peal_backend.config import Settings, SettingsError
from peal_backend.store import ModelStore
from peal_backend.training import calibration_loss, fit, predict, prediction_entropy
from tests.backbone_fixture import tiny_backbone  # noqa: F401  (fixture)


def two_blob_pixels(n_per_class=12, size=28, seed=0):
    """Two visibly different image classes: dark noisy images vs bright striped ones."""
    g = torch.Generator().manual_seed(seed)
    dark = torch.rand(n_per_class, 3, size, size, generator=g) * 0.3 - 1.5
    bright = torch.rand(n_per_class, 3, size, size, generator=g) * 0.3 + 1.0
    bright[:, :, ::4] = -1.0
    x = torch.cat([dark, bright])
    y = torch.tensor([0] * n_per_class + [1] * n_per_class)
    return x, y


# --- settings ---------------------------------------------------------------------------------------
def test_settings_from_env_parses_and_names_bad_values():
    s = Settings.from_env({"PEAL_ADAPTER": "linear", "PEAL_LORA_RANK": "4", "PEAL_CALIBRATION": "yes", "PORT": "9999"})
    assert (s.adapter, s.lora_rank, s.calibration, s.port) == ("linear", 4, True, 9999)
    with pytest.raises(SettingsError, match="PEAL_LORA_RANK"):
        Settings.from_env({"PEAL_LORA_RANK": "eight"})
    with pytest.raises(SettingsError, match="PEAL_ADAPTER"):
        Settings.from_env({"PEAL_ADAPTER": "full"})
    red = Settings(label_studio_api_key="secret-token", basic_auth_user="u", basic_auth_pass="pw").redacted()
    assert "secret-token" not in str(red) and "pw" not in str(red.values())


# --- backbone -----------------------------------------------------------------------------------------
def test_backbone_loads_through_from_pretrained_and_copies_are_independent(tiny_backbone):
    a, b = load_backbone(tiny_backbone), load_backbone(tiny_backbone)
    assert a.config.hidden_size == 32 and a.config.num_hidden_layers == 2
    with torch.no_grad():
        a.layernorm.weight.add_(1.0)
    assert not torch.equal(a.layernorm.weight, b.layernorm.weight)


def test_weights_rewritten_under_a_running_process_do_not_crash_it(tmp_path):
    """A server keeps serving when the backbone folder's weights are rewritten in place (a retrained
    peal-mini, a refreshed snapshot). Memory-mapped weights would die with SIGBUS; in a subprocess so
    that a crash is a failed assertion, not a dead test run."""
    code = textwrap.dedent(f"""
        import os, torch
        from tests.backbone_fixture import save_tiny_dinov2
        from peal_backend.backbone import load_backbone
        folder = save_tiny_dinov2({str(tmp_path / "m")!r})
        first = load_backbone(folder)
        with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
            f.truncate(0)  # the file is rewritten in place
        again = load_backbone(folder)
        with torch.no_grad():
            out = again(pixel_values=torch.zeros(1, 3, 28, 28)).last_hidden_state
        assert torch.isfinite(out).all() and torch.equal(first.layernorm.weight, again.layernorm.weight)
        print("served")
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "served" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_backbone_load_errors_say_what_to_do(tmp_path):
    with pytest.raises(BackboneLoadError, match="neither a local folder nor a hub id.*peal-mini"):
        load_backbone(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneLoadError, match="does not hold a DINOv2 model"):
        load_backbone(str(tmp_path / "empty"))


def test_offline_hub_id_fails_with_instructions():
    code = textwrap.dedent("""
        from peal_backend.backbone import load_backbone, BackboneLoadError
        try:
            load_backbone("facebook/dinov2-small")
        except BackboneLoadError as e:
            print("ERR", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "ERR cannot load DINOv2 backbone PEAL_BACKBONE='facebook/dinov2-small'" in out.stdout


def test_input_size_defaults_to_backbone_size_capped_and_patch_aligned(tiny_backbone):
    cfg = load_backbone(tiny_backbone).config
    assert input_size(Settings(), cfg) == 28
    assert input_size(Settings(image_size=30), cfg) == 28  # rounded down to the 7-px patch
    cfg.image_size = 518
    assert input_size(Settings(), cfg) == 224


@pytest.mark.parametrize("adapter,extra", [("lora", {}), ("lora", {"lora_last_k": 1}), ("linear", {}),
                                           ("prompt", {}), ("prompt", {"prompt_deep": True})])
def test_training_changes_only_adapter_and_head(tiny_backbone, adapter, extra):
    s = Settings(backbone=tiny_backbone, adapter=adapter, epochs=2, min_steps=5, batch_size=8, **extra)
    model = build_classifier(s, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x, y = two_blob_pixels(6)
    fit(model, x, y, s)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "training changed nothing"
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:3]}"
    assert {"head.weight", "head.bias"} <= changed
    if adapter == "lora":
        assert any("lora_B" in k for k in changed)
        if extra:  # LoRA only in the last block
            assert all(".layer.1." in k for k in changed if "lora" in k)
    if adapter == "prompt":
        assert "prompts" in changed
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert counts["trainable"] < counts["backbone"]


def test_lora_trainable_fraction_on_dinov2_small_shape(tmp_path):
    """The issue asks for the trainable share against the backbone; DINOv2-small's architecture, random weights."""
    from transformers import Dinov2Config, Dinov2Model
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                             intermediate_size=1536, patch_size=14, image_size=224)).save_pretrained(tmp_path)
    counts = build_classifier(Settings(backbone=str(tmp_path), lora_rank=8, lora_last_k=0), 5).parameter_counts()
    # LoRA r=8 on query and value of 12 blocks: 12 * 2 * 8 * (384 + 384) = 147,456; head (768 -> 5) 3,845
    assert counts["adapter"] == 147_456
    # the default: the last 2 blocks only, 2 * 2 * 8 * (384 + 384) = 24,576, entering at block 10
    default = build_classifier(Settings(backbone=str(tmp_path), lora_rank=8), 5)
    assert default.parameter_counts()["adapter"] == 24_576 and default.first_adapted == 10
    assert counts["head"] == 768 * 5 + 5
    assert 21_000_000 < counts["backbone"] < 23_000_000
    assert counts["trainable"] / counts["total"] < 0.01


def test_training_learns_and_is_deterministic(tiny_backbone):
    s = Settings(backbone=tiny_backbone, adapter="lora", epochs=15, min_steps=30, batch_size=8, seed=3)
    x, y = two_blob_pixels(10)
    runs = []
    for _ in range(2):
        model = build_classifier(s, 2)
        fit(model, x, y, s)
        runs.append(predict(model, x, s))
    assert np.array_equal(runs[0].probs, runs[1].probs)
    assert (runs[0].probs.argmax(1) == y.numpy()).mean() == 1.0


def test_multiple_choice_training_gives_independent_probabilities(tiny_backbone):
    s = Settings(backbone=tiny_backbone, adapter="linear", epochs=30, min_steps=60, batch_size=8)
    x, y = two_blob_pixels(8)
    multi = torch.stack([torch.nn.functional.one_hot(y, 3).float()[:, i] for i in range(3)], 1)
    multi[:, 2] = 1.0  # a label every image has
    model = build_classifier(s, 3)
    fit(model, x, multi, s, multilabel=True)
    p = predict(model, x, s, multilabel=True).probs
    assert p[:, 2].min() > 0.5 and not np.allclose(p.sum(1), 1.0)


# --- calibration loss ---------------------------------------------------------------------------------
def test_calibration_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.4]])
    targets = torch.tensor([0, 0, 0])  # row 0 correct, row 1 wrong, row 2 correct
    p = torch.softmax(logits, 1)
    u = -(p * p.log()).sum(1)
    expected = -math.log(math.tanh(u[1]) + 1e-6) + 0.5 * (-math.log(1 - math.tanh(u[0]) + 1e-6)
                                                          - math.log(1 - math.tanh(u[2]) + 1e-6))
    assert calibration_loss(logits, targets).item() == pytest.approx(expected, rel=1e-5)
    # all correct and confident: near 0; the cap holds for a confidently wrong batch
    assert calibration_loss(torch.tensor([[20.0, 0.0]]), torch.tensor([0])).item() < 1e-5
    assert calibration_loss(torch.tensor([[30.0, 0.0]]), torch.tensor([1])).item() == pytest.approx(5.0)
    assert prediction_entropy(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(math.log(2))


def test_calibration_gradient_raises_uncertainty_when_wrong_lowers_when_right():
    for target, sign in ((1, +1), (0, -1)):  # the prediction (argmax) is class 0
        logits = torch.tensor([[1.5, 0.0, 0.0]], requires_grad=True)
        calibration_loss(logits, torch.tensor([target])).backward()
        with torch.no_grad():
            stepped = logits - 0.1 * logits.grad
        change = prediction_entropy(stepped).item() - prediction_entropy(logits.detach()).item()
        assert change * sign > 0, f"target {target}: entropy moved the wrong way ({change})"


def test_calibration_loss_is_finite_on_extreme_logits():
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]])
    assert torch.isfinite(calibration_loss(logits, torch.tensor([0, 0])))


# --- store --------------------------------------------------------------------------------------------
def test_store_versions_are_atomic_numbered_and_pruned(tmp_path):
    store = ModelStore(tmp_path)
    w = {"head.weight": torch.ones(2, 2)}
    names = [store.save(7, "peal-lora-r8", w, {"labels": ["a", "b"]}, keep=3).name for _ in range(5)]
    assert names == [f"peal-lora-r8-v{i}" for i in range(1, 6)]
    assert store.versions(7) == names[-3:]
    assert store.latest(7).name == "peal-lora-r8-v5"
    assert torch.equal(store.latest(7).weights()["head.weight"], torch.ones(2, 2))
    # a half-written version (a writer killed mid-save) is invisible and cleaned by the next save
    tmp = tmp_path / "7" / ".tmp-deadbeef"
    tmp.mkdir()
    (tmp / "trainable.safetensors").write_bytes(b"partial")
    assert store.latest(7).name == "peal-lora-r8-v5"
    assert store.save(7, "peal-linear", w, {}).name == "peal-linear-v6"
    assert not tmp.exists()
    # a folder without its metadata is not a version
    (tmp_path / "7" / "peal-linear-v99").mkdir()
    assert store.latest(7).name == "peal-linear-v6"


def test_store_numbers_are_unique_across_processes(tmp_path):
    code = textwrap.dedent(f"""
        import torch
        from peal_backend.store import ModelStore
        s = ModelStore({str(tmp_path)!r})
        for _ in range(10):
            s.save(1, "peal-linear", {{"w": torch.zeros(1)}}, {{}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(ModelStore(tmp_path).versions(1)) == 30


def test_readme_documents_every_setting():
    import dataclasses
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f.metadata["env"] for f in dataclasses.fields(Settings) if f"`{f.metadata['env']}`" not in readme]
    assert not missing, f"README lacks {missing}: run python scripts/update_readme_settings.py"


def test_a_prune_killed_midway_never_leaves_a_listed_version_without_weights(tmp_path, monkeypatch):
    import shutil

    from peal_backend import store as store_module

    store = ModelStore(tmp_path)
    for _ in range(2):
        store.save(1, "peal-linear", {"w": torch.ones(2)}, {"labels": ["a", "b"]}, keep=2)

    def killed_midway(path, ignore_errors=False):  # the weights go first, then the process dies
        for f in sorted(os.listdir(path), key=lambda n: n != "trainable.safetensors"):
            os.remove(os.path.join(path, f))
            raise KeyboardInterrupt
    monkeypatch.setattr(store_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        store.save(1, "peal-linear", {"w": torch.ones(2)}, {"labels": ["a", "b"]}, keep=2)
    monkeypatch.setattr(store_module.shutil, "rmtree", shutil.rmtree)
    for name in store.versions(1):
        assert store.get(1, name).weights()["w"].shape == (2,)
    assert store.versions(1) == ["peal-linear-v2", "peal-linear-v3"]


def test_a_removed_or_misspelt_setting_is_named_not_silently_ignored():
    from peal_backend.config import unknown_variables

    env = {"PEAL_BUDGET": "5", "PEAL_STRATEGIE": "margin", "PEAL_STRATEGY": "margin", "PEAL_DATASETS": "/d", "HOME": "/"}
    assert unknown_variables(env) == ["PEAL_BUDGET", "PEAL_STRATEGIE"]
    assert not hasattr(Settings.from_env(env), "budget")  # the backend never read it: it is gone


def test_cycle_steps_scale_with_the_new_labels():
    from peal_backend.training import cycle_steps
    s = Settings(epochs=10, min_steps=50, batch_size=32, warm_min_steps=10)
    assert cycle_steps(s, 8) == 50 and cycle_steps(s, 320) == 100  # 10 epochs of 10 batches
    assert cycle_steps(s, 320, new_labels=32) == 10 and cycle_steps(s, 320, new_labels=64) == 20
    assert cycle_steps(s, 8, new_labels=1) == 10          # never under the warm floor
    assert cycle_steps(s, 8, new_labels=0) == 10
    assert cycle_steps(s, 320, new_labels=500) == 100     # never over the full budget


def test_warm_plan_counts_new_and_changed_labels_and_retrains_fully_every_n():
    from peal_backend.cycle import warm_plan
    s = Settings(warm_start=True, full_retrain_every=3)
    before = {"1": [0], "2": [1]}
    assert warm_plan(s, before, {"1": [0], "2": [1], "3": [1]}, 0) == (True, 1, 1)
    assert warm_plan(s, before, {"1": [1], "2": [1], "3": [0]}, 1) == (True, 2, 2)   # task 1 relabeled
    assert warm_plan(s, before, {"1": [0], "2": [1], "3": [1]}, 2) == (False, None, 0)  # the 3rd: full
    assert warm_plan(s, None, {"1": [0]}, 0) == (False, None, 0)          # nothing to start from
    assert warm_plan(s, before, {"1": [0]}, None) == (False, None, 0)     # a version from before incremental cycles
    assert warm_plan(s.replace(warm_start=False), before, before, 0) == (False, None, 0)
    assert warm_plan(s.replace(full_retrain_every=0), before, before, 99) == (True, 0, 100)


def test_refresh_plan_keeps_the_adapter_until_the_labels_have_grown_by_the_fraction():
    from peal_backend.cycle import changed_labels, refresh_plan
    s = Settings(adapter="lora", adapt_growth=0.25)
    trained = {str(i): [i % 2] for i in range(8)}       # the adapter trained on 8 labels: refresh while < 2 changed
    assert refresh_plan(s, trained, {**trained, "8": [0]})                      # 1 new
    assert not refresh_plan(s, trained, {**trained, "8": [0], "9": [1]})        # 2 new: the adapter trains
    assert not refresh_plan(s, trained, {**trained, "0": [1], "8": [0]})        # 1 new + 1 relabeled
    removed = {k: v for k, v in trained.items() if k != "3"}
    assert changed_labels(trained, {**removed, "8": [0]}) == 2                  # a removed label counts too
    assert not refresh_plan(s, trained, {**removed, "8": [0]})
    assert not refresh_plan(s.replace(adapt_growth=0.0), trained, trained)      # off
    assert not refresh_plan(s.replace(adapter="linear"), trained, trained)      # a probe's cycle is a head fit anyway
    assert not refresh_plan(s, None, trained) and not refresh_plan(s, {}, trained)  # no adapter to keep
    with pytest.raises(SettingsError, match="PEAL_ADAPT_GROWTH"):
        Settings(adapt_growth=-1)


def test_feature_rows_and_a_version_that_did_not_score_an_image(tmp_path):
    """The stored features come back by content hash in the asked order; a task whose image the version
    never scored (added since) means no refresh: the adapter trains."""
    from peal_backend.cycle import feature_rows
    from peal_backend.labelstudio_job import stored_adapter
    from peal_backend.model import ADAPTER_FILE, FEATURE_HASHES_FILE, FEATURES_FILE
    from peal_backend.store import ModelStore

    feats = np.arange(12, dtype=np.float16).reshape(4, 3)
    assert feature_rows(["a", "b", "c", "d"], feats, ["c", "a"]).tolist() == [[6, 7, 8], [0, 1, 2]]
    assert feature_rows(["a", "b"], feats[:2], ["a", "z"]) is None
    store = ModelStore(tmp_path)
    v = store.save(1, "peal-lora-r8", {"w": torch.zeros(1)}, {},
                   files={ADAPTER_FILE: {"1": [0]}, FEATURE_HASHES_FILE: ["a", "b", "c", "d"], FEATURES_FILE: feats})
    assert store.read_array(v, FEATURES_FILE).dtype == np.float16
    adapter = stored_adapter(store, v)
    labels, rows = adapter.labels, adapter.rows(["b", "d"])
    assert labels == {"1": [0]} and rows.dtype == np.float32 and rows.tolist() == [[3, 4, 5], [9, 10, 11]]
    assert adapter.rows(["b", "new"]) is None
    assert torch.equal(adapter.state["w"], torch.zeros(1))                       # the version's weights
    bare = store.save(1, "peal-lora-r8", {"w": torch.zeros(1)}, {})             # a version from before refreshes
    assert stored_adapter(store, bare) is None and store.read_array(bare, FEATURES_FILE) is None
