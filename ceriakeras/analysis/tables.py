"""The tables of ``analyze``: ``columns.csv`` rows, ``frames.csv`` (with the series' tracks), the terminal summary.

``columns.csv`` holds the column table of the design (:data:`CSV_HEADER`) plus ``recognised``;
``frames.csv`` one line per frame: columns found, total Ce, mean height, dose in e⁻/Å²,
recognised, and for a model that estimates them (version 3 on) the frame's ``defocus_nm`` and
``cs_um``; for a model normalised to the vacuum level (version 3 on) the frame's
``vacuum_area_fraction``.
"""

from __future__ import annotations

import csv
import io as _stdio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..io.files import write_bytes_atomic
from ..io.inputpaths import shown
from .pictures import write_series_plot
from .resume import read_progress

CSV_HEADER = ("source", "frame", "x_px", "y_px", "x_A", "y_A", "height", "confidence")
"""Columns of ``columns.csv``, in this order (the design's column table)."""
MARK_COLUMNS = ("recognised",)
"""Appended to the design's columns: 1 if the column's frame is recognised (CeO2 [110] as the
model knows it, :func:`ceriakeras.inference.recognise.recognise_frame`), 0 if not."""
DETAIL_COLUMNS = ("expected_height_atoms", "height_std_atoms")
"""Extra columns appended with ``details=True``."""
FRAME_COLUMNS = ("source", "frame", "columns", "total_ce_atoms", "mean_height_atoms",
                 "dose_e_per_A2", "recognised")
"""Columns of ``frames.csv`` (then :data:`OPTICS_COLUMNS` and :data:`VACUUM_COLUMNS` where the
model gives them)."""
VACUUM_COLUMNS = ("vacuum_area_fraction",)
"""Appended to ``frames.csv`` for a model normalised to the vacuum level (version 3 on): the
share of the frame's area farther than 5 Å from every column
(:func:`ceriakeras.inference.recognise.vacuum_fraction`), 0–1."""
OPTICS_COLUMNS = ("defocus_nm", "cs_um")
"""Columns of ``frames.csv`` for a model that estimates each frame's optics (version 3 on):
its defocus (nm, abTEM sign) and Cs (µm) estimates (:meth:`ceriakeras.inference.served.ServedModel.predict`)."""
TRACK_RADIUS_A = 1.0
"""A column in a later frame belongs to a first-frame column within this distance, Å."""


def columns_header(details: bool, track_columns: tuple = ()) -> str:
    """The first line of ``columns.csv`` (with ``details``, :data:`DETAIL_COLUMNS` too; then
    ``track_columns``, filled in at the end of a run by :mod:`ceriakeras.analysis.tracking`)."""
    return ",".join(CSV_HEADER + MARK_COLUMNS + (DETAIL_COLUMNS if details else ())
                    + tuple(track_columns)) + "\n"


def column_rows(source: str, index: int, table: dict, pixel_size_A: float, recognised: int,
                details: bool) -> Iterator[list]:
    """The ``columns.csv`` rows of one frame.

    Parameters
    ----------
    table : dict of (N,) arrays
        The frame's columns on the input grid (:func:`ceriakeras.inference.predict.frame_columns`).
    pixel_size_A : float
        The input's pixel size, Å (for ``x_A``, ``y_A``).
    recognised : int
        1 if the frame is recognised, else 0.
    """
    x, y = table["x_px"], table["y_px"]
    for j in range(len(x)):
        row = [source, index, f"{x[j]:.3f}", f"{y[j]:.3f}", f"{x[j] * pixel_size_A:.4f}",
               f"{y[j] * pixel_size_A:.4f}", int(table["height"][j]),
               f"{table['confidence'][j]:.4f}", recognised]
        if details:
            row += [f"{table['expected_height'][j]:.3f}", f"{table['height_std'][j]:.3f}"]
        yield row


def _csv_frames(csv_path: Path) -> Iterator[tuple]:
    """``columns.csv`` frame by frame: ``((source, frame), x_px, y_px, x_A, y_A, height)``, lists."""
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        current, cols = None, ([], [], [], [], [])
        for rec in reader:
            key = (rec[0], int(rec[1]))
            if key != current:
                if current is not None:
                    yield (current, *cols)
                current, cols = key, ([], [], [], [], [])
            for values, text, kind in zip(cols, (rec[2], rec[3], rec[4], rec[5], rec[6]),
                                          (float, float, float, float, int)):
                values.append(kind(text))
        if current is not None:
            yield (current, *cols)


