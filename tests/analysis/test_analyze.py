"""The analysis chain (ceriakeras.analysis.run and `ceriakeras analyze`): read → resample → model → columns → CSV.

The model here is a stand-in that turns the image itself into class probabilities (blob shape
→ column probability, blob mass → height), so positions and heights in ``columns.csv`` test the
whole chain, resampling and the coordinate mapping back to the input grid included.
"""

import csv
import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage

from ceriakeras.analysis import run as analyze_module
from ceriakeras.analysis.run import CSV_HEADER, analyze
from ceriakeras.analysis.tracking import TRACK_COLUMNS
from ceriakeras.inference import served as served_module
from ceriakeras.cli.main import main
from ceriakeras.config import AnalyzeConfig, InputError, ModelError

MODEL_PIXEL_A = 0.2
BLOB_SIGMA_A = 0.25
CONTRAST = 0.5  # peak intensity of a height-1 column above vacuum, relative


class StandInModel:
    """Finds Gaussian blobs in the (resampled) image and reports them as Ce columns.

    Column probability = the blob's shape normalized to 1 at its peak; height = the blob's
    integrated relative intensity / that of a height-1 column. Knows only its own pixel size.
    """

    def __init__(self, max_height=16):
        self.info = {"pixel_size_A": MODEL_PIXEL_A, "max_height": max_height,
                     "label_radius_A": 0.5}
        self.calls = []

    def predict(self, images):
        images = np.asarray(images, np.float32)
        self.calls.append(images.shape)
        b, h, w = images.shape
        c_max = self.info["max_height"] + 1
        probs = np.zeros((b, h, w, c_max), np.float32)
        unit = CONTRAST * 2 * np.pi * (BLOB_SIGMA_A / MODEL_PIXEL_A) ** 2
        for k in range(b):
            ratio = images[k] / np.median(images[k]) - 1.0
            peak = ndimage.maximum_filter(ratio, size=9)
            column = np.where(peak > 0.02, np.clip(ratio / np.where(peak > 0, peak, 1), 0, 1), 0)
            mass = ndimage.maximum_filter(ndimage.uniform_filter(ratio, size=9) * 81, size=9)
            height = np.clip(np.rint(mass / unit), 1, c_max - 1).astype(int)
            probs[k, ..., 0] = 1 - column
            np.put_along_axis(probs[k], height[..., None], column[..., None], axis=-1)
        return probs, probs.argmax(-1).astype(np.int32)


def synthetic_frame(columns_A, pixel_A, size_A=16.0, vacuum_counts=40.0):
    """Expected counts: vacuum × (1 + Σ CONTRAST·h·Gaussian) sampled at pixel centres (i·p)."""
    n = int(round(size_A / pixel_A))
    yy, xx = np.mgrid[0:n, 0:n] * pixel_A
    img = np.ones((n, n))
    for x, y, h in columns_A:
        img += CONTRAST * h * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * BLOB_SIGMA_A**2))
    return (vacuum_counts * img * (pixel_A / 0.05) ** 2).astype(np.float32)


def random_columns(seed, n=5, size_A=16.0):
    rng = np.random.default_rng(seed)
    cols = []
    for gy in range(2):
        for gx in range(3):
            if len(cols) < n:
                cols.append((2.5 + 5.0 * gx + rng.uniform(-0.6, 0.6),
                             3.0 + 8.0 * gy + rng.uniform(-0.6, 0.6), int(rng.integers(1, 6))))
    return cols


def read_rows(path):
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


def match(rows, truth_A, pixel_A):
    """For each true column (Å), the CSV row nearest to it; checks positions and heights."""
    xs = np.array([float(r[2]) for r in rows])
    ys = np.array([float(r[3]) for r in rows])
    assert len(rows) == len(truth_A)
    for x, y, h in truth_A:
        k = np.argmin(np.hypot(xs - x / pixel_A, ys - y / pixel_A))
        assert abs(xs[k] - x / pixel_A) < 0.05, (xs[k], x / pixel_A)
        assert abs(ys[k] - y / pixel_A) < 0.05, (ys[k], y / pixel_A)
        assert int(rows[k][6]) == h
        assert float(rows[k][4]) == pytest.approx(xs[k] * pixel_A, abs=2e-4)
        assert float(rows[k][5]) == pytest.approx(ys[k] * pixel_A, abs=2e-4)
        assert 0.0 <= float(rows[k][7]) <= 1.0


