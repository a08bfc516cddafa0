"""How far to trust a model: noise at fixed doses → the analyze column code → matching, metrics, plots, baseline.

The test split's noise-free images are given Poisson noise at each dose (fixed seeds, so every
run sees the same noisy images), passed through the model, and turned into columns by
:func:`ceriakeras.inference.columns.find_columns` exactly as ``ceriakeras analyze`` does. Predicted columns
are matched one to one to the true columns (Hungarian matching within 1 Å); the metrics are
computed on those matches. A classical baseline (peak finding and an intensity-to-height table
built at the true optics) is scored the same way, so the report shows what the network buys.

Matching and scores (:func:`~ceriakeras.evaluation.scoring.match_columns`, :class:`~ceriakeras.evaluation.scoring.Tally`,
…) and the noisy copies of a split live in :mod:`ceriakeras.evaluation.scoring`, shared with the confidence
calibration (:mod:`ceriakeras.evaluation.calibration`); the baseline (:func:`baseline_columns`) and the
report are here. The functions on arrays can be used on their own.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..config import AnalyzeConfig, ConfigError, InputError, to_dict
from ..io.files import atomic_path, write_text_atomic
from ..noise import counts_per_pixel
from .scoring import (MATCH_DISTANCE_A, Tally, calibration, check_doses, ece_spread,
                      noisy_predictions)

DEFAULT_DOSES_E_PER_A2 = (20.0, 50.0, 200.0, 1000.0, 5000.0)
"""Doses evaluated by default, e⁻/Å² per image."""
BASELINE_SMOOTHING_A = 0.4
"""Standard deviation of the Gaussian that smooths the image before the baseline's peak finding, Å."""
BASELINE_NOISE_SIGMAS = 3.0
"""The baseline keeps a peak only if it stands this many noise standard deviations above vacuum."""


