"""Tests of ceriakeras.evaluation.evaluate: matching, metrics, calibration, the baseline and evaluate() end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from ceriakeras.config import ConfigError
from ceriakeras.evaluation.evaluate import baseline_columns, disk_sums
from ceriakeras.evaluation.scoring import (
    Tally,
    calibration,
    check_doses,
    detection_scores,
    height_scores,
    match_columns,
    noise_seed,
)


# --- matching ----------------------------------------------------------------------------------
def test_match_pairs_each_prediction_with_its_nearby_true_column():
    true = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    pred = true[[2, 0, 1]] + np.array([[0.3, 0.0], [0.0, -0.2], [0.1, 0.1]])
    pi, ti = match_columns(pred, true, 1.0)
    assert pi.tolist() == [0, 1, 2]
    assert ti.tolist() == [2, 0, 1]


def test_distant_points_stay_unmatched():
    true = np.array([[0.0, 0.0], [10.0, 10.0]])
    pred = np.array([[0.5, 0.0], [12.0, 10.0], [30.0, 30.0]])
    pi, ti = match_columns(pred, true, 1.0)
    assert list(zip(pi, ti)) == [(0, 0)]


def test_distance_limit_is_inclusive():
    pi, ti = match_columns([[1.0, 0.0]], [[0.0, 0.0]], 1.0)
    assert len(pi) == 1
    pi, ti = match_columns([[1.0 + 1e-9, 0.0]], [[0.0, 0.0]], 1.0)
    assert len(pi) == 0


def test_matching_is_one_to_one_and_maximizes_the_number_of_pairs():
    # Greedy "nearest true column for each prediction in turn" would give pred 0 to true 0 and
    # leave pred 1 unmatched (true 1 is 2.2 away from it); the optimal matching pairs both.
    true = np.array([[0.0, 0.0], [1.6, 0.0]])
    pred = np.array([[0.7, 0.0], [-0.6, 0.0]])
    pi, ti = match_columns(pred, true, 1.0)
    assert sorted(zip(pi.tolist(), ti.tolist())) == [(0, 1), (1, 0)]


def test_tie_between_two_true_columns_gives_exactly_one_pair():
    true = np.array([[-0.5, 0.0], [0.5, 0.0]])
    pred = np.array([[0.0, 0.0]])
    pi, ti = match_columns(pred, true, 1.0)
    assert pi.tolist() == [0] and len(ti) == 1 and ti[0] in (0, 1)
    # Two predictions on the same spot: one true column takes one of them, never both.
    pi, ti = match_columns([[0.0, 0.0], [0.0, 0.0]], [[0.2, 0.0]], 1.0)
    assert len(pi) == 1 and ti.tolist() == [0]


def test_matching_minimizes_total_distance_among_full_matchings():
    true = np.array([[0.0, 0.0], [1.0, 0.0]])
    pred = np.array([[0.1, 0.0], [0.9, 0.0]])
    pi, ti = match_columns(pred, true, 1.0)
    assert dict(zip(pi.tolist(), ti.tolist())) == {0: 0, 1: 1}


def test_matching_agrees_with_brute_force_on_random_sets():
    rng = np.random.default_rng(3)
    for _ in range(30):
        pred = rng.uniform(0, 4, size=(rng.integers(0, 6), 2))
        true = rng.uniform(0, 4, size=(rng.integers(0, 6), 2))
        pi, ti = match_columns(pred, true, 1.0)
        assert len(set(pi.tolist())) == len(pi) and len(set(ti.tolist())) == len(ti)
        assert np.all(np.hypot(*(pred[pi] - true[ti]).T) <= 1.0)
        best = 0
        n = min(len(pred), len(true))
        for perm in itertools.permutations(range(len(true)), n) if len(pred) <= len(true) else ():
            d = np.hypot(*(pred[:n] - true[list(perm)]).T)
            best = max(best, int(np.sum(d <= 1.0)))
        for perm in itertools.permutations(range(len(pred)), n) if len(pred) > len(true) else ():
            d = np.hypot(*(pred[list(perm)] - true[:n]).T)
            best = max(best, int(np.sum(d <= 1.0)))
        assert len(pi) == best


def test_matching_with_no_points_or_bad_distance():
    pi, ti = match_columns(np.zeros((0, 2)), [[1.0, 1.0]], 1.0)
    assert len(pi) == len(ti) == 0
    with pytest.raises(ConfigError, match="max_distance"):
        match_columns([[0, 0]], [[0, 0]], 0.0)


# --- metrics -----------------------------------------------------------------------------------
def test_detection_scores_follow_their_definitions():
    matched, n_pred, n_true = 7, 10, 8
    s = detection_scores(matched, n_pred, n_true)
    precision, recall = matched / n_pred, matched / n_true
    assert s["precision"] == pytest.approx(precision)
    assert s["recall"] == pytest.approx(recall)
    assert s["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert detection_scores(0, 0, 5)["precision"] == 0.0


def test_height_scores_on_constructed_predictions():
    rng = np.random.default_rng(0)
    true = rng.integers(1, 11, size=200)
    offset = rng.choice([-2, -1, 0, 0, 0, 1], size=200)
    pred = np.clip(true + offset, 1, 12)
    s = height_scores(true, pred, max_height=12)
    assert s["exact_accuracy"] == pytest.approx(np.mean(pred == true))
    assert s["within_1_accuracy"] == pytest.approx(np.mean(np.abs(pred - true) <= 1))
    assert s["mae"] == pytest.approx(np.mean(np.abs(pred - true)))
    for h, v in s["per_height"].items():
        assert v["count"] == np.sum(true == h)
        assert v["accuracy"] == pytest.approx(np.mean(pred[true == h] == h))
    cm = np.array(s["confusion"])
    assert cm.shape == (13, 13)
    assert cm.sum() == len(true)
    assert np.trace(cm) == np.sum(pred == true)
    assert cm[true[0], pred[0]] >= 1


def test_confusion_matrix_counts_misses_and_spurious_columns():
    s = height_scores([3, 4], [3, 5], max_height=6, missed_height=[2, 2, 6], spurious_height=[1])
    cm = np.array(s["confusion"])
    assert cm[2, 0] == 2 and cm[6, 0] == 1      # missed true columns in column 0
    assert cm[0, 1] == 1                         # a spurious column of height 1 in row 0
    assert cm[3, 3] == 1 and cm[4, 5] == 1
    assert cm.sum() == 2 + 3 + 1
    # Height scores stay over the matched pairs only.
    assert s["exact_accuracy"] == 0.5 and s["mae"] == 0.5


def test_tally_combines_matching_and_scores():
    pixel = 0.2
    true_cols = np.array([[10.0, 10.0, 3], [30.0, 10.0, 5], [10.0, 40.0, 7]])
    # One column found with the right height (0.6 Å away), one with height off by one, one missed,
    # and one spurious detection far from any column.
    pred = {"x_px": np.array([13.0, 30.0, 50.0]), "y_px": np.array([10.0, 11.0, 50.0]),
            "height": np.array([3, 6, 2]), "confidence": np.array([0.9, 0.8, 0.5])}
    t = Tally()
    t.add(pred, true_cols, pixel, 1.0)
    m = t.metrics(max_height=8)
    assert (m["n_matched"], m["n_pred"], m["n_true"]) == (2, 3, 3)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["exact_accuracy"] == 0.5 and m["within_1_accuracy"] == 1.0
    # Calibration over all three reported columns: only the first is right.
    cal = m["calibration"]
    assert sum(cal["count"]) == 3
    assert m["ece"] == pytest.approx(abs(1 - 0.9) / 3 + abs(0 - 0.8) / 3 + abs(0 - 0.5) / 3)
    # The same column 1.2 Å away no longer matches.
    far = dict(pred, x_px=np.array([16.0, 30.0, 50.0]))
    t2 = Tally()
    t2.add(far, true_cols, pixel, 1.0)
    assert t2.metrics(8)["n_matched"] == 1


# --- calibration -------------------------------------------------------------------------------
def test_ece_of_a_perfectly_calibrated_set_is_near_zero():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, 200_000)
    correct = rng.uniform(0, 1, conf.size) < conf
    cal = calibration(conf, correct)
    # Within each bin, accuracy is a binomial mean around the bin's mean confidence.
    assert cal["ece"] < 0.01
    for c, a in zip(cal["mean_confidence"], cal["accuracy"]):
        assert a == pytest.approx(c, abs=0.02)


def test_ece_of_an_overconfident_set_is_its_gap():
    rng = np.random.default_rng(2)
    conf = rng.uniform(0.5, 1, 200_000)
    shrink = 0.6  # right only 60 % as often as claimed
    correct = rng.uniform(0, 1, conf.size) < shrink * conf
    cal = calibration(conf, correct)
    expected = (1 - shrink) * conf.mean()  # |acc − conf| = (1 − shrink) · conf in every bin
    assert cal["ece"] == pytest.approx(expected, abs=0.01)
    assert cal["ece"] > 0.2


def test_calibration_bins_cover_zero_and_one():
    cal = calibration([0.0, 1.0, 0.05, 0.95], [False, True, False, True], bins=10)
    assert cal["count"][0] == 2 and cal["count"][-1] == 2
    assert cal["ece"] == pytest.approx((0.0 + 0.0 + 0.05 + 0.05) / 4)


# --- baseline and helpers ----------------------------------------------------------------------
def test_disk_sums_count_the_pixels_inside_the_radius():
    img = np.ones((21, 21))
    r = 2.5
    yy, xx = np.mgrid[:21, :21]
    expected = np.sum((xx - 10) ** 2 + (yy - 10) ** 2 <= r ** 2)
    assert disk_sums(img, [10.0], [10.0], r)[0] == expected
    # A disk crossing the border counts only the pixels inside the image.
    assert disk_sums(img, [0.0], [0.0], r)[0] == np.sum(xx ** 2 + yy ** 2 <= r ** 2)


def _gaussian_columns(shape, columns, pixel, sign=-1.0):
    """A noise-free image (vacuum 1) whose columns darken with height (sign −1) or brighten."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    img = np.ones(shape)
    for x, y, h in columns:
        img += sign * 0.04 * h * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) * pixel ** 2 / (2 * 0.35 ** 2))
    return img


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_baseline_recovers_heights_of_clean_columns_at_high_dose(sign):
    pixel = 0.2
    cols = np.array([[20.0, 20, 2], [40, 20, 5], [20, 45, 8], [45, 45, 11]], dtype=float)
    clean = _gaussian_columns((64, 64), cols, pixel, sign)
    dose = 1e6
    counts = np.random.default_rng(0).poisson(clean * dose * pixel ** 2).astype(np.float32)
    out = baseline_columns(counts, clean, cols, dose, pixel, label_radius_A=0.5, min_distance_A=2.0)
    t = Tally()
    t.add(out, cols, pixel, 1.0)
    m = t.metrics(16)
    assert m["f1"] == 1.0 and m["exact_accuracy"] == 1.0
    assert "calibration" not in m  # the baseline states no confidence


