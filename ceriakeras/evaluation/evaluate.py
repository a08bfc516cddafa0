"""How far to trust a model: noise at fixed doses → the analyze column code → matching, metrics, plots, baseline.

The test split's noise-free images are given Poisson noise at each dose (fixed seeds, so every
run sees the same noisy images), passed through the model, and turned into columns by
:func:`ceriakeras.inference.columns.find_columns` exactly as ``ceriakeras analyze`` does. Predicted columns
are matched one to one to the true columns (Hungarian matching within 1 Å); the metrics are
computed on those matches. A classical baseline (peak finding and an intensity-to-height table
built at the true optics) is scored the same way, so the report shows what the network buys.

Matching and scores (:func:`~ceriakeras.evaluation.scoring.match_columns`, :class:`~ceriakeras.evaluation.scoring.Tally`,
…) and the noisy copies of a split live in :mod:`ceriakeras.evaluation.scoring`, shared with the confidence
calibration (:mod:`ceriakeras.evaluation.calibration`); the baseline in
:mod:`ceriakeras.evaluation.baseline`, the tables, report and plots in
:mod:`ceriakeras.evaluation.report`, labelled image files (``--images``) in
:mod:`ceriakeras.evaluation.truth` and :mod:`ceriakeras.evaluation.labelled`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..config import AnalyzeConfig, ConfigError, to_dict
from ..inference.columns import find_columns
from ..inference.served import DihedralAveraged, model_settings, with_model_threshold
from ..io.files import write_text_atomic
from ..noise import estimate_dose
from .baseline import baseline_columns, disk_sums  # noqa: F401
from .labelled import evaluate_images  # noqa: F401
from .report import format_images_table, format_report, format_table, write_plots  # noqa: F401
from .scoring import MATCH_DISTANCE_A, Tally, check_doses, noisy_predictions
from .truth import labelled_image_plan, read_image_table, read_truth  # noqa: F401

DEFAULT_DOSES_E_PER_A2 = (20.0, 50.0, 200.0, 1000.0, 5000.0)
"""Doses evaluated by default, e⁻/Å² per image."""


def evaluate(model: Any, data_dir: str | Path, out_dir: str | Path, *,
             doses: Sequence[float] = DEFAULT_DOSES_E_PER_A2, split: str = "test", seed: int = 0,
             max_images: int | None = None, baseline: bool = True, progress: bool = True,
             config: AnalyzeConfig | None = None, max_distance_A: float = MATCH_DISTANCE_A,
             overwrite: bool = False, command: str = "") -> dict:
    """Score a model's column heights on a dataset split at fixed doses; write metrics, plots, report.

    Parameters
    ----------
    model : object with ``.info`` and ``.predict``
        A served model (:func:`ceriakeras.inference.served.load_served_model`) or anything with the same
        interface: ``info`` with ``pixel_size_A``, ``max_height``, ``label_radius_A``;
        ``predict(images (B, H, W) float32 counts) -> (probabilities (B, H, W, C), height)``.
    data_dir : path
        Dataset folder (TFRecord shards and manifest); its pixel size must be the model's.
    out_dir : path
        Folder for ``metrics.json``, ``report.md`` and the PNG plots.
    doses : sequence of float
        Doses per image, e⁻/Å².
    split : str
        Which split to evaluate ("test" unless you know why not).
    seed : int
        Seed of the noise; the same seed gives the same noisy images and the same numbers.
    max_images : int, optional
        Evaluate only the first N records of the split.
    baseline : bool
        Also score the classical baseline (:func:`baseline_columns`).
    config : AnalyzeConfig, optional
        Column extraction settings, as for ``ceriakeras analyze`` (its defaults if omitted).
    progress, max_distance_A, overwrite, command
        A progress bar on stderr; the matching distance (Å); replace the results of an earlier
        evaluation in ``out_dir``; the command line, recorded in the report.

    Returns
    -------
    dict
        What ``metrics.json`` holds.
    """
    doses = check_doses(doses)
    config = config or AnalyzeConfig()
    config.validate()
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images={max_images} must be at least 1")
    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds an evaluation: pass --overwrite or choose another --out")
    if config.test_time_augmentation:
        model = DihedralAveraged(model)
    max_height = model_settings(model.info)[1]
    config = with_model_threshold(config, model.info)
    calibration = model.info.get("confidence_calibration")
    network, classical, n_images = _score_split(model, data_dir, split, doses, config, seed=seed,
                                                max_images=max_images, progress=progress,
                                                baseline=baseline, max_distance_A=max_distance_A)
    result = {
        "data_dir": str(data_dir),
        "split": split,
        "n_images": n_images,
        "seed": seed,
        "doses_e_per_A2": list(doses),
        "match_distance_A": max_distance_A,
        "analyze_config": to_dict(config),
        "model_info": {k: model.info.get(k) for k in ("pixel_size_A", "max_height", "label_radius_A",
                                                 "manifest_sha256")},
        "confidence_calibrated": calibration is not None,
        "command": command,
        "results": [
            {"dose_e_per_A2": d,
             "network": network[d].metrics(max_height),
             "baseline": classical[d].metrics(max_height) if baseline else None}
            for d in doses
        ],
    }
    plots = write_plots(result, out_dir)
    write_text_atomic(out_dir / "report.md", format_report(result, plots))
    # Last, so that a folder holding metrics.json holds a complete evaluation.
    write_text_atomic(out_dir / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


def _score_split(model, data_dir, split: str, doses, config: AnalyzeConfig, *, seed: int,
                 max_images, progress: bool, baseline: bool,
                 max_distance_A: float) -> tuple[dict, dict, int]:
    """The split's noisy copies at each dose through the model, their columns found as
    ``analyze`` finds them and matched to the truth: ``(network, baseline)`` tallies per dose
    (baseline empty without ``baseline``) and the number of images."""
    pixel_size_A, _, label_radius_A = model_settings(model.info)
    calibration = model.info.get("confidence_calibration")
    network = {d: Tally() for d in doses}
    classical = {d: Tally() for d in doses}
    n_images = 0
    for image, true_columns, noisy, probabilities in noisy_predictions(
            model.predict, data_dir, split, doses, pixel_size_A, seed=seed, max_images=max_images,
            progress=progress):
        for k, d in enumerate(doses):
            found = find_columns(probabilities[k], pixel_size_A, min_distance_A=config.min_distance_A,
                                 threshold=config.threshold, label_radius_A=label_radius_A,
                                 calibration=calibration,
                                 dose_e_per_A2=estimate_dose(noisy[k], pixel_size_A))
            network[d].add(found, true_columns, pixel_size_A, max_distance_A)
            if baseline:
                base = baseline_columns(noisy[k], image, true_columns, d, pixel_size_A,
                                        label_radius_A=label_radius_A,
                                        min_distance_A=config.min_distance_A)
                classical[d].add(base, true_columns, pixel_size_A, max_distance_A)
        n_images += 1
    return network, classical, n_images