@pytest.mark.parametrize("pixel_A", [0.05, 0.08, 0.2])
def test_positions_exact_under_resampling(tmp_path, pixel_A):
    truth = random_columns(int(pixel_A * 100))
    np.save(tmp_path / "frame.npy", synthetic_frame(truth, pixel_A))
    model = StandInModel()
    summary = analyze([tmp_path / "frame.npy"], tmp_path / "out", model=model,
                      pixel_size_A=pixel_A, progress=False)
    header, rows = read_rows(tmp_path / "out" / "columns.csv")
    assert header == list(CSV_HEADER) + ["recognised"] + list(TRACK_COLUMNS)
    match(rows, truth, pixel_A)
    # the model saw the frame at its own pixel size
    n_in = int(round(16.0 / pixel_A))
    assert model.calls[0][1] == int(np.floor(n_in * pixel_A / MODEL_PIXEL_A + 1e-9))
    assert summary["frames_analysed"] == 1 and summary["columns_total"] == len(truth)
    assert (tmp_path / "out" / "overlays" / "frame_00000.png").stat().st_size > 1000


def write_series(path, frames, pixel_A):
    tifffile.imwrite(path, np.stack(frames).astype(np.float32), imagej=True,
                     resolution=(1 / (pixel_A / 10), 1 / (pixel_A / 10)),
                     metadata={"unit": "nm", "axes": "TYX"})


@pytest.fixture
def series(tmp_path):
    pixel_A = 0.1
    truths = [random_columns(s) for s in range(7)]
    frames = [synthetic_frame(t, pixel_A) for t in truths]
    frames[3][5, 5] = np.nan  # one bad frame inside the series
    write_series(tmp_path / "series.tif", frames, pixel_A)
    return tmp_path / "series.tif", truths, pixel_A


def test_series_with_calibration_bad_frame_and_pictures(tmp_path, series):
    path, truths, pixel_A = series
    cfg = AnalyzeConfig(batch_size=3, overlay_every=2, tracks=False)  # per-frame models
    summary = analyze([path], tmp_path / "out", model=StandInModel(), config=cfg, xyz=True,
                      details=True, progress=False)
    header, rows = read_rows(tmp_path / "out" / "columns.csv")
    assert header == list(CSV_HEADER) + ["recognised", "expected_height_atoms", "height_std_atoms"]
    for i, truth in enumerate(truths):
        frame_rows = [r for r in rows if r[1] == str(i)]
        if i == 3:
            assert frame_rows == []
        else:
            match(frame_rows, truth, pixel_A)
    assert summary["frames_skipped"] == 1 and "frame 3" in summary["skipped"][0]["reason"]
    assert summary["inputs"][0]["pixel_size_from"] == "ImageJ calibration"
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "series_00000.png", "series_00002.png", "series_00004.png", "series_00006.png"]
    assert (out / "series_series.png").stat().st_size > 1000
    import av

    with av.open(str(out / "series_movie.mp4")) as movie:  # every good frame, in one box
        assert sum(1 for _ in movie.decode(video=0)) == 6
    import ase.io

    atoms = ase.io.read(out / "xyz" / "series_00000.xyz")
    assert len(atoms) == sum(h for _, _, h in truths[0])
    _, frames = read_rows(out / "frames.csv")
    assert [int(r[1]) for r in frames] == [0, 1, 2, 4, 5, 6]
    assert [int(r[3]) for r in frames] == [sum(h for *_, h in truths[i]) for i in (0, 1, 2, 4, 5, 6)]
    assert json.loads((out / "progress.json").read_text())["complete"] is True


def frames_in(rows):
    return sorted({(r[0], int(r[1])) for r in rows})


@pytest.mark.parametrize("cut", ["csv_mid_line", "csv_lost_rows", "uncommitted_rows"])
def test_resume_after_interruption(tmp_path, series, cut):
    path, truths, pixel_A = series
    out = tmp_path / "out"
    cfg = AnalyzeConfig(batch_size=2, overlay_every=100)
    analyze([path], out, model=StandInModel(), config=cfg, progress=False)
    _, full_rows = read_rows(out / "columns.csv")
    data = (out / "columns.csv").read_bytes()
    progress = json.loads((out / "progress.json").read_text())

    # fake an interruption after the first two batches (frames 0–3; frame 3 is the bad one)
    lines = data.splitlines(keepends=True)
    keep = [ln for ln in lines[1:] if int(ln.split(b",")[1]) < 4]
    committed = lines[0] + b"".join(keep)
    progress.update(complete=False, frames_done=4, csv_bytes=len(committed))
    if cut == "csv_mid_line":        # killed while writing the next batch's rows
        nxt = [ln for ln in lines[1:] if int(ln.split(b",")[1]) == 4]
        text = committed + nxt[0] + nxt[1][:7]
    elif cut == "csv_lost_rows":     # the CSV lost committed rows, ending inside frame 2
        rows2 = [ln for ln in keep if int(ln.split(b",")[1]) == 2]
        text = committed[: committed.index(rows2[1])] + rows2[1][:5]
    else:                            # rows written, progress not yet updated
        text = committed + b"".join(ln for ln in lines[1:] if int(ln.split(b",")[1]) == 4)
    (out / "columns.csv").write_bytes(text)
    (out / "progress.json").write_text(json.dumps(progress))

    model = StandInModel()
    summary = analyze([path], out, model=model, config=cfg, progress=False)
    _, rows = read_rows(out / "columns.csv")
    assert sorted(rows) == sorted(full_rows)  # every frame exactly once, nothing lost
    redo_from = 2 if cut == "csv_lost_rows" else 4
    assert summary["resumed_at_frame"] == redo_from
    # the frames not yet done, and one reading of the series' drift-free sum (one epoch, no change)
    assert sum(b for b, *_ in model.calls) == len([i for i in range(redo_from, 7) if i != 3]) + 1
    assert summary["frames_skipped"] == 1