def test_baseline_degrades_at_low_dose():
    pixel = 0.2
    cols = np.array([[x, y, h] for (x, y), h in zip(
        itertools.product(range(12, 60, 17), range(12, 60, 17)), itertools.cycle(range(1, 13)))],
        dtype=float)
    clean = _gaussian_columns((64, 64), cols, pixel)
    scores = []
    for dose in (1e6, 20.0):
        t = Tally()
        for seed in range(3):
            counts = np.random.default_rng(seed).poisson(clean * dose * pixel ** 2)
            t.add(baseline_columns(counts, clean, cols, dose, pixel, label_radius_A=0.5,
                                   min_distance_A=2.0), cols, pixel, 1.0)
        m = t.metrics(16)
        scores.append(m["f1"] * m["exact_accuracy"])
    assert scores[1] < scores[0]


def test_noise_seed_depends_only_on_seed_record_and_dose():
    a = noise_seed(0, 3, 50.0)
    assert np.array_equal(a, noise_seed(0, 3, 50.0))
    others = [noise_seed(1, 3, 50.0), noise_seed(0, 4, 50.0), noise_seed(0, 3, 200.0)]
    assert all(not np.array_equal(a, o) for o in others)
    assert a.shape == (2,) and np.all((a >= 0) & (a < 2**31))


