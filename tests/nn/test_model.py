"""The U-Net and its input layers: noise statistics, normalization, any image size, saving."""

import dataclasses

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ceriakeras.config import ConfigError, ModelConfig  # noqa: E402
from ceriakeras.nn.model import NormalizeIntensity, NormalizeToVacuum, PoissonNoise, build_unet  # noqa: E402

SMALL = ModelConfig(depth=2, base_filters=4, max_height=6)


@pytest.fixture(scope="module")
def model():
    return build_unet(SMALL, noise_seed=1)


def test_poisson_noise_mean_and_variance_equal_expected_counts():
    # expected counts = dose × pixel area × intensity: 200 e-/Å² × 0.04 Å² × 0.5 … 1.5
    dose, area = 200.0, 0.2**2
    intensity = np.linspace(0.5, 1.5, 4, dtype=np.float32)
    expected = dose * area * intensity  # 4 … 12 counts
    counts = np.broadcast_to(expected, (64, 64, 64, 4)).copy().reshape(64, 64, 256, 1)
    layer = PoissonNoise(seed=3)
    noisy = np.asarray(layer(counts, training=True)).reshape(64, 64, 64, 4)
    mean = noisy.mean(axis=(0, 1, 2))
    var = noisy.var(axis=(0, 1, 2))
    n = 64**3
    assert np.all(np.abs(mean - expected) < 5 * np.sqrt(expected / n)), (mean, expected)
    np.testing.assert_allclose(var, expected, rtol=0.03)
    assert np.all(noisy == np.round(noisy)), "Poisson draws are whole counts"


def test_poisson_noise_is_fresh_each_step_and_identity_at_inference():
    layer = PoissonNoise(seed=5)
    counts = np.full((2, 16, 16, 1), 3.0, np.float32)
    a = np.asarray(layer(counts, training=True))
    b = np.asarray(layer(counts, training=True))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(layer(counts, training=False)), counts)
    np.testing.assert_array_equal(np.asarray(layer(counts)), counts)


def test_normalization_removes_the_intensity_scale():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.5, 1.5, (2, 20, 24, 1)).astype(np.float32)
    out = np.asarray(NormalizeIntensity()(image))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(NormalizeIntensity()(image * 1234.5)), out, atol=1e-5)


def particle_frame(side_px, radius_px=20, inside=0.9, dose=1.0):
    """A dark disk (a particle, intensity ``inside``) centred in ``side_px``² of vacuum (1)."""
    yy, xx = np.mgrid[:side_px, :side_px] - (side_px - 1) / 2
    image = np.where(yy**2 + xx**2 < radius_px**2, inside, 1.0) * dose
    return image[None, :, :, None].astype(np.float32)


def test_vacuum_normalization_does_not_depend_on_framing():
    """The same particle in 80, 160 and 400 px of vacuum: NormalizeToVacuum gives it the same
    values (vacuum 0, the particle −0.1) at any dose scale; the frame mean does not."""
    vacuum = NormalizeToVacuum(tile_px=20, quantile=0.9)
    centre = {}
    for side in (80, 160, 400):
        for dose in (1.0, 357.0):
            out = np.asarray(vacuum(particle_frame(side, dose=dose)))[0, :, :, 0]
            c = side // 2
            np.testing.assert_allclose(out[c, c], -0.1, atol=1e-5)
            np.testing.assert_allclose(out[1, 1], 0.0, atol=1e-5)
            mean = np.asarray(NormalizeIntensity()(particle_frame(side, dose=dose)))[0, c, c, 0]
            centre.setdefault(side, set()).add(round(float(mean), 4))
    assert len({v for s in centre.values() for v in s}) == 3      # frame mean: one per framing
    # the level is a robust statistic of noisy counts too
    rng = np.random.default_rng(3)
    counts = rng.poisson(particle_frame(400, dose=200.0)).astype(np.float32)
    level = float(np.asarray(vacuum.vacuum_level(counts)).ravel()[0])
    assert 200.0 < level < 200.0 * 1.02


