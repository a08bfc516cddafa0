"""What ``evaluate`` shows: terminal tables, ``report.md`` and the PNG plots, for a split at doses
or for labelled images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.files import atomic_path
from .baseline import BASELINE_SMOOTHING_A
from .truth import ESTIMATED_DOSE_DIGITS, IMAGE_TABLE_NAME

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
