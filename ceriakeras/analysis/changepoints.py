"""Stretches of constant height in one track: where the height changes, and what it is.

A track's frames each give the model's class probabilities ``p_t(h)`` of the column's height
(:func:`ceriakeras.analysis.tracking.column_class_probabilities`). Two change statistics split a
track into stretches by optimal partitioning (every stretch at least ``min_stretch`` frames,
``penalty`` per change):

- ``"mean_shift"``: a Gaussian mean shift of the per-frame expected height
  ``E_t = Σ_h h p_t(h)``, its variance estimated from the track's own frame-to-frame
  differences. The model misreads a column the same way in every frame of a state, so its bias
  cancels in the difference of two stretches' means;
- ``"bayes"``: the same Gaussian model with each stretch's mean integrated out (a product
  partition model: the Bayesian offline counterpart of an online change-point detector; the
  penalty is then the log prior odds against a change);
- ``"classes"``: the tempered class log-likelihood ``τ Σ_t log p_t(h)`` of the best height per
  stretch (frames of one state are not independent evidence, hence ``τ ≤ 1``).

Where the frames were counted (:mod:`ceriakeras.analysis.rings`), each of these gains the
Poisson log-likelihood of the electrons in rings around the column (:func:`ring_gain`), weighted
by ``ring_weight`` over the track's :func:`ring_dispersion`.

The heights of a track's stretches are then read together (:func:`assign_heights`): each
stretch's tempered class log-likelihood, subject to every change going the way its mean shifted.
A stretch's confidence is the posterior ``softmax(τ_c Σ_t log p_t)`` at its height; a change's
probability the logistic of its statistic less the penalty.
"""

from __future__ import annotations

import numpy as np
from scipy.special import xlogy

LOG_FLOOR = 1e-3
"""Class probabilities are floored at this before the log (one frame cannot veto a height)."""
PRIOR_SHIFT_ATOMS = 1.0
"""``"bayes"``: prior sd of a stretch's mean expected height, atoms (one atom per change)."""
MIN_VARIANCE = 0.02
"""Smallest per-frame variance of the expected height, atoms² (a track of identical frames)."""


def log_probabilities(probabilities: np.ndarray, floor: float = LOG_FLOOR) -> np.ndarray:
    """``log`` of class probabilities (…, K) floored at ``floor`` and renormalised."""
    p = np.clip(np.asarray(probabilities, np.float64), floor, None)
    return np.log(p / p.sum(axis=-1, keepdims=True))


def expected_height(probabilities: np.ndarray) -> np.ndarray:
    """Σ_h h p(h), Ce atoms, of class probabilities (…, K) over heights 1 … K."""
    p = np.asarray(probabilities, np.float64)
    return p @ np.arange(1, p.shape[-1] + 1, dtype=np.float64)


def frame_variance(values: np.ndarray) -> float:
    """Per-frame variance of a track's expected heights, atoms²: half the mean squared
    difference of successive frames (von Neumann; a change adds only its one difference), at
    least :data:`MIN_VARIANCE`."""
    d = np.diff(np.asarray(values, np.float64))
    if len(d) == 0:
        return 1.0
    return max(float(np.mean(d**2)) / 2, MIN_VARIANCE)


def ring_gain(counts, frames) -> np.ndarray:
    """Poisson log-likelihood (up to terms that cancel between partitions) of stretches'
    ring counts: ``Σ_r S_r log(S_r / m) − S_r`` for ``S`` (…, R) the electrons each ring
    received over the stretch's ``m`` frames (:mod:`ceriakeras.analysis.rings`)."""
    counts = np.maximum(np.asarray(counts, np.float64), 0.0)
    m = np.asarray(frames, np.float64)
    total = counts.sum(axis=-1)
    with np.errstate(divide="ignore"):
        log_m = np.where(m > 0, np.log(np.where(m > 0, m, 1.0)), 0.0)
    return xlogy(counts, counts).sum(axis=-1) - total * log_m - total


def ring_dispersion(counts: np.ndarray, systematic: float = 0.0, frames: int = 16) -> float:
    """How much more a track's ring counts scatter than Poisson counts would, averaged over
    the rings (at least 1); the ring counts' log-likelihood is divided by it (quasi-Poisson).

    Two parts, the larger taken per ring: the frame-to-frame scatter (half the mean squared
    difference of successive frames over the mean count, von Neumann, as
    :func:`frame_variance`: centre and drift errors from frame to frame), and a floor for errors
    that do not average out over a stretch (the drift's slow wander, a ring edge crossing a
    pixel): a relative error ``systematic`` of the mean count, over ``frames`` frames of a
    stretch, ``1 + systematic² · mean · frames``. The floor matters only where the counts are
    large (a bright, high-dose series), where they would otherwise call any such wander a change.

    Parameters
    ----------
    counts : (m, R) float
        The track's single frames' electrons per ring, in order.
    systematic : float
        Relative error of a ring's mean count that more frames do not reduce.
    frames : int
        Frames of a typical stretch.
    """
    c = np.asarray(counts, np.float64)
    if len(c) < 3:
        return 1.0
    return float(dispersion_of(np.mean(np.diff(c, axis=0) ** 2, axis=0), c.mean(axis=0),
                               systematic, frames))


