"""Tracks in ``analyze``: per-column class probabilities → tracks, stretches, events, drift.

While frames are analysed, each column's class probabilities (the model's mass over its label
disk per height, :func:`ceriakeras.inference.columns.find_columns`' ``class_probabilities``) are
appended to ``OUT/tracking/probabilities.bin`` (:class:`.problog.ProbabilityLog`, cut back on resume like ``columns.csv``). When
every frame is done, :func:`write_tracks` reads ``columns.csv`` and that log once per series
through a :class:`ceriakeras.analysis.tracks.Tracker`, then writes

- ``columns.csv`` again with ``track`` (unique within a source), ``track_height`` (Ce atoms, read
  from all the frames of the column's stretch of constant height) and ``track_confidence`` (the
  probability that ``track_height`` is right);
- ``events.csv``: ``source, track, frame, x_px, y_px, x_A, y_A, height_before, height_after,
  probability`` (``frame`` the first frame at the new height, x, y where the column is then):
  the tracks' changes, and those read at the columns' places in every frame
  (:mod:`ceriakeras.analysis.sites`) that no track's change reports;
- ``tracking/drift.csv``, read by :func:`add_drift_columns` into ``frames.csv``'s
  ``drift_x_A, drift_y_A`` (Å, relative to the first frame).

A single image (a one-frame input) gets ``track`` = its row's index, ``track_height`` =
``height``, ``track_confidence`` = ``confidence`` and no events.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io as _stdio
import itertools
import operator
from pathlib import Path

import numpy as np

from ..config import InputError
from ..io.files import atomic_path, write_bytes_atomic
from .problog import LOG_NAME, ProbabilityLog, read_probability_log  # noqa: F401 (re-exported)
from .reading import FrameCursor
from .sites import Sightings, new_changes, site_changes, split_stretches
from .stacking import StackSettings, epochs, restack
from .tracks import Tracker, TrackSettings

TRACK_COLUMNS = ("track", "track_height", "track_confidence")
"""Appended to ``columns.csv`` by :func:`write_tracks`."""
EVENT_COLUMNS = ("source", "track", "frame", "x_px", "y_px", "x_A", "y_A", "height_before",
                 "height_after", "probability")
"""Columns of ``events.csv``."""
DRIFT_COLUMNS = ("drift_x_A", "drift_y_A")
"""Appended to ``frames.csv`` by :func:`add_drift_columns`."""


def _fallback_probabilities(height: np.ndarray, confidence: np.ndarray, k: int) -> np.ndarray:
    """Class probabilities from a row's height and confidence alone (no logged map)."""
    p = np.tile(((1 - confidence) / max(k - 1, 1))[:, None], (1, k))
    p[np.arange(len(height)), np.clip(height - 1, 0, k - 1)] = confidence
    return p


def _frames_of(csv_path: Path, offsets: dict):
    """Iterate ``(source, frame, global frame, rows)`` over ``columns.csv`` frame by frame."""
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        for (source, frame), rows in itertools.groupby(reader, operator.itemgetter(0, 1)):
            frame = int(frame)
            yield source, frame, offsets[source] + frame, list(rows)
    return header


def _numbers(rows: list) -> np.ndarray:
    """Columns 3–8 of ``columns.csv`` rows (``x_px … confidence``) as an (N, 6) float array."""
    text = ",".join([",".join(r[2:8]) for r in rows])
    values = np.fromstring(text, sep=",") if text else np.zeros(0)  # as float() reads them
    if values.size != 6 * len(rows):  # not six plain numbers a row: let NumPy say what
        values = np.array([r[2:8] for r in rows], np.float64)
    return values.reshape(len(rows), 6)


