"""How many of a movie set's true changes its pixels show at all: the ceiling of event recall.

usage:
  python scripts/studies/event_ceiling.py MOVIES[:RESULTS[:RESULTS ...]] [MOVIES[:...] ...]
      [--false-rate 0.01] [--window 16]

``MOVIES`` has the layout of ``../shared/crossmovie`` (``movies.csv``, ``truth.csv``,
``events.csv``, the TIFFs). For every true change, the electrons in the rings around the column
(:mod:`ceriakeras.analysis.rings`) are counted at its *true* position in every frame of the
stretches on both sides (at most ``--window`` frames a side), and the largest ring likelihood
ratio over every split of that window is taken (nats, over the column's quasi-Poisson dispersion,
as the tracks and sites weigh it; a frame's counts taken as electrons, against the first frame's
dose). That is what the package's test of the rings could see if it knew where the column is,
but not when it changed. The same scan over the same windows of columns that do not change there
gives the statistic's spread without a change; its ``1 − false_rate`` quantile is the threshold.
Changes above it are ones the pixels show to this test (``shown``); those below it cannot find
without also finding a ``false_rate`` share of unchanged windows (a test that knows how the
change looks, a template, can do somewhat better: docs/tracks.md).

With ``RESULTS`` (the ``ceriakeras analyze`` folders of the movies), each change is also marked
found or not, as ``score.py`` counts it (a reported event within 1.5 Å and ±3 frames, same sign).
Several sets are pooled; one line per dose is printed. A measurement, not a tuning tool: nothing
in the package reads it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ceriakeras.analysis.changepoints import ring_dispersion, ring_gain
from ceriakeras.analysis.rings import DoseLevel, ring_counts
from ceriakeras.analysis.track_settings import TrackSettings
from ceriakeras.io.series import open_series


def scan(counts: np.ndarray, min_stretch: int, systematic: float, frames: int) -> tuple:
    """The largest ring likelihood ratio (nats, over the dispersion) of one split of ``counts``
    (m, R), each side at least ``min_stretch`` frames, and the first frame after that split
    (index into ``counts``; 0 where no split fits)."""
    c = np.asarray(counts, np.float64)
    m = len(c)
    if m < 2 * min_stretch:
        return 0.0, 0
    disp = ring_dispersion(c, systematic, frames)
    cum = np.cumsum(c, axis=0)
    total = ring_gain(cum[-1], m)
    splits = np.arange(min_stretch, m - min_stretch + 1)
    before, after = cum[splits - 1], cum[-1] - cum[splits - 1]
    gain = (ring_gain(before, splits) + ring_gain(after, m - splits) - total) / disp
    k = int(np.argmax(gain))
    return float(gain[k]), int(splits[k])


def windows(heights: dict, frames: int, changes: list, window: int) -> list:
    """``(change frame, first, end)``: a window ``[first, end)`` about each frame in ``changes``
    (the movie's true change frames) within the stretches of ``heights`` ({frame: height}) on
    either side, at most ``window`` frames a side, over frames the column has."""
    have = sorted(heights)
    out = []
    for t in changes:
        first = max(t - window, 0)
        end = min(t + window, frames)
        for f in range(t - 1, first - 1, -1):  # back to the change before
            if f + 1 < t and heights.get(f) != heights.get(f + 1):
                first = f + 1
                break
        for f in range(t + 1, end):  # on to the change after
            if heights.get(f) != heights.get(f - 1):
                end = f
                break
        if all(f in heights for f in range(first, end)) and have:
            out.append((t, first, end))
    return out


def movie_scans(movies: Path, info: dict, truth: dict, events: list, settings: TrackSettings,
                window: int) -> tuple[list, list]:
    """One movie's scans: ``(event row, statistic, frame)`` of its true changes and the
    statistics of its unchanged windows."""
    px, n = float(info["pixel_size_A"]), int(info["frames"])
    columns = sorted(truth)
    xy = np.array([[truth[c].get(f, (np.nan, np.nan, 0))[:2] for c in columns] for f in range(n)])
    dose, counts = DoseLevel(), []
    with open_series(movies / info["file"], px) as series:
        for frame in series.frames():
            counts.append(ring_counts(frame.image, xy[frame.index], px, dose(frame.image)))
    counts = np.array(counts)  # (frames, columns, R)
    change_frames = sorted({int(e["frame"]) for e in events})
    changed, quiet = [], []
    for k, c in enumerate(columns):
        heights = {f: h for f, (_, _, h) in truth[c].items()}
        own = {int(e["frame"]): e for e in events if int(e["column"]) == c}
        for t, first, end in windows(heights, n, change_frames, window):
            block = counts[first:end, k]
            if not np.isfinite(block).all():
                continue
            stat, at = scan(block, settings.min_stretch, settings.ring_systematic,
                            settings.confidence_frames)
            if t in own:
                changed.append((own[t], stat, first + at))
            elif heights[first] == heights[end - 1]:
                quiet.append(stat)
    return changed, quiet


def found_events(results: list[Path]) -> dict:
    """``{file name: [(frame, x_px, y_px, sign)]}`` of the analyses' ``events.csv``."""
    out = defaultdict(list)
    for folder in results:
        with open(folder / "events.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                out[Path(r["source"]).name].append((int(r["frame"]), float(r["x_px"]),
                                                    float(r["y_px"]), np.sign(
                                                        int(r["height_after"])
                                                        - int(r["height_before"]))))
    return out