class _SeriesTracks:
    """Columns of each series tracked by position: each column of a later frame is given to the
    nearest column of the series' first analysed frame within :data:`TRACK_RADIUS_A`."""

    def __init__(self):
        self.by_source: dict[str, dict] = {}

    def add(self, source: str, frame: int, xs, ys, hs, total: int) -> None:
        from scipy.spatial import cKDTree

        n = len(hs)
        t = self.by_source.setdefault(source, {"ref": None, "frames": [], "heights": [],
                                               "total": []})
        pts = np.column_stack([xs, ys]) if n else np.zeros((0, 2))
        if t["ref"] is None:
            t["ref"] = cKDTree(pts) if n else None
            t["n_ref"] = n
        row = np.full(t["n_ref"], np.nan, np.float32)
        if t["ref"] is not None and n:
            dist, idx = t["ref"].query(pts, distance_upper_bound=TRACK_RADIUS_A)
            ok = np.isfinite(dist)
            row[idx[ok]] = np.asarray(hs, np.float32)[ok]
        t["frames"].append(frame)
        t["heights"].append(row)
        t["total"].append(total)

    def plot(self, out_dir: Path, labels: dict, max_height: int) -> None:
        """``<label>_series.png`` per series (``labels``: ``{source: label}``)."""
        for source, t in self.by_source.items():
            order = np.argsort(t["frames"], kind="stable")
            write_series_plot(out_dir / f"{labels[source]}_series.png",
                              np.asarray(t["frames"])[order], np.asarray(t["heights"])[order],
                              np.asarray(t["total"])[order], max_height, title=shown(source))


def frame_table_and_series_plots(csv_path: Path, out_dir: Path, plan: list, labels: list[str],
                                 max_height: int, movie: bool = False,
                                 series_plots: bool = True) -> dict:
    """Stream ``columns.csv`` once: per-frame counts to ``frames.csv``, tracks to series plots.

    With ``series_plots=False`` no ``<label>_series.png`` is drawn and no per-frame heights are
    kept (a tracked run draws its own, :mod:`ceriakeras.analysis.track_pictures`).

    Returns
    -------
    dict
        ``columns`` and ``total_ce`` (per analysed frame), and with ``movie``
        ``positions[source][frame]``: each series frame's ``(x_px, y_px, height)`` arrays.
    """
    by_source = {it["source"]: it for it in plan}
    per_frame = {"columns": [], "total_ce": [], "positions": {}}
    progress = read_progress(out_dir / "progress.json")
    offsets = dict(zip([it["source"] for it in plan],
                       np.cumsum([0] + [it["n_frames"] for it in plan[:-1]]).tolist()))
    frames_info = progress.get("frames", {})
    rows, tracks = [], _SeriesTracks()

    def close_frame(source, frame, px, py, xs, ys, hs):
        n, total = len(hs), int(np.sum(hs)) if hs else 0
        per_frame["columns"].append(n)
        per_frame["total_ce"].append(total)
        info = frames_info.get(str(offsets[source] + frame), {})
        dose = info.get("dose_e_per_A2")
        rows.append((source, frame, n, total, f"{total / n:.3f}" if n else "",
                     "" if dose is None else f"{dose:.4g}",
                     "" if "recognised" not in info else int(info["recognised"])))
        if by_source[source]["n_frames"] < 2:
            return
        if movie:
            per_frame["positions"].setdefault(source, {})[frame] = (
                np.asarray(px, np.float64), np.asarray(py, np.float64), np.asarray(hs, np.int32))
        if series_plots:
            tracks.add(source, frame, xs, ys, hs, total)

    seen = set()
    for key, *cols in _csv_frames(csv_path):
        close_frame(*key, *cols)
        seen.add(key)
    # frames analysed but without any column have no rows: account for them from progress
    bad = {(s["source"], int(s["frame"])) for s in progress["skipped"]}
    for source, frame in [(it["source"], i) for it in plan for i in range(it["n_frames"])
                          if (it["source"], i) not in seen and (it["source"], i) not in bad]:
        close_frame(source, frame, [], [], [], [], [])
    order = {it["source"]: i for i, it in reversed(list(enumerate(plan)))}
    rows.sort(key=lambda r: (order[r[0]], r[1]))
    header, rows = _optional_frame_columns(rows, progress, offsets)
    text = _stdio.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    write_bytes_atomic(out_dir / "frames.csv", text.getvalue().encode("utf-8", "surrogateescape"))
    tracks.plot(out_dir, {it["source"]: lab for it, lab in zip(plan, labels)}, max_height)
    return per_frame