def write_tracks(out_dir, plan: list, settings: TrackSettings | None = None,
                 before_replace=None, on_stretches=None, stack_reader=None,
                 stack: StackSettings | None = None, frame_reader=None) -> dict:
    """Track every series of a finished run; rewrite ``columns.csv``, write ``events.csv``.

    Parameters
    ----------
    out_dir : path
        The run's folder (``columns.csv``, ``tracking/probabilities.bin``).
    plan : list of dict
        The run's inputs in order (``source``, ``n_frames``; ``dose_e_per_A2``, the series'
        median dose per frame, e⁻/Å², where known: its penalties are taken at that dose,
        :meth:`TrackSettings.at_dose`).
    settings : TrackSettings, optional
    before_replace : callable, optional
        ``before_replace(size)`` is called with the new ``columns.csv``'s size, bytes, before it
        replaces the old one (the run commits that size first: a run killed in between then
        finds a CSV shorter than committed and redoes only its last frame).
    on_stretches : callable, optional
        ``on_stretches(stretches)`` gets every series' stretches (``{source: {track: [stretch,
        …]}}``, each with its ``evidence``) before the tables are written (calibration studies).
    stack_reader, stack : callable, StackSettings, optional
        ``stack_reader(item, spans, drift_A, on_frame=None)``: the epochs' summed frames read by
        the model (:func:`.stacking.model_reader`), each frame read shown to ``on_frame(index,
        image)``; None: heights from the frames' readings alone.
    frame_reader : callable, optional
        ``frame_reader(item)`` → ``(index, image)`` of the series' frames, counts per pixel
        (:func:`.reading.series_counts`; ``item['counts_per_electron']`` converts): the electrons
        around each column join the change statistic, and the changes at the sites are read
        (:mod:`.sites`; in the stacks' read, or in one more without it). None: the model's
        readings alone.

    Returns
    -------
    dict
        ``tracks`` (over all series), ``events``, ``stacked`` (stretches whose height was
        read from summed frames) and ``unread`` (``{source: warning}``, :func:`unread_warning`:
        series that could not be read again, tracked from the model's readings alone).

    Notes
    -----
    Any earlier ``track, track_height, track_confidence`` values (blank while frames are
    analysed, or from an earlier pass) are replaced: the result depends only on the columns and
    the probability log.
    """
    with _collector_paused():
        return _write_tracks(Path(out_dir), plan, settings or TrackSettings(), before_replace,
                             on_stretches, stack_reader, stack or StackSettings(), frame_reader)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for a while (as it was after): the tracks make no
    reference cycles, and its passes over their 10⁵ live records and every other object of the
    process cost 10–20 % of the tracks stage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_tracks(out_dir: Path, plan: list, settings: TrackSettings, before_replace,
                  on_stretches, stack_reader, stack: StackSettings, frame_reader) -> dict:
    """:func:`write_tracks`, with the cyclic garbage collector paused."""
    csv_path = out_dir / "columns.csv"
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        header = next(csv.reader(fh))
    if TRACK_COLUMNS[0] in header:
        header = header[:header.index(TRACK_COLUMNS[0])]
    offsets, n_frames, g = {}, {}, 0
    for item in plan:
        offsets[item["source"]], n_frames[item["source"]] = g, item["n_frames"]
        g += item["n_frames"]
    ids_path = out_dir / "tracking" / "track_ids.bin"  # each row's track, in row order
    ids_path.parent.mkdir(parents=True, exist_ok=True)
    unread: dict = {}  # source: why it could not be read again (model's readings alone)
    sightings: dict = {}  # source: each track's positions (sites)
    own = {item["source"]: settings.at_dose(item.get("dose_e_per_A2"))  # penalties at its dose
           for item in plan}
    with open(ids_path, "wb") as ids_file:
        stretches, drift_rows, layout = _track_pass(
            csv_path, offsets, n_frames, own, read_probability_log(out_dir / LOG_NAME), ids_file,
            {item["source"]: item for item in plan}, frame_reader, unread, sightings)
    for by_track in stretches.values():
        for runs in by_track.values():
            runs.sort(key=lambda s: s["first"])
    stacked, found = _reread_all(stretches, drift_rows, plan, stack_reader, frame_reader, stack,
                                 own, unread, sightings)
    events = _events(stretches, plan, found, settings)  # splits stretches at site changes
    if on_stretches is not None:
        on_stretches(stretches)
    _write_csv(out_dir / "tracking" / "drift.csv", drift_rows)
    _write_csv(out_dir / "events.csv", [EVENT_COLUMNS] + events)
    _rewrite_columns(csv_path, header, layout, ids_path, stretches, before_replace)
    ids_path.unlink()
    return {"tracks": sum(len(v) for v in stretches.values()), "events": len(events),
            "unread": unread,
            "stacked": stacked}