def test_refuses_to_overwrite_and_overwrites_when_asked(tmp_path, series):
    path, truths, _ = series
    out = tmp_path / "out"
    analyze([path], out, model=StandInModel(), progress=False)
    with pytest.raises(InputError, match="--overwrite"):
        analyze([path], out, model=StandInModel(), progress=False)
    before = read_rows(out / "columns.csv")
    summary = analyze([path], out, model=StandInModel(), overwrite=True, progress=False)
    assert read_rows(out / "columns.csv") == before
    assert summary["resumed_at_frame"] == 0


def test_unfinished_run_with_other_settings_is_refused(tmp_path, series):
    path, _, _ = series
    out = tmp_path / "out"
    analyze([path], out, model=StandInModel(), progress=False)
    progress = json.loads((out / "progress.json").read_text())
    progress["complete"] = False
    (out / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(InputError, match="other inputs, model or settings"):
        analyze([path], out, model=StandInModel(), config=AnalyzeConfig(threshold=0.5),
                progress=False)
    (out / "progress.json").write_text("{trunc")
    with pytest.raises(InputError, match="unreadable"):
        analyze([path], out, model=StandInModel(), progress=False)


def test_foreign_columns_csv_is_not_overwritten(tmp_path, series):
    path, _, _ = series
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "columns.csv").write_text("mine\n")
    with pytest.raises(InputError, match="--overwrite"):
        analyze([path], tmp_path / "out", model=StandInModel(), progress=False)
    assert (tmp_path / "out" / "columns.csv").read_text() == "mine\n"


@pytest.mark.parametrize("pixel_A, message", [(0.3, "outside 0.05–0.2"), (0.04, "outside"),
                                              (0.2, None)])
def test_pixel_size_range(tmp_path, pixel_A, message):
    np.save(tmp_path / "f.npy", synthetic_frame(random_columns(0, 2), 0.1))
    run = lambda: analyze([tmp_path / "f.npy"], tmp_path / "out", model=StandInModel(),  # noqa
                          pixel_size_A=pixel_A, progress=False)
    if message is None:
        run()
    else:
        with pytest.raises(InputError, match=message):
            run()


def test_pixel_size_coarser_than_model_is_refused(tmp_path):
    model = StandInModel()
    model.info["pixel_size_A"] = 0.1
    np.save(tmp_path / "f.npy", synthetic_frame(random_columns(0, 2), 0.1))
    with pytest.raises(InputError, match="coarser than the model"):
        analyze([tmp_path / "f.npy"], tmp_path / "out", model=model, pixel_size_A=0.15,
                progress=False)


class DimStandIn(StandInModel):
    """The stand-in with every column probability scaled by 0.6 (0.6 at a column's centre), and
    optionally a ``column_threshold`` of its own in its info."""

    def __init__(self, column_threshold=None):
        super().__init__()
        if column_threshold is not None:
            self.info["column_threshold"] = column_threshold

    def predict(self, images):
        probs, _ = super().predict(images)
        probs[..., 1:] *= 0.6
        probs[..., 0] = 1.0 - probs[..., 1:].sum(-1)
        return probs, probs.argmax(-1).astype(np.int32)


