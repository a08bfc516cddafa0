"""Stretches read again from the aligned sum of their frames.

A column's misreading at low dose repeats in every frame of a state (docs/tracks.md): adding up
the class log-probabilities of its frames does not undo it. Adding up the *frames* does: once
the drift is taken out, the sum of ``n`` frames at ``d`` e⁻/Å² is one image at ``n·d``, which
the model reads far better (exact height 0.43 → 0.67 at 50 e⁻/Å² on our own ``tune2`` movies,
16 frames).

The series is cut into *epochs*: wherever any track starts a new stretch, and into pieces of at
most ``max_frames``. Each epoch's frames are shifted back by their drift (whole input pixels, so
the counts stay counts) and added (:func:`aligned_sums`); the model reads the sum once
(``analyze``'s reader, :func:`ceriakeras.inference.predict.predict_columns`); each track takes
the column nearest to it in every epoch that its stretch covers for at least half
(:func:`restack`). The heights of a track's stretches are then read from those readings, each
weighted by its frames, under the same constraint as before: each change goes the way the
stretches' mean expected height moved. Where and whether a column changed is still decided by
the frames (:mod:`ceriakeras.analysis.changepoints`): letting two stacked readings of the same
height veto a change lost a third of the true changes on our own movies at 200 e⁻/Å² (recall
0.79 → 0.50 on ``tune2``), as a stacked reading is itself wrong one time in three.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .changepoints import assign_heights, log_probabilities
from .tracks import TrackSettings, reread_confidence


@dataclass(frozen=True)
class StackSettings:
    """How epochs are cut and read (frames, Å).

    ``max_frames`` bounds the cost (one model call per epoch: at most ``1 / max_frames`` of the
    per-frame model time, plus one per cut) and how far apart in time the frames of one reading
    may lie; 0 turns stacked readings off.
    """

    max_frames: int = 64
    """Longest epoch, frames (0: no stacked readings)."""
    min_frames: int = 3
    """Shortest epoch that is read, frames."""
    max_distance_A: float = 1.0
    """Largest distance, Å, between a track and the summed image's column it takes."""