def _reread_all(stretches: dict, drift_rows: list, plan: list, reader, frame_reader,
                stack: StackSettings, own: dict, unread: dict, sightings: dict
                ) -> tuple[int, dict]:
    """Every series read once more: its stretches' heights from its epochs' summed frames
    (:func:`ceriakeras.analysis.stacking.restack`, with ``reader``) and, in the same read, the
    changes at its sites (:mod:`ceriakeras.analysis.sites`, when ``frame_reader`` is given),
    with each series' ``own`` settings (``{source: TrackSettings}``, :meth:`TrackSettings.at_dose`).
    Returns the number of stretches so read and each series' site changes."""
    drift: dict = {}
    for source, frame, dx, dy in drift_rows[1:]:
        drift.setdefault(source, {})[frame] = (float(dx), float(dy))
    read, found = 0, {}
    for item in plan:
        by_track = stretches.get(item["source"])
        if not by_track or item["n_frames"] < 2:
            continue
        drift_A, settings = drift.get(item["source"], {}), own[item["source"]]
        spans = [] if reader is None else epochs(item["n_frames"], {
            run["first"] for runs in by_track.values() for run in runs[1:]}, stack)
        sites, members = (None, None) if frame_reader is None or item["source"] in unread else (
            site_changes(sightings.get(item["source"]), item, drift_A, settings))
        try:
            if spans:
                readings = reader(item, spans, drift_A, **(
                    {"on_frame": sites.add} if sites is not None else {}))
                read += restack(by_track, spans, readings, drift_A, stack, settings)
            elif sites is not None:
                frames = frame_reader(item)
                try:
                    for index, image in frames:
                        sites.add(index, image)
                finally:
                    getattr(frames, "close", lambda: None)()
        except (InputError, OSError) as err:  # moved or damaged since: frames' heights stay
            unread.setdefault(item["source"], unread_warning(str(err)))
            continue
        if sites is not None:
            found[item["source"]] = sites.events(members, by_track, item["source"])
    return read, found


def _track_pass(csv_path: Path, offsets: dict, n_frames: dict, own: dict, log, ids_file,
                items: dict, frame_reader, unread: dict, sightings: dict
                ) -> tuple[dict, list, list]:
    """Stream ``columns.csv`` and the probability log ``log`` once through a tracker per
    series (its ``own`` settings, ``{source: TrackSettings}``; with each series' frames from
    ``frame_reader``, if given); write each row's track
    to ``ids_file`` and its sightings to ``sightings[source]`` (:class:`.sites.Sightings`); return the stretches (``{source: {track: [stretch, …]}}``), the rows of
    ``tracking/drift.csv`` and the table's layout (``(source, frame, rows)`` per frame)."""
    stretches: dict = {}
    layout = []
    drift_rows = [("source", "frame") + DRIFT_COLUMNS]
    logged = next(log, None)
    tracker, current, item, images = None, None, {}, FrameCursor(None)

    def collect(source, tracker, finish=False):
        if finish:
            tracker.finish()
        for s in tracker.pop_stretches():
            stretches.setdefault(source, {}).setdefault(s["track"], []).append(s)

    for source, frame, gi, rows in _frames_of(csv_path, offsets):
        layout.append((source, frame, len(rows)))
        while logged is not None and logged[0] < gi:
            logged = next(log, None)
        if n_frames[source] < 2:
            ids_file.write(np.arange(len(rows), dtype=np.int64).tobytes())
            continue
        if source != current:
            if tracker is not None:
                collect(current, tracker, finish=True)
            _close(images, current, unread)  # the series just ended
            tracker = Tracker(own[source])
            current, item = source, items.get(source, {})
            images = FrameCursor(frame_reader(item) if frame_reader is not None and item
                                 else None)
        table = _numbers(rows)
        if logged is not None and logged[0] == gi and len(logged[1]) == len(rows):
            probabilities = logged[1]
        else:  # no logged map for this frame (an older run): from height and confidence
            probabilities = _fallback_probabilities(table[:, 4].astype(np.int64), table[:, 5],
                                                    16 if logged is None else logged[1].shape[1])
        ids, drift = tracker.add_frame(frame, table[:, 2:4], probabilities, table[:, 0:2],
                                       table[:, 5], images.get(frame), item.get("pixel_size_A"),
                                       item.get("counts_per_electron") or 1.0)
        ids_file.write(np.asarray(ids, np.int64).tobytes())
        sightings.setdefault(source, Sightings()).add(ids, table[:, 2:4], drift, frame,
                                                      tracker.level, tracker.frame_dose)
        drift_rows.append((source, frame, f"{drift[0]:.4f}", f"{drift[1]:.4f}"))
        collect(source, tracker)
    if tracker is not None:
        collect(current, tracker, finish=True)
    _close(images, current, unread)
    return stretches, drift_rows, layout


def _close(images: FrameCursor, source, unread: dict) -> None:
    """Close a series' frames; note in ``unread`` why they could not be read, if so."""
    if images.error is not None:
        unread.setdefault(source, unread_warning(images.error))
    images.close()


def unread_warning(reason: str) -> str:
    """What to tell of a series that could not be read again for its tracks (``reason``)."""
    return (f"could not be read again for the tracks ({reason}): its changes and heights come "
            "from the model's per-frame readings alone; put the file back and run again with "
            "--overwrite for the full tracks")


