"""Detector gain from the frames themselves: counts per electron, with the correction for a detector MTF.

A camera that reports *scaled units* gives ``C = g · (k ∗ N)``: ``N`` the electrons per pixel
(Poisson, mean ``λ``), ``k`` the detector's point spread (its MTF, normalized to ``Σ k = 1``),
``g`` the gain in counts per electron. The per-pixel variance is ``g² λ Σk²``: the blur hides a
factor ``Σk² < 1`` of the noise in the correlation between neighbouring pixels, so the plain
mean–variance ratio ``var / mean = g Σk²`` underestimates the gain. The *total* noise power, the
sum of the noise autocovariance over all lags, is ``g² λ (Σk)² = g² λ`` whatever the MTF, so

    g = Σ_τ autocov(τ) / mean.

The functions here sum the noise autocovariance over lags ``|τx|, |τy| ≤ max_lag_px`` (enough
for a detector's point spread, a few pixels wide) on square tiles of noise that hold no image
structure:

- :func:`estimate_gain_series`: the difference of two consecutive frames removes the static
  image and leaves noise of twice the variance (``var(I_t − I_{t+1}) = 2 g² λ Σk²``);
- :func:`estimate_gain_vacuum`: the mean-subtracted vacuum of a single frame is noise.

Tiles that still hold structure (a particle that moved or changed between frames, the particle
itself in a single frame) have long-range correlation; :func:`_flat_tiles` keeps only tiles whose
autocovariance beyond the detector's reach is what noise alone gives (in a single frame, the ones
whose noise power is high by more than 2.5 spreads, weak structure, are dropped too). The
estimate is the median over the kept tiles and its standard error comes from their spread.

Assumption: zero offset (dark-subtracted counts, as direct-electron and gain-referenced cameras
give). A CCD's bias must be subtracted first.

The gain policy of one input (:func:`input_gain`, what ``analyze`` uses): the option, else the
file's own, else these estimates, else 1 with a warning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..io.series import file_counts_per_electron, open_series

MAX_LAG_PX = 3
"""Half-width of the lag window summed for the total noise power, px (the detector's reach)."""
TILE_PX = 64
"""Side of the square tiles the noise is measured on, px."""
MIN_FLAT_TILES = 4
"""Fewest structure-free tiles an estimate is made from."""
MAX_SERIES_FRAMES = 32
"""Frames of a series used for the estimate (the first ones; more add little)."""
MIN_NOISE_FACTOR = 0.15
"""Smallest ``Σk²`` taken for detector noise: a point spread wider than this (σ ≳ 0.7 px) no
longer fits the lag window, and such correlated "noise" is image structure (a noise-free image)."""
MAX_RELATIVE_ERROR = 0.25
"""Largest standard error of an estimate, relative to it; a vaguer one is refused."""


@dataclass
class GainEstimate:
    """A detector gain measured from the noise.

    Attributes
    ----------
    counts_per_electron : float
        Gain ``g``: detector counts (units of the file) per electron.
    standard_error : float
        Standard error of ``counts_per_electron`` (same unit), from the spread over tiles.
    method : str
        ``'series estimate'`` (frame differences) or ``'vacuum estimate'`` (one frame's vacuum).
    noise_factor : float
        ``Σk²``: the per-pixel variance over the total noise power (1 for uncorrelated noise,
        less when the detector's MTF spreads each electron over neighbours).
    neighbour_correlation : float
        Mean correlation of the noise between horizontally and vertically adjacent pixels.
    tiles_used, tiles_total : int
        Structure-free tiles the estimate comes from, of all tiles measured.
    frames_used : int
        Frames read for the estimate.
    """

    counts_per_electron: float
    standard_error: float
    method: str
    noise_factor: float
    neighbour_correlation: float
    tiles_used: int
    tiles_total: int
    frames_used: int

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def check_counts_per_electron(counts_per_electron: float | None) -> None:
    """Raise :class:`~ceriakeras.config.InputError` unless the gain is None or a positive finite number."""
    from ..config import InputError

    if counts_per_electron is None:
        return
    try:
        ok = math.isfinite(float(counts_per_electron)) and float(counts_per_electron) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"--counts-per-electron {counts_per_electron} must be a positive number "
                         "of detector counts per electron (1 for counting cameras)")


