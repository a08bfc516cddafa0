"""Columns against the truth: matching, scores, noisy copies of a simulated split with the model's answer.

The common ground of :mod:`ceriakeras.evaluation.evaluate` (how far to trust a model) and
:mod:`ceriakeras.evaluation.calibration` (what its ``confidence`` means), so neither needs the other:
:func:`match_columns` pairs predicted with true columns one to one (Hungarian matching within a
distance), :func:`detection_scores`, :func:`height_scores` and :func:`calibration` (reliability
and ECE) score them, :class:`Tally` accumulates them over images, and
:func:`noisy_predictions` gives a split's noise-free images with Poisson noise at fixed seeds
(:func:`noise_seed`) and the model's probabilities for them. Functions on arrays; the records
are read lazily (TensorFlow is imported only when a split is read, SciPy when columns are matched).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..config import ConfigError, DataError

MATCH_DISTANCE_A = 1.0
"""Largest distance between a predicted and a true column that still counts as a detection, Å."""
CALIBRATION_BINS = 10
"""Equal-width confidence bins of the reliability diagram and the expected calibration error."""


# --- matching ----------------------------------------------------------------------------------
def match_columns(
    pred_xy: np.ndarray, true_xy: np.ndarray, max_distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Match predicted columns one to one to true columns (Hungarian matching).

    Among all one-to-one assignments that pair columns closer than ``max_distance``, the one
    with the most pairs is chosen, and among those the one with the smallest total distance.

    Parameters
    ----------
    pred_xy : (N, 2) array
        Predicted column positions (x, y), any length unit.
    true_xy : (M, 2) array
        True column positions, same unit.
    max_distance : float
        Largest distance of a matched pair, same unit (inclusive).

    Returns
    -------
    pred_idx, true_idx : (K,) int arrays
        Indices of the matched pairs, sorted by ``pred_idx``. Columns not listed are unmatched
        (false detections among the predictions, misses among the true columns).
    """
    from scipy import optimize, spatial

    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    if not max_distance > 0:
        raise ConfigError(f"max_distance={max_distance} must be positive")
    empty = np.zeros(0, dtype=np.int64)
    if len(pred_xy) == 0 or len(true_xy) == 0:
        return empty, empty
    dist = spatial.distance.cdist(pred_xy, true_xy)
    allowed = dist <= max_distance
    # A forbidden pair costs more than any set of allowed pairs together, so the assignment
    # first maximizes the number of allowed pairs, then minimizes their total distance.
    forbidden_cost = max_distance * (min(dist.shape) + 1)
    cost = np.where(allowed, dist, forbidden_cost)
    rows, cols = optimize.linear_sum_assignment(cost)
    keep = allowed[rows, cols]
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


# --- metrics -----------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def detection_scores(n_matched: int, n_pred: int, n_true: int) -> dict:
    """Column detection precision, recall and F1 from counts.

    A ratio whose denominator is zero is 0 (no predictions → precision 0).
    """
    precision = _ratio(n_matched, n_pred)
    recall = _ratio(n_matched, n_true)
    f1 = _ratio(2 * n_matched, n_pred + n_true)
    return {"precision": precision, "recall": recall, "f1": f1,
            "n_pred": int(n_pred), "n_true": int(n_true), "n_matched": int(n_matched)}