def test_check_doses_refuses_non_positive_doses():
    assert check_doses([20, 50.5]) == (20.0, 50.5)
    for bad in ([], [0], [-5, 20], [float("nan")]):
        with pytest.raises(ConfigError, match="dose"):
            check_doses(bad)


# --- evaluate() end to end ---------------------------------------------------------------------
class LabelOracle:
    """A stand-in model that knows the dataset: it recognises each noisy frame's record (the
    noise-free image it correlates with best) and answers the one-hot of that record's label mask,
    optionally changed by ``degrade(label) -> label``."""

    def __init__(self, records, info, degrade=None):
        self.info = info
        self.images = [r["image"] / r["image"].mean() for r in records]
        self.labels = [r["label"].astype(np.int64) for r in records]
        self.degrade = degrade
        self.calls = 0

    def predict(self, images):
        self.calls += 1
        n_classes = self.info["max_height"] + 1
        probs, heights = [], []
        for frame in np.asarray(images, np.float64):
            frame = frame / frame.mean()
            k = int(np.argmin([np.mean((frame - im) ** 2) for im in self.images]))
            label = self.labels[k] if self.degrade is None else self.degrade(self.labels[k])
            probs.append(np.eye(n_classes, dtype=np.float32)[label])
            heights.append(label.astype(np.int32))
        return np.stack(probs), np.stack(heights)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Four test images (two particles × two optics) simulated by the project's own code."""
    from ceriakeras.config import SimulationConfig, StructureConfig
    from ceriakeras.data.records import iter_shard, shard_paths
    from ceriakeras.data.writer import write_dataset

    config = SimulationConfig.legacy(structure=StructureConfig(diameter_range_A=(12.0, 18.0), vacuum_A=6.0),
                                     cell_size_A=32.0, optics_per_exit_wave=2, split_fractions=(0.0, 0.0, 1.0))
    out = tmp_path_factory.mktemp("data") / "tiny"
    write_dataset(out, 4, 1, 0, config, progress=False)
    records = [r for p in shard_paths(out, "test") for r in iter_shard(p)]
    info = {"pixel_size_A": config.pixel_size_A, "max_height": config.max_height,
            "label_radius_A": config.label_radius_A}
    return out, records, info