def dispersion_of(step_square, mean, systematic: float, frames: int) -> np.ndarray:
    """:func:`ring_dispersion` from its sums: ``step_square`` (…, R) the mean squared
    difference of successive frames' counts, ``mean`` (…, R) the mean count; (…), at least 1
    (rings without counts left out)."""
    lit = mean > 0
    ratio = step_square / 2 / np.where(lit, mean, 1.0)
    floor = 1.0 + systematic**2 * mean * frames
    part = np.where(lit, np.maximum(ratio, floor), 0.0)
    return np.maximum(part.sum(axis=-1) / np.maximum(lit.sum(axis=-1), 1), 1.0)


def stretch_gains(kind: str, n, s1, s2, sums, *, temper: float, variance, rings=None,
                  ring_frames=None, ring_weight: float = 0.0) -> np.ndarray:
    """Log-likelihood of stretches as one (any shape) from their frames ``n``, the sums ``s1``,
    ``s2`` of their expected heights and of its squares (atoms, atoms²), and (``"classes"``)
    ``sums`` (…, K) of their class log-probabilities; ``variance`` broadcasts. With
    ``rings`` (…, R), the electrons around the column over its ``ring_frames`` frames with
    counts, plus ``ring_weight`` (broadcasts) times their :func:`ring_gain`."""
    if kind == "classes":
        fit = temper * sums.max(axis=-1)
    else:
        fit = -(s2 - s1**2 / np.maximum(n, 1)) / (2 * variance)
        if kind == "bayes":  # the stretch's mean integrated out (prior sd PRIOR_SHIFT_ATOMS)
            fit = fit - 0.5 * np.log1p(n * PRIOR_SHIFT_ATOMS**2 / variance)
    if rings is not None:
        fit = fit + ring_weight * ring_gain(rings, ring_frames)
    return fit


def segment(units: dict, *, kind: str = "mean_shift", temper: float = 0.3,
            penalty: float = 4.0, min_stretch: int = 3, variance: float = 1.0,
            ring_weight: float = 0.0) -> list[tuple[int, int]]:
    """Optimal partition of a track's units into stretches of constant height.

    Parameters
    ----------
    units : dict of arrays
        Per unit (a frame, or a block of frames known to share a height): ``sum`` (n, K) its
        frames' summed class log-probabilities, ``s1`` / ``s2`` (n,) the sums of their expected
        heights and of its squares (atoms, atoms²), ``n`` (n,) frames; optionally ``rings``
        (n, R) the electrons around the column (:mod:`ceriakeras.analysis.rings`) and ``ni``
        (n,) the frames they were counted in.
    kind : {"mean_shift", "bayes", "classes"}
        The change statistic (module doc).
    temper : float
        τ, the weight of one frame's class log-probabilities (``"classes"``).
    penalty : float
        Cost of one change, nats.
    min_stretch : int
        Fewest frames in a stretch (≥ 1); a track shorter than twice this is one stretch.
    variance : float
        Per-frame variance of the expected height, atoms² (``"mean_shift"``).
    ring_weight : float
        Weight of the ring counts' Poisson log-likelihood (0: the model's readings alone;
        :func:`ring_dispersion` tells how much less than 1 it should be).

    Returns
    -------
    list of (start, stop)
        Unit ranges ``[start, stop)`` of the stretches, in order, covering all units.
    """
    return segment_tracks([units], kind=kind, temper=temper, penalty=penalty,
                          min_stretch=min_stretch, variances=[variance],
                          ring_weight=ring_weight)[0]


BATCH_VALUES = 2**16
"""Most gains of one step of a batch of tracks (:func:`segment_tracks`; 0.5 MB)."""


