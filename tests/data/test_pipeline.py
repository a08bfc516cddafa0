"""Pipeline: the GPU/XLA-safe Poisson sampler, doses, and make_dataset (alignment, determinism, validation noise, errors)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from ceriakeras.data import records, writer
from ceriakeras.config import ConfigError, DataError, PipelineConfig
from ceriakeras.data.pipeline import draw_dose, make_dataset
from ceriakeras.noise import expected_counts, poisson_sample
from helpers import SMALL, fake_simulator

PX = SMALL.pixel_size_A


# --- the sampler -------------------------------------------------------------------------------
def chi_square_p(x: np.ndarray, mean: float) -> float:
    """p-value of a chi-square test of draws ``x`` against Poisson(mean), tails pooled."""
    lo, hi = int(stats.poisson.ppf(1e-4, mean)), int(stats.poisson.isf(1e-4, mean))
    ks = np.arange(lo, hi + 1)
    observed = np.array([(x < lo).sum()] + [(x == k).sum() for k in ks] + [(x > hi).sum()])
    p = np.concatenate([[stats.poisson.cdf(lo - 1, mean)], stats.poisson.pmf(ks, mean),
                        [stats.poisson.sf(hi, mean)]])
    expected = p * len(x)
    keep = expected > 5
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return float(stats.chi2.sf(chi2, keep.sum() - 1))


@pytest.mark.parametrize("mean", [0.3, 2.0, 20.0, 500.0])
def test_poisson_sample_matches_scipy(mean):
    n = 200_000
    x = poisson_sample(tf.fill([n], mean), tf.constant([11, 3])).numpy()
    assert x.dtype == np.float32 and np.all(x == np.round(x)) and x.min() >= 0
    se_mean = math.sqrt(mean / n)
    assert abs(x.mean() - mean) < 5 * se_mean
    se_var = mean * math.sqrt(2.0 / n + 1.0 / (mean * n))
    assert abs(x.var() - mean) < 5 * se_var
    assert chi_square_p(x, mean) > 1e-3


def test_poisson_sample_mixed_means_per_pixel_and_edge_cases():
    means = np.array([0.0, -1.0, np.nan, np.inf, 1e-6, 99.99, 100.0, 1e4], np.float32)
    x = poisson_sample(np.tile(means, (20000, 1)), [1, 2]).numpy()
    assert np.all(x[:, :4] == 0)                       # 0, negative and non-finite means
    np.testing.assert_allclose(x[:, 5:].mean(0), means[5:], rtol=0.01)
    np.testing.assert_allclose(x[:, 5:].var(0), means[5:], rtol=0.06)


def test_poisson_sample_is_stateless():
    m = tf.fill([64, 64], 3.0)
    a, b = poisson_sample(m, [1, 2]), poisson_sample(m, [1, 2])
    c = poisson_sample(m, tf.constant([1, 3], tf.int32))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.any(a.numpy() != c.numpy())
    assert poisson_sample(tf.fill([4], 2.0), np.array([5, 6], np.uint32)).shape == (4,)
    assert poisson_sample(tf.fill([4], 2.0), [5, 6]).dtype == tf.float32
    assert poisson_sample(tf.fill([4], 2.0, ), [5, 6]).shape == (4,)


def test_poisson_sample_compiles_with_xla():
    sample = tf.function(poisson_sample, jit_compile=True)
    mean = tf.constant(np.geomspace(0.05, 3000, 64 * 64).reshape(64, 64), tf.float32)
    draws = np.stack([sample(mean, tf.constant([7, s])).numpy() for s in range(200)])
    m = mean.numpy()
    assert np.all(draws == np.round(draws))
    z = (draws.mean(0) - m) / np.sqrt(m / len(draws))   # every pixel's mean, in standard errors
    assert np.abs(z).max() < 5.5 and abs(z.mean()) < 0.1
    np.testing.assert_array_equal(sample(mean, tf.constant([7, 0])).numpy(), draws[0])


def test_dose_is_log_uniform_and_counts_scale():
    doses = draw_dose([3, 4], [20000], (20.0, 20000.0)).numpy()
    assert doses.min() >= 20.0 and doses.max() <= 20000.0
    u = (np.log(doses) - math.log(20.0)) / (math.log(20000.0) - math.log(20.0))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    image = np.array([[1.0, 0.5], [2.0, 0.0]], np.float32)
    counts = expected_counts(image, 200.0, 0.2).numpy()
    np.testing.assert_allclose(counts, image * 200.0 * 0.04, rtol=1e-6)
    batch = expected_counts(np.ones((2, 3, 3), np.float32), np.reshape([10.0, 100.0], [2, 1, 1]), 0.5)
    np.testing.assert_allclose(batch.numpy()[:, 0, 0], [2.5, 25.0], rtol=1e-6)


# --- make_dataset ------------------------------------------------------------------------------
def label_coded_simulator(particle_id, seed, config):
    """Fake examples whose intensity is 1 + label, so any misalignment shows."""
    out = fake_simulator(particle_id, seed, config)
    for ex in out:
        ex.image = (1.0 + ex.label).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "ds"
    writer.write_dataset(out, 40, 3, 1, SMALL, simulator=label_coded_simulator, progress=False)
    return out


CONFIG = PipelineConfig(crop_px=64, batch_size=4, shuffle_buffer=16, seed=2, deterministic=True,
                        validation_doses_e_per_A2=(50.0, 1000.0))


def take(ds, n):
    return [tuple(t.numpy() for t in batch) for batch in ds.take(n)]


@pytest.mark.parametrize("crop, crops_per_image", [(64, 4), (32, 4)])
def test_training_batches_shapes_alignment_and_doses(data_dir, crop, crops_per_image):
    """Intensity is 1 + label, so counts / (dose × pixel area) − 1 must equal the label everywhere."""
    weights = np.arange(SMALL.max_height + 1, dtype=np.float32) + 0.5
    config = dataclasses.replace(CONFIG, crop_px=crop, crops_per_image=crops_per_image)
    batches = take(make_dataset(data_dir, "train", config, class_weights=weights), 12)
    seen_doses = []
    orientations, n_columned = set(), 0
    for image, label, weight in batches:
        assert image.shape == (4, crop, crop, 1) and image.dtype == np.float32
        assert label.shape == (4, crop, crop) and label.dtype == np.int32
        np.testing.assert_array_equal(weight, weights[label])
        for img, lab in zip(image[..., 0], label):
            scale = img[lab == 0].mean()                   # dose × pixel area
            np.testing.assert_allclose(img / scale - 1.0, lab, atol=1e-4)   # aligned pixel by pixel
            seen_doses.append(scale / PX ** 2)
            if lab.max() > 0:
                orientations.add(lab.tobytes())
                n_columned += 1
    seen_doses = np.array(seen_doses)
    assert seen_doses.min() >= 20 * 0.999 and seen_doses.max() <= 20000 * 1.001
    assert seen_doses.max() / seen_doses.min() > 10     # doses vary over the envelope
    assert n_columned > 0 and len(orientations) == n_columned   # crops/orientations differ


def test_augmentation_is_a_crop_of_a_flipped_or_rotated_label(data_dir):
    """Every training label is one of the 8 dihedral transforms of a 64 px crop of a record."""
    originals = [rec["label"] for p in records.shard_paths(data_dir, "train")
                 for rec in records.iter_shard(p, with_extras=False)]
    views = set()
    for lab in originals:
        for k in range(4):
            for flipped in (lab, lab[:, ::-1]):
                v = np.ascontiguousarray(np.rot90(flipped, k))
                for i in range(v.shape[0] - 63):
                    for j in range(v.shape[1] - 63):
                        views.add(v[i:i + 64, j:j + 64].astype(np.int32).tobytes())
    codes = set()
    for _, label, _ in take(make_dataset(data_dir, "train", CONFIG), 4):
        for lab in label:
            assert lab.tobytes() in views
            codes.add(lab.tobytes())
    assert len(codes) == 16


@pytest.mark.parametrize("jitter", [0, 3])
def test_centred_crops_stay_within_the_jitter_of_the_centre(data_dir, jitter):
    """crop_jitter_px=J: every training label is a dihedral transform of a 32 px crop whose
    offsets lie within J px of the centred crop's, and with J > 0 the offsets vary."""
    originals = [rec["label"] for p in records.shard_paths(data_dir, "train")
                 for rec in records.iter_shard(p, with_extras=False)]
    crop = 32
    views = {}
    for lab in originals:
        centre = ((lab.shape[0] - crop) // 2, (lab.shape[1] - crop) // 2)
        for i in range(lab.shape[0] - crop + 1):
            for j in range(lab.shape[1] - crop + 1):
                inside = abs(i - centre[0]) <= jitter and abs(j - centre[1]) <= jitter
                for k in range(4):
                    for flip in (False, True):
                        v = lab[i:i + crop, j:j + crop]
                        v = np.rot90(v[:, ::-1] if flip else v, k)
                        key = np.ascontiguousarray(v).astype(np.int32).tobytes()
                        views[key] = views.get(key, False) or inside
    config = dataclasses.replace(CONFIG, crop_px=crop, crop_jitter_px=jitter, crops_per_image=2)
    for _, label, _ in take(make_dataset(data_dir, "train", config), 8):
        for lab in label:
            assert views.get(lab.tobytes()), "a training crop lies outside the jitter"
    wide = dataclasses.replace(config, crop_jitter_px=None)
    outside = sum(not views.get(lab.tobytes()) for _, label, _ in take(make_dataset(data_dir, "train", wide), 8)
                  for lab in label)
    assert outside > 0                      # uniform crops do leave the centre region


def test_crop_jitter_must_be_a_count_of_pixels():
    with pytest.raises(ConfigError, match="crop_jitter_px"):
        dataclasses.replace(CONFIG, crop_jitter_px=-1).validate()


def test_deterministic_mode_repeats_exactly(data_dir):
    a = take(make_dataset(data_dir, "train", CONFIG), 5)
    b = take(make_dataset(data_dir, "train", CONFIG), 5)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    c = take(make_dataset(data_dir, "train", dataclasses.replace(CONFIG, seed=3)), 5)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_nondeterministic_mode_runs(data_dir):
    config = dataclasses.replace(CONFIG, deterministic=False)
    (image, label, _), = take(make_dataset(data_dir, "train", config), 1)
    assert image.shape == (4, 64, 64, 1) and label.max() > 0


def test_validation_noise_is_fixed_and_at_the_doses(data_dir):
    manifest = records.read_manifest(data_dir)
    ds = make_dataset(data_dir, "validation", CONFIG)
    first, second = take(ds, 100), take(ds, 100)
    assert sum(len(b[0]) for b in first) == 2 * manifest["counts"]["validation"]  # one per dose, finite
    for x, y in zip(first, second):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    images = np.concatenate([b[0][..., 0] for b in first])
    labels = np.concatenate([b[1] for b in first])
    assert np.all(images == np.round(images))            # counts, already noisy
    for k in range(0, len(images), 2):                   # the same crop at 50 then 1000 e-/Å²
        np.testing.assert_array_equal(labels[k], labels[k + 1])
        for j, dose in enumerate((50.0, 1000.0)):
            expected = (1.0 + labels[k]) * dose * PX ** 2
            assert abs(images[k + j].sum() - expected.sum()) < 5 * math.sqrt(expected.sum())
    # centre crops, in record order
    rec = next(records.iter_shard(records.shard_paths(data_dir, "validation")[0], with_extras=False))
    np.testing.assert_array_equal(labels[0], rec["label"][8:72, 8:72])


def test_bad_inputs_name_the_file(tmp_path, data_dir):
    with pytest.raises(DataError, match="does not exist"):
        make_dataset(tmp_path / "missing", "train", CONFIG)
    with pytest.raises(DataError, match="larger than the 80×80"):
        make_dataset(data_dir, "train", dataclasses.replace(CONFIG, crop_px=96))
    small = tmp_path / "small"
    writer.write_dataset(small, 2, 1, 0, SMALL, simulator=fake_simulator, progress=False)
    with pytest.raises(DataError, match="no validation examples.*--count"):
        make_dataset(small, "validation", CONFIG)
    shard = records.shard_paths(small, "train")[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(DataError, match=f"{shard}.*truncated.*--repair"):
        make_dataset(small, "train", CONFIG)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=f"{shard}.*sha256.*--repair"):
        make_dataset(small, "train", CONFIG)
    shard.write_bytes(data)
    make_dataset(small, "train", CONFIG)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["schema_version"] = 7
    (small / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="schema version 7"):
        make_dataset(small, "train", CONFIG)


# --- detector MTF and the optics targets ---------------------------------------------------------
def test_detector_blur_gives_the_asked_neighbour_correlation_under_xla():
    from ceriakeras.noise import detector_blur

    blur = tf.function(detector_blur, jit_compile=True)
    noise = tf.random.stateless_normal([3, 256, 256, 1], seed=[4, 2])
    out = blur(noise, tf.constant([0.0, 0.15, 0.3])).numpy()[..., 0]
    x = out - out.mean(axis=(1, 2), keepdims=True)
    rho = (x[:, :, 1:] * x[:, :, :-1]).mean(axis=(1, 2)) / (x * x).mean(axis=(1, 2))
    np.testing.assert_allclose(rho, [0.0, 0.15, 0.3], atol=0.015)
    np.testing.assert_allclose(out[0], noise.numpy()[0, ..., 0], atol=1e-6)   # 0: unchanged
    np.testing.assert_allclose(out.sum(axis=(1, 2)), noise.numpy().sum(axis=(1, 2, 3)), atol=1e-2)


def test_optics_targets_come_from_each_records_metadata_and_columns(data_dir):
    truth = set()
    for path in sorted(data_dir.glob("validation-*")):
        for raw in tf.data.TFRecordDataset(str(path), compression_type="GZIP"):
            ex = records.parse_example(raw)
            meta = json.loads(ex["metadata"].numpy())
            truth.add((round(meta["defocus_nm"], 3), round(meta["cs_um"], 3),
                       float(ex["columns"].numpy()[:, 2].max())))
    seen = set()
    for image, label, weight in make_dataset(data_dir, "validation", CONFIG, optics=True):
        assert set(label) == {"probabilities", "optics"} == set(weight)
        targets = label["optics"].numpy()
        assert targets.shape == (image.shape[0], 3)
        np.testing.assert_array_equal(weight["optics"].numpy(), 1.0)
        seen |= {(round(float(d), 3), round(float(c), 3), float(h)) for d, c, h in targets}
    assert seen == truth
    (image, label, weight), = make_dataset(data_dir, "train", CONFIG, optics=True).take(1)
    assert label["optics"].shape == (CONFIG.batch_size, 3)
    every = np.array(_all_targets(data_dir))            # crops carry their record's targets
    for row in label["optics"].numpy():
        assert np.any(np.all(np.abs(every - row) < 1e-3, axis=1)), row


def _all_targets(data_dir):
    out = []
    for path in sorted(data_dir.glob("*.tfrecord.gz")):
        for raw in tf.data.TFRecordDataset(str(path), compression_type="GZIP"):
            ex = records.parse_example(raw)
            meta = json.loads(ex["metadata"].numpy())
            out.append((meta["defocus_nm"], meta["cs_um"], float(ex["columns"].numpy()[:, 2].max())))
    return out


def test_optics_targets_are_nan_where_the_metadata_has_none():
    from ceriakeras.data.pipeline import optics_targets

    t = optics_targets(tf.constant(['{"cs_um": -7.5, "defocus_nm": 3e0}', '{"seed": 1}']),
                       tf.constant([[1, 2, 5, 3, 4, 9], [0, 0, 0, 0, 0, 0]], tf.float32)).numpy()
    np.testing.assert_array_equal(t[0], [3.0, -7.5, 9.0])
    assert np.isnan(t[1, :2]).all() and t[1, 2] == 0
