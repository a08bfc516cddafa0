"""Tests of ``evaluate --images … --truth …``: labelled image files scored as the cross-check set's
score.py scores them. The images are synthetic (flat disks of counts on a lattice, written here);
a stand-in model reads each column's height off the image, so every score follows from
construction."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage

from ceriakeras.cli.main import main
from ceriakeras.config import AnalyzeConfig, ConfigError, InputError
from ceriakeras.evaluation.evaluate import evaluate_images, format_images_table, read_truth

VACUUM_COUNTS = 16      # counts per input pixel in vacuum
STEP = 0.25             # a column of h atoms is a disk of VACUUM_COUNTS · (1 + h · STEP) counts
DISK_RADIUS_A = 1.2     # wider than the 0.5 Å label disk, so the disk's inside reads one height
FIELD_A = 16.0          # images are 16 Å square
LATTICE_A = np.array([4.0, 8.0, 12.0])
FILES = (  # name, pixel size (Å), dose (e⁻/Å²) in images.csv
    ("a_d1000.tif", 0.1, 1000),
    ("b_d1000.tif", 0.125, 1000),
    ("c_d200.tif", 0.08, 200),
)
SPURIOUS_A = (2.0, 14.0)   # c_d200 has an extra disk at (x, y) here that truth.csv does not list
MISSED_A = (14.0, 2.0)     # and truth.csv lists a column here that c_d200 does not show


class DiskReader:
    """A stand-in model: a pixel whose counts stand ``h · STEP`` above the frame's median (the
    vacuum) is a column pixel of height ``h``; the column probability peaks at the disk centre
    (distance transform). It answers ``height + bias(height)`` with probability ``share(height)``
    and gives the rest to the next height, so its columns have exactly that confidence."""

    info = {"pixel_size_A": 0.2, "max_height": 9, "label_radius_A": 0.5}

    def __init__(self, bias=lambda h: 0 * h, share=lambda h: 1.0 + 0 * h):
        self.bias, self.share = bias, share

    def predict(self, images):
        frames = np.asarray(images, np.float64)
        n_classes = self.info["max_height"] + 1
        out = np.zeros(frames.shape + (n_classes,), np.float32)
        for k, frame in enumerate(frames):
            h = np.clip(np.rint((frame / np.median(frame) - 1) / STEP), 0, 6).astype(int)
            dist = ndimage.distance_transform_edt(h > 0)
            column = np.where(h > 0, 0.3 + 0.7 * dist / max(dist.max(), 1), 0.0)
            said = np.clip(h + self.bias(h), 1, n_classes - 2)
            share = self.share(h)
            rows, cols = np.indices(h.shape)
            out[k, ..., 0] = 1 - column
            out[k, rows, cols, said] = np.where(h > 0, share * column, 0)
            out[k, rows, cols, said + 1] += np.where(h > 0, (1 - share) * column, 0)
        return out, out.argmax(-1)


def _write_set(folder: Path, *, image_table: bool = True) -> dict:
    """Three labelled TIFFs (no calibration), truth.csv and images.csv; returns the true heights."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    truth_rows, heights = [], {}
    for name, px, _ in FILES:
        n = int(round(FIELD_A / px))
        yy, xx = np.mgrid[0:n, 0:n] * px
        image = np.full((n, n), VACUUM_COUNTS, np.uint16)
        cols = [(x + 0.03, y - 0.04, int(rng.integers(1, 7))) for y in LATTICE_A for x in LATTICE_A]
        painted = cols + ([(*SPURIOUS_A, 3)] if name.startswith("c") else [])
        for x, y, h in painted:
            image[(xx - x) ** 2 + (yy - y) ** 2 <= DISK_RADIUS_A ** 2] = VACUUM_COUNTS * (1 + h * STEP)
        tifffile.imwrite(folder / name, image)
        listed = cols + ([(*MISSED_A, 2)] if name.startswith("c") else [])
        truth_rows += [(name, x / px, y / px, h) for x, y, h in listed]
        heights[name] = np.array([h for _, _, h in cols])
    with open(folder / "truth.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file", "x_px", "y_px", "height")] + truth_rows)
    if image_table:
        with open(folder / "images.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("file", "particle", "dose", "pixel_size_A")]
                                     + [(name, i, dose, px) for i, (name, px, dose) in enumerate(FILES)])
    return heights


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labelled")
    return folder, _write_set(folder)