def _optional_frame_columns(rows: list, progress: dict, offsets: dict) -> tuple[tuple, list]:
    """``frames.csv``'s header and rows with the optics and vacuum columns the model gave."""
    header = FRAME_COLUMNS
    optics = progress.get("optics") or {}
    if optics:  # a model with a global branch: its estimates of each frame's optics
        header = header + OPTICS_COLUMNS
        rows = [row + tuple(
            f"{v:.3f}" if (v := optics.get(row[0], {}).get(str(row[1]), {}).get(name)) is not None
            else "" for name in OPTICS_COLUMNS) for row in rows]
    frames_info = progress.get("frames", {})
    if any("vacuum_fraction" in info for info in frames_info.values()):
        # a model normalised to the vacuum level: how much of each frame was vacuum
        header = header + VACUUM_COLUMNS
        rows = [row + (
            f"{v:.3f}" if (v := frames_info.get(str(offsets[row[0]] + row[1]), {})
                           .get("vacuum_fraction")) is not None else "",)
            for row in rows]
    return header, rows


def series_doses(plan: list, frames: dict) -> list:
    """Each series' median dose, e⁻/Å² per frame (None where no frame has one), from a run's
    per-frame state ``frames`` (``{str(global frame): {"dose_e_per_A2": …}}``)."""
    out, offset = [], 0
    for item in plan:
        doses = [d for k in range(offset, offset + item["n_frames"])
                 if (d := frames.get(str(k), {}).get("dose_e_per_A2")) is not None]
        out.append(float(np.median(doses)) if doses else None)
        offset += item["n_frames"]
    return out


def reason_counts(frames: dict) -> dict:
    """How many frames were not recognised, by the kind of reason."""
    out: dict[str, int] = {}
    for info in frames.values():
        if not info.get("recognised"):
            reason = info.get("reason") or "unknown"
            kind = ("too few columns" if "columns (a particle" in reason
                    else "not a CeO2 [110] lattice" if "lattice" in reason
                    else "dose outside the model's range" if "dose" in reason
                    else "too little vacuum in the field of view" if "vacuum" in reason
                    else reason)
            out[kind] = out.get(kind, 0) + 1
    return out


def format_summary(summary: dict) -> str:
    """A short table for the terminal."""
    lines = [
        f"frames          {summary['frames_analysed']} analysed of {summary['frames_total']}"
        + (f", {summary['frames_skipped']} skipped" if summary["frames_skipped"] else "")
        + (f" (resumed at frame {summary['resumed_at_frame']})" if summary["resumed_at_frame"] else ""),
        f"columns/frame   {summary['columns_per_frame']:.1f}",
        f"mean height     {summary['mean_height']:.2f} Ce atoms",
        (f"speed           {summary['frames_per_second']:.2f} frames/s"
         if summary["frames_analysed_now"] else
         "speed           - (every frame was analysed before; this run drew the pictures)"),
        *gain_lines(summary["inputs"]),
        f"results         {summary['out_dir']}",
    ]
    for s in summary["skipped"][:10]:
        lines.append(f"skipped         {s['reason']}")
    for it in summary["inputs"]:
        for key in ("gain_warning", "tracks_warning"):
            if it.get(key):
                lines.append(f"warning         {it['source']}: {it[key]}")
    if summary.get("frames_not_recognised"):
        why = ", ".join(f"{k}: {n}" for k, n in summary.get("not_recognised_reasons", {}).items())
        lines.append(f"warning         {summary['frames_not_recognised']} of "
                     f"{summary['frames_analysed']} frames do not look like CeO2 [110] as the "
                     f"model knows it ({why}); their columns are marked recognised=0 in "
                     "columns.csv: do not trust them")
    return "\n".join(lines)


GAIN_LINES_MAX = 5
"""Inputs up to which the terminal summary gives each one's gain; above, one line of their range."""


def gain_lines(inputs: list[dict], limit: int = GAIN_LINES_MAX) -> list[str]:
    """Terminal lines of the inputs' detector gains: one per input up to ``limit`` inputs, else
    one line with their range and how many came from each method (each is in summary.json)."""
    known = [it for it in inputs if it.get("counts_per_electron") is not None]
    if len(known) <= limit:
        return [_gain_line(it) for it in known]
    gains = [it["counts_per_electron"] for it in known]
    methods = Counter(str(it.get("counts_per_electron_from")) for it in known)
    how = ", ".join(f"{m}: {n}" for m, n in methods.items())
    return [f"gain            {min(gains):.3g}–{max(gains):.3g} counts/e⁻ over {len(known)} "
            f"inputs ({how}; each input's in summary.json)"]


def _gain_line(item: dict) -> str:
    """One terminal line: an input's detector gain and where it came from."""
    g, se = item["counts_per_electron"], item.get("counts_per_electron_standard_error")
    value = f"{g:.3g} ± {se:.2g}" if se else f"{g:.4g}"
    return (f"gain            {value} counts/e⁻ ({item.get('counts_per_electron_from')}) "
            f"{item['source']}")
