"""The shipped model (saved_models/ceria110) on frames it has never seen.

Frames come from the project's own simulator with a seed outside the training set's, at a high
dose and at 0.1 Å input pixels (so the resampling to the model's 0.2 Å is in the chain), and are
analyzed with exactly what users run (`analyze`). The ground truth is the simulation's column
table, mapped to the input pixel grid.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ceriakeras.analysis.run import analyze
from ceriakeras.inference.served import default_model_path
from ceriakeras.config import AnalyzeConfig, SimulationConfig, StructureConfig
from ceriakeras.evaluation.scoring import match_columns
from ceriakeras.physics.simulate import simulate_particle

ROOT = Path(__file__).resolve().parents[2]
INPUT_PIXEL_A = 0.1
HIGH_DOSE = 5000.0  # e-/Å²


@pytest.fixture(scope="module")
def frames():
    """Six unseen particles, four optics each, Poisson counts at 5000 e-/Å² on a 0.1 Å grid.

    Six, not two: the calibration check below compares a mean confidence with a fraction right,
    and over ~300 columns of two particles that fraction alone has a standard error of 0.026
    (over ~900 columns, 0.015). Simulating them takes ≈ 6 s."""
    config = SimulationConfig.legacy(
        structure=StructureConfig(diameter_range_A=(20.0, 30.0)),
        cell_size_A=48.0, sampling_A=INPUT_PIXEL_A, pixel_size_A=INPUT_PIXEL_A,
        optics_per_exit_wave=4,
    )
    rng = np.random.default_rng(0)
    out = []
    for particle in range(6):
        for ex in simulate_particle(particle, 987_654, config):
            counts = rng.poisson(ex.image * HIGH_DOSE * INPUT_PIXEL_A**2).astype(np.float32)
            out.append((counts, ex.columns))
    return out


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def rows(frames, tmp_path_factory):
    """columns.csv of `analyze` with the shipped model on the frames."""
    tmp = tmp_path_factory.mktemp("shipped")
    np.save(tmp / "series.npy", np.stack([f for f, _ in frames]))
    analyze([tmp / "series.npy"], tmp / "out", pixel_size_A=INPUT_PIXEL_A, config=AnalyzeConfig(),
            progress=False)
    return _read(tmp / "out" / "columns.csv")


def test_shipped_model_finds_columns_and_heights_at_high_dose(frames, rows):
    n_true = n_found = n_matched = n_right = n_within_1 = 0
    position_errors_A = []
    for k, (_, truth) in enumerate(frames):
        sel = [r for r in rows if int(r["frame"]) == k]
        xy = np.array([[float(r["x_px"]), float(r["y_px"])] for r in sel]).reshape(-1, 2)
        h = np.array([int(r["height"]) for r in sel])
        pi, ti = match_columns(xy, truth[:, :2], 1.0 / INPUT_PIXEL_A)
        n_true += len(truth)
        n_found += len(sel)
        n_matched += len(pi)
        n_right += int((h[pi] == truth[ti, 2].astype(int)).sum())
        n_within_1 += int((np.abs(h[pi] - truth[ti, 2].astype(int)) <= 1).sum())
        position_errors_A.extend(np.hypot(*(xy[pi] - truth[ti, :2]).T) * INPUT_PIXEL_A)
    recall, precision = n_matched / n_true, n_matched / max(n_found, 1)
    # Positions: within 0.5 Å, as the issue asks.
    assert np.median(position_errors_A) < 0.25
    assert np.mean(np.asarray(position_errors_A) < 0.5) > 0.95
    assert recall > 0.9 and precision > 0.9, (recall, precision)
    # Heights: floors under what the shipped model measures (docs/model.md: 0.62 exact and 0.95
    # within ±1 on the test split at 5000 e-/Å²), well above chance (1 in 13 heights). The issue's
    # targets (0.95 / 0.995) are not reached by this CPU-trained model; see docs/model.md.
    assert n_right / n_matched > 0.5, n_right / n_matched
    assert n_within_1 / n_matched > 0.85, n_within_1 / n_matched


def test_shipped_models_confidence_is_calibrated(frames, rows):
    """`confidence` is the probability that the height is right (docs/design.md): over these
    unseen frames the mean confidence is the fraction right, and so in confidence bins."""
    from ceriakeras.evaluation.scoring import calibration

    confidence, right = [], []
    for k, (_, truth) in enumerate(frames):
        sel = [r for r in rows if int(r["frame"]) == k]
        xy = np.array([[float(r["x_px"]), float(r["y_px"])] for r in sel]).reshape(-1, 2)
        h = np.array([int(r["height"]) for r in sel])
        pi, ti = match_columns(xy, truth[:, :2], 1.0 / INPUT_PIXEL_A)
        ok = np.zeros(len(sel), bool)   # a spurious column is a wrong height
        ok[pi] = h[pi] == truth[ti, 2].astype(int)
        confidence.extend(float(r["confidence"]) for r in sel)
        right.extend(ok)
    confidence, right = np.array(confidence), np.array(right)
    assert abs(confidence.mean() - right.mean()) < 0.08, (confidence.mean(), right.mean())
    assert calibration(confidence, right)["ece"] < 0.1


def test_shipped_model_assets_describe_it():
    from ceriakeras.inference.served import find_version, read_info

    info = read_info(find_version(default_model_path()))
    assert info["pixel_size_A"] == pytest.approx(0.2)
    assert info["max_height"] >= 14
    assert set(info) >= {"label_radius_A", "manifest_sha256", "metrics", "versions"}
    for key in ("confidence_calibration", "confidence_calibration_tta"):
        fit = info[key]
        assert fit["split"] == "validation" and fit["n_images"] >= 48
        assert min(fit["dose_e_per_A2"]) <= 20 and max(fit["dose_e_per_A2"]) >= 20000
        # on the validation columns it was fitted to: within the 0.05 at every dose
        assert max(fit["ece_after"]) <= 0.05 < max(fit["ece_before"])
        assert np.mean(fit["ece_after"]) < np.mean(fit["ece_before"])


@pytest.mark.slow
def test_make_demo_script_scores_the_example(tmp_path):
    """scripts/tools/demo.py (what `make demo` runs) analyzes the shipped examples, prints its
    accuracy near the held-out figure at their dose, and no TensorFlow log line, even with no
    TF_CPP_MIN_LOG_LEVEL set (issue 23)."""
    import os
    import re

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "tools" / "demo.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (ROOT / "results" / "demo" / "columns.csv").is_file()
    f1 = float(re.search(r"F1 ([0-9.]+)", out.stdout).group(1))
    exact = float(re.search(r"exact height ([0-9.]+)", out.stdout).group(1))
    within_1 = float(re.search(r"within ±1 ([0-9.]+)", out.stdout).group(1))
    spread = float(re.search(r"exact height [0-9.]+ \(± ([0-9.]+) from the choice", out.stdout).group(1))
    # README: 0.958 / 0.646 (± 0.021) / 0.982 on the 40 examples; 0.970 / 0.675 / 0.985 on the
    # model's own test split at 200 e-/Å². Particles scatter: the band, not the figure.
    assert f1 > 0.92 and within_1 > 0.95, out.stdout
    assert abs(exact - 0.675) < 0.05, out.stdout
    assert 0.0 < spread < 0.04, out.stdout     # 40 particles: a few hundredths at most
    tf_lines = re.compile(r"tensorflow|oneDNN|cuda|absl|cpu_feature_guard|^[IWE]\d{4} ", re.I | re.M)
    assert not tf_lines.search(out.stdout + out.stderr), (out.stdout + out.stderr)[-2000:]


@pytest.mark.slow
def test_evaluate_images_without_model_scores_the_shipped_model(frames, tmp_path, monkeypatch):
    """`ceriakeras evaluate --images DIR --truth truth.csv`, as the issue writes it: no --model
    means the shipped model, as for `analyze`."""
    import json

    import tifffile
    from click.testing import CliRunner

    from ceriakeras.cli.main import main
    from ceriakeras.inference.served import find_version, read_info

    folder = tmp_path / "labelled"
    folder.mkdir()
    with open(folder / "images.csv", "w") as f, open(folder / "truth.csv", "w") as t:
        f.write("file,dose,pixel_size_A\n")
        t.write("file,x_px,y_px,height\n")
        for k, (counts, truth) in enumerate(frames[:2]):
            tifffile.imwrite(folder / f"f{k}.tif", counts)
            f.write(f"f{k}.tif,{HIGH_DOSE:g},{INPUT_PIXEL_A}\n")
            t.writelines(f"f{k}.tif,{x},{y},{int(h)}\n" for x, y, h in truth)
    monkeypatch.chdir(tmp_path)     # the default --out is relative
    result = CliRunner().invoke(main, ["evaluate", "--images", str(folder),
                                       "--truth", str(folder / "truth.csv")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "results" / "evaluate-ceria110-images" / "metrics.json").read_text())
    shipped = read_info(find_version(default_model_path()))
    assert saved["model_info"]["manifest_sha256"] == shipped["manifest_sha256"]
    assert saved["analyze_config"]["threshold"] == shipped.get("column_threshold", 0.3)
    (row,) = saved["results"]
    assert row["dose_e_per_A2"] == HIGH_DOSE and row["network"]["f1"] > 0.9