def _by_dose(result):
    return {r["dose_e_per_A2"]: r for r in result["results"]}


def test_a_right_model_scores_what_was_built_in(labelled, tmp_path):
    folder, heights = labelled
    result = evaluate_images(DiskReader(share=lambda h: 0.8 + 0 * h), folder, folder / "truth.csv",
                             tmp_path / "ev", progress=False)
    rows = _by_dose(result)
    assert sorted(rows) == [200.0, 1000.0]
    high, low = rows[1000.0]["network"], rows[200.0]["network"]
    assert rows[1000.0]["n_images"] == 2 and high["n_true"] == 18
    assert high["f1"] == 1.0 and high["exact_accuracy"] == 1.0 and high["bias_atoms"] == 0.0
    # 200: one spurious disk and one missed truth row among 9 right columns
    assert low["n_pred"] == low["n_true"] == 10 and low["n_matched"] == 9
    assert low["precision"] == low["recall"] == low["f1"] == pytest.approx(0.9)
    assert low["exact_accuracy"] == 1.0
    # confidence 0.8 on columns that are always right: ECE 0.2 over the matched columns
    assert high["ece"] == pytest.approx(0.2, abs=1e-6) and low["ece"] == pytest.approx(0.2, abs=1e-6)
    # every image alike: resampling images cannot move the ECE; a calibrated 0.8 on 18 columns
    # would still show some (binomial scatter), but far less than 0.2
    assert high["ece_interval_90"] == pytest.approx([0.2, 0.2], abs=1e-6)
    assert 0.0 < high["ece_if_calibrated"] < 0.15
    assert "ECE at dose" in format_images_table(result)
    # pixel sizes from images.csv (the TIFFs carry none), doses too
    assert {im["pixel_size_from"] for im in result["images"]} == {"images.csv"}
    assert {im["dose_from"] for im in result["images"]} == {"images.csv"}
    assert {im["pixel_size_A"] for im in result["images"]} == {0.1, 0.125, 0.08}
    out = tmp_path / "ev"
    assert {"metrics.json", "report.md", "columns.csv", "accuracy_vs_dose.png",
            "reliability.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "metrics.json").read_text())["results"][0]["network"]["f1"] == pytest.approx(0.9)
    with open(out / "columns.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 9 + 9 + 10 and set(table[0]) >= {"source", "x_px", "y_px", "height", "confidence"}
    assert "| 1000 | 2 | 18 |" in (out / "report.md").read_text()
    with pytest.raises(ConfigError, match="overwrite"):
        evaluate_images(DiskReader(), folder, folder / "truth.csv", out, progress=False)


def test_the_ece_of_a_dozen_images_comes_with_its_spread():
    """A calibrated confidence still shows an ECE of a few hundredths on 12 images; columns
    that are right or wrong together per image widen the range; a miscalibrated one stands
    clear of the floor."""
    from ceriakeras.evaluation.scoring import calibration, ece_spread

    rng = np.random.default_rng(0)
    conf = [rng.uniform(0.3, 0.95, 60) for _ in range(12)]
    right = [rng.random(60) < c for c in conf]
    calibrated = ece_spread(conf, right)
    measured = calibration(np.concatenate(conf), np.concatenate(right))["ece"]
    lo, hi = calibrated["ece_interval_90"]
    assert lo <= measured <= hi
    assert 0.01 < calibrated["ece_if_calibrated"] < 0.06
    assert abs(measured - calibrated["ece_if_calibrated"]) < 0.04
    # half the images 0.25 easier, half 0.25 harder: calibrated on average, wider spread
    shift = [0.25 if k % 2 else -0.25 for k in range(12)]
    grouped = [rng.random(60) < np.clip(c + d, 0, 1) for c, d in zip(conf, shift)]
    assert ece_spread(conf, grouped)["ece_interval_90"][1] > hi
    # 0.3 too sure of itself: the whole range lies above what calibration would show
    over = ece_spread(conf, [rng.random(60) < c - 0.3 for c in conf])
    assert over["ece_interval_90"][0] > 2 * over["ece_if_calibrated"]
    assert ece_spread([], [])["ece_interval_90"] is None


def test_a_bias_of_one_atom_shows_as_plus_one(labelled, tmp_path):
    folder, _ = labelled
    result = evaluate_images(DiskReader(bias=lambda h: 1 + 0 * h), folder, folder / "truth.csv",
                             tmp_path / "ev", progress=False)
    for r in result["results"]:
        net = r["network"]
        assert net["exact_accuracy"] == 0.0 and net["within_1_accuracy"] == 1.0
        assert net["bias_atoms"] == 1.0 and net["mae"] == 1.0
        assert net["ece"] == pytest.approx(1.0)   # sure of itself and always wrong
    table = format_images_table(result)
    assert table.splitlines()[0].split()[:4] == ["dose", "(e-/Å²)", "images", "columns"]
    assert "bias (atoms)" in table and "+1.000" in table


def test_test_time_augmentation_leaves_a_symmetric_reader_unchanged(labelled, tmp_path):
    folder, _ = labelled
    model = DiskReader(bias=lambda h: (h >= 4).astype(int))
    plain = evaluate_images(model, folder, folder / "truth.csv", tmp_path / "a", progress=False)
    tta = evaluate_images(model, folder, folder / "truth.csv", tmp_path / "b", progress=False,
                          config=AnalyzeConfig(test_time_augmentation=True))
    assert tta["analyze_config"]["test_time_augmentation"] is True
    for p, t in zip(plain["results"], tta["results"]):
        for key in ("f1", "exact_accuracy", "within_1_accuracy", "bias_atoms"):
            assert t["network"][key] == pytest.approx(p["network"][key])
    assert 0 < plain["results"][0]["network"]["exact_accuracy"] < 1


def _score_py() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    for shared in (root.parent / "shared", root / "shared", root.parent.parent / "shared"):
        if (shared / "crosscheck" / "score.py").is_file():
            return shared / "crosscheck" / "score.py"
    return None


def test_scores_agree_with_the_cross_check_sets_score_py(labelled, tmp_path):
    script = _score_py()
    if script is None:
        pytest.skip("../shared/crosscheck/score.py (the cross-check set's scorer) is not here")
    folder, _ = labelled
    # wrong for tall columns only, and less sure of taller ones: every score is in between
    model = DiskReader(bias=lambda h: (h >= 4).astype(int), share=lambda h: 0.35 + 0.1 * h)
    result = evaluate_images(model, folder, folder / "truth.csv", tmp_path / "ev", progress=False)
    run = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "ev" / "columns.csv")],
                         capture_output=True, text=True, check=True)
    theirs = {row["dose"]: row for row in map(json.loads, run.stdout.splitlines()[:-1])}
    ours = _by_dose(result)
    assert sorted(theirs) == sorted(ours)
    for dose, row in theirs.items():
        net = ours[dose]["network"]
        assert row["columns"] == net["n_true"]
        for key, mine in (("precision", "precision"), ("recall", "recall"), ("f1", "f1"),
                          ("exact", "exact_accuracy"), ("within1", "within_1_accuracy"),
                          ("mae", "mae"), ("bias", "bias_atoms"), ("ece", "ece")):
            assert row[key] == pytest.approx(net[mine], abs=6e-4), (dose, key)
    assert 0 < ours[1000]["network"]["ece"] and 0 < ours[1000]["network"]["bias_atoms"] < 1