DOSES = (20.0, 200.0, 5000.0)


@pytest.mark.slow
def test_a_perfect_model_scores_one_at_every_dose(tiny_dataset, tmp_path):
    from ceriakeras.evaluation.evaluate import evaluate

    data, records, info = tiny_dataset
    model = LabelOracle(records, info)
    result = evaluate(model, data, tmp_path / "ev", doses=DOSES, progress=False)
    n_true = sum(len(r["columns"]) for r in records)
    assert result["n_images"] == len(records)
    for r in result["results"]:
        net = r["network"]
        assert net["n_true"] == n_true
        assert net["f1"] == 1.0 and net["exact_accuracy"] == 1.0 and net["mae"] == 0.0
        assert net["ece"] == pytest.approx(0.0, abs=1e-6)   # one-hot: confidence 1, always right
        base = r["baseline"]
        assert 0.0 <= base["f1"] <= 1.0 and base["n_true"] == n_true
    # Every file of the evaluation is there, and metrics.json holds what was returned.
    files = {p.name for p in (tmp_path / "ev").iterdir()}
    assert {"metrics.json", "report.md", "accuracy_vs_dose.png", "reliability.png"} <= files
    assert {f"confusion_{d:g}.png" for d in DOSES} <= files
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["results"][0]["network"]["f1"] == 1.0
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| detection F1 | 1.000 |" in report
    assert "No real user has that calibration" in report   # the baseline's advantage is stated
    for d in DOSES:
        assert f"## Dose {d:g} e⁻/Å²" in report


