"""Electron noise, written once: dose ↔ counts, the Poisson draw, the detector MTF, the dose of a frame.

Units: dose in e⁻/Å², pixel size in Å, counts in electrons (a detector's own units divided by its
gain in counts per electron, :mod:`ceriakeras.inference.detector`). The TensorFlow functions
(:func:`poisson_sample`, :func:`detector_blur`, :func:`expected_counts`) import TensorFlow when
called, so the rest of this module is usable before TensorFlow has loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

EXACT_MEAN_LIMIT = 100.0
"""Means below this are sampled exactly (CDF inversion); above, by a corrected normal quantile."""
MAX_INVERSION_TERMS = 256
"""Upper bound on the CDF terms of the exact branch (P(X ≥ 256 | mean 100) < 1e-40)."""


# --- dose ↔ counts -----------------------------------------------------------------------------
def counts_per_pixel(dose_e_per_A2, pixel_size_A):
    """Electrons per pixel in vacuum: dose (e⁻/Å²) × pixel area (Å²); floats or arrays."""
    return dose_e_per_A2 * pixel_size_A ** 2


def estimate_dose(counts: np.ndarray, pixel_size_A: float,
                  counts_per_electron: float = 1.0) -> float:
    """Dose of a frame, e⁻/Å²: the mean count per pixel over the pixel area, in electrons.

    A particle scatters electrons but, in phase contrast, keeps nearly all of them in the image,
    so the mean is the incident dose to within a few per cent.

    Parameters
    ----------
    counts : (H, W) float
        The frame, counts (at any pixel size: as read, or resampled to the model's).
    pixel_size_A : float
        Its pixel size, Å.
    counts_per_electron : float
        Detector gain, counts per electron (1: the counts are electrons).
    """
    dose = float(np.mean(counts, dtype=np.float64)) / float(pixel_size_A) ** 2
    return dose / counts_per_electron


def poisson_counts(rng: np.random.Generator, image: np.ndarray, dose_e_per_A2: float,
                   pixel_size_A: float) -> np.ndarray:
    """A Poisson draw (NumPy) of an image of relative intensity (vacuum 1) at a dose, electrons."""
    return rng.poisson(np.clip(image, 0, None) * counts_per_pixel(dose_e_per_A2, pixel_size_A))


# --- TensorFlow: the Poisson sampler and the detector MTF --------------------------------------
def poisson_sample(mean: Any, seed: Any) -> tf.Tensor:
    """Poisson counts with the given means, from a stateless seed; runs on GPU and under XLA.

    ``tf.random.poisson`` has CPU kernels only and is not XLA-compilable; this sampler uses only
    elementwise ops, a stateless uniform and a ``tf.while_loop``. One uniform ``u`` per pixel is
    turned into the smallest ``k`` with ``F(k) ≥ u``:

    - mean < 100: exact inversion of the Poisson CDF, summed in float64 term by term
      (``p(k) = p(k−1)·mean/k``) until every pixel is resolved (at most 256 terms);
    - mean ≥ 100: the Cornish–Fisher expansion of the Poisson quantile at ``z = Φ⁻¹(u)`` to
      order ``mean^-1/2`` (skewness and kurtosis terms), rounded; its error in probability is
      far below what a chi-square test of 10⁵ draws can see.

    Parameters
    ----------
    mean : array-like, any shape, float
        Expected counts (e.g. intensity × dose × pixel area); negative or non-finite values
        count as 0.
    seed : (2,) int tensor
        Stateless seed; the same seed and means give the same counts on any device.

    Returns
    -------
    tf.Tensor
        Counts as whole numbers, same shape and dtype as ``mean`` (float32 for integer input).
    """
    import tensorflow as tf

    mean = tf.convert_to_tensor(mean)
    out_dtype = mean.dtype if mean.dtype.is_floating else tf.float32
    lam = tf.cast(mean, tf.float64)
    lam = tf.where(tf.math.is_finite(lam) & (lam > 0), lam, tf.zeros_like(lam))
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    u = tf.random.stateless_uniform(tf.shape(lam), seed=seed, dtype=tf.float64)

    # Exact branch: k = #{j ≥ 0 : F(j) < u}, F(j) = Σ_{i ≤ j} e^-λ λ^i / i!.
    small = lam < EXACT_MEAN_LIMIT
    lam_s = tf.where(small, lam, tf.zeros_like(lam))
    u_s = tf.where(small, u, tf.zeros_like(u))
    p0 = tf.exp(-lam_s)

    def cond(i, k, p, F):
        return (i < MAX_INVERSION_TERMS) & tf.reduce_any(u_s > F)

    def body(i, k, p, F):
        k = k + tf.cast(u_s > F, tf.float64)
        i = i + 1
        p = p * lam_s / tf.cast(i, tf.float64)
        return i, k, p, F + p

    _, k_small, _, _ = tf.while_loop(
        cond, body, (tf.constant(0), tf.zeros_like(lam), p0, p0),
        maximum_iterations=MAX_INVERSION_TERMS)

    # Large means: Cornish–Fisher quantile (cumulants of Poisson are all λ), continuity-rounded.
    lam_l = tf.where(small, tf.ones_like(lam), lam)
    z = tf.math.ndtri(tf.clip_by_value(u, 1e-15, 1.0 - 1e-15))
    r = tf.sqrt(lam_l)
    x = (lam_l + r * z + (z * z - 1.0) / 6.0
         + (z * z * z - 3.0 * z) / (24.0 * r) - (2.0 * z * z * z - 5.0 * z) / (36.0 * r))
    k_large = tf.maximum(tf.floor(x + 0.5), 0.0)

    return tf.cast(tf.where(small, k_small, k_large), out_dtype)


def mtf_tap(correlation: Any) -> tf.Tensor:
    """Side weight ``a`` of the 3-tap kernel ``[a, 1 − 2a, a]`` whose blur of white noise gives
    the neighbour-pixel ``correlation`` (per axis): the smaller root of
    ``(6ρ + 4) a² − (4ρ + 2) a + ρ = 0``, i.e. ``ρ = 2a(1 − 2a) / (2a² + (1 − 2a)²)``.

    ``correlation`` is clipped to [0, 0.5] (a = 0 … 0.146); any shape, float32.
    """
    import tensorflow as tf

    rho = tf.clip_by_value(tf.cast(correlation, tf.float32), 0.0, 0.5)
    b = 4.0 * rho + 2.0
    return (b - tf.sqrt(b * b - 4.0 * rho * (6.0 * rho + 4.0))) / (2.0 * (6.0 * rho + 4.0))


def detector_blur(counts: Any, correlation: Any) -> tf.Tensor:
    """Blur counts with a detector MTF: the separable kernel ``[a, 1 − 2a, a]`` along rows and
    columns, ``a`` from :func:`mtf_tap`, so that white (Poisson) noise becomes noise whose
    correlation between horizontally or vertically neighbouring pixels is ``correlation``.

    Edges are padded by repeating the edge pixel, which keeps each image's total count exactly.
    Plain element-wise ops and slices: runs on GPU and under XLA.

    Parameters
    ----------
    counts : (B, H, W, C) float tensor
        Counts (e.g. a Poisson draw), H, W ≥ 2.
    correlation : (B,) float
        Neighbour correlation of the noise per image, in [0, 0.5] (0: unchanged).

    Returns
    -------
    tf.Tensor
        (B, H, W, C), the dtype of ``counts``.
    """
    import tensorflow as tf

    counts = tf.convert_to_tensor(counts)
    x = tf.cast(counts, tf.float32)
    a = tf.reshape(mtf_tap(correlation), [-1, 1, 1, 1])

    def blur(x, axis):
        n = tf.shape(x)[axis]
        first = tf.gather(x, [0], axis=axis)
        last = tf.gather(x, [n - 1], axis=axis)
        padded = tf.concat([first, x, last], axis=axis)
        before = tf.gather(padded, tf.range(0, n), axis=axis)
        after = tf.gather(padded, tf.range(2, n + 2), axis=axis)
        return (1.0 - 2.0 * a) * x + a * (before + after)

    return tf.cast(blur(blur(x, 1), 2), counts.dtype)


def expected_counts(image: Any, dose_e_per_A2: Any, pixel_size_A: Any) -> tf.Tensor:
    """Expected electrons per pixel: intensity (vacuum = 1) × dose (e⁻/Å²) × pixel area (Å²).

    ``dose_e_per_A2`` and ``pixel_size_A`` broadcast against ``image``'s leading axes (give
    them shape ``(B, 1, 1)`` for a batch of ``(B, H, W)`` images).
    """
    import tensorflow as tf

    image = tf.convert_to_tensor(image, tf.float32)
    pixel_size_A = tf.cast(pixel_size_A, tf.float32)
    return image * tf.cast(dose_e_per_A2, tf.float32) * pixel_size_A * pixel_size_A