def test_without_images_csv_the_pixel_size_comes_from_the_option_and_the_dose_from_counts(tmp_path):
    folder = tmp_path / "set"
    _write_set(folder, image_table=False)
    image = folder / "a_d1000.tif"
    result = evaluate_images(DiskReader(), [image], folder / "truth.csv", tmp_path / "ev",
                             pixel_size_A=0.1, progress=False)
    (only,) = result["images"]
    assert only["pixel_size_from"] == "--pixel-size" and only["pixel_size_A"] == 0.1
    assert only["dose_from"] == "estimated from counts"
    # mean counts over the pixel area, rounded to two digits: 16 counts per 0.01 Å² and the disks
    counts = tifffile.imread(image).astype(float)
    assert only["dose_e_per_A2"] == float(f"{counts.mean() / 0.01:.2g}")
    assert result["results"][0]["network"]["exact_accuracy"] == 1.0
    # the other two files' truth rows are ignored, and said so
    assert result["truth_entries_ignored"] == ["b_d1000.tif", "c_d200.tif"]
    assert "estimated from the image's counts" in format_images_table(result)
    # no pixel size anywhere: one line saying what to give
    with pytest.raises(InputError, match="--pixel-size"):
        evaluate_images(DiskReader(), [image], folder / "truth.csv", tmp_path / "ev2", progress=False)