@pytest.mark.slow
def test_degraded_models_score_lower_by_what_they_got_wrong(tiny_dataset, tmp_path):
    from ceriakeras.evaluation.evaluate import evaluate

    data, records, info = tiny_dataset
    heights = np.concatenate([np.rint(r["columns"][:, 2]) for r in records]).astype(int)
    assert heights.max() < info["max_height"]

    # Every height one too many: all columns found, no height exact, all within ±1.
    plus_one = LabelOracle(records, info, degrade=lambda lab: np.where(lab > 0, lab + 1, 0))
    result = evaluate(plus_one, data, tmp_path / "plus", doses=(200.0,), baseline=False, progress=False)
    net = result["results"][0]["network"]
    assert net["f1"] == 1.0
    assert net["exact_accuracy"] == 0.0 and net["within_1_accuracy"] == 1.0 and net["mae"] == 1.0
    assert net["ece"] == pytest.approx(1.0)   # confident and always wrong
    assert result["results"][0]["baseline"] is None
    cm = np.array(net["confusion"])
    for h in np.unique(heights):
        assert cm[h, h + 1] == np.sum(heights == h)

    # Columns of one atom invisible: recall = share of taller columns, precision 1.
    blind = LabelOracle(records, info, degrade=lambda lab: np.where(lab == 1, 0, lab))
    result = evaluate(blind, data, tmp_path / "blind", doses=(200.0,), baseline=False, progress=False)
    net = result["results"][0]["network"]
    assert net["precision"] == 1.0
    assert net["recall"] == pytest.approx(np.mean(heights > 1))
    assert net["recall"] < 1.0 and net["exact_accuracy"] == 1.0
    assert np.array(net["confusion"])[1, 0] == np.sum(heights == 1)


@pytest.mark.slow
def test_evaluation_is_repeatable_and_refuses_to_overwrite(tiny_dataset, tmp_path):
    from ceriakeras.evaluation.evaluate import evaluate

    data, records, info = tiny_dataset
    first = evaluate(LabelOracle(records, info), data, tmp_path / "a", doses=(20.0,), max_images=2,
                     progress=False)
    second = evaluate(LabelOracle(records, info), data, tmp_path / "b", doses=(20.0,), max_images=2,
                      progress=False)
    assert first["n_images"] == 2
    assert first["results"] == second["results"]   # same seeds → same noise → same baseline scores
    with pytest.raises(ConfigError, match="overwrite"):
        evaluate(LabelOracle(records, info), data, tmp_path / "a", doses=(20.0,), progress=False)
    evaluate(LabelOracle(records, info), data, tmp_path / "a", doses=(20.0,), max_images=1,
             progress=False, overwrite=True)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["n_images"] == 1


@pytest.mark.slow
def test_evaluation_refuses_a_dataset_at_another_pixel_size(tiny_dataset, tmp_path):
    from ceriakeras.config import DataError
    from ceriakeras.evaluation.evaluate import evaluate

    data, records, info = tiny_dataset
    model = LabelOracle(records, dict(info, pixel_size_A=info["pixel_size_A"] / 2))
    with pytest.raises(DataError, match="pixel"):
        evaluate(model, data, tmp_path / "ev", doses=(20.0,), progress=False)
    from ceriakeras.evaluation.calibration import fit_confidence_calibration

    with pytest.raises(DataError, match="pixel"):   # calibrating reads the data the same way
        fit_confidence_calibration(model.predict, data, model.info, split="test", progress=False)
    with pytest.raises(DataError, match="empty"):
        fit_confidence_calibration(LabelOracle(records, info).predict, data, info, progress=False)
    assert model.calls == 0


@pytest.mark.parametrize("doses, message", [("20,0", "positive"), ("20,abc", "numbers"), (",", "at least one")])
def test_cli_refuses_bad_doses(tmp_path, doses, message):
    from click.testing import CliRunner

    from ceriakeras.cli.main import main

    result = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path), "--data", str(tmp_path),
                                       "--doses", doses])
    assert result.exit_code == 2
    assert message in result.output


def _untrained_run(run, info):
    """A run folder as ``train`` leaves it, with an untrained depth-1 U-Net at the data's pixels."""
    from ceriakeras.config import ModelConfig, TrainConfig, to_dict
    from ceriakeras.nn.model import build_unet

    config = TrainConfig(model=ModelConfig(depth=1, base_filters=2, pixel_size_A=info["pixel_size_A"]))
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(to_dict(config)))
    build_unet(config.model).save(run / "checkpoints" / "best.keras")
    return run


