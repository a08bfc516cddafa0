"""Probability map → column table → 3D model: Ce columns from the network's output (NumPy / scikit-image).

The network gives, per pixel, the probability of each label class: 0 = no Ce column, ``h`` = a Ce
column of ``h`` atoms (:mod:`ceriakeras.physics.simulate` label masks). A column is a local maximum of
the *column probability* ``1 − p(background)``; its position is refined to sub-pixel by the
weighted centroid of that probability in a small disk, and its height is the class holding the
most probability mass in the disk of the label radius around it.
"""

from __future__ import annotations

import numpy as np

from ..config import CE_COLUMN_SPACING_A

TABLE_KEYS = ("x_px", "y_px", "height", "confidence", "expected_height", "height_std")
"""Keys of the dict returned by :func:`find_columns`."""


def _disk_offsets(radius_px: float) -> np.ndarray:
    """(K, 2) int: (dy, dx) of the pixels whose centres lie within ``radius_px`` of the origin."""
    r = int(np.ceil(radius_px))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= radius_px**2 + 1e-9
    return np.stack([dy[inside], dx[inside]], axis=1)


def calibrate_confidence(confidence: np.ndarray, dose_e_per_A2: float, table: dict, *,
                         height: np.ndarray | None = None,
                         height_std: np.ndarray | None = None) -> np.ndarray:
    """Map raw column confidences to calibrated ones with a model's calibration table.

    Parameters
    ----------
    confidence : array in [0, 1]
        Raw confidence (the reported height's share of the disk's probability mass).
    dose_e_per_A2 : float
        Dose of the frame (:func:`ceriakeras.noise.estimate_dose`), e⁻/Å².
    table : dict
        The model's ``confidence_calibration``, fitted by
        :func:`ceriakeras.evaluation.calibration.fit_confidence_calibration`: ``dose_e_per_A2`` and, by its
        ``map`` (``platt`` when absent), ``slope`` / ``intercept`` (``σ(a · logit(c) + b)``),
        ``coefficients`` (``logistic``: ``σ(w · (logit(c), height_std, height) + b)``) or
        ``knots_confidence`` / ``knots_probability`` (``isotonic``: linear between knots, a
        dose without knots uses its Platt pair). Platt parameters are interpolated linearly in
        log dose; the other maps are evaluated at the two fitted doses around the frame's and
        their outputs interpolated in log dose. Beyond the fitted doses, the nearest one holds.
    height, height_std : array, optional
        The columns' reported heights and ``height_std`` (atoms), same shape as ``confidence``;
        needed by the ``logistic`` map.

    Returns
    -------
    float64 array in [0, 1], same shape
    """
    from scipy.special import expit

    doses = np.log(np.asarray(table["dose_e_per_A2"], np.float64))
    x = np.log(max(float(dose_e_per_A2), 1e-6))
    c = np.clip(np.asarray(confidence, np.float64), 1e-4, 1 - 1e-4)
    z = np.log(c / (1 - c))
    kind = table.get("map", "platt")
    if kind == "platt":
        a = np.interp(x, doses, np.asarray(table["slope"], np.float64))
        b = np.interp(x, doses, np.asarray(table["intercept"], np.float64))
        return expit(a * z + b)
    if kind == "logistic" and (height is None or height_std is None):
        raise ValueError("the logistic confidence map needs the columns' height and height_std")

    def at(k: int) -> np.ndarray:
        if kind == "logistic":
            w = np.asarray(table["coefficients"][k], np.float64)
            return expit(w[0] * z + w[1] * np.asarray(height_std, np.float64)
                         + w[2] * np.asarray(height, np.float64) + w[3])
        xs, ys = table["knots_confidence"][k], table["knots_probability"][k]
        if kind != "isotonic":
            raise ValueError(f"unknown confidence map {kind!r}: update ceriakeras")
        if not xs:
            return expit(table["slope"][k] * z + table["intercept"][k])
        return np.interp(np.asarray(confidence, np.float64), xs, ys)

    hi = int(np.clip(np.searchsorted(doses, x), 0, len(doses) - 1))
    lo = max(hi - 1, 0)
    if lo == hi or x <= doses[lo]:
        return at(lo)
    if x >= doses[hi]:
        return at(hi)
    t = (x - doses[lo]) / (doses[hi] - doses[lo])
    return (1 - t) * at(lo) + t * at(hi)