def height_scores(
    true_height: np.ndarray,
    pred_height: np.ndarray,
    max_height: int,
    *,
    missed_height: np.ndarray | None = None,
    spurious_height: np.ndarray | None = None,
) -> dict:
    """Height accuracy on matched columns, accuracy per true height, and the confusion matrix.

    Parameters
    ----------
    true_height, pred_height : (K,) int arrays
        Heights (Ce atoms) of the matched pairs.
    max_height : int
        Largest height class; the confusion matrix is ``(max_height + 1) × (max_height + 1)``.
    missed_height : (A,) int array, optional
        Heights of true columns no prediction matched (row ``h``, column 0 of the matrix).
    spurious_height : (B,) int array, optional
        Heights of predicted columns that matched no true column (row 0, column ``h``).

    Returns
    -------
    dict
        ``exact_accuracy``, ``within_1_accuracy``, ``mae`` (atoms) and ``bias_atoms`` (mean
        predicted − true height, atoms) over the matched pairs;
        ``per_height``: {h: {"accuracy", "count"}} for every true height present;
        ``confusion``: nested list, rows = true height, columns = predicted height, where
        height 0 stands for "no column" (misses in column 0, spurious detections in row 0).
    """
    t = np.asarray(true_height, dtype=np.int64).ravel()
    p = np.asarray(pred_height, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true_height {t.shape} and pred_height {p.shape} differ in length")
    err = np.abs(p - t)
    n = len(t)
    per_height = {
        int(h): {"accuracy": float(np.mean(p[t == h] == h)), "count": int(np.sum(t == h))}
        for h in np.unique(t)
    }
    size = max_height + 1
    confusion = np.zeros((size, size), dtype=np.int64)
    for truth, pred in ((t, p),
                        (_as_int(missed_height), None),
                        (None, _as_int(spurious_height))):
        if truth is None:
            truth = np.zeros_like(pred)
        if pred is None:
            pred = np.zeros_like(truth)
        np.add.at(confusion, (np.clip(truth, 0, max_height), np.clip(pred, 0, max_height)), 1)
    return {
        "exact_accuracy": _ratio(np.sum(err == 0), n),
        "within_1_accuracy": _ratio(np.sum(err <= 1), n),
        "mae": float(np.mean(err)) if n else 0.0,
        "bias_atoms": float(np.mean(p - t)) if n else 0.0,
        "per_height": per_height,
        "confusion": confusion.tolist(),
    }


def _as_int(values: np.ndarray | None) -> np.ndarray:
    return np.zeros(0, dtype=np.int64) if values is None else np.asarray(values, np.int64).ravel()


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability diagram and expected calibration error (ECE) of a confidence score.

    Parameters
    ----------
    confidence : (K,) float array in [0, 1]
        Stated probability that each prediction is right.
    correct : (K,) bool array
        Whether each prediction is right.
    bins : int
        Number of equal-width bins on [0, 1].

    Returns
    -------
    dict
        ``ece`` = Σ_b (n_b / K) · |accuracy_b − mean confidence_b|; ``bin_edges`` (bins + 1),
        and per bin ``count``, ``mean_confidence`` and ``accuracy`` (None for empty bins).
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError(f"confidence {conf.shape} and correct {ok.shape} differ in length")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    sum_conf = np.bincount(which, weights=conf, minlength=bins)
    sum_ok = np.bincount(which, weights=ok.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = sum_conf / count
        accuracy = sum_ok / count
    n = len(conf)
    ece = float(np.sum(np.abs(sum_ok - sum_conf)) / n) if n else 0.0
    return {
        "ece": ece,
        "bin_edges": edges.tolist(),
        "count": count.tolist(),
        "mean_confidence": [None if c == 0 else float(v) for c, v in zip(count, mean_conf)],
        "accuracy": [None if c == 0 else float(v) for c, v in zip(count, accuracy)],
    }


ECE_SPREAD_DRAWS = 1000
"""Resamples behind :func:`ece_spread`."""


def ece_spread(confidence: Sequence[np.ndarray], correct: Sequence[np.ndarray], *,
               draws: int = ECE_SPREAD_DRAWS, seed: int = 0,
               bins: int = CALIBRATION_BINS) -> dict:
    """How far the ECE of a small labelled set is from the calibration it measures.

    The ECE of a few hundred columns is not zero even for a perfectly calibrated confidence
    (each bin's fraction right is a binomial draw), and columns of one image are right or wrong
    together (its optics, its particle), so a set of a dozen images scatters much more than its
    column count suggests. The two figures returned put a measured ECE in proportion.

    Parameters
    ----------
    confidence, correct : sequences of arrays
        Per image, the columns' stated confidence and whether each is right.
    draws, seed, bins
        Resamples, their random seed, and the ECE's bins.

    Returns
    -------
    dict
        ``ece_interval_90``: the 5th and 95th percentiles of the ECE over the images resampled
        with replacement (bootstrap over images: how much the figure would move on another set
        of as many images like these); ``ece_if_calibrated``: the median ECE of these very
        columns if each were right with exactly its stated probability (the floor a perfectly
        calibrated confidence would show on them); ``draws``.
    """
    conf = [np.asarray(c, np.float64).ravel() for c in confidence]
    right = [np.asarray(r, bool).ravel() for r in correct]
    if not conf or sum(len(c) for c in conf) == 0:
        return {"ece_interval_90": None, "ece_if_calibrated": None, "draws": 0}
    rng = np.random.default_rng(seed)
    all_conf = np.concatenate(conf)
    boot, floor = np.empty(draws), np.empty(draws)
    for k in range(draws):
        pick = rng.integers(0, len(conf), len(conf))
        c, r = np.concatenate([conf[i] for i in pick]), np.concatenate([right[i] for i in pick])
        boot[k] = calibration(c, r, bins)["ece"]
        floor[k] = calibration(all_conf, rng.random(len(all_conf)) < all_conf, bins)["ece"]
    return {"ece_interval_90": [float(np.quantile(boot, 0.05)), float(np.quantile(boot, 0.95))],
            "ece_if_calibrated": float(np.median(floor)), "draws": int(draws)}


@dataclass
class Tally:
    """Everything one method's column tables and the true columns give at one dose, accumulated
    over images, from which :meth:`metrics` computes the scores."""

    true_height: list = field(default_factory=list)
    pred_height: list = field(default_factory=list)
    confidence: list = field(default_factory=list)
    correct: list = field(default_factory=list)
    missed: list = field(default_factory=list)
    spurious: list = field(default_factory=list)
    matched: list = field(default_factory=list)
    """Per image, (N,) bool: which reported columns matched a true one (beside ``confidence``)."""
    n_pred: int = 0
    n_true: int = 0

    def add(self, pred: dict, true_columns: np.ndarray, pixel_size_A: float,
            max_distance_A: float) -> None:
        """Match one image's predicted columns to its true ones and record the outcome.

        Parameters
        ----------
        pred : dict of arrays
            ``x_px``, ``y_px``, ``height`` and optionally ``confidence``.
        true_columns : (M, 3) array
            ``x_px, y_px, height`` of the true columns.
        """
        pred_xy = np.stack([pred["x_px"], pred["y_px"]], axis=-1) * pixel_size_A
        true_xy = true_columns[:, :2] * pixel_size_A
        pi, ti = match_columns(pred_xy, true_xy, max_distance_A)
        ph = np.asarray(pred["height"], dtype=np.int64)
        th = np.rint(true_columns[:, 2]).astype(np.int64)
        self.true_height.append(th[ti])
        self.pred_height.append(ph[pi])
        self.missed.append(np.delete(th, ti))
        self.spurious.append(np.delete(ph, pi))
        self.n_pred += len(ph)
        self.n_true += len(th)
        if "confidence" in pred:
            right = np.zeros(len(ph), dtype=bool)
            right[pi] = ph[pi] == th[ti]
            self.confidence.append(np.asarray(pred["confidence"], dtype=np.float64))
            self.correct.append(right)
            found = np.zeros(len(ph), dtype=bool)
            found[pi] = True
            self.matched.append(found)

    def metrics(self, max_height: int) -> dict:
        """Detection, height and (where confidences were given) calibration scores."""
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
        t, p = cat(self.true_height), cat(self.pred_height)
        out = detection_scores(len(t), self.n_pred, self.n_true)
        out.update(height_scores(t, p, max_height, missed_height=cat(self.missed),
                                 spurious_height=cat(self.spurious)))
        if self.confidence:
            # Every reported column counts: a spurious one is a wrong height with its confidence.
            out["calibration"] = calibration(cat(self.confidence), cat(self.correct))
            out["ece"] = out["calibration"]["ece"]
        return out


# --- noisy copies of a split and the model's answer -------------------------------------------
def noise_seed(seed: int, record_index: int, dose_e_per_A2: float) -> np.ndarray:
    """The stateless seed pair of the noise on one record at one dose.

    It depends only on ``(seed, record_index, dose)``, so a record gets the same noisy image at
    a given dose whatever other doses or how many images are evaluated.
    """
    key = [int(seed), int(record_index), int(round(dose_e_per_A2 * 1000))]
    return np.random.SeedSequence(key).generate_state(2, dtype=np.uint32).astype(np.int64) % (2**31 - 1)


def check_doses(doses: Iterable[float]) -> tuple[float, ...]:
    """The doses as floats, refused unless there is at least one and all are positive and finite."""
    out = tuple(float(d) for d in doses)
    if not out:
        raise ConfigError("no dose given: pass at least one dose in e-/Å², e.g. --doses 50,200,1000")
    for d in out:
        if not (math.isfinite(d) and d > 0):
            raise ConfigError(f"dose {d:g} e-/Å² must be a positive number")
    return out


def split_records(data_dir: str | Path, split: str, max_images: int | None) -> Iterator[dict]:
    """The split's records in file order as dicts of NumPy values (at most ``max_images``)."""
    from ..data.records import iter_shard, shard_paths

    n = 0
    for path in shard_paths(data_dir, split):
        for rec in iter_shard(path):
            if max_images is not None and n >= max_images:
                return
            n += 1
            yield rec


def noisy_predictions(predict, data_dir: str | Path, split: str, doses: Sequence[float],
                      pixel_size_A: float, *, seed: int = 0, max_images: int | None = None,
                      progress: bool = True, desc: str = "evaluate") -> Iterator[tuple]:
    """The split's records with Poisson noise at each dose and the model's answer to them.

    Parameters
    ----------
    predict : callable
        ``predict(images (B, H, W) float32 counts) -> (probabilities (B, H, W, C), height)``.
    data_dir : path
        Dataset folder; its pixel size must be ``pixel_size_A``.
    split, doses, pixel_size_A, seed, max_images
        Which records, doses (e⁻/Å²), the model's pixel size (Å), the noise seed (see
        :func:`noise_seed`) and at most how many records.

    Yields
    ------
    image : (H, W) float32
        The noise-free image (relative intensity, vacuum 1).
    true_columns : (M, 3) float64
        ``x_px, y_px, height``.
    noisy : (D, H, W) float32
        Counts at each dose.
    probabilities : (D, H, W, C) array

    Raises
    ------
    DataError
        The dataset's pixel size differs from the model's, or the split is empty.
    """
    from ..noise import counts_per_pixel, poisson_sample
    from ..data.records import read_manifest

    manifest = read_manifest(data_dir)
    data_px = float(manifest.get("pixel_size_A", pixel_size_A))
    if not math.isclose(data_px, pixel_size_A, rel_tol=1e-4):
        raise DataError(
            f"{data_dir} has {data_px:g} Å pixels but the model works at {pixel_size_A:g} Å: "
            "simulate the test data at the model's pixel size (--pixel-size of `ceriakeras simulate`)"
        )
    available = int(manifest["counts"].get(split, 0))
    records = split_records(data_dir, split, max_images)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, total=min(available, max_images or available), desc=desc,
                       unit="image", file=sys.stderr, dynamic_ncols=True)
    n_images = 0
    for index, rec in enumerate(records):
        image = np.asarray(rec["image"], np.float32)
        true_columns = np.asarray(rec["columns"], np.float64).reshape(-1, 3)
        noisy = np.stack([
            np.asarray(poisson_sample(image * counts_per_pixel(d, pixel_size_A), noise_seed(seed, index, d)))
            for d in doses
        ]).astype(np.float32)
        probabilities, _ = predict(noisy)
        n_images += 1
        yield image, true_columns, noisy, np.asarray(probabilities)
    if n_images == 0:
        raise DataError(f"the {split} split of {data_dir} is empty: simulate more particles")
