"""Confidence calibration: maps beyond Platt, pooled calibration datasets, recalibrated copies."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ceriakeras.evaluation.calibration import (CALIBRATION_MAPS, collect_columns, fit_confidence_calibration,
                                    fit_map, parse_dataset)
from ceriakeras.inference.columns import calibrate_confidence
from ceriakeras.config import ConfigError, DataError, ModelError
from ceriakeras.evaluation.scoring import calibration


# --- maps on stand-in columns -------------------------------------------------------------------
def _stand_in(rng, n, dose, kind, std_range=(0.0, 1.5)):
    """Columns whose chance of being right is *not* a sigmoid of logit(raw confidence)."""
    conf = rng.uniform(0.05, 0.95, n)
    std = rng.uniform(*std_range, n)
    height = rng.integers(1, 12, n)
    if kind == "plateau":      # 0.3 below c = 0.5, 0.7 above: no sigmoid of logit(c) is flat twice
        p = np.where(conf < 0.5, 0.3, 0.7)
    else:                      # falls with the spread of the height distribution, not with c
        p = 1.0 / (1.0 + np.exp(4.0 * std - 3.0))
    right = rng.random(n) < p
    return {"confidence": conf, "height": height, "height_std": std, "correct": right,
            "matched": np.ones(n, bool), "dataset": np.zeros(n, np.int32)}


def _ece(table, cols, dose):
    mapped = calibrate_confidence(cols["confidence"], dose, table, height=cols["height"],
                                  height_std=cols["height_std"])
    return calibration(mapped, cols["correct"])["ece"]


@pytest.mark.parametrize("kind, better", [("plateau", "isotonic"), ("spread", "logistic")])
def test_a_more_flexible_map_calibrates_held_out_columns_where_platt_cannot(kind, better):
    """Plateaus in P(right | c) need the isotonic map; a held-out set with more uncertain
    columns (larger ``height_std``, as off the training generator) needs the logistic one."""
    rng = np.random.default_rng(5)
    doses = (50.0, 1000.0)
    fit_cols = {d: _stand_in(rng, 4000, d, kind) for d in doses}
    shifted = (0.75, 1.5) if kind == "spread" else (0.0, 1.5)
    held_out = {d: _stand_in(rng, 4000, d, kind, shifted) for d in doses}
    platt, flexible = fit_map(fit_cols, "platt"), fit_map(fit_cols, better)
    assert flexible["map"] == better and platt["map"] == "platt"
    for d in doses:
        e_platt, e_flex = _ece(platt, held_out[d], d), _ece(flexible, held_out[d], d)
        assert e_platt > 0.07          # the sigmoid cannot follow these curves
        assert e_flex < 0.035 and e_flex < e_platt / 2
    # between fitted doses the map interpolates: still calibrated at 200 e-/Å²
    assert _ece(flexible, held_out[50.0], 200.0) < 0.05


def test_isotonic_falls_back_to_platt_with_few_columns_and_maps_are_checked():
    rng = np.random.default_rng(1)
    cols = {50.0: _stand_in(rng, 100, 50.0, "plateau")}
    table = fit_map(cols, "isotonic")
    assert table["knots_confidence"] == [[]]
    c = np.array([0.2, 0.6])
    platt = {k: table[k] for k in ("dose_e_per_A2", "slope", "intercept")}
    assert np.allclose(calibrate_confidence(c, 50.0, table), calibrate_confidence(c, 50.0, platt))
    with pytest.raises(ConfigError, match="calibration map"):
        fit_map(cols, "spline")
    with pytest.raises(ValueError, match="height"):
        calibrate_confidence(c, 50.0, fit_map(cols, "logistic"))
    assert set(CALIBRATION_MAPS) == {"platt", "logistic", "isotonic"}


def _two_sets(rng, n, slope, offsets):
    """Columns of two datasets whose P(right) is σ(slope · logit(c) + offset), one offset each."""
    parts = []
    for k, b in enumerate(offsets):
        conf = rng.uniform(0.05, 0.95, n)
        p = 1.0 / (1.0 + np.exp(-(slope * np.log(conf / (1 - conf)) + b)))
        parts.append({"confidence": conf, "height": rng.integers(1, 12, n),
                      "height_std": rng.uniform(0, 1, n), "correct": rng.random(n) < p,
                      "matched": np.ones(n, bool), "dataset": np.full(n, k, np.int32)})
    return {key: np.concatenate([q[key] for q in parts]) for key in parts[0]}


def test_mean_pooling_keeps_the_slope_that_pooling_two_sets_flattens():
    """Two sets as steep as each other but of different difficulty: one fit on their columns
    pooled comes out flatter than either (a mixture of two sigmoids is flatter), the mean of the
    per-set fits keeps the slope; ``shared`` fits one slope for every dose."""
    rng = np.random.default_rng(3)
    cols = {200.0: _two_sets(rng, 6000, 2.0, (-1.5, 1.5)),
            1000.0: _two_sets(rng, 6000, 2.0, (-1.0, 2.0))}
    pooled, mean = fit_map(cols, "platt"), fit_map(cols, "platt", pooling="mean")
    shared = fit_map(cols, "platt", pooling="shared")
    assert pooled["pooling"] == "pooled" and mean["pooling"] == "mean"
    for k, offsets in enumerate(((-1.5, 1.5), (-1.0, 2.0))):
        assert pooled["slope"][k] < 1.7                       # flattened by the mixture
        assert abs(mean["slope"][k] - 2.0) < 0.15             # each set's own slope
        assert abs(mean["intercept"][k] - np.mean(offsets)) < 0.15
    assert shared["slope"][0] == shared["slope"][1]
    assert abs(shared["slope"][0] - np.mean(pooled["slope"])) < 0.2
    assert shared["intercept"][0] < shared["intercept"][1]   # 1000 e-/Å² is the easier dose
    # a single set: the mean of one fit is that fit
    one = {d: {k: v[c["dataset"] == 0] for k, v in c.items()} for d, c in cols.items()}
    assert np.allclose(fit_map(one, "platt", pooling="mean")["slope"], fit_map(one, "platt")["slope"])
    with pytest.raises(ConfigError, match="pooling"):
        fit_map(cols, "platt", pooling="median")


def test_parse_dataset_takes_a_split_suffix_only_when_it_names_a_split():
    assert parse_dataset("tfrecords/a:test") == ("tfrecords/a", "test")
    assert parse_dataset("tfrecords/a") == ("tfrecords/a", "validation")
    assert parse_dataset("tfrecords/a", "train") == ("tfrecords/a", "train")
    assert parse_dataset("C:/data/a:b") == ("C:/data/a:b", "validation")
    assert parse_dataset((Path("x"), "test")) == ("x", "test")


# --- pooled datasets, recalibrated copies ---------------------------------------------------------
@pytest.fixture(scope="module")
def two_split_dataset(tmp_path_factory):
    """Four images of two particles, one in the validation and one in the test split."""
    from ceriakeras.config import SimulationConfig, StructureConfig
    from ceriakeras.data.records import iter_shard, shard_paths
    from ceriakeras.data.writer import write_dataset

    config = SimulationConfig.legacy(structure=StructureConfig(diameter_range_A=(12.0, 18.0), vacuum_A=6.0),
                                     cell_size_A=32.0, optics_per_exit_wave=2,
                                     split_fractions=(0.0, 0.5, 0.5))
    out = tmp_path_factory.mktemp("data") / "two"
    write_dataset(out, 4, 1, 3, config, progress=False)
    records = {s: [r for p in shard_paths(out, s) for r in iter_shard(p)]
               for s in ("validation", "test")}
    info = {"pixel_size_A": config.pixel_size_A, "max_height": config.max_height,
            "label_radius_A": config.label_radius_A}
    return out, records, info


class Oracle:
    """Answers each noisy frame with a soft version of its record's label mask: 60 % of the
    mass on the true class, 40 % on the class above, so every column is right with a raw
    confidence of 0.6."""

    def __init__(self, records, info):
        self.images = [r["image"] / r["image"].mean() for r in records]
        self.labels = [r["label"].astype(np.int64) for r in records]
        self.n = info["max_height"] + 1

    def predict(self, images):
        out = []
        for frame in np.asarray(images, np.float64):
            k = int(np.argmin([np.mean((frame / frame.mean() - im) ** 2) for im in self.images]))
            label = self.labels[k]
            p = np.eye(self.n, dtype=np.float32)[label]
            column = label > 0
            p[column] *= 0.6
            above = np.clip(label + 1, 0, self.n - 1)
            p[column, above[column]] += 0.4
            out.append(p)
        out = np.stack(out)
        return out, out.argmax(-1)


def test_calibration_pools_the_datasets_and_records_them(two_split_dataset):
    data, records, info = two_split_dataset
    oracle = Oracle(records["validation"] + records["test"], info)
    doses = (200.0, 5000.0)
    each = {s: collect_columns(oracle.predict, [(data, s)], info, doses=doses, progress=False)
            for s in ("validation", "test")}
    pooled, sources = collect_columns(oracle.predict, [f"{data}:validation", f"{data}:test"], info,
                                      doses=doses, progress=False)
    for d in doses:
        n = [len(each[s][0][d]["confidence"]) for s in ("validation", "test")]
        assert min(n) > 0 and len(pooled[d]["confidence"]) == sum(n)
        assert np.bincount(pooled[d]["dataset"]).tolist() == n
        # each column knows its image within its dataset (2 images per split here)
        for k in range(2):
            mine = pooled[d]["dataset"] == k
            assert set(pooled[d]["image"][mine].tolist()) == {0, 1}
        # per-image columns match what one image alone gives
        first = collect_columns(oracle.predict, [(data, "validation")], info, doses=doses,
                                max_images=1, progress=False)[0][d]
        assert len(first["confidence"]) == np.sum((pooled[d]["dataset"] == 0)
                                                  & (pooled[d]["image"] == 0))
        assert pooled[d]["correct"].mean() > 0.9 and np.allclose(pooled[d]["confidence"], 0.6)
    assert [(s["split"], s["n_images"]) for s in sources] == [("validation", 2), ("test", 2)]
    assert sources[0]["n_columns"] == sum(len(r["columns"]) for r in records["validation"])
    from ceriakeras.io.files import file_sha256

    assert sources[1]["manifest_sha256"] == file_sha256(data / "manifest.json")

    fit = fit_confidence_calibration(oracle.predict, [f"{data}:validation", (data, "test")], info,
                                     doses=doses, progress=False, method="isotonic")
    assert fit["split"] == "test+validation" and fit["n_images"] == 4
    assert [s["split"] for s in fit["datasets"]] == ["validation", "test"]
    assert all(s["simulation"]["sampling_A"] == 0.1 for s in fit["datasets"])
    for before, after in zip(fit["ece_before"], fit["ece_after"]):
        assert before > 0.3 and after < 0.05   # right every time, raw confidence 0.6
    with pytest.raises(ConfigError, match="no calibration dataset"):
        fit_confidence_calibration(oracle.predict, [], info, progress=False)


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_recalibrated_copy_leaves_the_source_alone_and_never_overwrites(two_split_dataset,
                                                                         tmp_path):
    from click.testing import CliRunner

    from helpers import export_tiny_model

    from ceriakeras.cli.main import main
    from ceriakeras.evaluation.recalibrate import recalibrate

    data, _, info = two_split_dataset
    source = export_tiny_model(tmp_path)
    before = _tree_digest(source)
    out = tmp_path / "saved_models" / "recal"
    path = recalibrate(source, out, [f"{data}:validation", f"{data}:test"], method="logistic",
                       max_images=1, tta=False)
    assert path == out / "1" and _tree_digest(source) == before
    new = json.loads((path / "assets" / "ceriakeras.json").read_text())
    old = json.loads((source / "assets" / "ceriakeras.json").read_text())
    fit = new["confidence_calibration"]
    assert fit["map"] == "logistic" and len(fit["coefficients"]) == len(fit["dose_e_per_A2"])
    assert [(Path(s["data_dir"]), s["split"]) for s in fit["datasets"]] == \
        [(data, "validation"), (data, "test")]
    assert new["recalibrated_from"] == str(source) and "confidence_calibration_tta" not in new
    assert {k: v for k, v in new.items() if not k.startswith(("confidence_", "recalibrated"))} == \
        {k: v for k, v in old.items() if not k.startswith("confidence_")}
    assert (path / "saved_model.pb").read_bytes() == (source / "saved_model.pb").read_bytes()

    with pytest.raises(ModelError, match="never overwritten"):
        recalibrate(source, out, [data], version=1, tta=False)
    result = CliRunner().invoke(main, ["calibrate", "--model", str(source), "--data",
                                       f"{data}:test", "--out", str(out), "--version", "1"])
    assert result.exit_code == 2 and "never overwritten" in result.output
    result = CliRunner().invoke(main, ["calibrate", "--model", str(source), "--data", str(data),
                                       "--out", str(out), "--no-tta", "--images", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "2" / "assets" / "ceriakeras.json").is_file() and _tree_digest(source) == before
    assert "platt map" in result.output


@pytest.mark.slow
def test_a_dataset_with_finer_pixels_is_calibrated_through_the_analyze_resampling(tmp_path):
    """Counts at 0.1 Å are summed into the model's 0.2 Å pixels before the model sees them, and
    the columns it finds are matched on the dataset's own grid."""
    from ceriakeras.config import SimulationConfig, StructureConfig
    from ceriakeras.data.records import iter_shard, shard_paths
    from ceriakeras.data.writer import write_dataset

    config = SimulationConfig.legacy(structure=StructureConfig(diameter_range_A=(12.0, 18.0), vacuum_A=6.0),
                                     cell_size_A=32.0, pixel_size_A=0.1, optics_per_exit_wave=2,
                                     split_fractions=(0.0, 1.0, 0.0))
    write_dataset(tmp_path / "fine", 2, 1, 4, config, progress=False)
    records = [r for p in shard_paths(tmp_path / "fine", "validation") for r in iter_shard(p)]
    info = {"pixel_size_A": 0.2, "max_height": 16, "label_radius_A": 0.5}
    seen = []

    def predict(images):  # a one-pixel label of every true column, on the model's 0.2 Å grid
        images = np.asarray(images)
        seen.append(images.shape)
        cols = records[len(seen) - 1]["columns"]
        p = np.zeros(images.shape + (17,), np.float32)
        p[..., 0] = 1.0
        for x, y, h in cols:
            j, i = int(round((x + 0.5) / 2 - 0.5)), int(round((y + 0.5) / 2 - 0.5))
            p[:, i, j, 0], p[:, i, j, int(h)] = 0.0, 1.0
        return p, p.argmax(-1)

    columns, sources = collect_columns(predict, [tmp_path / "fine"], info, doses=(1000.0,),
                                       progress=False)
    assert seen == [(1, 160, 160)] * 2                      # 320 px of 0.1 Å → 160 of 0.2 Å
    got = columns[1000.0]
    assert len(got["correct"]) == sum(len(r["columns"]) for r in records) == sources[0]["n_columns"]
    assert got["correct"].all() and got["matched"].all()
    with pytest.raises(DataError, match="0.1 Å pixels but the model works at 0.05 Å"):
        collect_columns(predict, [tmp_path / "fine"], dict(info, pixel_size_A=0.05),
                        doses=(1000.0,), progress=False)


