"""The series plot of a tracked series: every track's height over time, its events marked.

Drawn from ``columns.csv`` (``track``, ``track_height``) and ``events.csv`` after
:func:`ceriakeras.analysis.tracking.write_tracks`; replaces the plot of the first frame's columns
(:func:`ceriakeras.analysis.run.write_series_plot`) for every series of two frames or more.
"""

from __future__ import annotations

import csv
import itertools
from array import array
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..io.files import atomic_path
from ..io.inputpaths import shown
from .pictures import height_colors, series_axes

MIN_TRACK_FRAMES = 3
"""Tracks seen in fewer frames are left out of the plot (a false detection's short track)."""


def write_track_series_plots(out_dir, plan: list, labels: list[str], max_height: int) -> int:
    """Write ``<label>_series.png`` for every series of ``plan`` from the tracked tables.

    Parameters
    ----------
    out_dir : path
        The run's folder (``columns.csv`` with track columns, ``events.csv``).
    plan : list of dict
        The run's inputs (``source``, ``n_frames``), in order.
    labels : list of str
        File-name label of each input.
    max_height : int
        The model's largest height, Ce atoms (colour scale).

    Returns
    -------
    int
        Plots written.
    """
    out_dir = Path(out_dir)
    series = {it["source"]: label for it, label in zip(plan, labels) if it["n_frames"] >= 2}
    rows = _track_rows(out_dir / "columns.csv", set(series))
    events = defaultdict(list)
    if (out_dir / "events.csv").exists():
        with open(out_dir / "events.csv", newline="", encoding="utf-8",
                  errors="surrogateescape") as fh:
            for r in csv.DictReader(fh):
                events[r["source"]].append((int(r["track"]), int(r["frame"])))
    written = 0
    for source, label in series.items():
        n = next(it["n_frames"] for it in plan if it["source"] == source)
        tracks, grid, ce = track_grid(*(np.asarray(a) for a in rows[source]), n)
        row_of = {t: k for k, t in enumerate(tracks.tolist())}
        marks = [(f, row_of[t]) for t, f in events[source] if t in row_of]
        draw(out_dir / f"{label}_series.png", grid, ce, marks, max_height, title=shown(source))
        written += 1
    return written


def _track_rows(csv_path: Path, sources: set) -> dict:
    """``{source: (track, frame, track_height)}`` of ``columns.csv``'s tracked rows, each an
    ``array('i')`` (12 bytes a row: no row is kept as text or dict)."""
    rows = {source: (array("i"), array("i"), array("i")) for source in sources}
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        if "track" not in header or "track_height" not in header:
            return rows
        at_track, at_height = header.index("track"), header.index("track_height")
        for rec in reader:
            if not rec or rec[0] not in rows or len(rec) <= at_track or rec[at_track] == "":
                continue
            track, frame, height = rows[rec[0]]
            track.append(int(rec[at_track]))
            frame.append(int(rec[1]))
            height.append(int(rec[at_height]))
    return rows


def track_grid(track: np.ndarray, frame: np.ndarray, height: np.ndarray,
               n_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The series plot's data from a series' tracked rows, aggregated in arrays.

    Parameters
    ----------
    track, frame, height : (R,) int arrays
        Each tracked row of ``columns.csv`` in the table's order: its ``track``, ``frame`` and
        ``track_height`` (Ce atoms).
    n_frames : int
        Frames of the series.

    Returns
    -------
    tracks : (T,) int64
        The tracks seen in at least :data:`MIN_TRACK_FRAMES` frames, by their first frame (ties:
        by their first row).
    grid : (T, n_frames) uint16
        Each track's height per frame, Ce atoms; 0 where it was not seen (2 bytes a cell: a
        long series of many columns, 450 × 10 000, is 9 MB).
    total_ce : (n_frames,) float64
        Ce atoms per frame: the sum of every tracked row's height (short tracks too), and of
        each track of ``grid`` at its last height in the frames it was missed between two
        sightings (the model loses a column in some frames; its atoms stay); NaN for a frame
        with neither.
    """
    track, frame, height = (np.asarray(a, np.int64).ravel() for a in (track, frame, height))
    ids, first_row, inverse = np.unique(track, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    span = max(n_frames, int(frame.max()) + 1 if frame.size else 1)
    seen = np.unique(inverse * span + frame) // span  # distinct frames of each track
    enough = np.flatnonzero(np.bincount(seen, minlength=len(ids)) >= MIN_TRACK_FRAMES)
    first_frame = np.full(len(ids), span, np.int64)
    np.minimum.at(first_frame, inverse, frame)
    order = enough[np.lexsort((first_row[enough], first_frame[enough]))]
    row = np.full(len(ids), -1, np.int64)
    row[order] = np.arange(len(order))
    grid = np.zeros((len(order), n_frames), np.uint16)
    kept = row[inverse] >= 0
    grid[row[inverse[kept]], frame[kept]] = np.clip(height[kept], 1, np.iinfo(np.uint16).max)
    present = np.bincount(frame, minlength=n_frames)[:n_frames] > 0
    total = np.bincount(frame, weights=height, minlength=n_frames)[:n_frames]
    missed, carried = _carried(grid)
    return ids[order], grid, np.where(present | missed, total + carried, np.nan)


def _carried(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: whether some track of ``grid`` was missed there between two of its sightings,
    and the sum of those tracks' last heights (Ce atoms)."""
    seen = grid > 0
    last = np.where(seen, np.arange(grid.shape[1], dtype=np.int32), -1)
    np.maximum.accumulate(last, axis=1, out=last)  # each cell's last sighting so far
    later = np.flip(np.logical_or.accumulate(np.flip(seen, axis=1), axis=1), axis=1)
    gap = ~seen & (last >= 0) & later
    height = np.take_along_axis(grid, np.maximum(last, 0), axis=1)
    return gap.any(axis=0), np.where(gap, height, 0).sum(axis=0, dtype=np.float64)


