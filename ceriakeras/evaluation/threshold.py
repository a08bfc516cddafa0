"""How the column threshold trades missed columns against false ones, on our own simulated data.

``find_columns`` keeps a peak of the column probability ``1 − p(background)`` only above a
threshold; :func:`threshold_table` scores the column finder at several thresholds on the same
noisy probability maps (noise as ``ceriakeras evaluate`` adds it). The threshold chosen from it
(``scripts/studies/threshold_study.py`` prints the table) is recorded in the model with
``ceriakeras export --column-threshold``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import AnalyzeConfig
from ..inference.columns import find_columns
from ..inference.served import model_settings
from .scoring import MATCH_DISTANCE_A, Tally, noisy_predictions


def threshold_table(model, data_dirs, doses, thresholds, *, split="validation", max_images=None,
                    seed=0, min_distance_A=None, progress=True) -> dict:
    """Scores of the column finder at each threshold and dose over the records of ``data_dirs``.

    Parameters
    ----------
    model : object with ``.info`` and ``.predict``
        As for :func:`ceriakeras.evaluation.evaluate.evaluate`.
    data_dirs : sequence of path
        Dataset folders at the model's pixel size.
    doses : sequence of float
        Doses, e⁻/Å².
    thresholds : sequence of float
        Column thresholds to try, each in (0, 1).
    split, max_images, seed
        Which records (at most ``max_images`` per folder) and the noise seed.
    min_distance_A : float, optional
        Smallest distance between columns, Å (default: ``analyze``'s,
        :class:`ceriakeras.config.AnalyzeConfig`).

    Returns
    -------
    dict
        ``{dose: {threshold: metrics}}`` with the metrics of :meth:`ceriakeras.evaluation.scoring.Tally.metrics`.
    """
    pixel_size_A, max_height, label_radius_A = model_settings(model.info)
    if min_distance_A is None:
        min_distance_A = AnalyzeConfig().min_distance_A
    tallies = {d: {t: Tally() for t in thresholds} for d in doses}
    for data_dir in data_dirs:
        for _, true_columns, _, probabilities in noisy_predictions(
                model.predict, data_dir, split, doses, pixel_size_A, seed=seed,
                max_images=max_images, progress=progress, desc=Path(data_dir).name):
            for k, d in enumerate(doses):
                for t in thresholds:
                    found = find_columns(probabilities[k], pixel_size_A,
                                         min_distance_A=min_distance_A, threshold=t,
                                         label_radius_A=label_radius_A)
                    tallies[d][t].add(found, true_columns, pixel_size_A, MATCH_DISTANCE_A)
    return {d: {t: tallies[d][t].metrics(max_height) for t in thresholds} for d in doses}