def segment_tracks(tracks: list[dict], *, kind: str = "mean_shift", temper: float = 0.3,
                   penalty: float = 4.0, min_stretch: int = 3, variances=None,
                   ring_weight=0.0) -> list[list[tuple[int, int]]]:
    """:func:`segment` of several tracks at once (the same stretches, in batches of tracks of
    similar length: one pass of the optimal partitioning for all of them).

    Parameters
    ----------
    tracks : list of dict of arrays
        Each track's units, as :func:`segment` takes them.
    kind, temper, penalty, min_stretch
        As :func:`segment`.
    ring_weight : float or sequence of float
        As :func:`segment`, or one per track; used only where every track has ``rings``.
    variances : sequence of float, optional
        Each track's per-frame variance of the expected height, atoms² (default 1).

    Returns
    -------
    list of list of (start, stop)
        Each track's stretches, as :func:`segment` returns them.
    """
    variances = [1.0] * len(tracks) if variances is None else list(variances)
    weights = np.broadcast_to(np.asarray(ring_weight, np.float64), (len(tracks),))
    if not all("rings" in units for units in tracks) or not (weights > 0).any():
        weights = np.zeros(len(tracks))
    sizes = [len(u["n"]) for u in tracks]
    out: list = [[] for _ in tracks]
    order = [t for t in sorted(range(len(tracks)), key=sizes.__getitem__) if sizes[t]]
    per_value = int(np.shape(tracks[order[0]]["sum"])[-1]) if order and kind == "classes" else 1
    while order:  # the longest tracks first: a batch as large as BATCH_VALUES allows
        n = sizes[order[-1]] + 1
        take = max(1, min(len(order), BATCH_VALUES // (n * per_value)))
        batch, order = order[-take:], order[:-take]
        parts = _segment_batch([tracks[t] for t in batch], [sizes[t] for t in batch],
                               np.array([variances[t] for t in batch], np.float64),
                               kind=kind, temper=temper, penalty=penalty, min_stretch=min_stretch,
                               ring_weight=weights[batch])
        for t, p in zip(batch, parts):
            out[t] = p
    return out


def _segment_batch(tracks: list[dict], sizes: list[int], variance: np.ndarray, *, kind: str,
                   temper: float, penalty: float, min_stretch: int, ring_weight: np.ndarray
                   ) -> list:
    """The optimal partitioning of a batch of tracks (one row each), a unit ``j`` at a time."""
    n_max, n_tracks = max(sizes), len(tracks)
    row = np.repeat(np.arange(n_tracks), sizes)  # each unit's track and place in it
    place = np.arange(len(row)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    c = {}
    keys = (("s1", "s2", "n") + (("sum",) if kind == "classes" else ())
            + (("rings", "ni") if (ring_weight > 0).any() else ()))  # what the gains use
    for key in keys:  # cumulative sums, the last repeated past the end
        flat = np.concatenate([np.asarray(units[key], np.float64) for units in tracks])
        padded = np.zeros((n_tracks, n_max, *flat.shape[1:]))
        padded[row, place] = flat
        c[key] = np.zeros((n_tracks, n_max + 1, *flat.shape[1:]))
        np.cumsum(padded, axis=1, out=c[key][:, 1:])
    cost = penalty * (np.arange(n_max + 1) > 0)
    variance = variance[:, None]
    best = np.full((n_tracks, n_max + 1), -np.inf)
    best[:, 0] = 0.0
    back = np.zeros((n_tracks, n_max + 1), np.int64)
    rows = np.arange(n_tracks)
    for j in range(1, n_max + 1):  # units i … j−1 as one stretch, for every start i < j
        n = c["n"][:, j:j + 1] - c["n"][:, :j]
        with np.errstate(invalid="ignore", divide="ignore"):  # past a track's end: not read
            gain = stretch_gains(kind, n, c["s1"][:, j:j + 1] - c["s1"][:, :j],
                                 c["s2"][:, j:j + 1] - c["s2"][:, :j],
                                 c["sum"][:, j:j + 1] - c["sum"][:, :j] if kind == "classes"
                                 else None, temper=temper, variance=variance,
                                 rings=c["rings"][:, j:j + 1] - c["rings"][:, :j]
                                 if "rings" in c else None,
                                 ring_frames=c["ni"][:, j:j + 1] - c["ni"][:, :j]
                                 if "rings" in c else None, ring_weight=ring_weight[:, None])
        gain[n < min_stretch] = -np.inf
        score = best[:, :j] + gain - cost[:j]
        k = np.argmax(score, axis=1)
        value = score[rows, k]
        found = np.isfinite(value)
        best[:, j] = np.where(found, value, -np.inf)
        back[:, j] = np.where(found, k, 0)
    out = []
    for t, n_units in enumerate(sizes):
        if not np.isfinite(best[t, n_units]):  # too short to split: one stretch
            out.append([(0, n_units)])
            continue
        cuts, j = [], n_units
        while j > 0:
            cuts.append((int(back[t, j]), j))
            j = int(back[t, j])
        out.append(cuts[::-1])
    return out


def settle_parts(units: list, parts: list, final: bool, window: int, fold) -> tuple[list, list]:
    """One track's (or site's) ``units`` split into ``parts`` (:func:`segment_tracks`): the
    settled stretches, each ``fold(a, b)`` of its units ``a … b − 1`` (all of them with
    ``final``, else all but the last), and the units left open (none with ``final``; else the
    last stretch's, those older than ``window // 2`` folded into one)."""
    done = [fold(a, b) for a, b in (parts if final else parts[:-1])]
    if final:
        return done, []
    a, b = parts[-1]
    cut = max(0, b - a - window // 2)
    return done, ([fold(a, a + cut)] + units[a + cut:b]) if cut >= 2 else units[a:b]


def change_statistic(kind: str, before: dict, after: dict, *, temper: float, variance: float,
                     ring_weight: float = 0.0) -> float:
    """Log-likelihood ratio, nats, of two stretches against one (``before``/``after``: ``sum``
    (K,), ``s1``, ``s2``, ``n`` and, optionally, ``rings``, ``ni``, as :func:`segment`'s units
    summed), the ring counts' share weighted by ``ring_weight``."""
    return (ring_statistic(before, after, ring_weight)
            + _model_statistic(kind, before, after, temper=temper, variance=variance))


def ring_statistic(before: dict, after: dict, ring_weight: float) -> float:
    """:func:`change_statistic`'s share from the ring counts (nats, weighted; 0 without)."""
    if ring_weight <= 0 or "rings" not in before or "rings" not in after:
        return 0.0
    a, b = np.asarray(before["rings"], np.float64), np.asarray(after["rings"], np.float64)
    na, nb = float(before["ni"]), float(after["ni"])
    return ring_weight * float(ring_gain(a, na) + ring_gain(b, nb) - ring_gain(a + b, na + nb))


def _model_statistic(kind: str, before: dict, after: dict, *, temper: float, variance: float
                     ) -> float:
    """:func:`change_statistic`'s share from the model's readings."""
    if kind == "classes":
        a, b = np.asarray(before["sum"]), np.asarray(after["sum"])
        return float(temper * (a.max() + b.max() - (a + b).max()))
    na, nb = before["n"], after["n"]
    shift = after["s1"] / nb - before["s1"] / na
    llr = na * nb / (na + nb) * shift**2 / (2 * variance)
    if kind == "bayes":  # log Bayes factor: each stretch's mean integrated out
        r = PRIOR_SHIFT_ATOMS**2 / variance
        llr += 0.5 * (np.log1p((na + nb) * r) - np.log1p(na * r) - np.log1p(nb * r))
    return float(llr)


def change_probability(statistic: float, penalty: float, scale: float = 1.0,
                       offset: float = 0.0) -> float:
    """``σ(scale · (statistic − penalty) + offset)``: the probability that a change is real
    (with ``offset`` 0, a change the partition keeps has p > 0.5)."""
    return float(1.0 / (1.0 + np.exp(-(scale * (statistic - penalty) + offset))))


def assign_heights(sums: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """The heights of a track's stretches, read together (Viterbi over heights).

    Maximises ``Σ_k sums[k, h_k]`` subject to ``sign(h_{k+1} − h_k) = directions[k]`` for a
    direction ±1 (0: no constraint).

    Parameters
    ----------
    sums : (S, K) float
        Each stretch's summed class log-probabilities (any positive weight).
    directions : (S − 1,) int
        Sign of each change (that of the shift of the mean expected height).

    Returns
    -------
    (S,) int
        Class index (height − 1) of each stretch.
    """
    sums = np.asarray(sums, np.float64)
    s, k = sums.shape
    score = sums[0].copy()
    back = np.zeros((s, k), np.int64)
    h = np.arange(k)
    for t in range(1, s):
        d = int(directions[t - 1])
        allowed = np.ones((k, k), bool) if d == 0 else (np.sign(h[None, :] - h[:, None]) == d)
        cand = np.where(allowed, score[:, None], -np.inf)       # (previous, next)
        if not np.isfinite(cand).any(axis=0).any():
            cand = np.broadcast_to(score[:, None], (k, k)).copy()
        back[t] = np.argmax(cand, axis=0)
        best_prev = cand[back[t], h]
        score = np.where(np.isfinite(best_prev), best_prev, -1e300) + sums[t]
    out = np.zeros(s, np.int64)
    out[-1] = int(np.argmax(score))
    for t in range(s - 1, 0, -1):
        out[t - 1] = back[t, out[t]]
    return out


def posterior_at(total: np.ndarray, index: int, confidence_temper: float) -> float:
    """``softmax(confidence_temper · total)[index]``: a stretch's confidence in its height."""
    z = confidence_temper * np.asarray(total, np.float64)
    z = np.exp(z - z.max())
    return float(z[index] / z.sum())


def platt(probability: float, slope: float, intercept: float) -> float:
    """``σ(slope · logit(p) + intercept)``, ``p`` clipped to [1e-6, 1 − 1e-6]."""
    p = min(max(float(probability), 1e-6), 1 - 1e-6)
    return float(1.0 / (1.0 + np.exp(-(slope * np.log(p / (1 - p)) + intercept))))
