"""The offline simulator: metrics, dataset loading, the cached scoring paths, the loop and its outputs.

The end-to-end runs use the tiny random DINOv2 (fast, but it learns nothing) for structure, and the
committed `peal-mini` backbone for the smoke test that must beat chance.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st
from PIL import Image

from peal_backend import simulate as sim
from peal_backend.backbone import PACKAGED_BACKBONES
from peal_backend.config import Settings
from peal_backend.images import preprocess, to_pil
from tests.backbone_fixture import tiny_backbone  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
PNEUMONIA = sim.datasets_dir() / "pneumoniamnist.npz"
needs_data = pytest.mark.skipif(not PNEUMONIA.exists(), reason=f"{PNEUMONIA} missing (set PEAL_DATASETS)")


# --- ECE ---------------------------------------------------------------------------------------------
def test_ece_by_hand():
    # two items at confidence 0.9 (one right) and two at 0.6 (both right): bins 14 and 9 (of 15)
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 1])
    assert sim.expected_calibration_error(probs, labels) == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))


def test_ece_is_zero_when_confidence_matches_accuracy_and_uses_right_closed_bins():
    # confidence 0.75 in one bin, three of four right: calibrated
    probs = np.tile([0.75, 0.25], (4, 1))
    assert sim.expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    # 1/15 exactly belongs to the first bin (0, 1/15], together with 0.05; with 2 bins 0.5 is in (0, 0.5]
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert sim.expected_calibration_error(probs, np.array([0, 0]), n_bins=2) == pytest.approx(0.5 * 0.5)
    assert sim.expected_calibration_error(np.zeros((0, 3)), np.zeros(0)) == 0.0


@hsettings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_ece_lies_in_unit_interval_and_is_maximal_for_confident_errors(n, c, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c), size=n)
    labels = rng.integers(c, size=n)
    assert 0.0 <= sim.expected_calibration_error(probs, labels) <= 1.0
    onehot = np.eye(c)[(labels + 1) % c]  # certain and always wrong
    assert sim.expected_calibration_error(onehot, labels) == pytest.approx(1.0)


def test_test_metrics_accuracy_and_macro_f1():
    probs = np.eye(3)[[0, 0, 1, 2]]
    m = sim.test_metrics(probs, np.array([0, 1, 1, 2]), 3)
    assert m["accuracy"] == pytest.approx(0.75)
    # class 0: P 1/2 R 1 -> 2/3; class 1: P 1 R 1/2 -> 2/3; class 2: 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


# --- flags ---------------------------------------------------------------------------------------------
def test_variants_are_adapters_times_strategy_specs():
    vs = sim.parse_variants("linear,lora", "random,entropy+cal,margin+bal+cal")
    assert [v.name for v in vs] == ["linear/random", "linear/entropy+cal", "linear/margin+cal+bal",
                                    "lora/random", "lora/entropy+cal", "lora/margin+cal+bal"]
    assert all(v.balance for v in sim.parse_variants("prompt", "badge", balance=True))


@pytest.mark.parametrize("adapters, strategies, message", [
    ("full", "entropy", "--adapter"), ("lora", "entropi", "unknown strategy 'entropi'"),
    ("lora", "entropy+fast", "unknown suffix"), ("lora", ",", "no strategy"),
])
def test_bad_variants_are_named(adapters, strategies, message):
    with pytest.raises(sim.SimulationError, match=message):
        sim.parse_variants(adapters, strategies)


# --- datasets ------------------------------------------------------------------------------------------
def test_npz_errors_name_the_problem(tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(sim.SimulationError, match="lacks test_images, test_labels"):
        sim.load_dataset(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "float.npz", train_images=np.zeros((2, 8, 8)), train_labels=np.zeros(2, int),
             test_images=np.zeros((2, 8, 8), np.uint8), test_labels=np.zeros(2, int))
    with pytest.raises(sim.SimulationError, match="train_images must be uint8"):
        sim.load_dataset(str(tmp_path / "float.npz"))
    with pytest.raises(sim.SimulationError, match="no such file or folder"):
        sim.load_dataset(str(tmp_path / "missing.npz"))


@needs_data
def test_image_folder_gives_the_same_pixels_as_the_npz(tmp_path):
    """PNG files in class folders and the npz arrays they came from preprocess to identical tensors."""
    images, labels = {}, {}
    with np.load(PNEUMONIA) as z:
        for s in ("train", "test"):
            y = z[f"{s}_labels"][:, 0].astype(np.int64)
            pick = np.concatenate([np.flatnonzero(y == 1)[:5], np.flatnonzero(y == 0)[:7]])  # both classes, mixed
            images[s], labels[s] = z[f"{s}_images"][np.sort(pick)], y[np.sort(pick)]
    for split in ("train", "test"):
        for i, (img, lab) in enumerate(zip(images[split], labels[split])):
            (tmp_path / split / f"class{lab}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / split / f"class{lab}" / f"{i:03d}.png")
    data = sim.load_dataset(str(tmp_path))
    assert data.classes == ["class0", "class1"]
    for split in ("train", "test"):
        order = np.argsort(labels[split], kind="stable")  # the folder lists class by class
        assert (getattr(data, f"{split}_labels") == labels[split][order]).all()
        from_folder = sim.pixels_of(getattr(data, f"{split}_images"), 28)
        from_npz = preprocess([to_pil(a) for a in images[split][order]], 28)
        assert torch.equal(from_folder, from_npz)


def test_flat_class_folders_hold_out_a_fifth_and_limits_subsample(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    data = sim.load_dataset(str(tmp_path))
    assert data.classes == ["cat", "dog", "eel"] and data.name == tmp_path.name
    assert len(data.train_labels) == 24 and np.bincount(data.test_labels).tolist() == [2, 2, 2]
    small = sim.load_dataset(str(tmp_path), limit_train=7, limit_test=3)
    assert len(small.train_images) == len(small.train_labels) == 7 and len(small.test_labels) == 3
    (tmp_path / "fox").mkdir()
    with pytest.raises(sim.SimulationError, match="no image: fox"):
        sim.load_dataset(str(tmp_path))


# --- the cached scoring paths equal predict -------------------------------------------------------
def _small_dataset(n_train=40, n_test=16, seed=0) -> sim.Dataset:
    """Two visibly different classes of 28x28 images: dark noise and bright stripes."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = np.arange(n) % 2
        x = np.where(y[:, None, None, None] == 0, rng.integers(0, 60, (n, 28, 28, 3)),
                     rng.integers(190, 256, (n, 28, 28, 3))).astype(np.uint8)
        x[y == 1, ::4] = 0
        return x, y

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return sim.Dataset("blobs", xtr, ytr, xte, yte, ["dark", "bright"])


