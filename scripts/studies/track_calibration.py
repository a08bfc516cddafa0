"""Fit the maps behind ``track_confidence`` and the events' ``probability`` on our own movies.

usage:
  python scripts/studies/track_calibration.py MOVIES:RESULTS [MOVIES:RESULTS ...]
      [--features posterior_logit,frame_scatter_atoms] [--score SCORE_PY]

Each pair is a movie set in the layout of ``../shared/crossmovie`` (``scripts/tools/
make_movies.py``) and a ``ceriakeras analyze`` folder of it (with ``tracking/probabilities.bin``).
The tracks are made again offline (:func:`ceriakeras.analysis.tracking.write_tracks` on a copy,
with the default settings but an identity confidence map and event map) and every column matched
to the truth within 1 Å gives one row: its stretch's evidence (:data:`ceriakeras.analysis.
tracks.EVIDENCE`) and whether ``track_height`` is right. Printed, as JSON lines:

- per feature set, the ECE per dose and the log loss with one particle left out (each particle's
  movies predicted by a map fitted on the others), and the map fitted on all rows
  (``confidence_weights`` of :class:`ceriakeras.analysis.tracks.TrackSettings`);
- ``event_scale`` and ``event_offset`` fitted on the reported events (real: within 1.5 Å and
  ±3 frames of a true event with the same sign, as ``score.py``).

Fit on your own tune movies only; score held-out movies with ``track_study.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ceriakeras.analysis.reading import series_counts
from ceriakeras.analysis.offline import untracked_copy
from ceriakeras.analysis.tracking import write_tracks
from ceriakeras.analysis.tracks import EVIDENCE, TrackSettings
from ceriakeras.evaluation.calibration import fit_logistic
from ceriakeras.evaluation.scoring import calibration, match_columns

sys.path.insert(0, str(Path(__file__).resolve().parent))
from track_study import read_csv, stack_reader

CANDIDATES = (("posterior_logit",), ("posterior_logit", "frame_scatter_atoms"),
              ("posterior_logit", "frame_confidence_logit"),
              ("posterior_logit", "mean_log_probability", "frame_confidence_logit"),
              ("stacked_posterior_logit",), ("stacked_posterior_logit", "frame_scatter_atoms"),
              ("posterior_logit", "stacked_posterior_logit", "frame_scatter_atoms"), EVIDENCE)
"""Feature sets compared (names of :data:`EVIDENCE`)."""
RAW = TrackSettings(confidence_weights=(), stacked_confidence_weights=(), event_scale=1.0,
                    event_offset=0.0)
"""The default tracking with the identity maps: confidence = posterior, p = σ(stat − penalty)."""


def collect(movies: Path, result: Path, group: int, reader=None) -> tuple[list, list]:
    """Rows ``(group + particle, dose, *evidence, right)`` of one set's matched columns and
    ``(dose, statistic − penalty, real)`` of its reported events."""
    info = {r["file"]: r for r in read_csv(movies / "movies.csv")}
    truth = defaultdict(list)
    for r in read_csv(movies / "truth.csv"):
        truth[(r["file"], int(r["frame"]))].append((float(r["x_px"]), float(r["y_px"]),
                                                    int(r["height"])))
    got: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan = untracked_copy(result, Path(tmp))
        write_tracks(Path(tmp), plan, RAW, on_stretches=got.update, stack_reader=reader,
                     frame_reader=series_counts)
        columns = read_csv(Path(tmp) / "columns.csv")
        events = read_csv(Path(tmp) / "events.csv")
    rows, frames = [], defaultdict(list)
    for r in columns:
        frames[(r["source"], int(r["frame"]))].append(r)
    for (source, frame), rr in frames.items():
        name = Path(source).name
        t = np.array(truth.get((name, frame), np.zeros((0, 3))))
        if not len(t):
            continue
        p = np.array([(float(r["x_px"]), float(r["y_px"])) for r in rr])
        i, j = match_columns(p, t[:, :2], 1.0 / float(info[name]["pixel_size_A"]))
        for a, b in zip(i, j):
            runs = got[source][int(rr[a]["track"])]
            run = next(s for s in runs if s["first"] <= frame <= s["last"])
            rows.append((group + int(info[name]["particle"]), float(info[name]["dose"]),
                         *run["evidence"], int(int(rr[a]["track_height"]) == int(t[b, 2]))))
    true = defaultdict(list)
    for r in read_csv(movies / "events.csv"):
        true[r["file"]].append((int(r["frame"]), float(r["x_px"]), float(r["y_px"]),
                                np.sign(int(r["height_after"]) - int(r["height_before"]))))
    found = []
    for r in events:
        name = Path(r["source"]).name
        px, sign = float(info[name]["pixel_size_A"]), np.sign(
            int(r["height_after"]) - int(r["height_before"]))
        real = any(abs(f - int(r["frame"])) <= 3 and s == sign and np.hypot(
            x - float(r["x_px"]), y - float(r["y_px"])) * px <= 1.5 for f, x, y, s in true[name])
        q = min(max(float(r["probability"]), 1e-9), 1 - 1e-9)
        found.append((float(info[name]["dose"]), float(np.log(q / (1 - q))), int(real)))
    return rows, found


def compare(rows: np.ndarray, sets) -> list[dict]:
    """Each feature set's leave-one-particle-out ECE per dose and log loss, and its full fit."""
    group, dose, x, y = rows[:, 0], rows[:, 1], rows[:, 2:-1], rows[:, -1]
    out = []
    for names in sets:
        cols = [EVIDENCE.index(n) for n in names]
        c = np.zeros(len(rows))
        for g in np.unique(group):
            m = group == g
            w = fit_logistic(x[~m][:, cols], y[~m], ridge=1.0)
            c[m] = 1 / (1 + np.exp(-(x[m][:, cols] @ w[:-1] + w[-1])))
        w = fit_logistic(x[:, cols], y, ridge=1.0)
        full = [0.0] * len(EVIDENCE) + [round(w[-1], 4)]
        for k, v in zip(cols, w[:-1]):
            full[k] = round(v, 4)
        cc = np.clip(c, 1e-6, 1 - 1e-6)
        out.append({"features": list(names), "confidence_weights": full,
                    "log_loss": round(float(-np.mean(y * np.log(cc) + (1 - y) * np.log(1 - cc))), 4),
                    "ece_left_out": {int(d): round(calibration(c[dose == d], y[dose == d])["ece"], 4)
                                     for d in np.unique(dose)}})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="MOVIES:RESULTS")
    ap.add_argument("--model", default=None,
                    help="model that reads the stacked frames (default: the shipped one)")
    ap.add_argument("--no-stack", action="store_true", help="heights from the frames alone")
    a = ap.parse_args(argv)
    reader = None if a.no_stack else stack_reader(a.model)
    rows, found = [], []
    for k, pair in enumerate(a.pairs):
        movies, result = pair.split(":", 1)
        r, f = collect(Path(movies), Path(result), 1000 * k, reader)
        rows += r
        found += f
    for line in compare(np.array(rows, np.float64), CANDIDATES):
        print(json.dumps(line), flush=True)
    ev = np.array(found, np.float64).reshape(-1, 3)
    if len(ev):
        w = fit_logistic(ev[:, 1:2], ev[:, 2], ridge=1.0)
        print(json.dumps({"events": len(ev), "real": int(ev[:, 2].sum()),
                          "event_scale": round(w[0], 4), "event_offset": round(w[1], 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