def local_maxima(image: np.ndarray, min_distance: int, threshold: float) -> np.ndarray:
    """``skimage.feature.peak_local_max(image, min_distance, threshold_abs=threshold,
    exclude_border=False)``, the same peaks at a fraction of the cost.

    Peaks are the pixels equal to the maximum of the ``(2·min_distance + 1)²`` square around
    them and above ``threshold``. Two such peaks closer than ``min_distance`` (Chebyshev) must
    be equal (a plateau); only then is scikit-image's spacing pass (a tree query per peak) run.

    Parameters
    ----------
    image : (H, W) float
    min_distance : int
        px, ≥ 1.
    threshold : float

    Returns
    -------
    (N, 2) int
        ``(row, column)`` of the peaks, highest first (as scikit-image orders them).
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    size = 2 * min_distance + 1
    mask = image == ndimage.maximum_filter(image, size=size, mode="nearest")
    if mask.all():  # a flat image has no peak
        mask[:] = False
    mask &= image > threshold
    coord = np.nonzero(mask)
    order = np.argsort(-image[coord], kind="stable")
    coord = np.transpose(coord)[order]
    if min_distance > 1 and len(coord) > 1 and cKDTree(coord).query_pairs(
            r=min_distance - 0.5, p=np.inf, output_type="ndarray").size:
        from skimage._shared.coord import ensure_spacing

        coord = ensure_spacing(coord, spacing=min_distance, p_norm=np.inf)
    return coord


class _Window:
    """The pixels around each peak that the centre and height are taken from.

    ``offsets`` (K, 2) within ``reach`` px; ``yy``, ``xx`` (N, K) their rows and columns;
    ``valid`` (N, K) inside the image; ``yy_c``, ``xx_c`` clipped to it; ``dist2`` (1, K) the
    squared offsets.
    """

    def __init__(self, peaks: np.ndarray, reach: float, shape: tuple[int, int]):
        h_img, w_img = shape
        self.offsets = _disk_offsets(reach)                              # (K, 2)
        self.yy = peaks[:, :1] + self.offsets[None, :, 0]                 # (N, K)
        self.xx = peaks[:, 1:] + self.offsets[None, :, 1]
        self.valid = (self.yy >= 0) & (self.yy < h_img) & (self.xx >= 0) & (self.xx < w_img)
        self.yy_c = np.clip(self.yy, 0, h_img - 1)
        self.xx_c = np.clip(self.xx, 0, w_img - 1)
        self.dist2 = (self.offsets**2).sum(axis=1)[None, :]


def _refine_centres(column: np.ndarray, peaks: np.ndarray, window: _Window,
                    centroid_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centres ``(y, x)``: the weighted centroid of the column probability in the
    centroid disk, recentred once on the first estimate (removes most of the bias of a disk cut
    off-centre)."""
    yy, xx = window.yy, window.xx
    values = np.where(window.valid, column[window.yy_c, window.xx_c], 0.0)
    y, x = peaks[:, 0].astype(np.float64), peaks[:, 1].astype(np.float64)
    inside = window.dist2 <= centroid_px**2 + 1e-9
    for _ in range(2):
        w = np.where(inside, values, 0.0)
        w_sum = np.where(w.sum(axis=1) > 0, w.sum(axis=1), 1.0)
        y_new = (w * yy).sum(axis=1) / w_sum
        x_new = (w * xx).sum(axis=1) / w_sum
        # keep the estimate within a pixel of the peak (a lopsided window cannot run away)
        y = np.clip(y_new, peaks[:, 0] - 1.0, peaks[:, 0] + 1.0)
        x = np.clip(x_new, peaks[:, 1] - 1.0, peaks[:, 1] + 1.0)
        inside = (yy - y[:, None]) ** 2 + (xx - x[:, None]) ** 2 <= centroid_px**2 + 1e-9
    return y, x


