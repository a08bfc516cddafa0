"""Frames cut or grown around a particle: how much vacuum a vacuum-normalised model needs.

:func:`framings` cuts a simulated image to frames with a given margin (Å) beyond the outermost
true column (``scripts/studies/vacuum_study.py``); :func:`reframe` pads labelled images with
vacuum or trims them, moving their truth along, and :func:`vacuum_shares` measures each image's
share of vacuum as ``analyze`` does (``scripts/studies/measure_framing.py``). What they showed
is :func:`ceriakeras.inference.recognise.required_vacuum_fraction`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..inference.recognise import vacuum_fraction


def framings(image: np.ndarray, true_columns: np.ndarray, pixel_size_A: float, margins_A):
    """Square frames cut from ``image`` around its particle, one per margin.

    Parameters
    ----------
    image : (H, W) array
        Noise-free image (relative intensity).
    true_columns : (M, 3) array
        ``x_px, y_px, height`` of the true columns.
    pixel_size_A : float
        Pixel size, Å.
    margins_A : sequence of float
        Room between the outermost true column and the frame's edge, Å (clipped by the image);
        a negative margin cuts that much off the particle on every side.

    Yields
    ------
    margin_A : float
    frame : (h, w) array
    columns : (K, 3) array
        The true columns inside the frame, in its pixels.
    """
    h, w = image.shape
    x0, y0 = true_columns[:, 0].min(), true_columns[:, 1].min()
    x1, y1 = true_columns[:, 0].max(), true_columns[:, 1].max()
    for margin in margins_A:
        m = margin / pixel_size_A
        left, top = max(0, int(np.floor(x0 - m))), max(0, int(np.floor(y0 - m)))
        right, bottom = min(w, int(np.ceil(x1 + m)) + 1), min(h, int(np.ceil(y1 + m)) + 1)
        shifted = true_columns - np.array([left, top, 0.0])
        inside = ((shifted[:, 0] >= 0) & (shifted[:, 0] <= right - left - 1)
                  & (shifted[:, 1] >= 0) & (shifted[:, 1] <= bottom - top - 1))
        yield margin, image[top:bottom, left:right], shifted[inside]


def reframe(src: Path, out: Path, doses: set[str], grow: float, *, noise: bool = True,
            seed: int = 0) -> None:
    """Copy the images of ``doses`` (as written in ``images.csv``) from ``src`` into ``out``,
    grown (``grow`` > 0) or trimmed (``grow`` < 0) by that share of the side on every edge, with
    ``images.csv`` and ``truth.csv`` moved along (columns outside the new frame dropped). Grown
    frames are filled with the vacuum of the image's outermost 4 px ring: Poisson counts of its
    mean (``noise``), or the mean itself."""
    import tifffile

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(src / "images.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dose"] in doses]
    with open(src / "truth.csv", newline="") as f:
        truth = list(csv.DictReader(f))
    shift, size = {}, {}
    for r in rows:
        a = tifffile.imread(src / r["file"])
        n = a.shape[0]
        p = int(round(abs(grow) * n))
        if grow > 0:
            ring = np.ones(a.shape, bool)
            ring[4:-4, 4:-4] = False
            vacuum = float(a[ring].mean())
            shape = (a.shape[0] + 2 * p, a.shape[1] + 2 * p)
            b = (rng.poisson(vacuum, shape) if noise else np.full(shape, round(vacuum))).astype(a.dtype)
            b[p:p + a.shape[0], p:p + a.shape[1]] = a
            shift[r["file"]] = p
        else:
            b = a[p:a.shape[0] - p, p:a.shape[1] - p] if p else a
            shift[r["file"]] = -p
        size[r["file"]] = b.shape
        tifffile.imwrite(out / r["file"], b)
    with open(out / "images.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "truth.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(truth[0]))
        w.writeheader()
        for t in truth:
            if t["file"] not in shift:
                continue
            x, y = float(t["x_px"]) + shift[t["file"]], float(t["y_px"]) + shift[t["file"]]
            h, wd = size[t["file"]]
            if 0 <= x <= wd - 1 and 0 <= y <= h - 1:
                w.writerow({**t, "x_px": x, "y_px": y})


def vacuum_shares(folder: Path, columns_csv: Path) -> list[float]:
    """Each image's share of vacuum (:func:`ceriakeras.inference.recognise.vacuum_fraction`) from the
    columns the model found in it, as ``analyze`` measures it."""
    import tifffile

    with open(folder / "images.csv", newline="") as f:
        pixel = {r["file"]: float(r["pixel_size_A"]) for r in csv.DictReader(f)}
    found: dict[str, list] = {name: [] for name in pixel}
    with open(columns_csv, newline="") as f:
        for r in csv.DictReader(f):
            found.setdefault(Path(r["source"]).name, []).append((float(r["x_A"]), float(r["y_A"])))
    shares = []
    for name, px in pixel.items():
        h, w = tifffile.imread(folder / name).shape[:2]
        xy = np.asarray(found[name], np.float64).reshape(-1, 2)
        shares.append(vacuum_fraction(xy[:, 0], xy[:, 1], w * px, h * px))
    return shares