# --- the loop ------------------------------------------------------------------------------------------
def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_simulate_writes_rows_plots_summary_and_resumes(tiny_backbone, tmp_path):
    s = Settings(backbone=tiny_backbone, min_steps=5, epochs=1)
    data = _small_dataset()
    variants = sim.parse_variants("linear,lora", "random,badge+bal")
    csv_path = sim.simulate(data, s, variants, seeds=[0, 1], cycles=3, budget=4, out_dir=tmp_path, progress=False)
    rows = _rows(csv_path)
    assert len(rows) == 4 * 2 * 3
    assert set(rows[0]) == set(sim.COLUMNS)
    for r in rows:
        assert int(r["labels"]) == 4 * (int(r["cycle"]) + 1)
        for k in ("accuracy", "macro_f1", "ece"):
            assert 0.0 <= float(r[k]) <= 1.0
        if r["cycle"] == "0":
            assert r["unknown_fraction"] == ""  # the first picks come from the order made with no label
        elif r["unknown_fraction"] != "":  # picks made from a trained classifier's order
            assert 0.0 <= float(r["unknown_fraction"]) <= 1.0
    assert sum(r["unknown_fraction"] != "" for r in rows) >= len(rows) // 2
    assert {r["settings"] for r in rows} == {sim.settings_key(s)}
    assert (tmp_path / "accuracy_blobs.png").stat().st_size > 10_000
    assert "| linear/random | 2 |" in (tmp_path / "summary.md").read_text()

    # a rerun skips what is complete and only adds the new seed
    before = {(r["config"], r["seed"], r["cycle"]): r["accuracy"] for r in rows}
    sim.simulate(data, s, variants[:1], seeds=[0, 1, 2], cycles=3, budget=4, out_dir=tmp_path, progress=False)
    after = _rows(csv_path)
    assert len(after) == len(rows) + 3
    assert all(before[(r["config"], r["seed"], r["cycle"])] == r["accuracy"] for r in after if r["seed"] != "2")