@pytest.mark.parametrize("own, config, found", [
    (None, None, True),    # no threshold anywhere: the default 0.3 keeps 0.6 peaks
    (0.7, None, False),    # the model's own 0.7 drops them
    (0.7, 0.5, True),      # a threshold in the config wins over the model's
    (0.5, None, True),
])
def test_the_models_own_column_threshold_applies_unless_the_config_names_one(
        tmp_path, own, config, found):
    truth = random_columns(3)
    np.save(tmp_path / "f.npy", synthetic_frame(truth, MODEL_PIXEL_A))
    summary = analyze([tmp_path / "f.npy"], tmp_path / "out", model=DimStandIn(own),
                      config=AnalyzeConfig(threshold=config, movie=False),
                      pixel_size_A=MODEL_PIXEL_A, progress=False)
    assert summary["columns_total"] == (len(truth) if found else 0)
    used = config if config is not None else own if own is not None else 0.3
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["identity"]["settings"]["threshold"] == used


def test_a_bad_column_threshold_in_the_model_is_refused(tmp_path):
    np.save(tmp_path / "f.npy", synthetic_frame(random_columns(3), MODEL_PIXEL_A))
    with pytest.raises(ModelError, match="column_threshold.*re-export"):
        analyze([tmp_path / "f.npy"], tmp_path / "out", model=DimStandIn(1.5),
                pixel_size_A=MODEL_PIXEL_A, progress=False)


def test_single_bad_image_is_an_error(tmp_path):
    img = synthetic_frame(random_columns(0, 2), 0.1)
    img[0, 0] = np.inf
    np.save(tmp_path / "f.npy", img)
    with pytest.raises(InputError, match="infinite"):
        analyze([tmp_path / "f.npy"], tmp_path / "out", model=StandInModel(), pixel_size_A=0.1,
                progress=False)


def test_missing_calibration_asks_for_pixel_size(tmp_path):
    np.save(tmp_path / "f.npy", synthetic_frame(random_columns(0, 2), 0.1))
    with pytest.raises(InputError, match="--pixel-size"):
        analyze([tmp_path / "f.npy"], tmp_path / "out", model=StandInModel(), progress=False)


def test_missing_default_model_is_a_one_line_model_error(tmp_path, monkeypatch):
    monkeypatch.setattr(served_module, "DEFAULT_MODEL", "saved_models/does-not-exist")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="--model") as err:
        served_module.load_model(None)
    assert "\n" not in str(err.value)


def test_real_vendor_pixel_sizes_are_within_range_but_checked(tmp_path):
    from pathlib import Path

    dm3 = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata" / "example_Se_implanted_MoS2.dm3"
    if not dm3.exists():
        pytest.skip("../shared/realdata is not here")
    model = StandInModel()
    model.info["pixel_size_A"] = 0.1
    with pytest.raises(InputError, match="coarser than the model"):  # 0.127 Å > 0.1 Å
        analyze([dm3], tmp_path / "out", model=model, progress=False)


# --- the command line ------------------------------------------------------------------------
def invoke(args):
    return CliRunner().invoke(main, ["analyze", *args])