def test_an_image_without_truth_is_refused(labelled, tmp_path):
    folder, _ = labelled
    other = tmp_path / "other"
    other.mkdir()
    (other / "d_d50.tif").write_bytes((folder / "a_d1000.tif").read_bytes())
    with pytest.raises(InputError, match="no rows in the truth table"):
        evaluate_images(DiskReader(), [folder / "a_d1000.tif", other / "d_d50.tif"],
                        folder / "truth.csv", tmp_path / "ev", progress=False)
    # a file of the same name elsewhere must not silently take the labelled file's truth
    (other / "a_d1000.tif").write_bytes((folder / "a_d1000.tif").read_bytes())
    with pytest.raises(InputError, match="both take the truth of a_d1000.tif"):
        evaluate_images(DiskReader(), [folder / "a_d1000.tif", other / "a_d1000.tif"],
                        folder / "truth.csv", tmp_path / "ev", progress=False)


@pytest.mark.parametrize("header, row, message", [
    ("file,x_px,height", "a.tif,1,2", "lacks the column(s) y_px"),
    ("file,x_px,y_px,height", "a.tif,nan,2,3", "x_px='nan'"),
    ("file,x_px,y_px,height", "a.tif,1,2,2.5", "whole number"),
    ("file,x_px,y_px,height", "a.tif,1,2,", "height=''"),
    ("file,x_px,y_px,height", ",1,2,3", "file name is empty"),
])
def test_bad_truth_tables_are_refused_with_the_line(tmp_path, header, row, message):
    path = tmp_path / "truth.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_truth(path)