def _save_runs(csv_path, dataset, n):
    for seed in range(n):
        row = {k: "" for k in sim.COLUMNS}
        sim.save_run(csv_path, [{**row, "dataset": dataset, "config": "linear/random", "seed": seed, "cycle": 0}])


def test_parallel_processes_share_one_csv_without_losing_runs(tmp_path):
    import multiprocessing

    csv_path = tmp_path / "results.csv"
    filler = {k: "" for k in sim.COLUMNS}  # a big CSV makes each rewrite slow enough to collide without the lock
    sim.write_results(csv_path, [{**filler, "dataset": "z", "config": "x", "seed": i} for i in range(3000)])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_runs, args=(csv_path, name, 25)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    rows = _rows(csv_path)
    assert sorted((r["dataset"], int(r["seed"])) for r in rows if r["dataset"] != "z") == [(d, s) for d in "ab" for s in range(25)]
    assert len(rows) == 3050


def test_picks_are_new_items_and_warm_start_changes_training(tiny_backbone, tmp_path):
    s = Settings(backbone=tiny_backbone, min_steps=5, epochs=1, clusters=-1)
    prep = sim.prepare(_small_dataset(), s, tmp_path / "cache")
    rows = list(sim.run_seed(prep, s, sim.Variant("linear", "entropy"), 0, cycles=4, budget=4))
    assert [r["labels"] for r in rows] == [4, 8, 12, 16]  # four distinct new items each cycle
    lora = sim.Variant("lora", "entropy")
    cold = list(sim.run_seed(prep, s, lora, 0, cycles=3, budget=4))
    warm = list(sim.run_seed(prep, s.replace(warm_start=True), lora, 0, 3, 4))
    assert warm[0]["accuracy"] == cold[0]["accuracy"]  # nothing to start from in cycle 0
    assert [r["ece"] for r in warm[1:]] != [r["ece"] for r in cold[1:]]


def test_head_refreshes_follow_the_growth_plan(tiny_backbone, tmp_path):
    """PEAL_ADAPT_GROWTH=0.5 with 4 labels a cycle: LoRA trains at 4, 8 and 12 labels (4 new >= half the
    labels it trained on), the head alone is refreshed at 16 (4 new < 0.5 x 12), LoRA trains at 20 (8 new);
    the refresh changes the curve."""
    s = Settings(backbone=tiny_backbone, min_steps=5, epochs=1, clusters=-1)
    prep = sim.prepare(_small_dataset(), s, tmp_path / "cache")
    lora = sim.Variant("lora", "entropy")
    full = list(sim.run_seed(prep, s, lora, 0, cycles=5, budget=4))
    grown = list(sim.run_seed(prep, s.replace(adapt_growth=0.5), lora, 0, cycles=5, budget=4))
    assert [r["refresh"] for r in full] == [""] * 5
    assert [r["refresh"] for r in grown] == ["", "", "", "head", ""]
    assert [r["ece"] for r in grown[:3]] == [r["ece"] for r in full[:3]]  # the same until the first refresh
    assert grown[3]["ece"] != full[3]["ece"]
    prompts = list(sim.run_seed(prep, s.replace(adapt_growth=0.5), sim.Variant("prompt", "entropy"), 0, cycles=4, budget=4))
    assert [r["refresh"] for r in prompts] == ["", "", "", "head"]  # prompts are kept alike


