"""Stretches of constant height in one track: penalised likelihood on class log-probabilities.

A track's frames each give the model's class probabilities ``p_t(h)`` of the column's height
(:func:`ceriakeras.analysis.tracking.column_class_probabilities`). Frames of one state are not
independent evidence (the model misreads the same column the same way in every frame), so a
stretch's log-likelihood of height ``h`` is the *tempered* sum ``τ · Σ_t log p_t(h)``,
``0 < τ ≤ 1``. A track is split into stretches by optimal partitioning: the split maximises the
sum over stretches of their best log-likelihood, minus ``penalty`` per change, with every
stretch at least ``min_stretch`` frames long. A stretch's height is its best ``h``, its
confidence the posterior ``softmax(τ_c · Σ_t log p_t)`` at that height, and a change's
probability the logistic of its log-likelihood ratio against no change, less the penalty.
"""

from __future__ import annotations

import numpy as np

LOG_FLOOR = 1e-3
"""Class probabilities are floored at this before the log (one frame cannot veto a height)."""


def log_probabilities(probabilities: np.ndarray, floor: float = LOG_FLOOR) -> np.ndarray:
    """``log`` of class probabilities (…, K) floored at ``floor`` and renormalised."""
    p = np.clip(np.asarray(probabilities, np.float64), floor, None)
    return np.log(p / p.sum(axis=-1, keepdims=True))


def segment(sums: np.ndarray, counts: np.ndarray, *, temper: float, penalty: float,
            min_stretch: int) -> list[tuple[int, int]]:
    """Optimal partition of a track's units into stretches of constant height.

    Parameters
    ----------
    sums : (n, K) float
        Per unit (a frame, or a block of frames already known to share a height), the sum of
        its frames' class log-probabilities.
    counts : (n,) int
        Frames per unit.
    temper : float
        τ, the weight of one frame's log-probabilities (0, 1].
    penalty : float
        Cost of one change, in tempered log-likelihood (nats).
    min_stretch : int
        Fewest frames in a stretch (≥ 1); a track shorter than twice this is one stretch.

    Returns
    -------
    list of (start, stop)
        Unit ranges ``[start, stop)`` of the stretches, in order, covering all units.
    """
    sums = np.asarray(sums, np.float64)
    n = len(sums)
    if n == 0:
        return []
    c = np.vstack([np.zeros((1, sums.shape[1])), np.cumsum(sums, axis=0)])
    frames = np.concatenate([[0], np.cumsum(counts)])
    best = np.full(n + 1, -np.inf)
    best[0] = 0.0
    back = np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):
        i = np.arange(j)
        score = best[i] + temper * (c[j] - c[i]).max(axis=1) - penalty * (i > 0)
        score[frames[j] - frames[i] < min_stretch] = -np.inf
        k = int(np.argmax(score))
        if np.isfinite(score[k]):
            best[j], back[j] = score[k], k
    if not np.isfinite(best[n]):  # too short to split: one stretch
        return [(0, n)]
    cuts, j = [], n
    while j > 0:
        cuts.append((int(back[j]), j))
        j = int(back[j])
    return cuts[::-1]


def stretch_height(total: np.ndarray, confidence_temper: float) -> tuple[int, float]:
    """Height index (0-based class among heights) and its posterior for a stretch's summed
    log-probabilities ``total`` (K,), with the weight ``confidence_temper`` per frame."""
    z = confidence_temper * np.asarray(total, np.float64)
    z = z - z.max()
    posterior = np.exp(z) / np.exp(z).sum()
    k = int(np.argmax(total))
    return k, float(posterior[k])


def change_probability(before: np.ndarray, after: np.ndarray, *, temper: float,
                       penalty: float, scale: float = 1.0) -> float:
    """Probability that a change between two stretches is real.

    The tempered log-likelihood ratio of two heights against one,
    ``Λ = τ (max_h A_h + max_h B_h − max_h (A + B)_h) ≥ 0`` (``A``, ``B`` the stretches' summed
    log-probabilities), less the penalty, through a logistic of slope ``scale``:
    ``σ(scale · (Λ − penalty))``. A change the partition keeps has Λ > penalty, so p > 0.5.
    """
    a, b = np.asarray(before, np.float64), np.asarray(after, np.float64)
    lam = temper * (a.max() + b.max() - (a + b).max())
    return float(1.0 / (1.0 + np.exp(-scale * (lam - penalty))))
