"""``evaluate --images``: a model scored on labelled image files (other simulators, hand-labelled
frames), each analysed as ``analyze`` does (:func:`ceriakeras.inference.predict.predict_columns`)
and scored as the cross-check set's ``score.py`` scores an ``analyze`` table.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.tables import CSV_HEADER
from ..config import AnalyzeConfig, ConfigError, InputError, to_dict
from ..inference.predict import ColumnSettings, predict_columns
from ..inference.served import (DihedralAveraged, find_version, load_served_model,
                                model_settings, read_info, with_model_threshold)
from ..io.files import write_text_atomic
from ..io.series import expand_inputs, open_series
from .report import format_images_report, write_plots
from .scoring import MATCH_DISTANCE_A, Tally, calibration, ece_spread
from .truth import IMAGE_TABLE_NAME, labelled_image_plan, read_image_table, read_truth, round_dose


def evaluate_images(model: Any, images, truth_path: str | Path, out_dir: str | Path, *,
                    pixel_size_A: float | None = None, image_table: str | Path | None = None,
                    config: AnalyzeConfig | None = None, max_distance_A: float = MATCH_DISTANCE_A,
                    overwrite: bool = False, progress: bool = True, command: str = "") -> dict:
    """Score a model on labelled image files (other simulators, hand-labelled frames).

    Each file is read, resampled to the model's pixel size and passed through the model, and
    its columns are found exactly as ``ceriakeras analyze`` finds them (the model's confidence
    calibration at the dose estimated from the frame's counts, as there); they are matched one
    to one to the file's true columns within ``max_distance_A`` (Hungarian) and scored per dose,
    as the cross-check set's ``score.py`` scores an ``analyze`` table: precision, recall, F1,
    exact and ±1 height accuracy, MAE and mean bias (predicted − true) over matched columns, and
    the ECE of ``confidence`` over matched columns.

    Parameters
    ----------
    model : path, or object with ``.info`` and ``.predict``
        As for :func:`ceriakeras.evaluation.evaluate.evaluate`, or a model folder (loaded once
        the inputs have been checked).
    images : path or list of paths
        Single-image files or folders of them (:func:`ceriakeras.io.series.expand_inputs`).
    truth_path : path
        The truth table (:func:`read_truth`); entries name files relative to its folder or by
        file name. Entries for files not among ``images`` are ignored (and counted).
    out_dir : path
        Folder for ``metrics.json``, ``report.md``, ``columns.csv`` (the predictions, as
        ``analyze`` writes them) and the PNG plots.
    pixel_size_A : float, optional
        Pixel size, Å, of files that ``images.csv`` gives none for (overrides their calibration).
    image_table : path, optional
        The ``images.csv`` (:func:`read_image_table`); default: the one beside the truth table,
        if there is one.
    config : AnalyzeConfig, optional
        Column extraction settings and ``test_time_augmentation``, as for ``analyze``.
    max_distance_A, overwrite, progress, command
        Matching distance (Å); replace an earlier evaluation in ``out_dir``; a progress bar on
        stderr; the command line, recorded in the report.

    Returns
    -------
    dict
        What ``metrics.json`` holds: ``results`` per dose (``dose_e_per_A2``, ``n_images``,
        ``network`` scores, ``baseline`` None), ``images`` (per file: dose and where it came
        from, pixel size and where it came from, columns true / predicted / matched).

    Raises
    ------
    InputError
        Bad truth or image table, an image without truth, no pixel size (see
        :func:`labelled_image_plan`); ``ConfigError`` for results already in ``out_dir``.
    """
    config = config or AnalyzeConfig()
    config.validate()
    out_dir = Path(out_dir)
    for name in () if overwrite else ("metrics.json", "columns.csv"):
        if (out_dir / name).exists():
            raise ConfigError(f"{out_dir} already holds {name}: pass --overwrite or choose "
                              "another --out")
    truth_path = Path(truth_path)
    plan, unused, config, image_table = _plan(model, images, truth_path, image_table, pixel_size_A, config)
    model = _served(model, config)
    scores = _score_images(model, plan, config, max_distance_A, progress)
    result = _images_result(model, scores, config, truth_path=truth_path, image_table=image_table,
                            n_images=len(plan), unused=unused, max_distance_A=max_distance_A,
                            command=command)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "columns.csv", scores["rows"])
    plots = write_plots(result, out_dir)
    write_text_atomic(out_dir / "report.md", format_images_report(result, plots))
    # Last, so that a folder holding metrics.json holds a complete evaluation.
    write_text_atomic(out_dir / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


def _plan(model, images, truth_path: Path, image_table, pixel_size_A,
          config: AnalyzeConfig) -> tuple[list, list, AnalyzeConfig, Path | None]:
    """The labelled images paired with their truth (:func:`labelled_image_plan`), checked
    before TensorFlow loads, ``config`` with the model's column threshold, and the image table
    (default: ``images.csv`` beside the truth table, if there is one)."""
    truth = read_truth(truth_path)
    if image_table is None and (truth_path.parent / IMAGE_TABLE_NAME).is_file():
        image_table = truth_path.parent / IMAGE_TABLE_NAME
    table = read_image_table(image_table) if image_table is not None else {}
    paths = expand_inputs(images)
    info = read_info(find_version(model)) if isinstance(model, (str, os.PathLike)) else model.info
    model_px = model_settings(info)[0]
    config = with_model_threshold(config, info)
    plan, unused = labelled_image_plan(paths, truth, truth_path.parent, table,
                                       pixel_size_A=pixel_size_A, model_pixel_A=model_px,
                                       config=config)
    return plan, unused, config, image_table


def _served(model, config: AnalyzeConfig):
    """The model to run: loaded from its folder once the inputs are checked; with
    ``test_time_augmentation``, averaged over the 8 flips and rotations."""
    if isinstance(model, (str, os.PathLike)):
        model = load_served_model(model)
    if config.test_time_augmentation:
        model = DihedralAveraged(model)
    return model


def _score_images(model, plan: list, config: AnalyzeConfig, max_distance_A: float,
                  progress: bool) -> dict:
    """Each planned image through :func:`ceriakeras.inference.predict.predict_columns`, its
    columns matched to its truth: ``tallies`` and ``n_by_dose`` per dose, ``per_image``, and
    ``rows`` (the text of ``columns.csv``)."""
    settings = ColumnSettings.for_model(model.info, config)
    tallies: dict[float, Tally] = {}
    n_by_dose: dict[float, int] = {}
    per_image = []
    rows = _stdio.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    items = plan
    if progress:
        from tqdm import tqdm

        items = tqdm(plan, desc="evaluate", unit="image", file=sys.stderr, dynamic_ncols=True)
    for item in items:
        with open_series(item["path"], item["pixel_size_A"]) as series:
            frame = next(series.frames())
        if frame.error is not None:
            raise InputError(frame.error)
        px = item["pixel_size_A"]
        found, estimated = predict_columns(model, frame.image, item["factor"], settings)
        x, y = found["x_px"], found["y_px"]
        pred = {"x_px": x, "y_px": y, "height": found["height"], "confidence": found["confidence"]}
        for j in range(len(x)):
            writer.writerow([item["source"], 0, f"{x[j]:.3f}", f"{y[j]:.3f}", f"{x[j] * px:.4f}",
                             f"{y[j] * px:.4f}", int(found["height"][j]),
                             f"{found['confidence'][j]:.4f}"])
        dose = item["dose_e_per_A2"]
        dose_from = IMAGE_TABLE_NAME
        if dose is None:
            dose, dose_from = round_dose(estimated), "estimated from counts"
        tally = tallies.setdefault(dose, Tally())
        before = tally.n_pred, sum(len(t) for t in tally.true_height)
        tally.add(pred, item["truth"], px, max_distance_A)
        n_by_dose[dose] = n_by_dose.get(dose, 0) + 1
        per_image.append({
            "file": item["source"], "truth_entry": item["name"], "dose_e_per_A2": dose,
            "dose_from": dose_from, "estimated_dose_e_per_A2": round(estimated, 3),
            "pixel_size_A": px, "pixel_size_from": item["pixel_size_from"],
            "n_true": len(item["truth"]), "n_pred": len(x),
            "n_matched": sum(len(t) for t in tally.true_height) - before[1],
        })
    return {"tallies": tallies, "n_by_dose": n_by_dose, "per_image": per_image,
            "rows": rows.getvalue()}


def _images_result(model, scores: dict, config: AnalyzeConfig, *, truth_path: Path, image_table,
                   n_images: int, unused: list, max_distance_A: float, command: str) -> dict:
    """What ``metrics.json`` holds (see :func:`evaluate_images`)."""
    tallies, per_image = scores["tallies"], scores["per_image"]
    max_height = model_settings(model.info)[1]
    doses = sorted(tallies)
    return {
        "mode": "labelled images",
        "images_are": "labelled images",
        "truth": str(truth_path),
        "image_table": None if image_table is None else str(image_table),
        "n_images": n_images,
        "doses_e_per_A2": doses,
        "doses_estimated": sorted({r["dose_e_per_A2"] for r in per_image
                                   if r["dose_from"] != IMAGE_TABLE_NAME}),
        "truth_entries_ignored": unused,
        "match_distance_A": max_distance_A,
        "ece_over": "matched columns (as the cross-check set's score.py); ece_all_reported counts "
                    "every reported column, a spurious one as wrong",
        "analyze_config": to_dict(config),
        "model_info": {k: model.info.get(k) for k in ("pixel_size_A", "max_height", "label_radius_A",
                                                 "manifest_sha256")},
        "confidence_calibrated": model.info.get("confidence_calibration") is not None,
        "command": command,
        "results": [{"dose_e_per_A2": d, "n_images": scores["n_by_dose"][d],
                     "network": _truth_metrics(tallies[d], max_height), "baseline": None}
                    for d in doses],
        "images": per_image,
    }


def _truth_metrics(tally: Tally, max_height: int) -> dict:
    """:meth:`Tally.metrics`, with the calibration scored as ``score.py`` scores it: over the
    matched columns only (right = same height); the project's own (every reported column, a
    spurious one counting as wrong) is kept as ``ece_all_reported``. The matched columns' ECE
    comes with :func:`ceriakeras.evaluation.scoring.ece_spread` (``ece_interval_90`` over the images
    resampled, ``ece_if_calibrated``): a dozen labelled images cannot measure an ECE to better
    than a few hundredths."""
    out = tally.metrics(max_height)
    t = np.concatenate(tally.true_height) if tally.true_height else np.zeros(0, np.int64)
    p = np.concatenate(tally.pred_height) if tally.pred_height else np.zeros(0, np.int64)
    out["mean_predicted_height_atoms"] = {int(h): float(np.mean(p[t == h])) for h in np.unique(t)}
    if tally.confidence:
        out["ece_all_reported"] = out.pop("ece")
        out.pop("calibration")
        matched = np.concatenate(tally.matched)
        out["calibration"] = calibration(np.concatenate(tally.confidence)[matched],
                                         np.concatenate(tally.correct)[matched])
        out["ece"] = out["calibration"]["ece"]
        out.update(ece_spread([c[m] for c, m in zip(tally.confidence, tally.matched)],
                              [r[m] for r, m in zip(tally.correct, tally.matched)]))
    return out