# --- classical baseline ------------------------------------------------------------------------
def disk_sums(image: np.ndarray, x_px: np.ndarray, y_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Sum of ``image`` over the pixels whose centres lie within ``radius_px`` of each point.

    Parameters
    ----------
    image : (H, W) array
    x_px, y_px : (N,) arrays
        Disk centres in pixels (x = column index, y = row index).
    radius_px : float

    Returns
    -------
    (N,) float64 array
    """
    r = int(math.ceil(radius_px)) + 1
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    h, w = image.shape
    out = np.zeros(len(x_px), dtype=np.float64)
    for k, (x, y) in enumerate(zip(np.asarray(x_px, float), np.asarray(y_px, float))):
        cx, cy = int(round(x)), int(round(y))
        xx, yy = cx + dx, cy + dy
        inside = ((xx - x) ** 2 + (yy - y) ** 2 <= radius_px ** 2)
        inside &= (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        out[k] = float(np.sum(image[yy[inside], xx[inside]]))
    return out


def baseline_columns(
    noisy_counts: np.ndarray,
    clean_image: np.ndarray,
    true_columns: np.ndarray,
    dose_e_per_A2: float,
    pixel_size_A: float,
    *,
    label_radius_A: float,
    min_distance_A: float,
    smoothing_A: float = BASELINE_SMOOTHING_A,
    noise_sigmas: float = BASELINE_NOISE_SIGMAS,
) -> dict:
    """Columns and heights by classical image analysis, calibrated at the true optics.

    Columns: local extrema of the Gaussian-smoothed image, with the contrast sign of the true
    columns in the noise-free image (which depends on the optics), kept when they stand above
    both ``noise_sigmas`` standard deviations of the smoothed shot noise and half the weakest true
    column's contrast in the smoothed noise-free image. Heights: each column's integrated
    intensity relative to vacuum in the label-radius disk, compared with a table of the mean
    integrated intensity of the true columns of each height in the *same noise-free image* (so the
    table is exactly right for these optics and this particle — an advantage no real user has);
    the nearest table entry wins.

    Parameters
    ----------
    noisy_counts : (H, W) array
        Detector counts (expected counts = ``clean_image`` × dose × pixel area).
    clean_image : (H, W) float array
        Noise-free intensity, vacuum = 1, at the same optics.
    true_columns : (M, 3) array
        ``x_px, y_px, height`` of the true columns (used only to build the oracle table, the
        contrast sign and the threshold).
    dose_e_per_A2, pixel_size_A : float
        Dose (e⁻/Å²) and pixel size (Å) of the image.
    label_radius_A, min_distance_A : float
        Disk radius for the integrated intensity and smallest distance between columns, Å.

    Returns
    -------
    dict of arrays
        ``x_px``, ``y_px``, ``height`` (no confidence: the baseline has none).
    """
    from skimage.feature import peak_local_max

    vacuum_counts = counts_per_pixel(dose_e_per_A2, pixel_size_A)
    contrast = np.asarray(noisy_counts, np.float64) / vacuum_counts - 1.0
    clean_contrast = np.asarray(clean_image, np.float64) - 1.0
    sigma_px = smoothing_A / pixel_size_A
    smooth = ndimage.gaussian_filter(contrast, sigma_px, mode="nearest")
    smooth_clean = ndimage.gaussian_filter(clean_contrast, sigma_px, mode="nearest")

    tx, ty = true_columns[:, 0], true_columns[:, 1]
    th = np.rint(true_columns[:, 2]).astype(np.int64)
    at_columns = ndimage.map_coordinates(smooth_clean, [ty, tx], order=1, mode="nearest")
    sign = 1.0 if np.sum(at_columns) >= 0 else -1.0
    # Shot noise of the smoothed contrast: per-pixel variance 1/counts (vacuum), divided by the
    # Gaussian's effective area 4π σ².
    noise_std = 1.0 / math.sqrt(vacuum_counts * 4.0 * math.pi * sigma_px ** 2)
    weakest = float(np.min(sign * at_columns)) if len(at_columns) else 0.0
    threshold = max(noise_sigmas * noise_std, 0.5 * weakest)

    peaks = peak_local_max(
        sign * smooth,
        min_distance=max(1, int(round(min_distance_A / pixel_size_A))),
        threshold_abs=threshold,
        exclude_border=False,
    )
    y, x = peaks[:, 0].astype(np.float64), peaks[:, 1].astype(np.float64)
    radius_px = label_radius_A / pixel_size_A
    table_sums = disk_sums(clean_contrast, tx, ty, radius_px)
    heights = np.unique(th)
    table = np.array([table_sums[th == h].mean() for h in heights])
    if len(x) and len(heights):
        sums = disk_sums(contrast, x, y, radius_px)
        height = heights[np.argmin(np.abs(sums[:, None] - table[None, :]), axis=1)]
    else:
        height = np.zeros(len(x), dtype=np.int64)
    return {"x_px": x, "y_px": y, "height": height.astype(np.int64)}


# --- the evaluation ----------------------------------------------------------------------------
def evaluate(
    model: Any,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    doses: Sequence[float] = DEFAULT_DOSES_E_PER_A2,
    split: str = "test",
    seed: int = 0,
    max_images: int | None = None,
    baseline: bool = True,
    progress: bool = True,
    config: AnalyzeConfig | None = None,
    max_distance_A: float = MATCH_DISTANCE_A,
    overwrite: bool = False,
    command: str = "",
) -> dict:
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
    progress : bool
        Show a progress bar on stderr.
    config : AnalyzeConfig, optional
        Column extraction settings, as for ``ceriakeras analyze`` (its defaults if omitted).
    max_distance_A : float
        Matching distance, Å.
    overwrite : bool
        Replace the results of an earlier evaluation in ``out_dir``.
    command : str
        The command line, recorded in the report.

    Returns
    -------
    dict
        What ``metrics.json`` holds.
    """
    from ..inference.columns import find_columns
    from ..noise import estimate_dose
    from ..inference.served import model_settings, with_model_threshold

    doses = check_doses(doses)
    config = config or AnalyzeConfig()
    config.validate()
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images={max_images} must be at least 1")
    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds an evaluation: pass --overwrite or choose another --out")
    if config.test_time_augmentation:
        from ..inference.served import DihedralAveraged

        model = DihedralAveraged(model)
    pixel_size_A, max_height, label_radius_A = model_settings(model.info)
    config = with_model_threshold(config, model.info)
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


# --- reporting ---------------------------------------------------------------------------------
_SCORES = (  # (key, label, format) of the scores shown in tables
    ("precision", "detection precision", "{:.3f}"),
    ("recall", "detection recall", "{:.3f}"),
    ("f1", "detection F1", "{:.3f}"),
    ("exact_accuracy", "exact height accuracy", "{:.3f}"),
    ("within_1_accuracy", "height within ±1", "{:.3f}"),
    ("mae", "height MAE (atoms)", "{:.3f}"),
    ("bias_atoms", "height bias, predicted − true (atoms)", "{:+.3f}"),
    ("ece", "confidence ECE", "{:.3f}"),
)


def _fmt(metrics: dict | None, key: str, pattern: str) -> str:
    value = None if metrics is None else metrics.get(key)
    return "–" if value is None else pattern.format(value)


def format_table(result: dict) -> str:
    """The scores per dose as a plain-text table for the terminal (network, then baseline)."""
    keys = ("f1", "exact_accuracy", "within_1_accuracy", "mae", "bias_atoms", "ece")
    head = ["dose e-/Å²", "F1", "exact", "±1", "MAE (atoms)", "bias (atoms)", "ECE", "base F1",
            "base exact", "base ±1"]
    rows = []
    for r in result["results"]:
        net, base = r["network"], r["baseline"]
        rows.append([f"{r['dose_e_per_A2']:g}"]
                    + [_fmt(net, k, "{:+.3f}" if k == "bias_atoms" else "{:.3f}") for k in keys]
                    + [_fmt(base, k, "{:.3f}") for k in ("f1", "exact_accuracy", "within_1_accuracy")])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(row) for row in rows])


