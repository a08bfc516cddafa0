"""A finished ``analyze`` folder as its tracks stage found it: redo that stage offline.

Studies (``scripts/studies/track_study.py``, ``track_calibration.py``) and ``bench_tracks.py``
run :func:`ceriakeras.analysis.tracking.write_tracks` again with other settings on such a copy,
without running the model.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

from .tracking import DRIFT_COLUMNS, LOG_NAME, TRACK_COLUMNS


def untracked_copy(result, work) -> list:
    """A finished ``analyze`` folder ``result`` as the tracks stage finds it, in ``work``.

    Copies the probability log, ``columns.csv`` with the track columns blank (as analyze leaves
    them until that stage) and ``frames.csv`` without the drift columns, so that
    :func:`write_tracks` and :func:`add_drift_columns` can run again on ``work`` (other
    settings, studies, benchmarks) without running the model. ``work`` is emptied first; it
    may not be ``result`` or inside it.

    Returns
    -------
    list of dict
        The run's plan, from ``summary.json``: ``source``, ``n_frames``, ``path`` (the source
        as given), ``pixel_size_A`` and ``counts_per_electron`` of each input (what
        :func:`ceriakeras.analysis.stacking.model_reader` needs), and from ``frames.csv`` its
        median ``dose_e_per_A2`` (e⁻/Å² per frame; None where it has none), as ``analyze``
        gives the tracks stage.
    """
    result, work = Path(result), Path(work)
    if work.resolve() == result.resolve() or result.resolve() in work.resolve().parents:
        raise ValueError(f"{work} is {result} or inside it: give another folder to copy into")
    if work.exists():
        shutil.rmtree(work)
    (work / "tracking").mkdir(parents=True)
    shutil.copy(result / LOG_NAME, work / LOG_NAME)
    _strip_csv(result / "columns.csv", work / "columns.csv", TRACK_COLUMNS, blank=True)
    _strip_csv(result / "frames.csv", work / "frames.csv", DRIFT_COLUMNS)
    summary = json.loads((result / "summary.json").read_text())
    doses = median_doses(work / "frames.csv")
    return [{"source": i["source"], "n_frames": i["frames"], "path": i["source"],
             "pixel_size_A": i.get("pixel_size_A"),
             "counts_per_electron": i.get("counts_per_electron", 1.0),
             "dose_e_per_A2": doses.get(i["source"])}
            for i in summary["inputs"]]


def median_doses(frames_path: Path) -> dict:
    """``{source: median dose}`` (e⁻/Å² per frame) of the series in a ``frames.csv`` (frames
    without a dose left out)."""
    doses: dict = {}
    with open(frames_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for row in csv.DictReader(fh):
            try:
                value = float(row.get("dose_e_per_A2") or "nan")
            except ValueError:
                continue
            if math.isfinite(value):
                doses.setdefault(row["source"], []).append(value)
    return {source: statistics.median(values) for source, values in doses.items()}


def _strip_csv(src: Path, dst: Path, drop: tuple, blank: bool = False) -> None:
    """``src`` as CSV without the columns named in ``drop`` (``blank``: kept, values blank)."""
    with (open(src, newline="", encoding="utf-8", errors="surrogateescape") as fh,
          open(dst, "w", newline="", encoding="utf-8", errors="surrogateescape") as out):
        rows = csv.reader(fh)
        header = next(rows)
        keep = [k for k, name in enumerate(header) if name not in drop]
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header if blank else [header[k] for k in keep])
        extra = [""] * (len(header) - len(keep)) if blank else []
        writer.writerows([r[k] for k in keep] + extra for r in rows)