def draw(path: Path, grid: np.ndarray, total_ce: np.ndarray, events: list, max_height: int,
         title: str = ""):
    """Tracks × frames coloured by track height (Ce atoms), events as black triangles, and the
    total Ce of the tracked heights per frame below.

    ``grid`` is :func:`track_grid`'s (heights, 0 where a track was not seen). It is coloured
    here, 4 bytes a cell, and given to matplotlib as RGBA: colour-mapped by matplotlib, its
    float64 copies took ≈ 300 MB for 450 tracks × 10 000 frames (the same picture). Returns the
    figure written (:func:`.pictures.series_axes`' panels).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, cax = series_axes(fig)
    n = grid.shape[1]
    if grid.size:
        cmap = ListedColormap(height_colors(max_height)[1:] / 255.0)  # the overlays' colours
        # row h of the table: height h's colour as matplotlib's colour map gives it; row 0 clear
        table = np.vstack([np.zeros((1, 4), np.uint8), cmap(np.arange(max_height), bytes=True)])
        ax1.imshow(table[np.minimum(grid, max_height)], aspect="auto", interpolation="nearest",
                   extent=(-0.5, n - 0.5, grid.shape[0] - 0.5, -0.5))
        fig.colorbar(ScalarMappable(Normalize(0.5, max_height + 0.5), cmap), cax=cax,
                     label="track height (Ce atoms)")
    else:
        cax.set_axis_off()
    if events:
        f, r = np.array(events).T
        ax1.plot(f - 0.5, r, "k>", ms=5, label="change (first frame at the new height)")
        ax1.legend(loc="lower right", fontsize=7)
    ax1.set_ylabel(f"track (seen in ≥ {MIN_TRACK_FRAMES} frames)")
    ax1.set_title(title, fontsize=8)
    ax2.plot(np.arange(n), total_ce, "-", lw=1)
    ax2.set_xlabel("frame")
    ax2.set_ylabel("total Ce atoms (tracks)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return fig


def write_stretch_models(out_dir, plan: list, labels: list[str], max_height: int) -> int:
    """``xyz/<label>_frames_<first>-<last>.xyz``: one 3D model of the whole particle per stretch
    of a series in which no column changed (between two frames of ``events.csv``).

    Each model is the stretch's middle frame's columns (positions, Å) with their track heights
    (:func:`ceriakeras.inference.columns.columns_to_atoms`); ``info`` names the frames it covers.
    Returns the models written.
    """
    import ase.io

    from ..config import CE_COLUMN_SPACING_A
    from ..inference.columns import columns_to_atoms

    out_dir = Path(out_dir)
    series = {it["source"]: (it, label) for it, label in zip(plan, labels) if it["n_frames"] >= 2}
    cuts = defaultdict(set)
    if (out_dir / "events.csv").exists():
        with open(out_dir / "events.csv", newline="", encoding="utf-8",
                  errors="surrogateescape") as fh:
            for r in csv.DictReader(fh):
                cuts[r["source"]].add(int(r["frame"]))
    wanted = {}
    for source, (item, _) in series.items():
        edges = [0, *sorted(f for f in cuts[source] if 0 < f < item["n_frames"]), item["n_frames"]]
        for a, b in itertools.pairwise(edges):
            wanted[(source, (a + b - 1) // 2)] = (a, b - 1)
    rows = defaultdict(list)
    with open(out_dir / "columns.csv", newline="", encoding="utf-8",
              errors="surrogateescape") as fh:
        for r in csv.DictReader(fh):
            if (r["source"], int(r["frame"])) in wanted and r.get("track_height", "") != "":
                rows[(r["source"], int(r["frame"]))].append(
                    (float(r["x_A"]), float(r["y_A"]), int(r["track_height"])))
    for (source, frame), (first, last) in wanted.items():
        item, label = series[source]
        table = np.array(rows.get((source, frame), []), np.float64).reshape(-1, 3)
        h, w = item["shape"][-2:]
        px = item["pixel_size_A"]
        atoms = columns_to_atoms(table[:, 0], table[:, 1], table[:, 2].astype(int),
                                 cell=[w * px, h * px, (max_height + 2) * CE_COLUMN_SPACING_A])
        atoms.info.update(source=source, first_frame=first, last_frame=last, drawn_from=frame)
        path = out_dir / "xyz" / f"{label}_frames_{first:05d}-{last:05d}.xyz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            ase.io.write(tmp, atoms, format="extxyz")
    return len(wanted)
