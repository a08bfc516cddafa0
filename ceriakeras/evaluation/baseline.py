"""The classical baseline ``evaluate`` scores beside the network: peak finding and an
intensity-to-height table built at the true optics (an optimistic reference for classical analysis).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..noise import counts_per_pixel

BASELINE_SMOOTHING_A = 0.4
"""Standard deviation of the Gaussian that smooths the image before the baseline's peak finding, Å."""
BASELINE_NOISE_SIGMAS = 3.0
"""The baseline keeps a peak only if it stands this many noise standard deviations above vacuum."""


def disk_sums(image: np.ndarray, x_px: np.ndarray, y_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Sum of ``image`` over the pixels whose centres lie within ``radius_px`` of each point.

    Parameters
    ----------
    image : (H, W) array
    x_px, y_px : (N,) arrays
        Disk centres in pixels (x = column index, y = row index).
    radius_px : float

    Returns
    -------
    (N,) float64 array
    """
    r = int(math.ceil(radius_px)) + 1
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    h, w = image.shape
    out = np.zeros(len(x_px), dtype=np.float64)
    for k, (x, y) in enumerate(zip(np.asarray(x_px, float), np.asarray(y_px, float))):
        cx, cy = int(round(x)), int(round(y))
        xx, yy = cx + dx, cy + dy
        inside = ((xx - x) ** 2 + (yy - y) ** 2 <= radius_px ** 2)
        inside &= (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        out[k] = float(np.sum(image[yy[inside], xx[inside]]))
    return out


def baseline_columns(
    noisy_counts: np.ndarray,
    clean_image: np.ndarray,
    true_columns: np.ndarray,
    dose_e_per_A2: float,
    pixel_size_A: float,
    *,
    label_radius_A: float,
    min_distance_A: float,
    smoothing_A: float = BASELINE_SMOOTHING_A,
    noise_sigmas: float = BASELINE_NOISE_SIGMAS,
) -> dict:
    """Columns and heights by classical image analysis, calibrated at the true optics.

    Columns: local extrema of the Gaussian-smoothed image, with the contrast sign of the true
    columns in the noise-free image (which depends on the optics), kept when they stand above
    both ``noise_sigmas`` standard deviations of the smoothed shot noise and half the weakest true
    column's contrast in the smoothed noise-free image. Heights: each column's integrated
    intensity relative to vacuum in the label-radius disk, compared with a table of the mean
    integrated intensity of the true columns of each height in the *same noise-free image* (so the
    table is exactly right for these optics and this particle — an advantage no real user has);
    the nearest table entry wins.

    Parameters
    ----------
    noisy_counts : (H, W) array
        Detector counts (expected counts = ``clean_image`` × dose × pixel area).
    clean_image : (H, W) float array
        Noise-free intensity, vacuum = 1, at the same optics.
    true_columns : (M, 3) array
        ``x_px, y_px, height`` of the true columns (used only to build the oracle table, the
        contrast sign and the threshold).
    dose_e_per_A2, pixel_size_A : float
        Dose (e⁻/Å²) and pixel size (Å) of the image.
    label_radius_A, min_distance_A : float
        Disk radius for the integrated intensity and smallest distance between columns, Å.

    Returns
    -------
    dict of arrays
        ``x_px``, ``y_px``, ``height`` (no confidence: the baseline has none).
    """
    from skimage.feature import peak_local_max

    vacuum_counts = counts_per_pixel(dose_e_per_A2, pixel_size_A)
    contrast = np.asarray(noisy_counts, np.float64) / vacuum_counts - 1.0
    clean_contrast = np.asarray(clean_image, np.float64) - 1.0
    sigma_px = smoothing_A / pixel_size_A
    smooth = ndimage.gaussian_filter(contrast, sigma_px, mode="nearest")
    smooth_clean = ndimage.gaussian_filter(clean_contrast, sigma_px, mode="nearest")

    tx, ty = true_columns[:, 0], true_columns[:, 1]
    th = np.rint(true_columns[:, 2]).astype(np.int64)
    at_columns = ndimage.map_coordinates(smooth_clean, [ty, tx], order=1, mode="nearest")
    sign = 1.0 if np.sum(at_columns) >= 0 else -1.0
    # Shot noise of the smoothed contrast: per-pixel variance 1/counts (vacuum), divided by the
    # Gaussian's effective area 4π σ².
    noise_std = 1.0 / math.sqrt(vacuum_counts * 4.0 * math.pi * sigma_px ** 2)
    weakest = float(np.min(sign * at_columns)) if len(at_columns) else 0.0
    threshold = max(noise_sigmas * noise_std, 0.5 * weakest)

    peaks = peak_local_max(
        sign * smooth,
        min_distance=max(1, int(round(min_distance_A / pixel_size_A))),
        threshold_abs=threshold,
        exclude_border=False,
    )
    y, x = peaks[:, 0].astype(np.float64), peaks[:, 1].astype(np.float64)
    radius_px = label_radius_A / pixel_size_A
    table_sums = disk_sums(clean_contrast, tx, ty, radius_px)
    heights = np.unique(th)
    table = np.array([table_sums[th == h].mean() for h in heights])
    if len(x) and len(heights):
        sums = disk_sums(contrast, x, y, radius_px)
        height = heights[np.argmin(np.abs(sums[:, None] - table[None, :]), axis=1)]
    else:
        height = np.zeros(len(x), dtype=np.int64)
    return {"x_px": x, "y_px": y, "height": height.astype(np.int64)}
