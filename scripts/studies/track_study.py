"""Score tracks on a set of movies (the layout of ``../shared/crossmovie``), tracking settings swept.

usage:
  python scripts/studies/track_study.py MOVIES RESULTS [RESULTS ...]
      [--grid temper=0.2,0.3 penalty=3,4,6] [--out study.json]

``RESULTS`` are ``ceriakeras analyze`` folders of the movies (with ``tracking/probabilities.bin``).
For each setting, the tracks are made again offline (:func:`ceriakeras.analysis.tracking.
write_tracks` on a copy of each folder, so the model is not run again) and scored: per dose the
metrics of ``MOVIES/score.py`` (or ``../shared/crossmovie/score.py``: f1, exact, track_exact,
event recall / precision) and the ECE of ``track_confidence`` (:func:`ceriakeras.evaluation.
scoring.calibration`, columns matched within 1 Å). Tune on your own movies only.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ceriakeras.analysis.reading import series_counts
from ceriakeras.analysis.offline import untracked_copy
from ceriakeras.analysis.tracking import write_tracks
from ceriakeras.analysis.tracks import TrackSettings
from ceriakeras.evaluation.scoring import calibration, match_columns

SCORE = Path(__file__).resolve().parents[3] / "shared" / "crossmovie" / "score.py"
"""The yardstick's scorer, beside the repository (``../shared``); ``--score`` names another."""


def stack_reader(model=None):
    """The stack reader ``analyze`` uses (:func:`ceriakeras.analysis.stacking.model_reader`),
    for the model at ``model`` (default: the shipped one)."""
    from ceriakeras.analysis.stacking import model_reader
    from ceriakeras.inference.predict import ColumnSettings
    from ceriakeras.inference.served import load_model

    served, _ = load_model(model)
    return model_reader(served, ColumnSettings.for_model(served.info))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def confidence_ece(movies: Path, outs: list[Path], pairs: dict | None = None) -> dict:
    """ECE of ``track_confidence`` per dose (columns matched to the truth within 1 Å); with
    ``pairs`` (a dict), also its ``(confidence, correct)`` arrays per dose."""
    info = {r["file"]: r for r in read_csv(movies / "movies.csv")}
    truth = defaultdict(list)
    for r in read_csv(movies / "truth.csv"):
        truth[(r["file"], int(r["frame"]))].append((float(r["x_px"]), float(r["y_px"]),
                                                    int(r["height"])))
    pred = defaultdict(list)
    for out in outs:
        for r in read_csv(out / "columns.csv"):
            pred[(Path(r["source"]).name, int(r["frame"]))].append(
                (float(r["x_px"]), float(r["y_px"]), int(r["track_height"]),
                 float(r["track_confidence"])))
    conf, ok = defaultdict(list), defaultdict(list)
    for key, t in truth.items():
        if key[0] not in info or key not in pred:
            continue
        t, p = np.array(t), np.array(pred[key])
        i, j = match_columns(p[:, :2], t[:, :2], 1.0 / float(info[key[0]]["pixel_size_A"]))
        dose = int(float(info[key[0]]["dose"]))
        conf[dose] += p[i, 3].tolist()
        ok[dose] += (p[i, 2] == t[j, 2]).tolist()
    if pairs is not None:
        pairs.update({d: (np.array(conf[d]), np.array(ok[d])) for d in conf})
    return {d: round(calibration(np.array(conf[d]), np.array(ok[d]))["ece"], 4) for d in conf}


