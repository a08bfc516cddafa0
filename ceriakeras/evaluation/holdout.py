"""Held-out scores of a confidence calibration: ECE over matched columns, and how it scatters.

Used to choose a calibration recipe on our own held-out simulated data
(``scripts/studies/calibration_holdout.py``): :func:`pooled` joins datasets' columns
(:func:`ceriakeras.evaluation.calibration.collect_columns`), :func:`score` gives the ECE of a
calibration table over the matched columns at one dose (as the cross-check set's ``score.py``
counts it), :func:`subset_ece` how much it scatters over small sets of frames.
"""

from __future__ import annotations

import numpy as np

from ..inference.columns import calibrate_confidence
from .scoring import calibration


def pooled(sets: list[dict]) -> dict:
    """The sets' columns concatenated per dose, ``dataset`` renumbered per set."""
    out = {}
    for d in sets[0]:
        keys = set.intersection(*(set(s[d]) for s in sets)) - {"dataset"}
        out[d] = {k: np.concatenate([s[d][k] for s in sets]) for k in keys}
        out[d]["dataset"] = np.concatenate([np.full(len(s[d]["height"]), i, np.int32)
                                            for i, s in enumerate(sets)])
    return out


def matched(columns: dict, table: dict, dose: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The matched columns at one dose (as ``score.py`` counts them): their confidence mapped
    by ``table``, whether each is right, and the boolean mask that picked them."""
    c = columns[dose]
    keep = c["matched"].astype(bool)
    conf = calibrate_confidence(c["confidence"][keep], dose, table, height=c["height"][keep],
                                height_std=c["height_std"][keep])
    return conf, c["correct"][keep].astype(bool), keep


def score(columns: dict, table: dict, dose: float) -> tuple[float, float]:
    """(ECE, mean confidence − fraction right) over the matched columns at one dose."""
    conf, right, _ = matched(columns, table, dose)
    return calibration(conf, right)["ece"], float(conf.mean() - right.mean())


def subset_ece(columns: dict, table: dict, dose: float, frames: int, per_particle: int = 1,
               draws: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ECE over the matched columns of ``draws`` random sets of ``frames`` images at one dose,
    each image of another particle (images ``per_particle`` at a time share one particle, as
    ``simulate`` stores them): how much the ECE of a small labelled set scatters by which
    frames it holds. Also the ECE of the same draws with every column's rightness redrawn as
    a coin of its calibrated confidence: the floor a perfectly calibrated map would show."""
    conf, right, keep = matched(columns, table, dose)
    image = columns[dose]["image"][keep].astype(np.int64)
    particle = image // per_particle
    particles = np.unique(particle)
    rng = np.random.default_rng(seed)
    out, floor = np.empty(draws), np.empty(draws)
    for k in range(draws):
        chosen = rng.choice(particles, size=min(frames, len(particles)), replace=False)
        images = [rng.choice(np.unique(image[particle == q])) for q in chosen]
        pick = np.isin(image, images)
        out[k] = calibration(conf[pick], right[pick])["ece"]
        floor[k] = calibration(conf[pick], rng.random(pick.sum()) < conf[pick])["ece"]
    return out, floor