def _heights(p: np.ndarray, y: np.ndarray, x: np.ndarray, window: _Window,
             label_r: float) -> tuple[np.ndarray, ...]:
    """Per column, from the class mass in the label disk (radius ``label_r`` px) around the
    refined centre: the most probable height class index, its share of the mass (the raw
    confidence), the mass-weighted mean height and its standard deviation; and each height's
    share of the mass, (N, C − 1) float32 (uniform where the disk holds none).

    The mass is gathered only from the offsets that can be in the disk: the centre is within
    1 px of the peak along x and y, so within √2 px.
    """
    n_classes = p.shape[-1]
    near = window.dist2[0] <= (label_r + 1.5) ** 2
    yl, xl = window.yy[:, near], window.xx[:, near]
    in_label = window.valid[:, near] & ((yl - y[:, None]) ** 2 + (xl - x[:, None]) ** 2
                                        <= label_r**2)
    mass = (p[window.yy_c[:, near], window.xx_c[:, near], 1:].astype(np.float64)
            * in_label[..., None]).sum(axis=1)                                  # (N, C-1)
    total = mass.sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    heights = np.arange(1, n_classes, dtype=np.float64)
    best = mass.argmax(axis=1)
    confidence = np.where(total > 0, mass[np.arange(len(best)), best] / safe, 0.0)
    expected = (mass * heights).sum(axis=1) / safe
    std = np.sqrt(np.clip((mass * (heights - expected[:, None]) ** 2).sum(axis=1) / safe, 0, None))
    shares = np.where(total[:, None] > 0, mass / safe[:, None], 1.0 / (n_classes - 1))
    return best, confidence, expected, std, shares.astype(np.float32)


def find_columns(probabilities: np.ndarray, pixel_size_A: float, *, min_distance_A: float = 2.0,
                 threshold: float = 0.3, label_radius_A: float = 0.5,
                 calibration: dict | None = None,
                 dose_e_per_A2: float | None = None) -> dict[str, np.ndarray]:
    """Find Ce columns and their heights in a per-pixel class probability map.

    Parameters
    ----------
    probabilities : (H, W, C) float
        Softmax output; class 0 = no Ce column, class ``h`` = column of ``h`` Ce atoms.
    pixel_size_A : float
        Pixel size of the map, Å.
    min_distance_A : float
        Smallest distance between two columns, Å (peaks closer than this are merged into the
        stronger one; Ce columns along [110] are ≥ 3.3 Å apart).
    threshold : float
        Smallest column probability ``1 − p(background)`` at a column centre, in (0, 1).
    label_radius_A : float
        Radius of the labelled disk around each column the model was trained on, Å; the
        height is taken from the probability mass inside it.
    calibration : dict, optional
        The model's ``confidence_calibration`` (:func:`calibrate_confidence`); then
        ``dose_e_per_A2`` (of the frame, :func:`ceriakeras.noise.estimate_dose`) is needed too.
    dose_e_per_A2 : float, optional
        Dose of the frame, e⁻/Å².

    Returns
    -------
    dict of (N,) arrays, sorted by row then column
        ``x_px``, ``y_px`` (float64, sub-pixel, in this map's grid; pixel centres at integers),
        ``height`` (int32, Ce atoms, ≥ 1), ``confidence`` (float64 in [0, 1]: the reported
        height's share of the column probability mass in the disk; with ``calibration``, that
        share mapped to the probability that the height is right), ``expected_height``
        (float64, mass-weighted mean height), ``height_std`` (float64, its standard deviation);
        ``class_probabilities`` (N, C − 1) float32: each height's share of the disk's mass.

    Notes
    -----
    The centroid disk has radius ``2·label_radius + 1`` px, at most half ``min_distance_A``, so
    it holds a whole column's probability blob but not its neighbours' (vectorized per column).
    """
    p = np.asarray(probabilities)
    if p.ndim != 3 or p.shape[-1] < 2:
        raise ValueError(f"probabilities must be (H, W, C) with C ≥ 2 classes, got {p.shape}")
    if calibration is not None and dose_e_per_A2 is None:
        raise ValueError("a confidence calibration needs the frame's dose_e_per_A2")
    if not pixel_size_A > 0:
        raise ValueError(f"pixel_size_A={pixel_size_A} must be positive")
    if not min_distance_A > 0 or not 0 < threshold < 1 or not label_radius_A > 0:
        raise ValueError("min_distance_A and label_radius_A must be positive, threshold in (0, 1)")
    h_img, w_img = p.shape[:2]
    column = 1.0 - p[..., 0].astype(np.float64)

    min_distance_px = max(1, int(round(min_distance_A / pixel_size_A)))
    peaks = local_maxima(column, min_distance_px, threshold)
    empty = {k: np.zeros(0, np.int32 if k == "height" else np.float64) for k in TABLE_KEYS}
    empty["class_probabilities"] = np.zeros((0, p.shape[-1] - 1), np.float32)
    if len(peaks) == 0:
        return empty

    label_px = label_radius_A / pixel_size_A
    centroid_px = min(2.0 * label_px + 1.0, max(1.0, 0.5 * min_distance_A / pixel_size_A))
    window = _Window(peaks, max(centroid_px, label_px) + 1.0, (h_img, w_img))
    y, x = _refine_centres(column, peaks, window, centroid_px)
    best, confidence, expected, std, shares = _heights(p, y, x, window, max(label_px, 0.5))
    if calibration is not None:
        confidence = calibrate_confidence(confidence, dose_e_per_A2, calibration,
                                          height=best + 1.0, height_std=std)

    order = np.lexsort((x, y))
    return {
        "x_px": x[order],
        "y_px": y[order],
        "height": (best[order] + 1).astype(np.int32),
        "confidence": np.clip(confidence[order], 0.0, 1.0),
        "expected_height": expected[order],
        "height_std": std[order],
        # each column's share of its disk's mass per height 1 … C−1 (tracks, issue 22)
        "class_probabilities": shares[order],
    }