def format_report(result: dict, plots: dict[str, str]) -> str:
    """A short Markdown report: what was evaluated, a table per dose, the plots."""
    n_true = result["results"][0]["network"]["n_true"]
    cfg = result["analyze_config"]
    lines = [
        "# Column-height evaluation",
        "",
        f"- data: `{result['data_dir']}`, {result['split']} split, {result['n_images']} images, "
        f"{n_true} true Ce columns",
        f"- model: {result['model_info']['pixel_size_A']:g} Å pixels, heights up to "
        f"{result['model_info']['max_height']} atoms",
        f"- Poisson noise at each dose on the noise-free images (seed {result['seed']}); columns "
        f"extracted as `ceriakeras analyze` does (min distance {cfg['min_distance_A']:g} Å, "
        f"threshold {cfg['threshold']:g}); predicted and true columns matched one to one within "
        f"{result['match_distance_A']:g} Å (Hungarian matching)"
        + ("; the network's probabilities averaged over the 8 flips and 90° rotations of each "
           "image (test-time augmentation)." if cfg.get("test_time_augmentation") else "."),
        "- Height scores are over matched columns; calibration (ECE) is over every reported column "
        "(a spurious one counts as a wrong height); `confidence` is "
        + ("calibrated by the model's `confidence_calibration` (fitted on the validation split)."
           if result.get("confidence_calibrated") else "raw (the model has no calibration)."),
    ]
    if result["command"]:
        lines.append(f"- command: `{result['command']}`")
    has_baseline = result["results"][0]["baseline"] is not None
    if has_baseline:
        lines += [
            "",
            "The **baseline** finds columns as peaks of the Gaussian-smoothed image "
            f"(σ = {BASELINE_SMOOTHING_A:g} Å) and gives each the height whose mean integrated "
            "intensity (label-radius disk, relative to vacuum) is nearest, from a table built on "
            "the *noise-free image of the same particle at the true optics*, with the contrast "
            "sign and detection threshold also taken from it. No real user has that calibration: "
            "the baseline is an optimistic reference for classical analysis.",
        ]
    if "accuracy_vs_dose" in plots:
        lines += ["", f"![accuracy and F1 against dose]({plots['accuracy_vs_dose']})"]
    for r in result["results"]:
        net, base = r["network"], r["baseline"]
        lines += ["", f"## Dose {r['dose_e_per_A2']:g} e⁻/Å²", ""]
        lines += (["| score | network | baseline |", "| --- | --- | --- |"] if has_baseline
                  else ["| score | network |", "| --- | --- |"])
        for key, label, pattern in _SCORES:
            cells = [label, _fmt(net, key, pattern)] + ([_fmt(base, key, pattern)] if has_baseline else [])
            lines.append("| " + " | ".join(cells) + " |")
        per_h = ", ".join(f"{h}: {v['accuracy']:.2f} ({v['count']})"
                          for h, v in sorted(net["per_height"].items(), key=lambda kv: int(kv[0])))
        lines += ["", f"Network exact accuracy per true height (columns): {per_h or '–'}"]
        key = f"confusion_{r['dose_e_per_A2']:g}"
        if key in plots:
            lines += ["", f"![confusion matrix at {r['dose_e_per_A2']:g} e⁻/Å²]({plots[key]})"]
    if "reliability" in plots:
        lines += ["", "## Calibration of `confidence`", "", f"![reliability diagram]({plots['reliability']})"]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_plots(result: dict, out_dir: str | Path) -> dict[str, str]:
    """Write the PNG plots of an evaluation; returns {plot name: file name inside ``out_dir``}.

    ``accuracy_vs_dose.png`` (F1, exact and ±1 accuracy against dose, network and baseline),
    ``confusion_<dose>.png`` (network, one per dose), ``reliability.png`` (one curve per dose).
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = result["results"]
    doses = [r["dose_e_per_A2"] for r in results]
    files: dict[str, str] = {}

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (key, label), color in zip((("f1", "detection F1"), ("exact_accuracy", "exact height"),
                                    ("within_1_accuracy", "height within ±1")),
                                   ("C0", "C1", "C2")):
        ax.plot(doses, [r["network"][key] for r in results], "o-", color=color, label=f"network: {label}")
        if results[0]["baseline"] is not None:
            ax.plot(doses, [r["baseline"][key] for r in results], "s--", color=color, alpha=0.6,
                    label=f"baseline: {label}")
    ax.set(xscale="log", xlabel="dose (e⁻/Å²)", ylabel="score", ylim=(0, 1.02),
           title=f"{result['n_images']} {result.get('images_are', 'test images')}, matching within "
                 f"{result['match_distance_A']:g} Å")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    _save(fig, out_dir / "accuracy_vs_dose.png")
    files["accuracy_vs_dose"] = "accuracy_vs_dose.png"

    for r in results:
        cm = np.asarray(r["network"]["confusion"], dtype=np.float64)
        fig = Figure(figsize=(5.6, 4.8), layout="constrained")
        ax = fig.add_subplot()
        rows = cm.sum(axis=1, keepdims=True)
        frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1, origin="lower")
        fig.colorbar(im, ax=ax, label="fraction of the true height's columns")
        ax.set(xlabel="predicted height (atoms; 0 = missed)", ylabel="true height (atoms; 0 = spurious)",
               title=f"network at {r['dose_e_per_A2']:g} e⁻/Å²")
        name = f"confusion_{r['dose_e_per_A2']:g}.png"
        _save(fig, out_dir / name)
        files[f"confusion_{r['dose_e_per_A2']:g}"] = name

    fig = Figure(figsize=(5.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for r in results:
        cal = r["network"].get("calibration")
        if cal is None:
            continue
        pts = [(c, a) for c, a in zip(cal["mean_confidence"], cal["accuracy"]) if c is not None]
        if pts:
            c, a = zip(*pts)
            ax.plot(c, a, "o-", label=f"{r['dose_e_per_A2']:g} e⁻/Å² (ECE {cal['ece']:.3f})")
    ax.set(xlabel="confidence", ylabel="fraction with the right height", xlim=(0, 1), ylim=(0, 1),
           title="reliability of the network's confidence")
    ax.legend(fontsize="small", loc="upper left")
    _save(fig, out_dir / "reliability.png")
    files["reliability"] = "reliability.png"
    return files


# --- labelled image files (``evaluate --images … --truth truth.csv``) ---------------------------
TRUTH_COLUMNS = ("file", "x_px", "y_px", "height")
"""Columns a truth table must have: the image file, a Ce column's centre in the image's own pixels
(pixel ``i``'s centre at ``i``) and its height (Ce atoms); one row per true column."""
IMAGE_TABLE_NAME = "images.csv"
"""The per-image table read from the truth table's folder: ``file``, ``dose`` (e⁻/Å² per image;
``dose_e_per_A2`` also accepted) and ``pixel_size_A`` (Å); other columns are ignored."""
ESTIMATED_DOSE_DIGITS = 2
"""A dose estimated from counts is rounded to this many significant digits to group images."""


def _read_csv_rows(path: Path, required: Sequence[str], what: str) -> list[dict]:
    """The rows of a CSV file as dicts, after checking that it has the ``required`` columns."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise InputError(f"{what} {path} lacks the column(s) {', '.join(missing)}: it needs "
                                 f"{', '.join(required)} (header line first)")
            reader.fieldnames = header
            return list(reader)
    except OSError as err:
        raise InputError(f"{what} {path} is unreadable ({err.strerror or err})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{what} {path} is not a text CSV file ({_short(err)})") from None


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:120] or type(err).__name__


def _number(text, path: Path, line: int, column: str, *, positive: bool = False,
            integer: bool = False, optional: bool = False) -> float | None:
    """One CSV cell as a finite number (checked), or None for an empty optional cell."""
    text = (text or "").strip()
    if optional and text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    bad = not math.isfinite(value) or (positive and value <= 0) or (integer and value != round(value))
    if bad:
        want = ("a whole number of Ce atoms ≥ 1" if integer else
                "a positive number" if positive else "a finite number")
        raise InputError(f"{path} line {line}: {column}={text!r} is not {want}; fix that row")
    return value


def read_truth(path: str | Path) -> dict[str, np.ndarray]:
    """The true Ce columns of each labelled image, from a truth table.

    Parameters
    ----------
    path : path
        CSV with the header ``file,x_px,y_px,height`` (:data:`TRUTH_COLUMNS`; other columns are
        ignored): one row per Ce column, its centre in the image's own pixels (x = column index,
        y = row index, pixel ``i``'s centre at ``i``), its height in Ce atoms (≥ 1).

    Returns
    -------
    dict
        ``file`` as written → ``(M, 3)`` float64 array ``x_px, y_px, height``.

    Raises
    ------
    InputError
        Unreadable file, a missing column, an empty file name, or a NaN, non-numeric, negative
        coordinate or non-integer height (the message names the line).
    """
    path = Path(path)
    rows = _read_csv_rows(path, TRUTH_COLUMNS, "truth table")
    truth: dict[str, list] = {}
    for line, row in enumerate(rows, start=2):
        name = (row.get("file") or "").strip()
        if not name:
            raise InputError(f"{path} line {line}: the file name is empty; fix that row")
        x = _number(row.get("x_px"), path, line, "x_px")
        y = _number(row.get("y_px"), path, line, "y_px")
        h = _number(row.get("height"), path, line, "height", positive=True, integer=True)
        truth.setdefault(name, []).append((x, y, h))
    if not truth:
        raise InputError(f"truth table {path} has no rows: one row per Ce column is needed")
    return {name: np.asarray(cols, np.float64).reshape(-1, 3) for name, cols in truth.items()}


def read_image_table(path: str | Path) -> dict[str, dict]:
    """Dose and pixel size of each labelled image, from an ``images.csv``.

    Parameters
    ----------
    path : path
        CSV with a ``file`` column and, optionally per row, ``dose`` (or ``dose_e_per_A2``;
        e⁻/Å² per image) and ``pixel_size_A`` (Å); an empty cell means unknown.

    Returns
    -------
    dict
        ``file`` → ``{"dose_e_per_A2": float | None, "pixel_size_A": float | None}``.

    Raises
    ------
    InputError
        Unreadable file, no ``file`` column, a file listed twice, or a value that is not a
        positive number.
    """
    path = Path(path)
    rows = _read_csv_rows(path, ("file",), "image table")
    dose_key = "dose_e_per_A2" if rows and "dose_e_per_A2" in rows[0] else "dose"
    table: dict[str, dict] = {}
    for line, row in enumerate(rows, start=2):
        name = (row.get("file") or "").strip()
        if not name:
            raise InputError(f"{path} line {line}: the file name is empty; fix that row")
        if name in table:
            raise InputError(f"{path} line {line}: {name} is listed twice; keep one row per image")
        table[name] = {
            "dose_e_per_A2": _number(row.get(dose_key), path, line, dose_key, positive=True,
                                     optional=True),
            "pixel_size_A": _number(row.get("pixel_size_A"), path, line, "pixel_size_A",
                                    positive=True, optional=True),
        }
    return table


def _name_index(names: Iterable[str], base: Path):
    """A lookup ``path -> entry`` of a truth or image table: the entry whose path relative to the
    table's folder ``base`` is this file, else the only entry with the same file name."""
    by_path, by_name = {}, {}
    for name in names:
        by_path[(base / name).resolve()] = name
        by_name.setdefault(Path(name).name, []).append(name)

    def lookup(path: Path) -> str | None:
        found = by_path.get(path.resolve())
        if found is None and len(by_name.get(path.name, ())) == 1:
            found = by_name[path.name][0]
        return found

    return lookup


def round_dose(dose_e_per_A2: float, digits: int = ESTIMATED_DOSE_DIGITS) -> float:
    """``dose_e_per_A2`` rounded to ``digits`` significant digits (to group estimated doses)."""
    if not dose_e_per_A2 > 0:
        return float(dose_e_per_A2)
    return float(f"{dose_e_per_A2:.{digits}g}")


def labelled_image_plan(paths: Sequence[Path], truth: dict[str, np.ndarray], truth_dir: Path,
                        table: dict[str, dict], *, pixel_size_A: float | None,
                        model_pixel_A: float, config: AnalyzeConfig) -> tuple[list[dict], list[str]]:
    """Check every labelled image's header, pixel size and truth before any model work.

    The pixel size of each file comes from its ``images.csv`` row, else ``pixel_size_A`` (the
    ``--pixel-size`` option: as in ``analyze``, it overrides the file's calibration), else the
    file's calibration; the dose from its ``images.csv`` row, else (later) from its counts.

    Returns
    -------
    plan : list of dict
        Per file: ``path``, ``source``, ``name`` (its truth entry), ``truth`` (M, 3),
        ``shape``, ``pixel_size_A``, ``pixel_size_from``, ``factor``, ``dose_e_per_A2`` (or None).
    unused : list of str
        Truth entries that name no given file (ignored).

    Raises
    ------
    InputError
        A file with no truth rows that ``images.csv`` does not list either (a labelled image
        with no columns must be listed there), a series of several frames, no pixel size, a
        pixel size the model cannot use, or true columns outside the image.
    """
    from ..io.series import open_series
    from ..inference.resample import resample_factor

    plan, used = [], {}
    truth_entry, table_entry = _name_index(truth, truth_dir), _name_index(table, truth_dir)
    for path in paths:
        name, row_name = truth_entry(path), table_entry(path)
        if (name or row_name) in used:
            raise InputError(f"{used[name or row_name]} and {path} both take the truth of "
                             f"{name or row_name}: give files with distinct names, or name them in "
                             "the truth table by their path relative to its folder")
        if name is None and row_name is None:
            raise InputError(f"{path} has no rows in the truth table (and is not listed in "
                             f"{IMAGE_TABLE_NAME} as an image without columns): label it or leave "
                             "it out of --images")
        row = table.get(row_name, {}) if row_name is not None else {}
        true_columns = truth[name] if name is not None else np.zeros((0, 3))
        used[name or row_name] = path
        csv_px = row.get("pixel_size_A")
        with open_series(path, csv_px if csv_px is not None else pixel_size_A) as series:
            if series.n_frames != 1:
                raise InputError(f"{path} holds {series.n_frames} frames; --images takes single "
                                 "labelled images (save each frame as its own file)")
            factor = resample_factor(series.pixel_size_A, model_pixel_A,
                                     min_pixel_A=config.min_pixel_size_A,
                                     max_pixel_A=config.max_pixel_size_A)
            h, w = series.shape
            origin = (f"{IMAGE_TABLE_NAME}" if csv_px is not None else series.pixel_size_from)
            if len(true_columns):
                x, y = true_columns[:, 0], true_columns[:, 1]
                if x.min() < -0.5 or y.min() < -0.5 or x.max() > w - 0.5 or y.max() > h - 0.5:
                    raise InputError(f"the truth table puts columns of {path} outside its {w}×{h} px "
                                     "image: are x_px, y_px in this image's own pixels?")
            plan.append({"path": path, "source": series.source, "name": name or row_name,
                         "truth": true_columns, "shape": (h, w),
                         "pixel_size_A": series.pixel_size_A, "pixel_size_from": origin,
                         "factor": factor, "dose_e_per_A2": row.get("dose_e_per_A2")})
    unused = sorted(set(truth) - set(used))
    return plan, unused


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


def evaluate_images(
    model: Any,
    images,
    truth_path: str | Path,
    out_dir: str | Path,
    *,
    pixel_size_A: float | None = None,
    image_table: str | Path | None = None,
    config: AnalyzeConfig | None = None,
    max_distance_A: float = MATCH_DISTANCE_A,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict:
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
        As for :func:`evaluate`, or a model folder (``saved_models/NAME`` or a version folder),
        loaded once the inputs have been checked.
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
    max_distance_A : float
        Matching distance, Å.
    overwrite : bool
        Replace an earlier evaluation in ``out_dir``.
    progress : bool
        Progress bar on stderr.
    command : str
        The command line, recorded in the report.

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
    import csv
    import io as _stdio

    from ..analysis.tables import CSV_HEADER
    from ..inference.served import find_version, model_settings, read_info, with_model_threshold
    from ..inference.predict import ColumnSettings, predict_columns
    from ..io.series import expand_inputs, open_series

    config = config or AnalyzeConfig()
    config.validate()
    out_dir = Path(out_dir)
    if not overwrite:
        for name in ("metrics.json", "columns.csv"):
            if (out_dir / name).exists():
                raise ConfigError(f"{out_dir} already holds {name}: pass --overwrite or choose "
                                  "another --out")
    truth_path = Path(truth_path)
    truth = read_truth(truth_path)
    if image_table is None and (truth_path.parent / IMAGE_TABLE_NAME).is_file():
        image_table = truth_path.parent / IMAGE_TABLE_NAME
    table = read_image_table(image_table) if image_table is not None else {}
    paths = expand_inputs(images)
    if isinstance(model, (str, os.PathLike)):
        info = read_info(find_version(model))   # the inputs are checked before TensorFlow loads
    else:
        info = model.info
    model_px, max_height, label_radius_A = model_settings(info)
    config = with_model_threshold(config, info)
    plan, unused = labelled_image_plan(paths, truth, truth_path.parent, table,
                                       pixel_size_A=pixel_size_A, model_pixel_A=model_px,
                                       config=config)
    if isinstance(model, (str, os.PathLike)):
        from ..inference.served import load_served_model

        model = load_served_model(model)
    if config.test_time_augmentation:
        from ..inference.served import DihedralAveraged

        model = DihedralAveraged(model)
    calibration_table = model.info.get("confidence_calibration")
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

    doses = sorted(tallies)
    result = {
        "mode": "labelled images",
        "images_are": "labelled images",
        "truth": str(truth_path),
        "image_table": None if image_table is None else str(image_table),
        "n_images": len(plan),
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
        "confidence_calibrated": calibration_table is not None,
        "command": command,
        "results": [{"dose_e_per_A2": d, "n_images": n_by_dose[d],
                     "network": _truth_metrics(tallies[d], max_height), "baseline": None}
                    for d in doses],
        "images": per_image,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "columns.csv", rows.getvalue())
    plots = write_plots(result, out_dir)
    write_text_atomic(out_dir / "report.md", format_images_report(result, plots))
    # Last, so that a folder holding metrics.json holds a complete evaluation.
    write_text_atomic(out_dir / "metrics.json", json.dumps(result, indent=1) + "\n")
    return result


_IMAGE_TABLE_SCORES = (  # (key, header, format) of the labelled-image table
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("exact_accuracy", "exact", "{:.3f}"),
    ("within_1_accuracy", "±1", "{:.3f}"),
    ("mae", "MAE (atoms)", "{:.3f}"),
    ("bias_atoms", "bias (atoms)", "{:+.3f}"),
    ("ece", "ECE", "{:.3f}"),
)


def format_images_table(result: dict) -> str:
    """The per-dose scores of :func:`evaluate_images` as a plain-text table for the terminal."""
    head = ["dose (e-/Å²)", "images", "columns"] + [h for _, h, _ in _IMAGE_TABLE_SCORES]
    rows = []
    estimated = set(result.get("doses_estimated", []))
    for r in result["results"]:
        net = r["network"]
        rows.append([f"{r['dose_e_per_A2']:g}" + ("*" if r["dose_e_per_A2"] in estimated else ""),
                     str(r["n_images"]), str(net["n_true"])]
                    + [_fmt(net, k, f) for k, _, f in _IMAGE_TABLE_SCORES])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [line(head), line(["-" * w for w in widths])] + [line(row) for row in rows]
    if estimated:
        lines.append("* dose estimated from the image's counts (mean count / pixel area), "
                     f"rounded to {ESTIMATED_DOSE_DIGITS} digits: give it in {IMAGE_TABLE_NAME}")
    spread = ece_spread_line(result)
    if spread:
        lines.append(spread)
    return "\n".join(lines)


def ece_spread_line(result: dict) -> str:
    """One sentence per labelled-image evaluation: each dose's ECE with its 90 % range over
    the images resampled and the ECE a perfectly calibrated confidence would show on the same
    columns (:func:`ceriakeras.evaluation.scoring.ece_spread`); empty without them."""
    cells = []
    for r in result["results"]:
        net = r["network"]
        if net.get("ece_interval_90") is None or net.get("ece_if_calibrated") is None:
            continue
        lo, hi = net["ece_interval_90"]
        cells.append(f"{r['dose_e_per_A2']:g}: {net['ece']:.3f} ({lo:.3f}–{hi:.3f}; "
                     f"{net['ece_if_calibrated']:.3f})")
    if not cells:
        return ""
    return ("ECE at dose (e-/Å²): measured (90 % range over the images resampled; what a perfectly "
            "calibrated confidence would show on these columns): " + ", ".join(cells))


def format_images_report(result: dict, plots: dict[str, str]) -> str:
    """A short Markdown report of :func:`evaluate_images`: what was scored, the table, the plots."""
    cfg = result["analyze_config"]
    n_true = sum(r["network"]["n_true"] for r in result["results"])
    px = sorted({(im["pixel_size_A"], im["pixel_size_from"]) for im in result["images"]})
    lines = [
        "# Column-height evaluation on labelled images",
        "",
        f"- truth: `{result['truth']}`"
        + (f", image table `{result['image_table']}`" if result["image_table"] else "")
        + f"; {result['n_images']} images, {n_true} true Ce columns"
        + (f"; truth for {len(result['truth_entries_ignored'])} other files ignored"
           if result["truth_entries_ignored"] else ""),
        "- pixel sizes: " + ", ".join(f"{p:g} Å ({src})" for p, src in px),
        f"- model: {result['model_info']['pixel_size_A']:g} Å pixels, heights up to "
        f"{result['model_info']['max_height']} atoms; each image resampled to it by summing counts "
        "and its columns extracted as `ceriakeras analyze` does (min distance "
        f"{cfg['min_distance_A']:g} Å, threshold {cfg['threshold']:g})"
        + ("; probabilities averaged over the 8 flips and 90° rotations of each image "
           "(test-time augmentation)" if cfg.get("test_time_augmentation") else ""),
        f"- predicted and true columns matched one to one within {result['match_distance_A']:g} Å "
        "per image (Hungarian matching); height scores and the ECE are over matched columns, as the "
        "cross-check set's `score.py` computes them; bias = mean predicted − true height; "
        "`confidence` is "
        + ("calibrated by the model's `confidence_calibration` at the dose estimated from each "
           "image's counts." if result.get("confidence_calibrated")
           else "raw (the model has no calibration)."),
    ]
    if result["doses_estimated"]:
        lines.append("- doses " + ", ".join(f"{d:g}" for d in result["doses_estimated"])
                     + " e⁻/Å² are estimated from the counts (no dose in the image table)")
    if result["command"]:
        lines.append(f"- command: `{result['command']}`")
    lines += ["", "| dose (e⁻/Å²) | images | columns | "
              + " | ".join(h for _, h, _ in _IMAGE_TABLE_SCORES) + " |",
              "| --- " * (3 + len(_IMAGE_TABLE_SCORES)) + "|"]
    for r in result["results"]:
        net = r["network"]
        lines.append(f"| {r['dose_e_per_A2']:g} | {r['n_images']} | {net['n_true']} | "
                     + " | ".join(_fmt(net, k, f) for k, _, f in _IMAGE_TABLE_SCORES) + " |")
    spread = ece_spread_line(result)
    if spread:
        lines += ["", spread.replace("e-/Å²", "e⁻/Å²") + ". The range is how far the ECE of "
                  "this many images moves from one such set of images to another: the columns of "
                  "one image are right or wrong together (one particle, one set of optics), and "
                  "each bin's fraction right is a binomial draw. A dozen images cannot pin an ECE "
                  "down to better than a few hundredths."]
    if any("ece_all_reported" in r["network"] for r in result["results"]):
        lines += ["", "ECE over every reported column (a spurious one counting as a wrong height), "
                  "as `ceriakeras evaluate --data` reports it: "
                  + ", ".join(f"{_fmt(r['network'], 'ece_all_reported', '{:.3f}')} at "
                              f"{r['dose_e_per_A2']:g}" for r in result["results"]) + " e⁻/Å²."]
    if "accuracy_vs_dose" in plots:
        lines += ["", f"![accuracy and F1 against dose]({plots['accuracy_vs_dose']})"]
    for r in result["results"]:
        net = r["network"]
        per_h = ", ".join(f"{h}: {v['accuracy']:.2f} ({v['count']}; read as "
                          f"{net['mean_predicted_height_atoms'][h]:.1f})"
                          for h, v in sorted(net["per_height"].items(), key=lambda kv: int(kv[0])))
        lines += ["", f"Exact accuracy per true height at {r['dose_e_per_A2']:g} e⁻/Å² "
                  f"(columns; mean predicted height, atoms): {per_h or '–'}"]
    if "reliability" in plots:
        lines += ["", "## Calibration of `confidence` (matched columns)", "",
                  f"![reliability diagram]({plots['reliability']})"]
    return "\n".join(lines) + "\n"