def test_a_project_with_few_labels_is_served_in_coverage_order_then_trains(tiny_backbone, tmp_path):
    """auto: the cold cycle (no label) only orders; a classifier is trained once two classes are in."""
    s = Settings(backbone=tiny_backbone, clusters=-1)
    prep = sim.prepare(_small_dataset(), s, tmp_path / "cache")
    cold = sim.simulated_cycle(prep, s, np.zeros(0, np.int64))
    assert not cold.trained and cold.strategy == s.auto_start and cold.order.size == len(prep.train_hashes)
    one_class = np.flatnonzero(prep.data.train_labels == 0)[:3]
    assert not sim.simulated_cycle(prep, s, one_class).trained
    both = np.concatenate([one_class, np.flatnonzero(prep.data.train_labels == 1)[:1]])
    trained = sim.simulated_cycle(prep, s, both)
    assert trained.trained and trained.strategy == s.auto_start  # 4 labels < 3 per class: still coverage


def test_labels_to_reach_and_summary_reference():
    pts = {10: np.array([0.5, 0.6]), 20: np.array([0.7, 0.8]), 30: np.array([0.9, 0.9])}
    assert sim.labels_to_reach(pts, 0.75) == 20
    assert sim.labels_to_reach(pts, 0.95) is None
    rows = [dict(dataset="d", config=c, adapter=c.split("/")[0], seed=s, cycle=i, labels=n, accuracy=a, unknown_fraction="",
                 macro_f1=a - 0.1, ece=0.05, train_seconds=1,
                 select_seconds=0.5, eval_seconds=0.5)
            for c, acc in (("linear/random", (0.5, 0.7)), ("lora/entropy", (0.72, 0.8)))
            for s in (0, 1) for i, (n, a) in enumerate(zip((5, 10), acc))]
    text = sim.summary_markdown(rows)
    assert "linear/random reaches 0.700 at 10 labels" in text
    assert "| lora/entropy | 2 | 0.720 ± 0.000 | 0.800 ± 0.000 | 5 | 0.700 | 0.050 |  | 2.0 |" in text
    assert "| lora | 2 | 1.00 | 0.50 | 0.50 | 2.00 |" in text  # cycle 0 left out of the timing


