"""`make demo`: analyze the shipped low-dose example series with the shipped model, and score them.

Runs ``ceriakeras analyze examples/ceria_particle_*.tif --out results/demo --overwrite --xyz
--quiet`` in this process (the shipped model, the pixel size from each TIFF's calibration), with
the command line's own quiet start-up: no TensorFlow log lines. Then compares the columns found
in each frame with the simulation's ground truth for that frame (``NAME_truth.csv`` beside each
``NAME.tif``: ``frame, x_px, y_px, height``; a file without ``frame`` holds the same columns for
every frame) as ``ceriakeras evaluate --images`` scores: one-to-one matching within 1 Å; F1 of
the detection, and the exact and ±1 height accuracy and the mean bias over the matched columns,
all frames of all series pooled.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
OUT = ROOT / "results" / "demo"
MATCH_DISTANCE_A = 1.0
HELD_OUT = {200.0: (0.675, 0.639)}
"""Exact height accuracy of the shipped model (version 6) at a dose (e⁻/Å²): on its own test
split and on the cross-check set (README.md)."""


def example_series() -> list[Path]:
    """The example TIFF series that have a truth table beside them."""
    found = [p.with_name(p.name[:-len("_truth.csv")] + ".tif") for p in EXAMPLES.glob("*_truth.csv")]
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t
                                        for t in re.split(r"(\d+)", p.name)])


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keys = rows[0].keys() if rows else []
    return {k: np.array([r[k] for r in rows]) for k in keys}


def _frame_columns(table: dict[str, np.ndarray], frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixels and heights of one frame's rows (all rows if the table has no frame)."""
    if not table:
        return np.zeros((0, 2)), np.zeros(0, int)
    sel = table["frame"].astype(int) == frame if "frame" in table else slice(None)
    xy = np.column_stack([table["x_px"][sel].astype(float), table["y_px"][sel].astype(float)])
    return xy, table["height"][sel].astype(int)


def score(found: dict[str, np.ndarray], truth_csv: Path, pixel_size_A: float,
          frames: int) -> tuple[list, list, list]:
    """Per frame of one series: columns found, true columns, matched (≤ 1 Å), with the right
    height and within ±1 atom; and the true and found heights of the matched pairs."""
    from ceriakeras.evaluation.scoring import match_columns

    truth = _read_csv(truth_csv)
    rows, true_h, pred_h = [], [], []
    for frame in range(frames):
        xy, h = _frame_columns(found, frame)
        true_xy, th = _frame_columns(truth, frame)
        pi, ti = match_columns(xy, true_xy, MATCH_DISTANCE_A / pixel_size_A)
        err = np.abs(h[pi] - th[ti])
        rows.append({"frame": frame, "found": len(h), "true": len(th), "matched": len(pi),
                     "exact": int((err == 0).sum()), "within_1": int((err <= 1).sum())})
        true_h.append(th[ti])
        pred_h.append(h[pi])
    return rows, true_h, pred_h


def score_all(columns_csv: Path, series: list[Path]) -> tuple[dict, dict]:
    """Per series its frames' rows (:func:`score`); over all: F1, precision, recall, and exact
    and ±1 accuracy and bias (atoms) of the matched columns."""
    from ceriakeras.evaluation.scoring import detection_scores, height_scores

    found = _read_csv(columns_csv)
    per_series, rows, true_h, pred_h = {}, [], [], []
    for tif in series:
        meta = json.loads(tif.with_suffix(".json").read_text())
        mine = ({k: v[found["source"] == str(tif)] for k, v in found.items()} if found else {})
        r, t, p = score(mine, tif.with_name(tif.stem + "_truth.csv"), meta["pixel_size_A"],
                        meta["frames"])
        per_series[tif.name] = r
        rows += r
        true_h += t
        pred_h += p
    total = detection_scores(sum(r["matched"] for r in rows), sum(r["found"] for r in rows),
                             sum(r["true"] for r in rows))
    heights = height_scores(np.concatenate(true_h), np.concatenate(pred_h), 16)
    total.update({k: heights[k] for k in ("exact_accuracy", "within_1_accuracy", "bias_atoms")})
    return per_series, total


def particle_spread(per_series: dict, draws: int = 2000, seed: int = 0) -> float:
    """Standard error of the pooled exact-height accuracy from the choice of particles: the
    standard deviation of that accuracy over ``draws`` bootstrap resamples of the series (one
    particle each), fixed ``seed``. Particles differ far more than frames of one particle do."""
    counts = np.array([[sum(r["exact"] for r in rows), sum(r["matched"] for r in rows)]
                       for rows in per_series.values()], float)
    if len(counts) < 2:
        return float("nan")
    pick = np.random.default_rng(seed).integers(0, len(counts), (draws, len(counts)))
    sums = counts[pick].sum(axis=1)
    return float(np.std(sums[:, 0] / np.maximum(sums[:, 1], 1.0)))


def run_analyze(series: list[Path]) -> int:
    """``ceriakeras analyze`` on the example series, in this process; its exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from ceriakeras.cli.main import main as cli

    args = ["analyze", *map(str, series), "--out", str(OUT), "--overwrite", "--xyz", "--quiet"]
    try:
        cli.main(args=args, prog_name="ceriakeras", standalone_mode=False)
    except SystemExit as end:
        return int(end.code or 0)
    return 0


def main() -> int:
    series = example_series()
    metas = [json.loads(s.with_suffix(".json").read_text()) for s in series]
    doses = {m["dose_e_per_A2"] for m in metas}
    sizes = [m["diameter_A"] for m in metas]
    print(f"Analyzing {len(series)} series in {EXAMPLES.relative_to(ROOT)}/ (simulated with the "
          f"training data's converged settings, ground truth known): one particle each, "
          f"{min(sizes):.0f}–{max(sizes):.0f} Å across, its optics drawn from the training "
          f"distribution, {'/'.join(f'{d:g}' for d in doses)} e-/Å² per frame.")
    status = run_analyze(series)
    if status:
        return status
    per_series, total = score_all(OUT / "columns.csv", series)
    print("\nseries                  Å across  defocus nm  Cs µm  frames  columns found  true columns"
          "  within 1 Å  height right  within ±1  exact")
    for (name, rows), m in zip(per_series.items(), metas):
        n = {k: sum(r[k] for r in rows) for k in ("found", "true", "matched", "exact", "within_1")}
        print(f"{name:<23} {m['diameter_A']:>8.0f}  {m['defocus_nm']:>10.1f}  {m['cs_um']:>5.1f}  "
              f"{len(rows):>6}  {n['found']:>13}  {n['true']:>12}  {n['matched']:>10}  "
              f"{n['exact']:>12}  {n['within_1']:>9}  {n['exact'] / max(n['matched'], 1):5.2f}")
    n_frames = sum(len(r) for r in per_series.values())
    spread = particle_spread(per_series)
    print(f"\nAll {n_frames} frames of {len(per_series)} particles: F1 {total['f1']:.3f} (precision "
          f"{total['precision']:.3f}, recall {total['recall']:.3f}); of the {total['n_matched']} "
          f"columns found, exact height {total['exact_accuracy']:.3f} (± {spread:.3f} from the "
          f"choice of particles), within ±1 {total['within_1_accuracy']:.3f}, "
          f"bias {total['bias_atoms']:+.2f} atoms (predicted − true).")
    for dose in sorted(doses & set(HELD_OUT)):
        own, cross = HELD_OUT[dose]
        print(f"Held-out exact height at {dose:g} e-/Å² (README): {own:.3f} on the model's own test "
              f"split, {cross:.3f} on the cross-check set.")
    print(f"Results in {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
