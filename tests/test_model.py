"""The U-Net and its input layers: noise statistics, normalization, any image size, saving."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ceriakeras.config import ModelConfig  # noqa: E402
from ceriakeras.model import NormalizeIntensity, PoissonNoise, build_unet  # noqa: E402

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