def test_cli_runs_and_prints_a_summary(tmp_path, series, monkeypatch):
    path, truths, _ = series
    monkeypatch.setattr(analyze_module, "load_model",
                        lambda m: (StandInModel(), {"path": str(m)}))
    res = invoke([str(path), "--out", str(tmp_path / "out"), "--quiet", "--overlay-every", "3"])
    assert res.exit_code == 0, res.output
    assert "frames" in res.output and "6 analysed of 7" in res.output
    assert "columns/frame" in res.output and "frames/s" in res.output
    res = invoke([str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("error:")
    assert "--overwrite" in res.output


@pytest.mark.parametrize("args, message", [
    (["missing.tif"], "does not exist"),
    (["{npy}", "--pixel-size", "-1"], "positive"),
    (["{npy}", "--pixel-size", "0.5"], "outside"),
    (["{npy}"], "--pixel-size"),
    (["{npy}", "--pixel-size", "0.1", "--overlay-every", "0"], "overlay_every"),
    (["{bad_tif}", "--pixel-size", "0.1"], "unreadable"),
])
def test_cli_one_line_errors(tmp_path, monkeypatch, args, message):
    np.save(tmp_path / "f.npy", synthetic_frame(random_columns(0, 2), 0.1))
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    monkeypatch.setattr(analyze_module, "load_model",
                        lambda m: (StandInModel(), {"path": str(m)}))
    args = [a.format(npy=tmp_path / "f.npy", bad_tif=tmp_path / "bad.tif") for a in args]
    res = invoke([*args, "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and res.output.count("\n") == 1, res.output
    assert message in res.output


def test_cli_without_shipped_model(tmp_path, monkeypatch):
    np.save(tmp_path / "f.npy", synthetic_frame(random_columns(0, 2), 0.1))
    monkeypatch.setattr(served_module, "DEFAULT_MODEL", "saved_models/does-not-exist")
    monkeypatch.chdir(tmp_path)
    res = invoke([str(tmp_path / "f.npy"), "--pixel-size", "0.1", "--out", "out", "--quiet"])
    assert res.exit_code == 2
    assert "make demo" in res.output and res.output.count("\n") == 1


def test_test_time_augmentation_averages_eight_copies(tmp_path, series):
    path, truths, pixel_A = series
    plain, averaged = StandInModel(), StandInModel()
    analyze([path], tmp_path / "plain", model=plain, config=AnalyzeConfig(batch_size=4),
            progress=False)
    cfg = AnalyzeConfig(batch_size=4, test_time_augmentation=True)
    analyze([path], tmp_path / "tta", model=averaged, config=cfg, progress=False)
    assert len(averaged.calls) == 8 * len(plain.calls)
    _, rows = read_rows(tmp_path / "tta" / "columns.csv")
    for i, truth in enumerate(truths):  # the stand-in is equivariant: the same columns come out
        if i != 3:
            match([r for r in rows if r[1] == str(i)], truth, pixel_A)
    progress = json.loads((tmp_path / "tta" / "progress.json").read_text())
    assert progress["identity"]["settings"]["test_time_augmentation"] is True
    # a run with other settings is not resumed into the same folder
    with pytest.raises(Exception, match="settings|overwrite"):
        analyze([path], tmp_path / "tta", model=StandInModel(), config=AnalyzeConfig(),
                progress=False)


def test_two_model_workers_give_the_same_tables_in_order(tmp_path, series):
    path, truths, pixel_A = series
    one = analyze([path], tmp_path / "one", model=StandInModel(),
                  config=AnalyzeConfig(batch_size=1, movie=False), progress=False)
    two = analyze([path], tmp_path / "two", model=StandInModel(),
                  config=AnalyzeConfig(batch_size=1, model_workers=2, movie=False), progress=False)
    for name in ("columns.csv", "frames.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert one["frames_analysed"] == two["frames_analysed"] == 6
    assert not (tmp_path / "one" / "series_movie.mp4").exists()  # --no-movie
    # default overlays: a short series gets every good frame
    assert len(list((tmp_path / "one" / "overlays").iterdir())) == 6


def test_missing_pyav_is_refused_before_any_work_unless_no_movie(tmp_path, series, monkeypatch):
    import importlib.util

    from ceriakeras.config import ConfigError

    path, _, _ = series
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "av" else real(n, *a))
    with pytest.raises(ConfigError, match="--no-movie"):
        analyze([path], tmp_path / "out", model=StandInModel(), progress=False)
    assert not (tmp_path / "out").exists()
    analyze([path], tmp_path / "out", model=StandInModel(), config=AnalyzeConfig(movie=False),
            progress=False)


def noisy_series(path, gain, pixel_A=0.1, frames=6, seed=0):
    """The same scene in every frame, Poisson electrons times ``gain``; .npy (N, H, W)."""
    rng = np.random.default_rng(seed)
    expected = synthetic_frame(random_columns(1), pixel_A, size_A=32.0, vacuum_counts=10.0)
    np.save(path, np.stack([gain * rng.poisson(expected) for _ in range(frames)]).astype(np.float32))
    return float(expected.mean()) / pixel_A**2       # dose of a frame, e-/Å²


def test_gain_is_estimated_from_a_series_and_used_for_the_dose(tmp_path):
    dose = noisy_series(tmp_path / "s.npy", gain=25.0)
    summary = analyze([tmp_path / "s.npy"], tmp_path / "out", model=StandInModel(),
                      pixel_size_A=0.1, config=AnalyzeConfig(overlay_every=100), progress=False)
    item = summary["inputs"][0]
    assert item["counts_per_electron_from"] == "series estimate"
    assert item["counts_per_electron"] == pytest.approx(25.0, rel=0.1)
    assert 0 < item["counts_per_electron_standard_error"] < 2.5
    header, frames = read_rows(tmp_path / "out" / "frames.csv")
    doses = [float(r[header.index("dose_e_per_A2")]) for r in frames]
    assert doses == pytest.approx([dose] * 6, rel=0.1)        # electrons, not counts
    assert "gain" in analyze_module.format_summary(summary)
    stored = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert stored["inputs"][0]["counts_per_electron"] == item["counts_per_electron"]


def test_gain_option_wins_and_bad_values_are_refused(tmp_path, monkeypatch):
    dose = noisy_series(tmp_path / "s.npy", gain=4.0, frames=2)
    monkeypatch.setattr(analyze_module, "load_model",
                        lambda m: (StandInModel(), {"path": str(m)}))
    res = invoke([str(tmp_path / "s.npy"), "--pixel-size", "0.1", "--out", str(tmp_path / "o"),
                  "--quiet", "--counts-per-electron", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["inputs"][0]["counts_per_electron"] == 2.0
    assert summary["inputs"][0]["counts_per_electron_from"] == "option"
    header, frames = read_rows(tmp_path / "o" / "frames.csv")
    assert float(frames[0][header.index("dose_e_per_A2")]) == pytest.approx(2 * dose, rel=0.05)
    res = invoke([str(tmp_path / "s.npy"), "--pixel-size", "0.1", "--out", str(tmp_path / "p"),
                  "--quiet", "--counts-per-electron", "0"])
    assert res.exit_code == 2 and "counts-per-electron" in res.output


def test_unmeasurable_gain_falls_back_to_counts_with_a_warning(tmp_path):
    np.save(tmp_path / "f.npy", synthetic_frame(random_columns(0), 0.1))   # noise-free
    summary = analyze([tmp_path / "f.npy"], tmp_path / "out", model=StandInModel(),
                      pixel_size_A=0.1, progress=False)
    item = summary["inputs"][0]
    assert item["counts_per_electron"] == 1.0 and item["counts_per_electron_from"] == "assumed"
    assert "--counts-per-electron" in item["gain_warning"]
    assert "--counts-per-electron" in analyze_module.format_summary(summary)
    # five columns are not a particle: the frame is not recognised, its columns marked 0
    header, rows = read_rows(tmp_path / "out" / "columns.csv")
    assert {r[header.index("recognised")] for r in rows} == {"0"}
    assert summary["frames_not_recognised"] == 1 and summary["frames_recognised"] == 0


class OpticsStandIn(StandInModel):
    """A stand-in that also estimates each frame's optics, as models of version 3 on do:
    defocus = the frame's mean count (so each frame has its own), Cs = −defocus."""

    has_optics = True

    def predict(self, images, *, optics=False):
        probs, height = super().predict(images)
        if not optics:
            return probs, height
        mean = np.asarray(images, np.float32).mean(axis=(1, 2))
        self.estimates = getattr(self, "estimates", []) + list(mean)
        return probs, height, {"defocus_nm": mean, "cs_um": -mean,
                               "max_column_height_atoms": mean * 0}


def test_frames_csv_has_the_optics_estimates_of_models_that_have_them_across_a_resume(
        tmp_path, series):
    path, _, _ = series
    cfg = AnalyzeConfig(batch_size=2, overlay_every=100)
    analyze([path], tmp_path / "plain", model=StandInModel(), config=cfg, progress=False)
    header, _ = read_rows(tmp_path / "plain" / "frames.csv")
    assert "defocus_nm" not in header and "cs_um" not in header    # versions 1–2: unchanged

    out = tmp_path / "out"
    model = OpticsStandIn()
    analyze([path], out, model=model, config=cfg, progress=False)
    header, frames = read_rows(out / "frames.csv")
    assert header[-2:] == ["defocus_nm", "cs_um"]
    assert [int(r[1]) for r in frames] == [0, 1, 2, 4, 5, 6]           # frame 3 is unreadable
    np.testing.assert_allclose([float(r[-2]) for r in frames], model.estimates, rtol=1e-3)
    np.testing.assert_allclose([float(r[-1]) for r in frames], [-e for e in model.estimates],
                               rtol=1e-3)
    reference = (out / "frames.csv").read_text()

    # interrupted after frames 0–3: the estimates of the frames done before are kept
    data = (out / "columns.csv").read_bytes()
    lines = data.splitlines(keepends=True)
    committed = lines[0] + b"".join(ln for ln in lines[1:] if int(ln.split(b",")[1]) < 4)
    progress = json.loads((out / "progress.json").read_text())
    progress.update(complete=False, frames_done=4, csv_bytes=len(committed))
    (out / "columns.csv").write_bytes(committed)
    (out / "progress.json").write_text(json.dumps(progress))
    again = OpticsStandIn()
    analyze([path], out, model=again, config=cfg, progress=False)
    assert len(again.estimates) == 3                                  # frames 4, 5, 6 only
    assert (out / "frames.csv").read_text() == reference


def test_picture_captions_name_frame_dose_columns_and_an_unrecognised_frame():
    from ceriakeras.analysis.pictures import frame_caption

    item = {"source": "/data/run/series.tif", "n_frames": 120}
    text = frame_caption(item, 7, 512.4, 31, recognised=True)
    assert text.split() == ["series.tif", "frame", "7/119", "512", "e⁻/Å²", "31", "columns"]
    assert frame_caption(item, 7, 512.4, 31, recognised=False).endswith("NOT RECOGNISED")
    assert "image" in frame_caption({"source": "a.npy", "n_frames": 1}, 0, 20.0, 0)


def ceo2_particle(centre_A, radius_A=7.0, height=2):
    """Columns (x, y, h) of CeO2 [110] within ``radius_A`` of ``centre_A``, Å."""
    from ceriakeras.config import CEO2_LATTICE_A
    a1 = np.array([CEO2_LATTICE_A / np.sqrt(2), 0.0])
    a2 = np.array([CEO2_LATTICE_A / np.sqrt(8), CEO2_LATTICE_A / 2])
    i, j = np.mgrid[-6:7, -6:7]
    pts = i.ravel()[:, None] * a1 + j.ravel()[:, None] * a2
    pts = pts[np.hypot(*pts.T) <= radius_A] + np.asarray(centre_A)
    return [(x, y, height) for x, y in pts]


class VacuumStandIn(StandInModel):
    """A stand-in whose info says it normalises to the vacuum level, as version 3 does."""

    def __init__(self):
        super().__init__()
        self.info["training_config"] = {"model": {"intensity_reference": "vacuum",
                                                  "vacuum_quantile": 0.9}}


def test_a_vacuum_normalised_model_marks_frames_with_too_little_vacuum(tmp_path):
    # the same 14 Å particle in a 16 Å frame (no vacuum) and in a 40 Å frame (most is vacuum)
    np.save(tmp_path / "tight.npy", synthetic_frame(ceo2_particle((8.0, 8.0)), 0.1, 16.0))
    np.save(tmp_path / "wide.npy", synthetic_frame(ceo2_particle((20.0, 20.0)), 0.1, 40.0))
    inputs = [tmp_path / "tight.npy", tmp_path / "wide.npy"]
    summary = analyze(inputs, tmp_path / "v3", model=VacuumStandIn(), pixel_size_A=0.1,
                      progress=False)
    header, frames = read_rows(tmp_path / "v3" / "frames.csv")
    assert header[-1] == "vacuum_area_fraction"
    tight, wide = ({h: v for h, v in zip(header, r)} for r in frames)
    assert float(tight["vacuum_area_fraction"]) < 0.1
    # the columns reach 7 Å from the centre, vacuum starts 5 Å beyond: 1 − π 12² / 40²
    assert float(wide["vacuum_area_fraction"]) == pytest.approx(1 - np.pi * 144 / 1600, abs=0.05)
    assert (tight["recognised"], wide["recognised"]) == ("0", "1")
    assert summary["not_recognised_reasons"] == {"too little vacuum in the field of view": 1}
    assert "too little vacuum" in analyze_module.format_summary(summary)

    # a model normalised to the frame mean (versions 1–2) needs no vacuum: no check, no column
    analyze(inputs, tmp_path / "v2", model=StandInModel(), pixel_size_A=0.1, progress=False)
    header, frames = read_rows(tmp_path / "v2" / "frames.csv")
    assert "vacuum_area_fraction" not in header
    assert [r[header.index("recognised")] for r in frames] == ["1", "1"]


def test_a_series_gets_tracks_events_and_drift_unless_turned_off(tmp_path):
    # tracks (issue 22): a still particle: one track per column, every frame's height, no event
    truth = random_columns(1)
    write_series(tmp_path / "still.tif", [synthetic_frame(truth, 0.1)] * 6, 0.1)
    cfg = AnalyzeConfig(batch_size=4, movie=False)
    analyze([tmp_path / "still.tif"], tmp_path / "on", model=StandInModel(), config=cfg,
            progress=False, xyz=True)
    # one 3D model for the one stretch, naming the frames it covers
    assert [p.name for p in (tmp_path / "on" / "xyz").iterdir()] == ["still_frames_00000-00005.xyz"]
    header, rows = read_rows(tmp_path / "on" / "columns.csv")
    assert header[-3:] == list(TRACK_COLUMNS) and len(rows) == 6 * len(truth)
    assert len({r[-3] for r in rows}) == len(truth)
    assert all(r[-2] == r[6] for r in rows)
    fheader, frames = read_rows(tmp_path / "on" / "frames.csv")
    at = fheader.index("drift_x_A")
    assert all(abs(float(f[at])) < 0.05 for f in frames)
    assert read_rows(tmp_path / "on" / "events.csv") == (
        ["source", "track", "frame", "x_px", "y_px", "x_A", "y_A", "height_before",
         "height_after", "probability"], [])
    analyze([tmp_path / "still.tif"], tmp_path / "off", model=StandInModel(),
            config=AnalyzeConfig(batch_size=4, movie=False, tracks=False), progress=False)
    header, _ = read_rows(tmp_path / "off" / "columns.csv")
    assert "track" not in header and not (tmp_path / "off" / "events.csv").exists()


def test_the_tracks_stage_gets_each_series_median_dose(tmp_path, monkeypatch):
    """The tracks' penalties follow a series' dose (TrackSettings.at_dose): analyze hands the
    tracks stage each series' median of the doses frames.csv reports."""
    from ceriakeras.analysis import run as run_module

    truth = random_columns(1)
    write_series(tmp_path / "still.tif", [synthetic_frame(truth, 0.1)] * 5, 0.1)
    seen = []
    real = run_module.tracking.write_tracks

    def spy(out_dir, plan, *args, **kwargs):
        seen.extend((item["source"], item["dose_e_per_A2"]) for item in plan)
        return real(out_dir, plan, *args, **kwargs)

    monkeypatch.setattr(run_module.tracking, "write_tracks", spy)
    analyze([tmp_path / "still.tif"], tmp_path / "out", model=StandInModel(),
            config=AnalyzeConfig(batch_size=4, movie=False), progress=False)
    header, frames = read_rows(tmp_path / "out" / "frames.csv")
    doses = [float(f[header.index("dose_e_per_A2")]) for f in frames]
    assert len(seen) == 1 and seen[0][0] == frames[0][0]
    assert seen[0][1] == pytest.approx(float(np.median(doses)), rel=1e-3) and seen[0][1] > 0


def test_progress_json_is_json_dumps_text_with_each_frame_serialized_once():
    """progress.json's text, written after every batch, is json.dumps(state, indent=1)'s own,
    frame entries and optics added, replaced, and odd names (quotes, non-ASCII, newlines) too."""
    from ceriakeras.analysis.resume import ProgressJson

    progress = ProgressJson()
    state = {"version": 1, "identity": {"inputs": [{"source": 'é/"a",b.tif', "n": 3}], "e": []},
             "frames_done": 0, "skipped": [{"frame": 1, "reason": "cut\nhere"}],
             "complete": False, "optics": {}, "frames": {}, "nan": [float("nan"), None]}
    assert progress.dumps(state) == json.dumps(state, indent=1)
    for g in range(30):
        state["frames"][str(g)] = {"dose_e_per_A2": g / 7, "recognised": g % 3 > 0,
                                   "lattice_fraction": None, "reason": ""}
        state["optics"].setdefault(f"s{g % 2}.tif", {})[str(g)] = {"defocus_nm": -g / 3}
        state["frames_done"] = g + 1
        assert progress.dumps(state) == json.dumps(state, indent=1)
    state["frames"]["4"] = {"dose_e_per_A2": 1.5}  # a new entry for a frame: its new text
    assert progress.dumps(state) == json.dumps(state, indent=1)
    state["optics"][7] = {}  # a key JSON converts: JSON's own text
    assert progress.dumps(state) == json.dumps(state, indent=1)


def test_many_inputs_share_one_gain_line_few_get_one_each():
    from ceriakeras.analysis.tables import gain_lines

    def item(k, how="series estimate"):
        return {"source": f"s{k}.tif", "counts_per_electron": 1.0 + k / 100,
                "counts_per_electron_standard_error": 0.02, "counts_per_electron_from": how}

    few = gain_lines([item(k) for k in range(3)], limit=5)
    assert len(few) == 3 and all(f"s{k}.tif" in line for k, line in enumerate(few))
    many = gain_lines([item(k) for k in range(39)] + [item(39, "option")], limit=5)
    assert len(many) == 1
    assert "1–1.39 counts/e⁻ over 40 inputs" in many[0]
    assert "series estimate: 39" in many[0] and "option: 1" in many[0]
    assert gain_lines([{"source": "x", "counts_per_electron": None}]) == []


def test_a_series_gone_before_the_tracks_stage_is_tracked_from_the_readings(tmp_path, series,
                                                                             monkeypatch):
    """The frames cannot be read a second time (moved mid-run): the run still ends, with the
    tracks from the model's readings and a warning that says what to do."""
    path, _, _ = series

    def gone(item):
        raise InputError(f"{item['source']} does not exist")
        yield  # a generator, as series_counts

    monkeypatch.setattr(analyze_module, "series_counts", gone)
    summary = analyze([path], tmp_path / "out", model=StandInModel(), progress=False)
    warning = summary["inputs"][0]["tracks_warning"]
    assert "does not exist" in warning and "--overwrite" in warning
    header, rows = read_rows(tmp_path / "out" / "columns.csv")
    track = header.index("track")
    assert rows and all(r[track] != "" for r in rows)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["inputs"][0]["tracks_warning"] == warning
