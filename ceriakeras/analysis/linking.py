"""Frame-to-frame linking of columns through drift (SciPy's assignment).

The columns of a new frame are given to the tracks of the earlier frames by a minimum-cost
one-to-one assignment (:func:`scipy.optimize.linear_sum_assignment`) of the tracks' predicted
positions to the detections, gated by a largest distance. The drift between frames is the median
displacement of the columns linked with a wider gate; the link is then made again with the drift
removed and the tight gate.
"""

from __future__ import annotations

import numpy as np

MIN_COLUMNS_FOR_SHIFT = 3
"""Linked columns needed to estimate a frame's shift (fewer: the shift is not updated)."""


def link(predicted: np.ndarray, detected: np.ndarray, max_distance_A: float
         ) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one links between predicted and detected positions closer than ``max_distance_A``.

    Parameters
    ----------
    predicted : (M, 2) float
        Where the tracks should be in this frame, Å.
    detected : (N, 2) float
        Columns found in this frame, Å.
    max_distance_A : float
        Largest link, Å.

    Returns
    -------
    (i, j) : two (L,) int arrays
        ``predicted[i[k]]`` is linked to ``detected[j[k]]``; the total distance is smallest.
    """
    from scipy.spatial import cKDTree

    predicted = np.asarray(predicted, np.float64).reshape(-1, 2)
    detected = np.asarray(detected, np.float64).reshape(-1, 2)
    if len(predicted) == 0 or len(detected) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return _link_trees(cKDTree(predicted), cKDTree(detected), max_distance_A)


def _link_trees(predicted, detected, max_distance_A: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`link` between two non-empty ``cKDTree`` (a frame's detections' tree is built
    once for all the links of :func:`link_with_drift`)."""
    none = np.zeros(0, np.int64)
    pairs = predicted.sparse_distance_matrix(detected, max_distance_A, output_type="ndarray")
    if len(pairs) == 0:
        return none, none
    rows, cols = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    # a pair whose two ends have no other candidate is a link; the rest is assigned jointly
    alone = (np.bincount(rows, minlength=predicted.n)[rows] == 1) & (
        np.bincount(cols, minlength=detected.n)[cols] == 1)
    i, j = [rows[alone]], [cols[alone]]
    if not alone.all():  # (SciPy's optimize, 0.1 s to import, only when needed)
        from scipy.optimize import linear_sum_assignment

        r, c = np.unique(rows[~alone]), np.unique(cols[~alone])
        cost = np.full((len(r), len(c)), 1e6)
        cost[np.searchsorted(r, rows[~alone]), np.searchsorted(c, cols[~alone])] = pairs["v"][~alone]
        a, b = linear_sum_assignment(cost)
        ok = cost[a, b] < 1e6
        i.append(r[a[ok]])
        j.append(c[b[ok]])
    return np.concatenate(i), np.concatenate(j)


def median_shift(predicted: np.ndarray, detected: np.ndarray, i: np.ndarray, j: np.ndarray
                 ) -> np.ndarray | None:
    """Median displacement (2,), Å, of the linked pairs; None with fewer than
    :data:`MIN_COLUMNS_FOR_SHIFT` links."""
    if len(i) < MIN_COLUMNS_FOR_SHIFT:
        return None
    return np.median(np.asarray(detected)[j] - np.asarray(predicted)[i], axis=0)


def link_with_drift(predicted: np.ndarray, detected: np.ndarray, max_distance_A: float,
                    search_A: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Link a frame's columns to the tracks, allowing a common shift of up to ``search_A``.

    Parameters
    ----------
    predicted : (M, 2) float
        The tracks' positions with the previous frame's drift, Å.
    detected : (N, 2) float
        The frame's columns, Å.
    max_distance_A : float
        Largest link once the shift is removed, Å.
    search_A : float
        Largest link while the shift is estimated, Å (≥ ``max_distance_A``; it should hold
        the largest drift per frame plus the position noise, and stay under half the closest
        column spacing, 3.3 Å along [110]).

    Returns
    -------
    i, j : (L,) int
        Links (as :func:`link`).
    shift : (2,) float
        The frame's shift from ``predicted``, Å (zeros if too few columns were linked).
    """
    from scipy.spatial import cKDTree

    predicted = np.asarray(predicted, np.float64).reshape(-1, 2)
    detected = np.asarray(detected, np.float64).reshape(-1, 2)
    shift = np.zeros(2)
    if len(predicted) == 0 or len(detected) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), shift
    found = cKDTree(detected)
    tree = cKDTree(predicted)
    i, j = _link_trees(tree, found, search_A)
    for _ in range(2):  # the wide link gives a first shift, the shifted one refines it
        estimate = median_shift(predicted + shift, detected, i, j)
        if estimate is None:
            break
        shift = shift + estimate
        tree = cKDTree(predicted + shift)
        i, j = _link_trees(tree, found, search_A)
    i, j = _link_trees(tree, found, max_distance_A)  # the tree of predicted + shift
    return i, j, shift