def is_found(event: dict, reported: list, pixel_size_A: float) -> bool:
    """Whether ``reported`` holds ``event`` as ``score.py`` counts it (1.5 Å, ±3 frames, sign)."""
    sign = np.sign(int(event["height_after"]) - int(event["height_before"]))
    return any(abs(f - int(event["frame"])) <= 3 and s == sign and np.hypot(
        x - float(event["x_px"]), y - float(event["y_px"])) * pixel_size_A <= 1.5
        for f, x, y, s in reported)


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+",
                    help="MOVIES or MOVIES:RESULTS[:RESULTS …] (analyze folders of them: each "
                         "change marked found or not); several sets are pooled per dose")
    ap.add_argument("--false-rate", type=float, default=0.01,
                    help="share of unchanged windows above the threshold (default 0.01)")
    ap.add_argument("--window", type=int, default=16, help="frames a side (default 16)")
    a = ap.parse_args(argv)
    by_dose = defaultdict(lambda: ([], []))
    for item in a.sets:
        movies, *results = item.split(":")
        for dose, changed, quiet in set_scans(Path(movies), [Path(r) for r in results],
                                              a.window):
            by_dose[dose][0].extend(changed)
            by_dose[dose][1].extend(quiet)
    for dose, (changed, quiet) in sorted(by_dose.items()):
        print(summary(dose, changed, quiet, a.false_rate))
    return 0


def set_scans(movies: Path, results: list[Path], window: int):
    """Per movie of a set: its dose (e⁻/Å²), its changes' ``(statistic, found)`` (found: None
    without ``results``, the set's analyze folders; ``(None, None)`` for a change that could not
    be scanned: its rings leave the frame, or the truth lacks some of its frames) and its
    unchanged windows' statistics."""
    settings = TrackSettings()
    truth = defaultdict(lambda: defaultdict(dict))
    for r in read_table(movies / "truth.csv"):
        truth[r["file"]][int(r["column"])][int(r["frame"])] = (
            float(r["x_px"]), float(r["y_px"]), int(r["height"]))
    events = defaultdict(list)
    for r in read_table(movies / "events.csv"):
        events[r["file"]].append(r)
    reported = found_events(results) if results else None
    for info in read_table(movies / "movies.csv"):
        changed, quiet = movie_scans(movies, info, truth[info["file"]], events[info["file"]],
                                     settings, window)
        px = float(info["pixel_size_A"])
        found = [(stat, None if reported is None else is_found(e, reported[info["file"]], px))
                 for e, stat, _ in changed]
        left = [(None, None)] * (len(events[info["file"]]) - len(changed))  # not scanned
        yield round(float(info["dose"])), found + left, quiet


def summary(dose: float, changes: list, quiet: list, false_rate: float) -> str:
    """One dose's line: the threshold, the share of changes above it, and (with results) how
    many of those above and below the analysis found."""
    changed = [c for c in changes if c[0] is not None]
    if not changed or not quiet:
        return f"{dose:g} e-/A2: {len(changed)} changes, {len(quiet)} unchanged windows: too few"
    threshold = float(np.quantile(quiet, 1 - false_rate))
    stats = np.array([s for s, _ in changed])
    shown = stats >= threshold
    left = len(changes) - len(changed)
    line = (f"{dose:g} e-/A2: threshold {threshold:.1f} nats ({false_rate:g} of "
            f"{len(quiet)} unchanged windows above); shown by the pixels {shown.sum()} / "
            f"{len(stats)} = {shown.mean():.3f}" + (f" ({left} not scanned)" if left else "")
            + f"; median statistic {np.median(stats):.1f} nats")
    if changed[0][1] is not None:
        found = np.array([f for _, f in changed], bool)
        line += (f"; found: {(found & shown).sum()} of those shown, {(found & ~shown).sum()} of "
                 f"the {(~shown).sum()} not shown (recall of the scanned {found.mean():.3f})")
    return line


if __name__ == "__main__":
    sys.exit(main())
