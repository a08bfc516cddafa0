"""Calibration of the column ``confidence``: a Platt scaling per dose, fitted on validation data.

The raw confidence of a column (:func:`ceriakeras.columns.find_columns`: the reported height's
share of the probability mass in the column's disk) is not the probability that the height is
right. :func:`fit_confidence_calibration` measures, at each of
:data:`CALIBRATION_DOSES_E_PER_A2`, how often columns of a given confidence are right on noisy
copies of a simulated split (:func:`ceriakeras.scoring.noisy_predictions`, the validation split,
never the test split) and fits :func:`fit_platt`; ``ceriakeras export --calibrate`` stores the
table in the model's ``assets/ceriakeras.json``. Applying it to a frame of a given dose is
:func:`ceriakeras.columns.calibrate_confidence` (re-exported here), which ``find_columns`` calls.

Imports only the modules below it (``config``, ``modelinfo``, ``columns``, ``scoring``), so
``export``, ``evaluate`` and ``analyze`` can all use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import optimize

from .columns import calibrate_confidence, find_columns
from .config import AnalyzeConfig
from .modelinfo import model_settings
from .scoring import MATCH_DISTANCE_A, Tally, calibration, check_doses, noisy_predictions

CALIBRATION_DOSES_E_PER_A2 = (20.0, 50.0, 200.0, 1000.0, 5000.0, 20000.0)
"""Doses at which the confidence calibration is fitted (the training envelope's ends), e⁻/Å²."""


def fit_platt(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``(slope, intercept)`` of ``P(right) = σ(slope · logit(c) + intercept)``.

    Fitted by maximum likelihood, with a weak pull towards the identity ``(1, 0)`` so that a
    handful of columns, or all of them right, still give finite numbers.
    """
    from scipy.special import expit

    c = np.clip(np.asarray(confidence, np.float64), 1e-4, 1 - 1e-4)
    y = np.asarray(correct, np.float64)
    z = np.log(c / (1 - c))

    def loss(params):
        a, b = params
        q = np.clip(expit(a * z + b), 1e-12, 1 - 1e-12)
        nll = -np.sum(y * np.log(q) + (1 - y) * np.log(1 - q))
        return nll + 1e-2 * ((a - 1) ** 2 + b**2)

    best = optimize.minimize(loss, x0=[1.0, 0.0], method="Nelder-Mead",
                             options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
    return float(best.x[0]), float(best.x[1])


def fit_confidence_calibration(
    predict,
    data_dir: str | Path,
    info: dict,
    *,
    doses: Sequence[float] = CALIBRATION_DOSES_E_PER_A2,
    split: str = "validation",
    max_images: int = 48,
    seed: int = 1,
    config: AnalyzeConfig | None = None,
    progress: bool = True,
    desc: str = "calibrate",
) -> dict:
    """Fit, at each dose, the Platt scaling that makes the column ``confidence`` calibrated.

    The raw confidence (the reported height's share of the probability mass in the column's
    disk) is not a probability of being right: at high dose the disk's pixels split their mass
    between neighbouring heights although the column is nearly always right (under-confident),
    at 20 e⁻/Å² the reverse. The same procedure as :func:`ceriakeras.evaluate.evaluate` (noise
    at fixed seeds, columns as ``analyze`` finds them, Hungarian matching; a spurious column
    counts as wrong), on another split (validation, not test) and noise seed, gives
    ``(slope, intercept)`` per dose for :func:`ceriakeras.columns.calibrate_confidence`.

    Parameters
    ----------
    predict : callable
        ``predict(images (B, H, W) float32 counts) -> (probabilities (B, H, W, C), height)``.
    data_dir : path
        Dataset folder at the model's pixel size.
    info : dict
        ``pixel_size_A``, ``max_height``, ``label_radius_A`` of the model.
    doses : sequence of float
        Doses, e⁻/Å², at which to fit (interpolated in log dose in between).
    split, max_images, seed : str, int, int
        Which records and noise.

    Returns
    -------
    dict
        ``dose_e_per_A2``, ``slope``, ``intercept`` (one per dose), ``ece_before`` and
        ``ece_after`` (on the fitted columns themselves), ``split``, ``n_images``,
        ``n_columns`` (true Ce columns), ``seed``, ``data_dir``.
    """
    doses = check_doses(doses)
    config = config or AnalyzeConfig()
    pixel_size_A, max_height, label_radius_A = model_settings(info)
    tallies = {d: Tally() for d in doses}
    n_images = n_columns = 0
    for _, true_columns, _, probabilities in noisy_predictions(
            predict, data_dir, split, doses, pixel_size_A, seed=seed, max_images=max_images,
            progress=progress, desc=desc):
        for k, d in enumerate(doses):
            found = find_columns(probabilities[k], pixel_size_A, min_distance_A=config.min_distance_A,
                                 threshold=config.threshold, label_radius_A=label_radius_A)
            tallies[d].add(found, true_columns, pixel_size_A, MATCH_DISTANCE_A)
        n_images += 1
        n_columns += len(true_columns)
    slopes, intercepts, before, after = [], [], [], []
    for d in doses:
        conf = np.concatenate(tallies[d].confidence)
        right = np.concatenate(tallies[d].correct)
        a, b = fit_platt(conf, right)
        slopes.append(a)
        intercepts.append(b)
        before.append(calibration(conf, right)["ece"])
        table = {"dose_e_per_A2": [d], "slope": [a], "intercept": [b]}
        after.append(calibration(calibrate_confidence(conf, d, table), right)["ece"])
    return {"dose_e_per_A2": list(doses), "slope": slopes, "intercept": intercepts,
            "ece_before": before, "ece_after": after, "split": split, "n_images": n_images,
            "n_columns": n_columns, "seed": seed, "data_dir": str(data_dir)}