def noise_autocovariance(noise: np.ndarray, max_lag_px: int = MAX_LAG_PX) -> np.ndarray:
    """Autocovariance of zero-mean noise tiles at lags up to ``max_lag_px``, averaged over tiles.

    Parameters
    ----------
    noise : (T, B, B) or (B, B) float
        Noise tiles (each tile's own mean is removed here), counts.
    max_lag_px : int
        Largest lag along each axis, px.

    Returns
    -------
    (T, 2L+1, 2L+1) float64 (or (2L+1, 2L+1) for one tile)
        ``c[t, L + dy, L + dx]`` = mean over the tile of ``n(y, x) · n(y + dy, x + dx)`` (pixel
        pairs that both lie inside the tile), counts².
    """
    arr = np.asarray(noise, np.float64)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    t, h, w = arr.shape
    arr = arr - arr.mean(axis=(1, 2), keepdims=True)
    lag = int(max_lag_px)
    # zero-padded FFT correlation: no wrap-around between opposite edges
    shape = (h + lag, w + lag)
    f = np.fft.rfft2(arr, s=shape)
    corr = np.fft.irfft2(f * np.conj(f), s=shape)
    out = np.empty((t, 2 * lag + 1, 2 * lag + 1))
    for i, ddy in enumerate(range(-lag, lag + 1)):
        for j, ddx in enumerate(range(-lag, lag + 1)):
            pairs = (h - abs(ddy)) * (w - abs(ddx))
            out[:, i, j] = corr[:, ddy % shape[0], ddx % shape[1]] / pairs
    return out[0] if single else out


def mtf_noise_factor(noise: np.ndarray, max_lag_px: int = MAX_LAG_PX) -> float:
    """``Σk²``: the per-pixel noise variance over the total noise power (autocovariance summed).

    For Poisson counts blurred by a detector point spread ``k`` (``Σk = 1``) this is ``Σk²``;
    1 for uncorrelated noise. Divide a plain ``variance / mean`` by it to get the gain.

    Parameters
    ----------
    noise : (B, B) or (T, B, B) float
        Noise alone (frame differences, or vacuum with its mean removed), counts.
    max_lag_px : int
        Lags summed along each axis, px (the detector's reach).

    Returns
    -------
    float in (0, 1] for noise (may exceed 1 by sampling error for uncorrelated noise)
    """
    c = noise_autocovariance(noise, max_lag_px)
    c = c.reshape(-1, *c.shape[-2:]).mean(axis=0)
    total = c.sum()
    if not total > 0:
        raise ValueError("the noise has no positive total power; is the input noise-free?")
    return float(c[max_lag_px, max_lag_px] / total)


def _tiles(image: np.ndarray, tile_px: int) -> np.ndarray:
    """(T, B, B) view of the whole tiles of (..., H, W) → (..., T, B, B)."""
    h, w = image.shape[-2:]
    ny, nx = h // tile_px, w // tile_px
    cut = image[..., :ny * tile_px, :nx * tile_px]
    lead = cut.shape[:-2]
    out = cut.reshape(*lead, ny, tile_px, nx, tile_px)
    out = np.moveaxis(out, -3, -2)
    return out.reshape(*lead, ny * nx, tile_px, tile_px)