def _events(stretches: dict, plan: list, found: dict, settings: TrackSettings) -> list:
    """Rows of ``events.csv``, in input order: the first stretch of each change of height, and
    the changes ``found`` at the sites that no such change already reports. A site's change
    inside a stretch of its track splits that stretch there (:func:`.sites.split_stretches`),
    so ``track_height`` changes where the event says."""
    order = {item["source"]: k for k, item in enumerate(plan)}
    known = _track_events(stretches, order)  # before the splits: what the sites must not repeat
    rest = []
    for source, changes in found.items():
        new = new_changes(changes, [row for k, _, _, row in known if k == order[source]],
                          settings)
        rest += [(order[source], frame, track, row) for frame, track, row
                 in split_stretches(stretches.get(source, {}), new)]
    rows = _track_events(stretches, order) + rest  # again: the splits are changes of tracks now
    return [row for *_, row in sorted(rows, key=lambda r: r[:3])]


def _track_events(stretches: dict, order: dict) -> list:
    """``(series order, frame, track, row)`` of each change between two stretches of a track."""
    rows = []
    for source, by_track in stretches.items():
        for track, runs in by_track.items():
            for before, after in itertools.pairwise(runs):
                if after["change_probability"] is None or (
                        before["height_index"] == after["height_index"]):
                    continue
                rows.append((order[source], after["first"], track, (
                    source, track, after["first"], f"{after['x_px']:.3f}", f"{after['y_px']:.3f}",
                    f"{after['x_A']:.4f}", f"{after['y_A']:.4f}", before["height_index"] + 1,
                    after["height_index"] + 1, f"{after['change_probability']:.4f}")))
    return rows


def _rewrite_columns(csv_path: Path, header: list, layout: list, ids_path: Path,
                     stretches: dict, before_replace=None) -> None:
    """``columns.csv`` again, each row with its track, track height and confidence.

    ``layout`` holds ``(source, frame, rows)`` of each frame in the table's order: a frame's rows
    are copied as lines without their old track columns (parsed only when the CSV quotes their
    source's name)."""
    lookup = {source: _StretchLookup(by_track) for source, by_track in stretches.items()}
    n = len(header)
    with atomic_path(csv_path) as tmp:
        with (open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as out,
              open(csv_path, newline="\n", encoding="utf-8", errors="surrogateescape") as src,
              open(ids_path, "rb") as ids_file):
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(header + list(TRACK_COLUMNS))
            next(csv.reader(src))
            for source, frame, n_rows in layout:
                ids = np.frombuffer(ids_file.read(8 * n_rows), np.int64)
                tails = (lookup[source].tails(ids, frame) if source in lookup
                         else [None] * n_rows)
                if any(c in source for c in ',"\r\n'):  # a name the CSV quotes
                    rows = list(itertools.islice(csv.reader(src), n_rows))
                    writer.writerows(rec[:n] + _tail(tail, tid, rec).split(",")
                                     for rec, tid, tail in zip(rows, ids.tolist(), tails))
                    continue
                lines = [src.readline().rstrip("\r\n").split(",", n) for _ in range(n_rows)]
                out.write("".join([",".join(rec[:n]) + "," + _tail(tail, tid, rec) + "\n"
                                   for rec, tid, tail in zip(lines, ids.tolist(), tails)]))
        if before_replace is not None:
            before_replace(tmp.stat().st_size)


def _tail(tail: str | None, tid: int, rec: list) -> str:
    """A row's ``track,track_height,track_confidence``: its stretch's, or (a single image, no
    stretch) its own index, height and confidence."""
    return f"{tid},{rec[6]},{rec[7]}" if tail is None else tail


class _StretchLookup:
    """The stretches of one series' tracks, found by track and frame at once."""

    def __init__(self, by_track: dict):
        tracks = sorted(by_track)
        runs = [run for t in tracks for run in by_track[t]]  # by track, then first frame
        self.span = max((run["first"] for run in runs), default=0) + 1
        self.keys = np.array([run["track"] * self.span + run["first"] for run in runs], np.int64)
        self.track = np.array([run["track"] for run in runs], np.int64)
        counts = [len(by_track[t]) for t in tracks]
        self.start = dict(zip(tracks, np.cumsum([0] + counts[:-1]).tolist()))
        self.text = [f"{run['track']},{run['height_index'] + 1},{run['confidence']:.4f}"
                     for run in runs]

    def tails(self, ids: np.ndarray, frame: int) -> list:
        """``track,track_height,track_confidence`` of each column (its stretch in ``frame``,
        else its track's first; None for a track without stretches)."""
        if not len(self.keys):
            return [None] * len(ids)
        k = np.searchsorted(self.keys, ids * self.span + min(frame, self.span - 1),
                            side="right") - 1
        at = np.maximum(k, 0)
        found = (k >= 0) & (self.track[at] == ids)
        if not found.all():  # before its first stretch (or none): the track's first, if any
            at = [a if ok else self.start.get(tid)
                  for a, ok, tid in zip(at.tolist(), found.tolist(), ids.tolist())]
            return [None if a is None else self.text[a] for a in at]
        return [self.text[a] for a in at.tolist()]