def test_model_settings_are_checked():
    for bad in ({"intensity_reference": "median"}, {"global_pool": "sum"},
                {"vacuum_quantile": 1.0}, {"vacuum_tile_A": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            dataclasses.replace(CONTEXT, **bad).validate()


@pytest.mark.parametrize("shape", [(97, 131), (64, 64), (33, 17)])
def test_any_image_size_gives_probabilities_of_the_same_size(model, shape):
    image = np.random.default_rng(1).poisson(5.0, (2, *shape, 1)).astype(np.float32)
    prob = np.asarray(model(image))
    assert prob.shape == (2, *shape, SMALL.max_height + 1)
    assert prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(axis=-1), 1.0, atol=1e-5)


def test_output_does_not_depend_on_the_intensity_scale(model):
    image = np.random.default_rng(2).poisson(8.0, (1, 40, 56, 1)).astype(np.float32)
    a = np.asarray(model(image))
    b = np.asarray(model(image * 37.0))
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("normalization", ["batch", "group", "none"])
def test_depth_filters_and_normalization_are_configurable(normalization):
    config = ModelConfig(depth=3, base_filters=4, normalization=normalization, max_height=3)
    m = build_unet(config)
    assert m.output_shape == (None, None, None, 4)
    prob = np.asarray(m(np.ones((1, 19, 23, 1), np.float32)))
    assert prob.shape == (1, 19, 23, 4)


def test_output_is_float32_under_mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = build_unet(SMALL)
        prob = m(np.ones((1, 24, 24, 1), np.float32))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert prob.dtype == "float32"
    assert any(layer.compute_dtype == "float16" for layer in m.layers)


def test_saved_model_file_loads_in_safe_mode(model, tmp_path):
    path = tmp_path / "unet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    image = np.random.default_rng(3).poisson(4.0, (1, 45, 30, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded(image)), np.asarray(model(image)), atol=1e-6)


# --- the context U-Net (version 3) and the detector MTF -------------------------------------------
from pathlib import Path  # noqa: E402

from ceriakeras.nn.model import (  # noqa: E402
    OPTICS_OUTPUTS, build_context_unet, build_model, has_optics, receptive_field_px,
)

REPO = Path(__file__).resolve().parents[2]
CONTEXT = ModelConfig(architecture="context_unet", depth=3, base_filters=4, max_filters=8,
                      full_resolution_filters=2, global_units=4, max_height=6)


@pytest.fixture(scope="module")
def context_model():
    return build_context_unet(CONTEXT, noise_seed=2)


def test_context_unet_runs_on_odd_sizes_with_optics_outputs(context_model):
    assert has_optics(context_model) and not has_optics(build_model(SMALL))
    image = np.random.default_rng(4).poisson(5.0, (2, 333, 517, 1)).astype(np.float32)
    out = context_model(image)
    prob, optics = np.asarray(out["probabilities"]), np.asarray(out["optics"])
    assert prob.shape == (2, 333, 517, CONTEXT.max_height + 1) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(axis=-1), 1.0, atol=1e-5)
    assert optics.shape == (2, len(OPTICS_OUTPUTS)) and optics.dtype == np.float32
    # scale-free input, like the U-Net
    np.testing.assert_allclose(np.asarray(context_model(image * 9.0)["probabilities"]), prob,
                               atol=1e-5)


def test_v3_receptive_field_reaches_64_angstrom():
    from ceriakeras.config import TrainConfig, load_config

    config = load_config(TrainConfig, REPO / "configs" / "ceria110_v3_train.toml").model
    assert config.architecture == "context_unet"
    # the analytic field of the convolutions alone; the global branch sees the whole frame
    local = dataclasses.replace(config, global_branch=False, base_filters=2, max_filters=2)
    assert receptive_field_px(build_model(local)) * config.pixel_size_A >= 64.0
    assert receptive_field_px(build_model(dataclasses.replace(local, global_branch=True))) \
        == float("inf")
    # versions 1–2: about 20 Å
    assert receptive_field_px(build_model(ModelConfig())) * 0.2 < 25.0