def test_command_reports_bad_input_and_cli_registers_simulate(tmp_path):
    args = Namespace(data=str(tmp_path / "nope.npz"), backbone="peal-mini", adapter="linear", strategy="entropy",
                     balance=False, calibration=False, warm_start=False, budget=0, cycles=2, seeds=1, first_seed=0,
                     cold_start="typiclust", limit_train=0, limit_test=0, out=str(tmp_path / "out"), threads=1, quiet=True)
    with pytest.raises(SystemExit, match="no such file or folder"):
        sim.command(args, Settings())
    with pytest.raises(SystemExit, match="unknown strategy 'best'"):
        sim.command(Namespace(**{**vars(args), "strategy": "best"}), Settings())
    out = subprocess.run([sys.executable, "-m", "peal_backend.cli", "simulate", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--limit-train" in out.stdout


# --- the smoke test on real data with the committed backbone --------------------------------------------
PEAL_MINI = PACKAGED_BACKBONES["peal-mini"]


@needs_data
@pytest.mark.skipif(not (PEAL_MINI / "config.json").exists(), reason=f"the peal-mini backbone is not committed yet ({PEAL_MINI})")
def test_smoke_two_cycles_with_peal_mini_beat_chance(tmp_path):
    """The CLI as users run it: a 2-cycle run on a slice of PneumoniaMNIST produces the CSV and the
    PNG, with accuracies in [0, 1] above the majority-class rate of the test slice."""
    cmd = [sys.executable, "-m", "peal_backend.cli", "simulate", "--data", str(PNEUMONIA), "--backbone", "peal-mini",
           "--adapter", "linear", "--strategy", "entropy,random", "--budget", "40", "--cycles", "2", "--seeds", "1",
           "--limit-train", "400", "--limit-test", "200", "--out", str(tmp_path), "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(tmp_path / "results.csv")
    assert len(rows) == 4 and (tmp_path / "accuracy_pneumoniamnist.png").stat().st_size > 10_000
    test_labels = sim.load_dataset(str(PNEUMONIA), limit_test=200).test_labels
    chance = np.bincount(test_labels).max() / test_labels.size
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and 0.0 <= float(r["macro_f1"]) <= 1.0
    final = [float(r["accuracy"]) for r in rows if r["cycle"] == "1"]
    assert min(final) > chance, (final, chance)


# --- bad input: one class, an empty pool, a class never labeled, one image per class -----------------------
def test_a_dataset_with_one_class_is_a_clear_error(tmp_path):
    data = _small_dataset()
    one = sim.Dataset("one", data.train_images, np.zeros_like(data.train_labels), data.test_images,
                      np.zeros_like(data.test_labels), ["only"])
    with pytest.raises(sim.SimulationError, match="1 class"):
        sim.simulate(one, Settings(), sim.parse_variants("linear", "auto"), [0], 2, out_dir=tmp_path, progress=False)


def test_an_empty_pool_and_one_image_per_class(tiny_backbone, tmp_path):
    s = Settings(backbone=tiny_backbone, clusters=0)
    data = _small_dataset()
    tiny = sim.Dataset("tiny", data.train_images[:2], data.train_labels[:2], data.test_images, data.test_labels,
                       data.classes)
    prep = sim.prepare(tiny, s, tmp_path / "cache")
    everything = sim.simulated_cycle(prep, s, np.arange(2))  # one image per class, all labeled: the pool is empty
    assert everything.trained and everything.order.size == 0 and everything.queue_scores.size == 0
    rows = list(sim.run_seed(prep, s, sim.Variant("linear", "auto"), 0, cycles=5, budget=1))
    assert [r["labels"] for r in rows] == [1, 2]  # stops when the pool is empty
    assert 0.0 <= rows[-1]["accuracy"] <= 1.0


def test_a_class_nobody_labeled_is_never_predicted(tiny_backbone, tmp_path):
    from peal_backend.training import fit_head

    x = torch.randn(6, 8)
    w, b = fit_head(x, torch.tensor([0, 0, 0, 2, 2, 2]), 4)  # classes 1 and 3 have no label
    probs = torch.softmax(torch.randn(50, 8) @ w.T + b, dim=1)
    assert probs[:, [1, 3]].max() < 1e-6 and set(probs.argmax(1).tolist()) <= {0, 2}
    assert torch.equal(w[1], torch.zeros(8)) and torch.equal(w[3], torch.zeros(8))


def test_runs_differ_by_adapt_growth_and_rows_from_before_it_ran_with_0():
    row = {"dataset": "d", "config": "lora/auto", "warm_start": "False", "budget": "4", "backbone": "peal-mini",
           "lora_last_k": "2", "settings": "k", "seed": "0"}
    assert sim.run_key(row) == sim.run_key({**row, "adapt_growth": "0.0000"}) == sim.run_key({**row, "adapt_growth": 0.0})
    assert sim.run_key({**row, "adapt_growth": "0.2500"}) == sim.run_key({**row, "adapt_growth": 0.25}) != sim.run_key(row)
    assert sim.settings_key(Settings(adapt_growth=0.5)) == sim.settings_key(Settings(adapt_growth=0.0))  # a column instead