def test_cli_errors_are_one_line(labelled, tmp_path):
    folder, _ = labelled
    model = tmp_path / "model" / "1"
    (model / "assets").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"")
    (model / "assets" / "ceriakeras.json").write_text(json.dumps(DiskReader.info))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,x_px,y_px\na_d1000.tif,1,2\n")
    base = ["evaluate", "--model", str(model), "--out", str(tmp_path / "ev")]
    cases = [
        (["--images", str(folder), "--truth", str(bad)], "lacks the column(s) height"),
        (["--images", str(folder / "a_d1000.tif"), "--truth", str(folder / "truth.csv"),
          "--doses", "50"], "--doses goes with --data"),
        (["--images", str(folder)], "give both"),
        (["--data", str(folder), "--images", str(folder), "--truth", str(folder / "truth.csv")],
         "not both"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, base + args)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    # no images.csv and no calibration: the pixel size is asked for before the model is loaded
    bare = tmp_path / "bare"
    _write_set(bare, image_table=False)
    result = CliRunner().invoke(main, base + ["--images", str(bare), "--truth", str(bare / "truth.csv")])
    assert result.exit_code == 2 and "--pixel-size" in result.output


@pytest.mark.slow
def test_cli_scores_images_with_an_exported_model(tmp_path):
    from helpers import export_tiny_model

    folder = tmp_path / "set"
    _write_set(folder, image_table=False)
    model = export_tiny_model(tmp_path)
    for extra, out in (([], "ev"), (["--tta"], "ev-tta")):
        args = ["evaluate", "--model", str(model), "--images", str(folder / "a_d1000.tif"),
                "--truth", str(folder / "truth.csv"), "--pixel-size", "0.1",
                "--out", str(tmp_path / out)] + extra
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0].split()[:2] == ["dose", "(e-/Å²)"] and "ECE" in lines[0]
        assert "not among --images" in result.stdout
        saved = json.loads((tmp_path / out / "metrics.json").read_text())
        assert saved["n_images"] == 1 and saved["results"][0]["network"]["n_true"] == 9
        assert saved["analyze_config"]["test_time_augmentation"] is bool(extra)
        assert (tmp_path / out / "columns.csv").read_text().startswith("source,frame,x_px")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_a_calibrated_file_needs_no_pixel_size(tmp_path):
    folder = tmp_path / "set"
    _write_set(folder, image_table=False)
    image = folder / "b_d1000.tif"   # 0.125 Å pixels: 8e8 pixels per cm
    tifffile.imwrite(image, tifffile.imread(image), resolution=(8e8, 8e8), resolutionunit="CENTIMETER")
    result = evaluate_images(DiskReader(), [image], folder / "truth.csv", tmp_path / "ev",
                             progress=False)
    (only,) = result["images"]
    assert only["pixel_size_from"] == "TIFF resolution tags"
    assert only["pixel_size_A"] == pytest.approx(0.125)
    assert result["results"][0]["network"]["exact_accuracy"] == 1.0


def test_measure_framing_moves_the_truth_with_the_frame(labelled, tmp_path):
    """evaluation.framing (scripts/studies/measure_framing.py): a padded copy keeps every column on its disk (a reader that
    takes the vacuum as its reference scores it perfectly), a trimmed one drops the columns
    outside it."""
    from ceriakeras.evaluation.framing import reframe, vacuum_shares

    folder, _ = labelled
    sides = {name: int(round(FIELD_A / px)) for name, px, _ in FILES}
    shares = {}
    for grow in (0.5, -0.375):      # the trimmed frame, 6–10 Å, holds the middle disk alone
        out = tmp_path / f"framed{grow}"
        reframe(folder, out, {"1000"}, grow, noise=False)
        assert sorted(p.name for p in out.glob("*.tif")) == ["a_d1000.tif", "b_d1000.tif"]
        for name in ("a_d1000.tif", "b_d1000.tif"):
            image = tifffile.imread(out / name)
            n = sides[name]
            assert image.shape[0] == n + 2 * int(round(grow * n))
            if grow > 0:                                  # the original sits in the middle
                p = int(round(grow * n))
                np.testing.assert_array_equal(image[p:p + n, p:p + n], tifffile.imread(folder / name))
                assert (image[:p] == VACUUM_COUNTS).all()
        result = evaluate_images(DiskReader(), out, out / "truth.csv", tmp_path / f"ev{grow}",
                                 progress=False)
        net = _by_dose(result)[1000.0]["network"]
        assert net["exact_accuracy"] == 1.0 and net["f1"] == 1.0, {k: net[k] for k in ("n_pred", "n_true", "n_matched")}
        assert net["n_true"] == (18 if grow > 0 else 2)
        shares[grow] = vacuum_shares(out, tmp_path / f"ev{grow}" / "columns.csv")
    # vacuum as `analyze` measures it (> 5 Å from every column): around the 3 × 3 columns
    # 4 Å apart, a square of 8 + 2·5 Å with corners rounded by 5 Å is not vacuum; the
    # padded frame is 32 Å wide, the trimmed one 6–10 Å, all within 5 Å of its column
    particle = 8**2 + 4 * 8 * 5 + np.pi * 5**2
    np.testing.assert_allclose(shares[0.5], 1 - particle / 32**2, atol=0.02)
    assert max(shares[-0.375]) == 0.0