def fit_platt(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of ``σ(a · logit(c) + b)`` that minimise the log loss."""
    from scipy.optimize import minimize

    c = np.clip(confidence, 1e-4, 1 - 1e-4)
    z, y = np.log(c / (1 - c)), correct.astype(np.float64)

    def loss(ab):
        q = np.clip(1 / (1 + np.exp(-(ab[0] * z + ab[1]))), 1e-9, 1 - 1e-9)
        return -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))

    a, b = minimize(loss, [1.0, 0.0], method="Nelder-Mead").x
    return float(a), float(b)


def quiet_columns(movies: Path, outs: list[Path]) -> dict:
    """Per dose, over the movies without true events: the share of true columns with no
    reported event within 1.5 Å of them (the static-series target)."""
    info = {r["file"]: r for r in read_csv(movies / "movies.csv")}
    changing = {r["file"] for r in read_csv(movies / "events.csv")}
    where = defaultdict(dict)
    for r in read_csv(movies / "truth.csv"):
        if r["file"] not in changing:
            where[(r["file"], int(r["frame"]))][int(r["column"])] = (float(r["x_px"]),
                                                                     float(r["y_px"]))
    flagged, total = defaultdict(set), defaultdict(int)
    for (name, frame), cols in where.items():
        if frame == 0:
            total[int(float(info[name]["dose"]))] += len(cols)
    for out in outs:
        if not (out / "events.csv").exists():
            continue
        for r in read_csv(out / "events.csv"):
            name = Path(r["source"]).name
            cols = where.get((name, int(r["frame"])))
            if not cols:
                continue
            tol = 1.5 / float(info[name]["pixel_size_A"])
            x, y = float(r["x_px"]), float(r["y_px"])
            for c, (cx, cy) in cols.items():
                if np.hypot(cx - x, cy - y) <= tol:
                    flagged[int(float(info[name]["dose"]))].add((name, c))
    return {d: round(1 - len(flagged[d]) / total[d], 4) for d in total if total[d]}


def score(movies: Path, outs: list[Path], script: Path = SCORE) -> dict:
    """score.py's rows per dose, with ``track_confidence_ece`` added."""
    text = subprocess.run([sys.executable, str(script), str(movies), *map(str, outs)],
                          capture_output=True, text=True, check=True).stdout
    rows = {int(r["dose"]): r for r in (json.loads(line) for line in text.splitlines()
                                        if line.startswith("{"))}
    for dose, ece in confidence_ece(movies, outs).items():
        rows.setdefault(dose, {})["track_confidence_ece"] = ece
    for dose, share in quiet_columns(movies, outs).items():
        rows.setdefault(dose, {})["static_columns_without_event"] = share
    return rows


def parse_settings(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = [type(getattr(TrackSettings(), key))(v) for v in value.split(",")]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("movies", type=Path)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--grid", nargs="*", default=[], help="NAME=v1,v2 of TrackSettings")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every setting's scores")
    ap.add_argument("--score", type=Path, default=SCORE, help="the crossmovie score.py")
    ap.add_argument("--model", default=None,
                    help="model that reads the stacked frames (default: the shipped one)")
    ap.add_argument("--no-stack", action="store_true",
                    help="heights from the frames alone (analyze --stack-frames 0)")
    ap.add_argument("--no-rings", action="store_true",
                    help="changes from the model's readings alone (no ring counts)")
    ap.add_argument("--fit-confidence", action="store_true",
                    help="fit the Platt map of track_confidence (run with slope 1, intercept 0)")
    a = ap.parse_args(argv)
    grid = parse_settings(a.grid)
    names = list(grid)
    report = []
    reader = None if a.no_stack else stack_reader(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        for values in itertools.product(*[grid[n] for n in names]) if names else [()]:
            settings = TrackSettings(**dict(zip(names, values)))
            outs = []
            for k, result in enumerate(a.results):
                work = Path(tmp) / f"r{k}"
                plan = untracked_copy(result, work)
                write_tracks(work, plan, settings, stack_reader=reader,
                             frame_reader=None if a.no_rings else series_counts)
                outs.append(work)
            rows = score(a.movies, outs, a.score)
            report.append({"settings": dict(zip(names, values)), "scores": rows})
            if a.fit_confidence:
                pairs: dict = {}
                confidence_ece(a.movies, outs, pairs)
                report[-1]["platt"] = fit_platt(np.concatenate([c for c, _ in pairs.values()]),
                                                np.concatenate([o for _, o in pairs.values()]))
            print(json.dumps(report[-1]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