@pytest.mark.slow
def test_cli_evaluates_an_exported_model_and_prints_the_table(tiny_dataset, tmp_path):
    import keras
    from click.testing import CliRunner

    from ceriakeras.cli.main import main
    from ceriakeras.nn.export import export_run

    data, records, info = tiny_dataset
    run = _untrained_run(tmp_path / "run", info)
    export_run(run, tmp_path / "saved_models" / "tiny")
    keras.backend.clear_session()

    out = tmp_path / "ev"
    args = ["evaluate", "--model", str(tmp_path / "saved_models" / "tiny"), "--data", str(data),
            "--doses", "50,1000", "--max-images", "1", "--no-baseline", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()   # the progress bar goes to stderr
    assert lines[0].split()[:3] == ["dose", "e-/Å²", "F1"]
    assert [line.split()[0] for line in lines[2:4]] == ["50", "1000"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["doses_e_per_A2"] == [50.0, 1000.0] and saved["n_images"] == 1
    assert saved["results"][0]["baseline"] is None
    assert saved["command"].startswith("ceriakeras")
    # Results are never replaced unless asked.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    # --tta: the 8 flips and rotations averaged, and said so
    tta = CliRunner().invoke(main, args[:-1] + [str(tmp_path / "ev-tta"), "--tta"])
    assert tta.exit_code == 0, tta.output
    saved = json.loads((tmp_path / "ev-tta" / "metrics.json").read_text())
    assert saved["analyze_config"]["test_time_augmentation"] is True
    assert "test-time augmentation" in (tmp_path / "ev-tta" / "report.md").read_text()


# --- calibration of the confidence -------------------------------------------------------------
def test_platt_fit_recovers_the_scaling_that_made_the_outcomes():
    from scipy.special import expit, logit

    from ceriakeras.evaluation.calibration import fit_platt

    rng = np.random.default_rng(5)
    c = rng.uniform(0.05, 0.95, 20000)
    right = rng.random(c.size) < expit(2.0 * logit(c) + 0.5)
    a, b = fit_platt(c, right)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(0.5, abs=0.06)
    assert calibration(expit(a * logit(c) + b), right)["ece"] < 0.02 < calibration(c, right)["ece"]
    a, b = fit_platt(np.full(5, 0.9), np.ones(5, bool))  # all right: finite, towards 1
    assert np.isfinite([a, b]).all() and expit(a * logit(0.9) + b) > 0.9


def test_calibrate_confidence_interpolates_in_log_dose():
    from scipy.special import expit, logit

    from ceriakeras.inference.columns import calibrate_confidence

    table = {"dose_e_per_A2": [10.0, 1000.0], "slope": [1.0, 3.0], "intercept": [0.0, 1.0]}
    c = np.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(calibrate_confidence(c, 10.0, table), c, atol=1e-9)
    np.testing.assert_allclose(calibrate_confidence(c, 1.0, table), c, atol=1e-9)   # held below
    np.testing.assert_allclose(calibrate_confidence(c, 1e5, table), expit(3 * logit(c) + 1))
    np.testing.assert_allclose(calibrate_confidence(c, 100.0, table), expit(2 * logit(c) + 0.5))


def test_find_columns_needs_the_dose_to_calibrate():
    from ceriakeras.inference.columns import find_columns

    p = np.zeros((16, 16, 3), np.float32)
    p[..., 0] = 1.0
    p[8, 8] = [0.1, 0.6, 0.3]
    table = {"dose_e_per_A2": [100.0], "slope": [2.0], "intercept": [0.0]}
    with pytest.raises(ValueError, match="dose"):
        find_columns(p, 0.2, calibration=table)
    raw = find_columns(p, 0.2)
    cal = find_columns(p, 0.2, calibration=table, dose_e_per_A2=100.0)
    assert raw["confidence"][0] == pytest.approx(0.6 / 0.9)
    assert cal["confidence"][0] == pytest.approx(1 / (1 + (0.3 / 0.6) ** 2))  # odds squared
    np.testing.assert_array_equal(raw["height"], cal["height"])


class SoftOracle(LabelOracle):
    """The oracle, but it gives only ``share`` of each column pixel's height mass to the right
    height and spreads the rest evenly: always right, and under-confident."""

    def __init__(self, records, info, share=0.4):
        super().__init__(records, info)
        self.share = share

    def predict(self, images):
        probs, heights = super().predict(images)
        column = probs[..., 0] < 0.5
        n_h = probs.shape[-1] - 1
        soft = np.where(probs[..., 1:] > 0.5, self.share, (1 - self.share) / (n_h - 1))
        probs[..., 1:] = np.where(column[..., None], soft, 0.0)
        return probs, heights


@pytest.mark.slow
def test_fitted_calibration_fixes_an_under_confident_model(tiny_dataset, tmp_path):
    from ceriakeras.evaluation.calibration import fit_confidence_calibration
    from ceriakeras.evaluation.evaluate import evaluate

    data, records, info = tiny_dataset
    model = SoftOracle(records, info)
    fit = fit_confidence_calibration(model.predict, data, info, doses=(50.0, 5000.0), split="test",
                                     max_images=2, progress=False)
    assert fit["dose_e_per_A2"] == [50.0, 5000.0] and fit["n_images"] == 2
    from ceriakeras.inference.columns import calibrate_confidence

    for before, after, dose in zip(fit["ece_before"], fit["ece_after"], fit["dose_e_per_A2"]):
        assert before > 0.4            # right every time, confidence ≈ 0.4
        assert after < 0.05 and calibrate_confidence(np.array([0.4]), dose, fit)[0] > 0.95
    # evaluate() applies the model's calibration (other images and noise: still calibrated)
    model.info = dict(info, confidence_calibration=fit)
    result = evaluate(model, data, tmp_path / "ev", doses=(50.0, 5000.0), progress=False,
                      baseline=False)
    assert result["confidence_calibrated"] is True
    for r in result["results"]:
        assert r["network"]["ece"] < 0.05
    assert "calibrated by the model" in (tmp_path / "ev" / "report.md").read_text()


@pytest.mark.slow
def test_export_records_calibrations_for_plain_and_augmented_inference(tiny_dataset, tmp_path):
    import keras

    from ceriakeras.inference.served import DihedralAveraged, load_served_model
    from ceriakeras.nn.export import export_run

    data, records, info = tiny_dataset
    run = _untrained_run(tmp_path / "run", info)
    served = load_served_model(export_run(run, tmp_path / "m", calibrate_on=data,
                                          calibration_split="test", calibration_images=1))
    keras.backend.clear_session()
    plain, tta = served.info["confidence_calibration"], served.info["confidence_calibration_tta"]
    for fit in (plain, tta):
        assert len(fit["slope"]) == len(fit["intercept"]) == len(fit["dose_e_per_A2"]) == 6
        assert fit["n_images"] == 1 and fit["split"] == "test" and "counts" in fit["method"]
        assert np.isfinite(fit["slope"]).all() and np.isfinite(fit["intercept"]).all()
    assert DihedralAveraged(served).info["confidence_calibration"] == tta
    assert "confidence_calibration_tta" not in DihedralAveraged(served).info


class FaintExtras(LabelOracle):
    """The oracle's answer plus one faint false column (probability 0.35 at its peak) in the
    vacuum corner of every frame."""

    def predict(self, images):
        probs, heights = super().predict(images)
        blob = np.array([[0.2, 0.2, 0.2], [0.2, 0.35, 0.2], [0.2, 0.2, 0.2]], np.float32)
        probs[:, 6:9, 6:9, :] = 0.0
        probs[:, 6:9, 6:9, 1] = blob
        probs[:, 6:9, 6:9, 0] = 1.0 - blob
        return probs, probs.argmax(-1).astype(np.int32)


@pytest.mark.slow
def test_threshold_study_trades_false_columns_against_the_threshold(tiny_dataset):
    """evaluation.threshold (scripts/studies/threshold_study.py): a 0.35 false column counts below a 0.35 threshold, not above."""
    from ceriakeras.evaluation.threshold import threshold_table

    data, records, info = tiny_dataset
    assert all(np.all(r["label"][6:9, 6:9] == 0) for r in records), "the corner must be vacuum"
    n_true = sum(len(r["columns"]) for r in records)
    table = threshold_table(FaintExtras(records, info), [data], (200.0, 5000.0), (0.3, 0.5),
                            split="test", progress=False)
    for rows in table.values():
        low, high = rows[0.3], rows[0.5]
        assert low["n_true"] == high["n_true"] == n_true
        assert low["recall"] == high["recall"] == 1.0
        assert low["precision"] == pytest.approx(n_true / (n_true + len(records)))
        assert high["precision"] == 1.0 and high["f1"] == 1.0 > low["f1"]
