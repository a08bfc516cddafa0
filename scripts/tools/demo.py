"""`make demo`: analyze the shipped low-dose example series with the shipped model, and score it.

Runs ``ceriakeras analyze examples/ceria_series.tif --out results/demo --overwrite --xyz`` (the
shipped model, the pixel size from the TIFF's calibration), then compares the columns found in
each frame with the simulation's ground truth (``examples/ceria_series_truth.csv``): a column
counts as found when it lies within 1 Å of a true column (one-to-one matching), and as right
when its height (Ce atoms) is the true one.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from ceriakeras.analysis.run import analyze, format_summary
from ceriakeras.config import AnalyzeConfig, CeriakerasError
from ceriakeras.evaluation.scoring import match_columns

ROOT = Path(__file__).resolve().parents[2]
SERIES = ROOT / "examples" / "ceria_series.tif"
TRUTH = ROOT / "examples" / "ceria_series_truth.csv"
OUT = ROOT / "results" / "demo"
MATCH_DISTANCE_A = 1.0


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    keys = rows[0].keys() if rows else []
    return {k: np.array([r[k] for r in rows]) for k in keys}


def score(columns_csv: Path, truth_csv: Path, pixel_size_A: float) -> list[dict]:
    """Per frame: columns found, true columns, matched (≤ 1 Å) and with the right height."""
    found = _read_csv(columns_csv)
    truth = _read_csv(truth_csv)
    true_xy = np.column_stack([truth["x_px"].astype(float), truth["y_px"].astype(float)])
    true_h = truth["height"].astype(int)
    frames = found["frame"].astype(int) if found else np.zeros(0, int)
    rows = []
    for frame in np.unique(frames):
        sel = frames == frame
        xy = np.column_stack([found["x_px"][sel].astype(float), found["y_px"][sel].astype(float)])
        h = found["height"][sel].astype(int)
        pi, ti = match_columns(xy, true_xy, MATCH_DISTANCE_A / pixel_size_A)
        rows.append({"frame": int(frame), "found": int(sel.sum()), "true": len(true_h),
                     "matched": len(pi), "height_right": int((h[pi] == true_h[ti]).sum())})
    return rows


def main() -> int:
    meta = json.loads((ROOT / "examples" / "ceria_series.json").read_text())
    print(f"Analyzing {SERIES.relative_to(ROOT)}: {meta['frames']} frames at {meta['pixel_size_A']} Å, "
          f"{meta['dose_e_per_A2']:g} e-/Å² per frame, defocus {meta['defocus_nm']:.1f} nm, "
          f"Cs {meta['cs_um']:.1f} µm (simulated, ground truth known)")
    try:
        summary = analyze([SERIES], OUT, config=AnalyzeConfig(), overwrite=True, xyz=True)
    except CeriakerasError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    rows = score(OUT / "columns.csv", TRUTH, meta["pixel_size_A"])
    print("\nframe  columns found  true columns  within 1 Å  height right")
    for r in rows:
        print(f"{r['frame']:>5}  {r['found']:>13}  {r['true']:>12}  {r['matched']:>10}  {r['height_right']:>12}")
    right = sum(r["height_right"] for r in rows)
    total = sum(r["true"] for r in rows)
    print(f"\n{right} of {total} true columns found with the right height "
          f"({100.0 * right / max(total, 1):.0f} %). Results in {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