def test_the_holdout_study_draws_one_image_per_particle_and_pools_sets():
    """evaluation.holdout (scripts/studies/calibration_holdout.py): 12-image draws take each image of another particle; a
    map that is right on average but 0.25 off on every particle scatters above its floor."""
    from ceriakeras.evaluation.holdout import pooled, subset_ece

    rng = np.random.default_rng(2)
    n_images, per_image = 64, 200           # 16 particles × 4 optics, as simulate stores them
    image = np.repeat(np.arange(n_images), per_image)
    conf = rng.uniform(0.4, 0.9, image.size)
    off = np.where((image // 4) % 2 == 0, 0.25, -0.25)   # even particles easier, odd harder
    right = rng.random(image.size) < np.clip(conf + off, 0, 1)
    cols = {200.0: {"confidence": conf, "height": np.ones(image.size), "height_std": np.zeros(
        image.size), "correct": right, "matched": np.ones(image.size, bool), "image": image,
        "dataset": np.zeros(image.size, np.int32)}}
    table = {"map": "platt", "dose_e_per_A2": [200.0], "slope": [1.0], "intercept": [0.0]}
    ece, floor = subset_ece(cols, table, 200.0, frames=3, per_particle=4, draws=200)
    assert ece.shape == floor.shape == (200,)
    # three particles never balance easy and hard ones: well above the floor (0.03 here)
    assert np.quantile(ece, 0.1) > np.median(floor) + 0.015
    assert np.median(ece) > 2 * np.median(floor)
    # the same columns shuffled across images, so no longer right or wrong together: no excess
    shuffled = dict(cols[200.0], image=rng.permutation(image))
    e2, _ = subset_ece({200.0: shuffled}, table, 200.0, frames=3, per_particle=4, draws=200)
    assert np.median(e2) < np.median(ece) - 0.03
    # 16 frames of 16 particles take every particle once, so 8 easy and 8 hard each time: the
    # excess is gone (16 frames drawn from the 64 images regardless of particle would not be)
    ece16, _ = subset_ece(cols, table, 200.0, frames=16, per_particle=4, draws=50)
    assert np.median(ece16) < np.median(ece) - 0.03
    both = pooled([cols, cols])
    assert np.bincount(both[200.0]["dataset"]).tolist() == [image.size, image.size]
    assert len(both[200.0]["image"]) == 2 * image.size