def test_receptive_field_agrees_with_the_gradient_of_a_centre_pixel():
    """Empirically: the input pixels whose gradient differs from the far field's (NormalizeIntensity
    gives every pixel the same small share through the image mean) lie within the analytic field."""
    import tensorflow as tf

    config = dataclasses.replace(CONTEXT, depth=4, dilations=(2,), global_branch=False,
                                 normalization="none", full_resolution_filters=8)
    keras.utils.set_random_seed(0)   # (narrow layers of an untrained net could all be dead)
    model = build_model(config)
    field = receptive_field_px(model)                    # 3 + … = analytic side, px
    size = int(field) + 64
    image = tf.constant(np.random.default_rng(5).uniform(50, 150, (1, size, size, 1)), tf.float32)
    c = size // 2
    with tf.GradientTape() as tape:
        tape.watch(image)
        centre = tf.reduce_sum(model(image)[0, c, c, :] * np.arange(config.max_height + 1))
    grad = tape.gradient(centre, image).numpy()[0, :, :, 0]
    local = np.argwhere(grad != grad[0, 0])
    extent = local.max(axis=0) - local.min(axis=0) + 1
    assert np.all(extent <= field) and np.all(extent > 0.75 * field), (extent, field)


def test_context_unet_mixed_precision_outputs_are_float32():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = build_context_unet(CONTEXT)
        out = m(np.ones((1, 40, 24, 1), np.float32))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert out["probabilities"].dtype == "float32" and out["optics"].dtype == "float32"
    assert any(layer.compute_dtype == "float16" for layer in m.layers)


@pytest.mark.parametrize("settings", [{}, {"intensity_reference": "vacuum", "global_pool": "max"}])
def test_context_unet_file_loads_in_safe_mode(context_model, tmp_path, settings):
    if settings:   # version 3's input normalisation and global pooling
        context_model = build_context_unet(dataclasses.replace(CONTEXT, **settings), noise_seed=2)
        assert isinstance(context_model.get_layer("normalize_intensity"), NormalizeToVacuum)
        assert isinstance(context_model.get_layer("global_pool"), keras.layers.GlobalMaxPooling2D)
    path = tmp_path / "context.keras"
    context_model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    image = np.random.default_rng(6).poisson(4.0, (1, 45, 30, 1)).astype(np.float32)
    a, b = loaded(image), context_model(image)
    for key in ("probabilities", "optics"):
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=1e-5)
    noise = loaded.get_layer("poisson_noise")
    assert noise.detector_correlation_max == CONTEXT.detector_correlation_max


def neighbour_correlation(x):
    """Correlation of horizontally and vertically adjacent pixels of each (H, W) image."""
    x = x - x.mean(axis=(1, 2), keepdims=True)
    var = (x * x).mean(axis=(1, 2))
    h = (x[:, :, 1:] * x[:, :, :-1]).mean(axis=(1, 2))
    v = (x[:, 1:, :] * x[:, :-1, :]).mean(axis=(1, 2))
    return (h + v) / (2 * var)


def test_detector_mtf_correlates_neighbours_in_the_drawn_range_and_keeps_the_mean():
    expected = 40.0                               # counts per pixel of a flat image
    counts = np.full((48, 96, 96, 1), expected, np.float32)
    plain = np.asarray(PoissonNoise(seed=1)(counts, training=True))[..., 0]
    noisy = np.asarray(PoissonNoise(seed=1, detector_correlation_max=0.3)(counts, training=True))
    noisy = noisy[..., 0]
    rho = neighbour_correlation(noisy)
    se = 3.0 / 96                                 # ~3 standard errors of one image's estimate
    assert np.all(np.abs(neighbour_correlation(plain)) < se)
    assert rho.min() > -se and rho.max() < 0.3 + se, (rho.min(), rho.max())
    assert rho.max() > 0.2 and rho.min() < 0.1, "correlations spread over [0, 0.3]"
    assert abs(noisy.mean() - expected) < 5 * np.sqrt(expected / noisy.size)
    # the blur keeps each image's total count exactly
    raw = np.asarray(PoissonNoise(seed=1)(counts, training=True))[..., 0]
    np.testing.assert_allclose(noisy.sum(axis=(1, 2)), raw.sum(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(PoissonNoise(detector_correlation_max=0.3)(counts, training=False)), counts)