def epochs(n_frames: int, cuts: Iterable[int], settings: StackSettings) -> list[tuple[int, int]]:
    """The epochs ``[a, b)`` of a series of ``n_frames``: cut at ``cuts`` (frames where some
    track starts a new stretch), the longer ones split evenly into pieces of at most
    ``settings.max_frames``; those shorter than ``settings.min_frames`` are left out."""
    if settings.max_frames <= 0:
        return []
    edges = sorted({0, n_frames, *[int(c) for c in cuts if 0 < c < n_frames]})
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        pieces = -(-(b - a) // settings.max_frames)
        bounds = np.linspace(a, b, pieces + 1).round().astype(int).tolist()
        out += [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e - s >= settings.min_frames]
    return out


def shift_back(image: np.ndarray, dx_px: int, dy_px: int) -> np.ndarray:
    """``image`` with its content moved by (−dx, −dy) whole pixels; the strip that comes in is
    filled with the image's mean (near the vacuum level of a particle in vacuum; the median
    would be closer, and cost 10 times the rest of this stage on a 1024² frame)."""
    out = np.zeros(image.shape, np.float64)
    add_shifted_back(out, image, dx_px, dy_px)
    return out


def add_shifted_back(total: np.ndarray, image: np.ndarray, dx_px: int, dy_px: int) -> None:
    """``total += shift_back(image, dx_px, dy_px)``, in place, without the shifted copy."""
    h, w = image.shape
    mean = float(image.mean())
    if abs(dx_px) >= w or abs(dy_px) >= h:  # drifted out of the field
        total += mean
        return
    ys, yd = (slice(dy_px, h), slice(0, h - dy_px)) if dy_px >= 0 else (
        slice(0, h + dy_px), slice(-dy_px, h))
    xs, xd = (slice(dx_px, w), slice(0, w - dx_px)) if dx_px >= 0 else (
        slice(0, w + dx_px), slice(-dx_px, w))
    total[yd, xd] += image[ys, xs]
    rows = slice(h - dy_px, h) if dy_px >= 0 else slice(0, -dy_px)  # the strips that came in
    cols = slice(w - dx_px, w) if dx_px >= 0 else slice(0, -dx_px)
    total[rows, :] += mean
    total[yd, cols] += mean


def aligned_sums(frames: Iterator, spans: list[tuple[int, int]], drift_px: dict
                 ) -> Iterator[tuple[tuple[int, int], np.ndarray, int]]:
    """The drift-free sum of each epoch's frames, in order.

    Parameters
    ----------
    frames : iterator of (index, image)
        The series' frames in order (``image`` counts, None for a frame that could not be read).
    spans : list of (a, b)
        Epochs, in order, not overlapping (:func:`epochs`).
    drift_px : dict
        ``{frame: (dx, dy)}``, input pixels, each frame's drift from the first; frames without
        one are left out.

    Yields
    ------
    span : (a, b)
    total : (H, W) float64
        The sum, in the first frame's place (content at ``x − drift``).
    n : int
        Frames added (an epoch without any is not yielded).
    """
    spans = iter(spans)
    span = next(spans, None)
    total, n = None, 0
    for index, image in frames:
        while span is not None and index >= span[1]:
            if n:
                yield span, total, n
            span, total, n = next(spans, None), None, 0
        if span is None:
            return
        if index < span[0] or image is None or index not in drift_px:
            continue
        dx, dy = (int(round(v)) for v in drift_px[index])
        if total is None:
            total, n = np.zeros(np.shape(image), np.float64), 0
        add_shifted_back(total, np.asarray(image), dx, dy)
        n += 1
    if span is not None and n:
        yield span, total, n


def stack_readings(frames: Iterator, spans: list[tuple[int, int]], drift_A: dict,
                   pixel_size_A: float, read) -> list:
    """Each epoch's drift-free sum read once: per epoch ``(xy_A (N, 2), probabilities (N, K))``
    of the columns found in it (Å, without drift), or None (no frame to add).

    Parameters
    ----------
    frames : iterator of (index, image)
        See :func:`aligned_sums`.
    spans : list of (a, b)
    drift_A : dict
        ``{frame: (dx, dy)}``, Å.
    pixel_size_A : float
        The input's pixel size, Å.
    read : callable
        ``read(image) -> table`` with ``x_px``, ``y_px`` (input pixels) and
        ``class_probabilities`` (:func:`ceriakeras.inference.predict.predict_columns`).
    """
    drift_px = {f: (dx / pixel_size_A, dy / pixel_size_A) for f, (dx, dy) in drift_A.items()}
    found = {}
    for span, total, _ in aligned_sums(frames, spans, drift_px):
        table = read(total)
        xy = np.stack([np.asarray(table["x_px"], np.float64),
                       np.asarray(table["y_px"], np.float64)], axis=1) * pixel_size_A
        found[span] = (xy, np.asarray(table["class_probabilities"]))
    return [found.get(span) for span in spans]


def model_reader(model, settings, timings: dict | None = None):
    """The ``stack_reader`` of :func:`ceriakeras.analysis.tracking.write_tracks` for a model.

    Parameters
    ----------
    model : object with ``.predict``
        The model that read the frames.
    settings : ceriakeras.inference.predict.ColumnSettings
        How its columns are found (as for the frames).
    timings : dict, optional
        ``timings['stacks']`` gets the seconds spent (reading the files again included).

    Returns
    -------
    callable
        ``read(item, spans, drift_A, on_frame=None)``: the series ``item['path']`` (``item`` a plan entry with
        ``pixel_size_A``, ``counts_per_electron`` and, optionally, ``factor``) read again, each
        epoch's drift-free sum read once by :func:`ceriakeras.inference.predict.predict_columns`;
        see :func:`stack_readings`; ``on_frame(index, image)`` sees every frame read (the
        sites' ring counts, :mod:`ceriakeras.analysis.sites`).
    """
    from ..inference.predict import predict_columns
    from ..inference.resample import resample_factor
    from .reading import series_counts

    def read(item, spans, drift_A, on_frame=None):
        t0 = time.perf_counter()
        px = item["pixel_size_A"]
        factor = item.get("factor") or resample_factor(px, settings.model_pixel_A)
        with contextlib.closing(series_counts(item)) as frames:  # as the file holds them
            frames = frames if on_frame is None else _tapped(frames, on_frame)
            found = stack_readings(
                frames, spans, drift_A, px,
                lambda image: predict_columns(model, image, factor, settings,
                                              counts_per_electron=item["counts_per_electron"])[0])
            if on_frame is not None:  # the frames after the last epoch too
                for _ in frames:
                    pass
        if timings is not None:
            timings["stacks"] = timings.get("stacks", 0.0) + time.perf_counter() - t0
        return found

    return read


def _tapped(frames: Iterator, on_frame) -> Iterator:
    """``frames``, each shown to ``on_frame(index, image)`` as it passes."""
    for index, image in frames:
        on_frame(index, image)
        yield index, image


def restack(by_track: dict, spans: list[tuple[int, int]], readings: list, drift_A: dict,
            settings: StackSettings, tracks: TrackSettings) -> int:
    """Read the heights of one series' stretches again from the epochs' readings.

    Parameters
    ----------
    by_track : dict
        ``{track: [stretch, …]}`` (in order; each with ``first``, ``last``, ``x_A``, ``y_A``,
        ``sum`` its frames' summed class log-probabilities, ``mean`` its mean expected height),
        changed in place: ``height_index``, ``evidence`` and ``confidence``
        (:func:`ceriakeras.analysis.tracks.reread_confidence`) and ``stacked`` (frames of the
        epochs read).
    spans : list of (a, b)
        The epochs read.
    readings : list
        Per epoch, ``(xy_A (N, 2), probabilities (N, K))`` of the columns found in its sum
        (positions without drift, Å), or None.
    drift_A : dict
        ``{frame: (dx, dy)}``, Å.
    settings : StackSettings
    tracks : TrackSettings
        The tracks' settings (``temper``: the weight of one frame's log-probabilities, for
        stretches without a stacked reading).

    Returns
    -------
    int
        Stretches with a stacked reading.
    """
    trees = [None if r is None or not len(r[0]) else cKDTree(np.asarray(r[0])) for r in readings]
    logps = [None if r is None or not len(r[0]) else log_probabilities(r[1]) for r in readings]
    starts = np.array([a for a, _ in spans], np.int64)
    read = 0
    for runs in by_track.values():
        stacked = []
        for run in runs:
            total, frames = None, 0
            dx, dy = drift_A.get(run["first"], (0.0, 0.0))
            where = (run["x_A"] - dx, run["y_A"] - dy)
            lo = max(0, int(np.searchsorted(starts, run["first"], side="right")) - 1)
            for e in range(lo, len(spans)):
                a, b = spans[e]
                if a > run["last"]:
                    break
                overlap = min(b, run["last"] + 1) - max(a, run["first"])
                if trees[e] is None or 2 * overlap < b - a:
                    continue
                d, k = trees[e].query(where)
                if d > settings.max_distance_A:
                    continue
                part = (b - a) * logps[e][k]
                total, frames = (part, b - a) if total is None else (total + part, frames + b - a)
            run["stacked"] = frames
            stacked.append(total)
        read += sum(t is not None for t in stacked)
        if not any(t is not None for t in stacked):
            continue
        sums = np.array([t if t is not None else tracks.temper * np.asarray(run["sum"])
                         for t, run in zip(stacked, runs)])
        means = np.array([run["mean"] for run in runs])
        directions = np.sign(np.diff(means)).astype(np.int64)  # each change as the frames say
        for run, h, total in zip(runs, assign_heights(sums, directions).tolist(), stacked):
            if run["height_index"] != h or total is not None:
                run["height_index"] = int(h)
                reread_confidence(run, tracks, total)
    return read
