"""How far to trust a model: noise at fixed doses → the analyze column code → matching, metrics, plots, baseline.

The test split's noise-free images are given Poisson noise at each dose (fixed seeds, so every
run sees the same noisy images), passed through the model, and turned into columns by
:func:`ceriakeras.columns.find_columns` exactly as ``ceriakeras analyze`` does. Predicted columns
are matched one to one to the true columns (Hungarian matching within 1 Å); the metrics are
computed on those matches. A classical baseline (peak finding and an intensity-to-height table
built at the true optics) is scored the same way, so the report shows what the network buys.

Matching and scores (:func:`~ceriakeras.scoring.match_columns`, :class:`~ceriakeras.scoring.Tally`,
…) and the noisy copies of a split live in :mod:`ceriakeras.scoring`, shared with the confidence
calibration (:mod:`ceriakeras.calibration`); the baseline (:func:`baseline_columns`) and the
report are here. The functions on arrays can be used on their own.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage, optimize, spatial

from .config import AnalyzeConfig, ConfigError, DataError, to_dict
from .io import atomic_path, write_text_atomic
from .scoring import (CALIBRATION_BINS, MATCH_DISTANCE_A, Tally, calibration,  # noqa: F401
                      check_doses, detection_scores, height_scores, match_columns, noise_seed,
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

    counts_per_pixel = dose_e_per_A2 * pixel_size_A ** 2
    contrast = np.asarray(noisy_counts, np.float64) / counts_per_pixel - 1.0
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
    noise_std = 1.0 / math.sqrt(counts_per_pixel * 4.0 * math.pi * sigma_px ** 2)
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
        A served model (:func:`ceriakeras.export.load_served_model`) or anything with the same
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
    from .columns import estimate_dose, find_columns
    from .modelinfo import model_settings

    doses = check_doses(doses)
    config = config or AnalyzeConfig()
    config.validate()
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images={max_images} must be at least 1")
    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds an evaluation: pass --overwrite or choose another --out")
    if config.test_time_augmentation:
        from .export import DihedralAveraged

        model = DihedralAveraged(model)
    pixel_size_A, max_height, label_radius_A = model_settings(model.info)
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
    ("ece", "confidence ECE", "{:.3f}"),
)


def _fmt(metrics: dict | None, key: str, pattern: str) -> str:
    value = None if metrics is None else metrics.get(key)
    return "–" if value is None else pattern.format(value)


def format_table(result: dict) -> str:
    """The scores per dose as a plain-text table for the terminal (network, then baseline)."""
    keys = ("f1", "exact_accuracy", "within_1_accuracy", "mae", "ece")
    head = ["dose e-/Å²", "F1", "exact", "±1", "MAE", "ECE", "base F1", "base exact", "base ±1"]
    rows = []
    for r in result["results"]:
        net, base = r["network"], r["baseline"]
        rows.append([f"{r['dose_e_per_A2']:g}"]
                    + [_fmt(net, k, "{:.3f}") for k in keys]
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
           title=f"{result['n_images']} test images, matching within {result['match_distance_A']:g} Å")
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