def _write_csv(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _stdio.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    write_bytes_atomic(path, text.getvalue().encode("utf-8", "surrogateescape"))  # names as given


def add_drift_columns(out_dir) -> None:
    """Add ``drift_x_A, drift_y_A`` (Å, from ``tracking/drift.csv``) to ``frames.csv``, after
    ``recognised`` (before any model-specific columns); blank for a frame without tracked
    columns."""
    out_dir = Path(out_dir)
    drift_path, frames_path = out_dir / "tracking" / "drift.csv", out_dir / "frames.csv"
    if not (drift_path.exists() and frames_path.exists()):
        return
    with open(drift_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        drift = {(r["source"], r["frame"]): (r["drift_x_A"], r["drift_y_A"])
                 for r in csv.DictReader(fh)}
    with open(frames_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = list(csv.reader(fh))
    if not rows or DRIFT_COLUMNS[0] in rows[0]:
        return
    at = rows[0].index("recognised") + 1 if "recognised" in rows[0] else len(rows[0])
    out = [rows[0][:at] + list(DRIFT_COLUMNS) + rows[0][at:]]
    out += [r[:at] + list(drift.get((r[0], r[1]), ("", ""))) + r[at:] for r in rows[1:]]
    _write_csv(frames_path, out)


def movie_track_heights(out_dir, positions: dict) -> dict:
    """``positions`` (``{source: {frame: (x_px, y_px, height)}}``, rows in ``columns.csv``'s
    order, as the movie draws them) with each column's ``track_height`` for its height, so the
    movie labels columns with the height read from their stretch."""
    with open(Path(out_dir) / "columns.csv", newline="", encoding="utf-8",
              errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if TRACK_COLUMNS[1] not in header:
            return positions
        col = header.index(TRACK_COLUMNS[1])
        heights: dict = {}
        for rec in reader:
            if rec[0] in positions and rec[col] != "":
                heights.setdefault((rec[0], int(rec[1])), []).append(int(rec[col]))
    out = {}
    for source, frames in positions.items():
        out[source] = {}
        for frame, (x, y, h) in frames.items():
            new = heights.get((source, frame))
            out[source][frame] = (x, y, np.asarray(new, np.int32) if new is not None
                                  and len(new) == len(h) else h)
    return out


EVENT_NOTE_FRAMES = 5
"""Frames of the movie that point out a change, from its first frame at the new height."""


def event_marks(out_dir, source: str, pixel_size_A: float | None = None) -> dict[int, list]:
    """``{frame: [(x_px, y_px, "3→4"), …]}`` from ``events.csv`` for one source: where each
    change of height happens (input pixels) and how (Ce atoms), for :data:`EVENT_NOTE_FRAMES`
    frames from when it happens (the movie marks and names it). With the input's
    ``pixel_size_A`` (Å), each mark follows the drift (``tracking/drift.csv``) over those
    frames."""
    out_dir = Path(out_dir)
    drift: dict[int, tuple] = {}
    if pixel_size_A and (out_dir / "tracking" / "drift.csv").exists():
        with open(out_dir / "tracking" / "drift.csv", newline="", encoding="utf-8",
                  errors="surrogateescape") as fh:
            drift = {int(r["frame"]): (float(r[DRIFT_COLUMNS[0]]) / pixel_size_A,
                                       float(r[DRIFT_COLUMNS[1]]) / pixel_size_A)
                     for r in csv.DictReader(fh) if r["source"] == source}
    marks: dict[int, list] = {}
    if (out_dir / "events.csv").exists():
        with open(out_dir / "events.csv", newline="", encoding="utf-8",
                  errors="surrogateescape") as fh:
            for r in csv.DictReader(fh):
                if r["source"] != source:
                    continue
                first, text = int(r["frame"]), f"{r['height_before']}→{r['height_after']}"
                x0, y0 = drift.get(first, (0.0, 0.0))
                for f in range(first, first + EVENT_NOTE_FRAMES):
                    dx, dy = drift.get(f, (x0, y0))
                    marks.setdefault(f, []).append(
                        (float(r["x_px"]) + dx - x0, float(r["y_px"]) + dy - y0, text))
    return marks