def columns_to_atoms(x_A, y_A, height, *, cell=None):
    """A 3D model: Ce atoms stacked along the beam (z) in every column.

    Assumption: a projection says nothing about where along the beam a column's atoms sit, so
    each column is centred on the particle's mid-plane ``z = 0``: a column of ``h`` atoms holds
    Ce at ``z = (k − (h − 1)/2) · CE_COLUMN_SPACING_A`` for ``k = 0 … h − 1`` (3.83 Å apart along
    [110]). Flat-bottomed particles on a support would instead start all columns at one plane;
    the heights, not the z offsets, are what the image measures.

    Parameters
    ----------
    x_A, y_A : (N,) float
        Column positions, Å (image x = column index direction, y = row direction).
    height : (N,) int
        Ce atoms in each column (columns with height < 1 are skipped).
    cell : (3,) float, optional
        Cell lengths, Å (no periodicity); default none.

    Returns
    -------
    ase.Atoms
        Ce atoms; ``atoms.arrays['column']`` holds each atom's column index.
    """
    from ase import Atoms

    x_A = np.asarray(x_A, dtype=np.float64).ravel()
    y_A = np.asarray(y_A, dtype=np.float64).ravel()
    height = np.asarray(height).astype(np.int64).ravel()
    if not (len(x_A) == len(y_A) == len(height)):
        raise ValueError("x_A, y_A and height must have the same length")
    height = np.clip(height, 0, None)
    n = int(height.sum())
    column = np.repeat(np.arange(len(height)), height)
    k = np.arange(n) - np.repeat(np.cumsum(height) - height, height)       # index inside column
    z = (k - (height[column] - 1) / 2.0) * CE_COLUMN_SPACING_A
    positions = np.stack([x_A[column], y_A[column], z], axis=1) if n else np.zeros((0, 3))
    atoms = Atoms(symbols=["Ce"] * n, positions=positions,
                  cell=cell if cell is not None else None, pbc=False)
    atoms.arrays["column"] = column.astype(np.int64)
    return atoms