def _tile_size(shape: tuple[int, int], tile_px: int) -> int:
    """The tile side: ``tile_px``, smaller for small frames so there are at least 16 tiles."""
    h, w = shape
    b = int(tile_px)
    while b > 16 and (h // b) * (w // b) < 16:
        b //= 2
    if (h // b) * (w // b) < MIN_FLAT_TILES:
        raise ValueError(f"a frame of {h}×{w} px is too small to measure the detector noise "
                         f"(needs {MIN_FLAT_TILES} tiles of {b} px)")
    return b


def _flat_tiles(autocov: np.ndarray, max_lag_px: int, n_samples: int) -> np.ndarray:
    """Which tiles hold noise only: no autocovariance beyond the detector's reach.

    ``autocov`` : (T, 2M+1, 2M+1) with ``M > max_lag_px``; ``n_samples`` pixels (times pairs)
    behind each tile's estimate. Noise correlation ends within ``max_lag_px``; image structure
    (smooth, or lattice fringes a few Å across) correlates further. For noise, each lag's
    autocovariance in the outer ring is zero with a sampling variance ``var² Σρ² / n_samples``
    (``ρ`` the autocorrelation in the inner window), so ``Q = Σ_ring ĉ² n_samples / (var² Σρ²)``
    is about the number of ring lags; a tile passes below twice that (structure of either sign
    raises ``Q``; a lattice cannot cancel out of it).
    """
    m = autocov.shape[-1] // 2
    win = autocov[:, m - max_lag_px:m + max_lag_px + 1, m - max_lag_px:m + max_lag_px + 1]
    ring2 = (autocov**2).sum(axis=(1, 2)) - (win**2).sum(axis=(1, 2))
    n_ring = autocov.shape[-1] ** 2 - win.shape[-1] ** 2
    var = autocov[:, m, m]
    ok = (var > 0) & (win.sum(axis=(1, 2)) > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = ring2 * n_samples / (win**2).sum(axis=(1, 2))
    return ok & (q <= 2.0 * n_ring)


def _clip_high(gains: np.ndarray, n_sigma: float = 2.5) -> np.ndarray:
    """Tiles kept after clipping high outliers: structure only ever adds to a tile's noise power.

    The spread is taken from the lower half (median − 25th percentile), which structure leaves
    alone; tiles above ``median + n_sigma · spread`` are dropped until none is.
    """
    keep = np.ones(len(gains), bool)
    for _ in range(10):
        med = np.median(gains[keep])
        sigma = (med - np.percentile(gains[keep], 25)) / 0.6745
        new = gains <= med + n_sigma * sigma
        if new.sum() < MIN_FLAT_TILES or np.array_equal(new, keep):
            break
        keep = new
    return keep


def _estimate(noise_tiles: np.ndarray, mean_tiles: np.ndarray, max_lag_px: int, method: str,
              frames_used: int, clip: bool = False) -> GainEstimate:
    """Gain from (P, T, B, B) noise tiles (P repeats of the same T tiles) and (T,) tile means."""
    p, t = noise_tiles.shape[:2]
    ring_lag = 2 * max_lag_px + 2
    autocov = noise_autocovariance(noise_tiles.reshape(p * t, *noise_tiles.shape[2:]), ring_lag)
    autocov = autocov.reshape(p, t, *autocov.shape[1:]).mean(axis=0)          # (T, ., .)
    flat = _flat_tiles(autocov, max_lag_px, p * noise_tiles.shape[2] * noise_tiles.shape[3])
    flat &= mean_tiles > 0
    n = int(flat.sum())
    if n < MIN_FLAT_TILES:
        raise ValueError(f"only {n} of {t} tiles hold noise alone (no structure); "
                         f"{MIN_FLAT_TILES} are needed")
    m = ring_lag
    inner = autocov[flat, m - max_lag_px:m + max_lag_px + 1, m - max_lag_px:m + max_lag_px + 1]
    # removing each tile's mean takes ~var·Σρ/n_pixels off every lag: undo it for the window
    n_pixels = noise_tiles.shape[2] * noise_tiles.shape[3]
    total = inner.sum(axis=(1, 2)) / (1.0 - inner[0].size / n_pixels)
    gains = total / mean_tiles[flat]
    if not np.all(np.isfinite(gains)) or np.median(gains) <= 0:
        raise ValueError("the frames show no noise (noise-free or normalized data?)")
    keep = _clip_high(gains) if clip else np.ones(len(gains), bool)
    gains, n = gains[keep], int(keep.sum())
    g = float(np.median(gains))
    spread = 1.4826 * float(np.median(np.abs(gains - g)))
    se = 1.2533 * spread / np.sqrt(n)
    variance = autocov[flat, m, m][keep]
    neighbours = (autocov[flat, m, m - 1] + autocov[flat, m, m + 1] + autocov[flat, m - 1, m]
                  + autocov[flat, m + 1, m])[keep] / 4.0
    factor = float(np.median(variance / total[keep]))
    if factor < MIN_NOISE_FACTOR:
        raise ValueError(f"what varies is correlated over more than {max_lag_px} px (Σk² = "
                         f"{factor:.2f} < {MIN_NOISE_FACTOR}): structure, not detector noise")
    if se > MAX_RELATIVE_ERROR * g:
        raise ValueError(f"the estimate {g:.3g} ± {se:.2g} counts/e⁻ is too uncertain")
    return GainEstimate(
        counts_per_electron=g, standard_error=float(se), method=method,
        noise_factor=factor,
        neighbour_correlation=float(np.median(neighbours / variance)),
        tiles_used=n, tiles_total=t, frames_used=frames_used)


def estimate_gain_series(frames, *, max_lag_px: int = MAX_LAG_PX, tile_px: int = TILE_PX,
                         max_frames: int = MAX_SERIES_FRAMES) -> GainEstimate:
    """Detector gain (counts per electron) from the noise of a series of frames of one scene.

    Consecutive frames are paired, ``(0, 1), (2, 3), …``; each pair's difference is noise of
    variance ``2 g² λ Σk²`` where the scene did not change. Per tile, the difference's
    autocovariance summed over lags ``≤ max_lag_px`` (the total noise power, whatever the MTF),
    pooled over pairs, divided by twice the tile's mean count is ``g``. Tiles where the scene
    changed (motion, a growing particle) are left out by :func:`_flat_tiles`.

    Parameters
    ----------
    frames : (N, H, W) array or sequence of (H, W) arrays, N ≥ 2
        Counts in the file's units, zero offset.
    max_lag_px : int
        Lags summed along each axis, px: the detector point spread's reach.
    tile_px : int
        Tile side, px (reduced for small frames to give ≥ 16 tiles).
    max_frames : int
        Use at most this many frames (the first).

    Returns
    -------
    GainEstimate
        ``method = 'series estimate'``.

    Raises
    ------
    ValueError
        Fewer than 2 frames, frames of different shapes, a frame too small, no noise, or fewer
        than :data:`MIN_FLAT_TILES` tiles without structure.
    """
    frames = [np.asarray(f, np.float64) for f in list(frames)[:max_frames]]
    if len(frames) < 2:
        raise ValueError(f"a series estimate of the gain needs at least 2 frames, got {len(frames)}")
    shape = frames[0].shape
    if any(f.shape != shape or f.ndim != 2 for f in frames):
        raise ValueError("all frames must be 2D images of the same shape")
    b = _tile_size(shape, tile_px)
    n_pairs = len(frames) // 2
    stack = np.stack(frames[:2 * n_pairs])
    diff = (stack[0::2] - stack[1::2]) / np.sqrt(2.0)         # noise of one frame's variance
    means = _tiles(stack, b).mean(axis=(0, 2, 3))            # (T,)
    return _estimate(_tiles(diff, b), means, max_lag_px, "series estimate", 2 * n_pairs)


def estimate_gain_vacuum(frame, *, max_lag_px: int = MAX_LAG_PX,
                         tile_px: int = TILE_PX) -> GainEstimate:
    """Detector gain (counts per electron) from the vacuum of a single frame.

    The frame is cut into tiles; tiles without image structure (vacuum: flat illumination,
    noise only, see :func:`_flat_tiles`) give ``g`` = the autocovariance of their
    mean-subtracted counts summed over lags ``≤ max_lag_px``, over their mean count.

    Parameters
    ----------
    frame : (H, W) array
        Counts in the file's units, zero offset.
    max_lag_px, tile_px : int
        See :func:`estimate_gain_series`.

    Returns
    -------
    GainEstimate
        ``method = 'vacuum estimate'``.

    Raises
    ------
    ValueError
        A frame too small, no noise, or fewer than :data:`MIN_FLAT_TILES` vacuum tiles (the
        particle or a support fills the frame).
    """
    frame = np.asarray(frame, np.float64)
    if frame.ndim != 2:
        raise ValueError(f"frame must be a 2D image, got shape {frame.shape}")
    b = _tile_size(frame.shape, tile_px)
    tiles = _tiles(frame, b)
    means = tiles.mean(axis=(1, 2))
    try:
        return _estimate(tiles[None], means, max_lag_px, "vacuum estimate", 1, clip=True)
    except ValueError as err:
        raise ValueError(f"no vacuum to measure the gain on: {err}") from None


# --- the gain policy of one input --------------------------------------------------------------
GAIN_FRAMES_PIXELS = 8_000_000
"""Pixels of the input read for a series' gain estimate (at least 2 frames, at most 32)."""


_READ_THE_FILE = object()
"""``file_gain`` of :func:`input_gain` when the caller has not read the file's header."""


def input_gain(path, pixel_size_A: float | None = None,
               counts_per_electron: float | None = None, *, file_gain=_READ_THE_FILE) -> dict:
    """The detector gain of one input, counts per electron, and where it came from.

    In this order: ``counts_per_electron`` (``'option'``); the file's own
    (:func:`ceriakeras.io.series.file_counts_per_electron`, ``'file'``); estimated from the noise,
    from the differences of the first frames of a series (``'series estimate'``) or else from
    the vacuum of its first frame (``'vacuum estimate'``, the estimators above); failing
    all, 1 (``'assumed'``: the frames are taken to be in electrons, as before this estimate
    existed) with ``gain_warning`` saying why. ``file_gain``: the gain the file's header states
    (counts per electron, or None), where the caller has read it already
    (:attr:`ceriakeras.io.series.ImageSeries.counts_per_electron`); else the header is read here.

    Returns
    -------
    dict
        ``counts_per_electron`` (float), ``counts_per_electron_from`` (str),
        ``counts_per_electron_standard_error`` (float or None), ``gain_estimate`` (dict of
        :class:`GainEstimate` or None), ``gain_warning`` (str, '' if none).
    """
    def result(value, origin, se=None, estimate=None, warning=""):
        return {"counts_per_electron": float(value), "counts_per_electron_from": origin,
                "counts_per_electron_standard_error": se, "gain_estimate": estimate,
                "gain_warning": warning}

    if counts_per_electron is not None:
        return result(counts_per_electron, "option")
    from_file = file_counts_per_electron(path) if file_gain is _READ_THE_FILE else file_gain
    if from_file is not None:
        return result(from_file, "file")
    with open_series(path, pixel_size_A) as series:
        h, w = series.shape
        limit = int(np.clip(GAIN_FRAMES_PIXELS // max(1, h * w), 2, MAX_SERIES_FRAMES))
        frames = []
        for frame in series.frames():
            if frame.image is not None:
                frames.append(frame.image)
            if len(frames) >= limit:
                break
    problems = []
    estimators = ([("series", lambda: estimate_gain_series(frames))] if len(frames) >= 2 else [])
    estimators += [("vacuum", lambda: estimate_gain_vacuum(frames[0]))] if frames else []
    for name, estimator in estimators:
        try:
            est = estimator()
        except ValueError as err:
            problems.append(f"{name}: {err}")
            continue
        return result(est.counts_per_electron, est.method, round(est.standard_error, 6),
                      est.to_dict())
    reason = "; ".join(problems) or "no readable frame"
    return result(1.0, "assumed", warning=f"gain not measurable ({reason}); counts are taken "
                  "as electrons: give --counts-per-electron for a right dose and confidence")
