"""The pretraining script survives an interrupted run: a run resumed from its last checkpoint's
training state ends with the same weights and loss log as one that was never stopped, and a resume
with changed training arguments is refused. Tiny model, the shared train pools only, real script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import DATASETS

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "32", "--depth", "1", "--heads", "2", "--batch-size", "8", "--local-crops", "2",
        "--out-dim", "64", "--steps", "4", "--log-every", "1", "--freeze-last-steps", "1",
        "--w-fmnist", "0", "--w-wallpapers", "0", "--threads", "1", "--pixel-weight", "1",
        "--save-dtype", "float32"]


def pretrain(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEAL_DATASETS": str(DATASETS)}
    return subprocess.run([sys.executable, str(REPO / "scripts/pretrain_peal_mini.py"), *TINY, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, check=check)


@pytest.mark.parametrize("run", [("--objective", "dino"), ("--objective", "contrastive"),
                                 ("--objective", "contrastive", "--stats-weight", "1")])
def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, run):
    pretrain(*run, "--out", str(tmp_path / "whole"))
    # the same run stopped after step 2 leaves what a run killed during step 3 leaves: the step-2 state
    first = pretrain(*run, "--checkpoint-dir", str(tmp_path / "ckpt"), "--stop-at", "2", "--out", str(tmp_path / "first"))
    assert "stopped after step 2" in first.stdout and not (tmp_path / "first").exists()
    resumed = pretrain(*run, "--resume", str(tmp_path / "ckpt"), "--out", str(tmp_path / "resumed"))
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == again.keys()
    assert all((whole[k] == again[k]).all() for k in whole)
    log_whole = json.loads((tmp_path / "whole" / "PROVENANCE.json").read_text())["loss_log"]
    log_resumed = json.loads((tmp_path / "resumed" / "PROVENANCE.json").read_text())["loss_log"]
    strip = lambda log: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in log]  # noqa: E731
    assert strip(log_whole) == strip(log_resumed) and len(log_whole) == 4
    assert ("stats" in log_whole[0]) == ("--stats-weight" in run)  # the statistics loss is logged where it runs


def test_resume_with_changed_training_arguments_is_refused(tmp_path):
    pretrain("--checkpoint-dir", str(tmp_path / "ckpt"), "--stop-at", "2", "--out", str(tmp_path / "a"))
    changed = pretrain("--resume", str(tmp_path / "ckpt"), "--lr", "1e-3", "--out", str(tmp_path / "b"), check=False)
    assert changed.returncode != 0 and "lr=" in changed.stderr
    shorter = pretrain("--resume", str(tmp_path / "ckpt"), "--steps", "3", "--out", str(tmp_path / "s"), check=False)
    assert shorter.returncode != 0 and "--steps 3" in shorter.stderr
    nowhere = pretrain("--stop-at", "2", "--out", str(tmp_path / "d"), check=False)  # would drop its state
    assert nowhere.returncode != 0 and "--stop-at needs --checkpoint-dir" in nowhere.stderr
    missing = pretrain("--resume", str(tmp_path / "nothing"), "--out", str(tmp_path / "c"), check=False)
    assert missing.returncode != 0 and "training_state.pt" in missing.stderr


def test_a_finished_run_trains_longer_when_resumed_with_more_steps(tmp_path):
    pretrain("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "100", "--out", str(tmp_path / "a"))
    longer = pretrain("--resume", str(tmp_path / "ckpt"), "--steps", "6", "--out", str(tmp_path / "b"))
    assert "at step 4" in longer.stdout  # the last step's state was saved although no checkpoint step fell there
    log = json.loads((tmp_path / "b" / "PROVENANCE.json").read_text())["loss_log"]
    assert [r["step"] for r in log] == list(range(6))


def test_keep_colour_leaves_hue_and_draws_the_same_random_numbers():
    """--keep-colour: no view of a red image turns grey (without it, about a fifth do), and the generator
    ends in the same state, so every later random draw of a run is the same as without the switch."""
    import torch

    from scripts.pretrain_peal_mini import color_augment
    red = torch.zeros(400, 3, 8, 8)
    red[:, 0] = 0.8
    views, states = {}, {}
    for keep in (False, True):
        g = torch.Generator().manual_seed(0)
        views[keep] = color_augment(red, g, blur_p=0.5, solarize_p=0.0, jitter=0.1, keep_colour=keep)
        states[keep] = g.get_state()
    grey = {keep: int(((v[:, 0] - v[:, 1]).abs().amax(dim=(1, 2)) < 1e-6).sum()) for keep, v in views.items()}
    assert grey[True] == 0
    assert 40 < grey[False] < 120  # p = 0.2 of 400
    assert torch.equal(states[False], states[True])


def test_image_stats_are_channel_means_stds_and_central_means():
    """The targets of --stats-weight: per channel, mean and std over the image, mean over its central half."""
    import torch

    from peal_backend.backbones import image_stats
    x = torch.zeros(2, 3, 8, 8)
    x[0, 0, 2:6, 2:6] = 1.0  # a bright centre in red: a quarter of the image
    x[1] = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)  # a flat colour
    s = image_stats(x)
    assert s.shape == (2, 9)
    assert torch.allclose(s[0, [0, 3, 6]], torch.tensor([0.25, torch.tensor([1.0] * 16 + [0.0] * 48).std(), 1.0]))
    assert torch.allclose(s[0, [1, 2, 4, 5, 7, 8]], torch.zeros(6))
    assert torch.allclose(s[1], torch.tensor([0.2, 0.5, 0.9, 0, 0, 0, 0.2, 0.5, 0.9]))


def test_stats_weight_needs_the_contrastive_objective(tmp_path):
    refused = pretrain("--objective", "dino", "--stats-weight", "1", "--out", str(tmp_path / "x"), check=False)
    assert refused.returncode != 0 and "--stats-weight needs --objective contrastive" in refused.stderr
