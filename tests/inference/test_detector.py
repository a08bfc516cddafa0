"""Detector gain from the noise: series (frame differences) and single frame (vacuum), with an MTF."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ceriakeras.inference.detector import (estimate_gain_series, estimate_gain_vacuum, mtf_noise_factor,
                                 noise_autocovariance)

SHAPE = (373, 428)  # the camera frames, px


def _scene(particle: bool = True) -> np.ndarray:
    """(H, W) intensity, vacuum = 1: a lattice-fringed disk (a particle) in vacuum."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    fringes = 0.3 * np.cos(2 * np.pi * xx / 19.0) * np.cos(2 * np.pi * yy / 27.0)
    return 1.0 + fringes * (np.hypot(xx - 190, yy - 170) < (110 if particle else -1))


def _mtf_kernel(sigma_px: float = 0.5) -> np.ndarray:
    """A Gaussian point spread, Σk = 1 (σ = 0.5 px: neighbour correlation of the noise ≈ 0.26)."""
    r = np.arange(-3, 4)
    k1 = np.exp(-(r**2) / (2 * sigma_px**2))
    k = np.outer(k1, k1)
    return k / k.sum()


def _camera(scene, electrons_per_px, gain, frames, seed, kernel=None):
    """(N, H, W) counts: Poisson electrons, blurred by the detector's MTF, times the gain."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(frames):
        electrons = rng.poisson(scene * electrons_per_px).astype(np.float64)
        if kernel is not None:
            electrons = ndimage.convolve(electrons, kernel, mode="reflect")
        out.append(gain * electrons)
    return np.stack(out)


def test_series_with_correlated_noise_recovers_the_gain():
    frames = _camera(_scene(), 2.5, 25.0, 24, seed=1, kernel=_mtf_kernel())
    naive = np.var(frames[0] - frames[1]) / 2 / frames.mean()
    est = estimate_gain_series(frames)
    assert est.method == "series estimate"
    assert naive < 0.6 * 25          # the plain mean-variance ratio is fooled by the MTF ...
    assert est.counts_per_electron == pytest.approx(25.0, rel=0.10)   # ... the estimate is not
    assert 0 < est.standard_error < 0.05 * 25
    assert abs(est.counts_per_electron - 25.0) < 4 * est.standard_error + 0.02 * 25
    assert est.neighbour_correlation == pytest.approx(0.26, abs=0.05)
    assert est.noise_factor == pytest.approx((_mtf_kernel() ** 2).sum(), rel=0.1)


def test_series_in_counts_gives_a_gain_of_one():
    est = estimate_gain_series(_camera(_scene(), 2.5, 1.0, 20, seed=2))
    assert est.counts_per_electron == pytest.approx(1.0, rel=0.10)
    assert est.noise_factor == pytest.approx(1.0, abs=0.05)


def test_a_changing_scene_is_left_out_of_the_series_estimate():
    """A particle that moves between frames: its tiles hold structure, the vacuum's do not."""
    rng = np.random.default_rng(3)
    frames = []
    for t in range(20):
        scene = np.roll(_scene(), 3 * t, axis=1)
        frames.append(8.0 * rng.poisson(scene * 3.0))
    est = estimate_gain_series(np.stack(frames))
    assert est.tiles_used < est.tiles_total
    assert est.counts_per_electron == pytest.approx(8.0, rel=0.10)


def test_single_frame_vacuum_estimate():
    frame = _camera(_scene(), 3.0, 25.0, 1, seed=4, kernel=_mtf_kernel())[0]
    est = estimate_gain_vacuum(frame)
    assert est.method == "vacuum estimate"
    assert est.counts_per_electron == pytest.approx(25.0, rel=0.10)
    assert est.standard_error < 0.1 * 25
    counts = _camera(_scene(), 3.0, 1.0, 1, seed=5)[0]
    assert estimate_gain_vacuum(counts).counts_per_electron == pytest.approx(1.0, rel=0.10)


def test_no_vacuum_and_too_few_frames_are_refused_with_a_reason():
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    crystal = 200.0 * (1 + 0.3 * np.cos(2 * np.pi * xx / 19.0) * np.cos(2 * np.pi * yy / 27.0))
    frame = np.random.default_rng(6).poisson(crystal).astype(float)   # lattice everywhere
    with pytest.raises(ValueError, match="no vacuum"):
        estimate_gain_vacuum(frame)
    with pytest.raises(ValueError, match="at least 2 frames"):
        estimate_gain_series(frame[None])
    with pytest.raises(ValueError, match="no noise|no structure"):
        estimate_gain_series(np.ones((4, 128, 128)))


def test_mtf_noise_factor_and_autocovariance():
    rng = np.random.default_rng(7)
    white = rng.normal(size=(256, 256))
    assert mtf_noise_factor(white) == pytest.approx(1.0, abs=0.05)
    k = _mtf_kernel(0.7)
    blurred = ndimage.convolve(white, k, mode="wrap")
    assert mtf_noise_factor(blurred) == pytest.approx((k**2).sum(), rel=0.1)
    c = noise_autocovariance(blurred, 2)
    assert c.shape == (5, 5)
    assert np.allclose(c, c[::-1, ::-1])                       # c(τ) = c(−τ)
    assert c[2, 2] == pytest.approx(blurred.var(), rel=1e-3)


def test_input_gain_takes_the_header_gain_the_caller_read_and_does_not_read_it_again(
        tmp_path, monkeypatch):
    from ceriakeras.inference import detector

    def no_second_read(path):
        raise AssertionError("the header was read again")

    monkeypatch.setattr(detector, "file_counts_per_electron", no_second_read)
    gain = detector.input_gain(tmp_path / "a.dm4", 0.1, None, file_gain=3.5)
    assert (gain["counts_per_electron"], gain["counts_per_electron_from"]) == (3.5, "file")
    assert detector.input_gain(tmp_path / "a.dm4", 0.1, 2.0, file_gain=None)[
        "counts_per_electron_from"] == "option"
