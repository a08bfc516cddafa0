"""A column's own pixels, frame by frame: electrons in rings around it (change detection).

At 50 e⁻/Å² per frame the model reads a column's height right one time in two, and it misreads
a column the same way in every frame of a state: the per-frame expected height then barely
moves when one Ce atom leaves or lands (docs/tracks.md). The electrons that land around the
column do move, whatever the model makes of them. Counted in a few rings around the column's
position (from its track: a slow average of its sightings), they are Poisson counts, and a
change of their means between two stretches is a plain likelihood ratio
(:func:`ceriakeras.analysis.changepoints.ring_gain`).

The sign of that change depends on the optics (defocus turns a heavier column brighter or
darker), so the rings say *when* a column changed; which way it changed is still read by the
model.
"""

from __future__ import annotations

import functools

import numpy as np

RINGS_A = (0.0, 0.4, 0.8, 1.2, 1.6)
"""Ring edges, Å, around a column's centre: a disk and three rings (chosen on our own ``tune``
and ``tune2`` movies; nearest Ce neighbours in [110] lie ≥ 1.9 Å away)."""


def ring_counts(image: np.ndarray, xy_px: np.ndarray, pixel_size_A: float,
                counts_per_electron: float = 1.0, rings_A: tuple = RINGS_A) -> np.ndarray:
    """Electrons in each ring around each column.

    Parameters
    ----------
    image : (H, W) array
        One frame, counts per pixel.
    xy_px : (N, 2) float
        Column centres (x, y), pixels (pixel i's centre at i).
    pixel_size_A : float
        Pixel size, Å.
    counts_per_electron : float
        The detector's counts per electron.
    rings_A : tuple of float
        Ring edges, Å, increasing from 0.

    Returns
    -------
    (N, len(rings_A) − 1) float
        Electrons per ring; NaN rows for columns whose outer ring leaves the image.
    """
    xy = np.asarray(xy_px, np.float64).reshape(-1, 2)
    k = len(rings_A) - 1
    out = np.full((len(xy), k), np.nan)
    h, w = image.shape
    offsets, starts, half = _ring_offsets(float(pixel_size_A), tuple(rings_A), w)
    finite = np.isfinite(xy).all(axis=1)
    centre = np.rint(np.where(finite[:, None], xy, 0)).astype(np.int64)
    inside = (finite & (centre[:, 0] - half >= 0) & (centre[:, 1] - half >= 0)
              & (centre[:, 0] + half < w) & (centre[:, 1] + half < h))
    n, m = int(inside.sum()), offsets.shape[1]
    if not n:
        return out
    c = centre[inside]
    phase = np.clip(np.rint((xy[inside] - c) * PHASES) + PHASES // 2, 0, PHASES).astype(np.int64)
    place = phase[:, 1] * (PHASES + 1) + phase[:, 0]
    values = np.ravel(image)[(c[:, 1] * w + c[:, 0])[:, None] + offsets[place]]  # ring by ring
    begin = (starts[place] + (np.arange(n) * m)[:, None]).ravel()
    counts = np.add.reduceat(values.ravel(), begin, dtype=np.float64).reshape(n, k + 1)
    counts[np.diff(np.append(begin, n * m)).reshape(n, k + 1) == 0] = 0.0  # an empty ring
    out[inside] = counts[:, :k] / counts_per_electron
    return out


class DoseLevel:
    """Each frame's dose against a series' first: ring counts are divided by it, so that a beam
    whose current drifts or flickers from frame to frame (a cold FEG's decay, a few per cent of
    flicker) does not look like every column changing at once.

    The level is a frame's mean count per pixel, every other pixel along each axis (a quarter
    of the pixels: at 50 e⁻/Å² and 0.1 Å per pixel on a 1024² frame a relative error of 0.3 %,
    against the 5–20 % of one ring's Poisson count). The particle's own changes hardly move it:
    elastic scattering moves electrons, it does not remove them.
    """

    def __init__(self, first: float | None = None):
        self.first = first

    def __call__(self, image: np.ndarray) -> float:
        """``image``'s dose relative to the first frame's (1 for the first; 1 for a frame without
        counts)."""
        level = float(np.mean(image[::2, ::2], dtype=np.float64))
        if self.first is None and level > 0:
            self.first = level
        return level / self.first if level > 0 and self.first else 1.0


class RingLevel:
    """The part of a frame's ring counts that all its columns share, taken out.

    A focus that drifts over a long series (a few nm a minute is common) moves the electrons
    between the rings of every column at once; counted as they come, that reads as every column
    changing (docs/tracks.md: 156 events at 200 e⁻/Å² on our movies with 2 nm of focus drift
    over 48 frames, 19 without). Each column's counts are taken against its own mean so far (its
    *base*, from ``settle`` counted frames on); the median over the columns of each ring's ratio
    is the frame's *level* of that ring, smoothed over frames (a focus drifts slowly; a beam's
    flicker is :class:`DoseLevel`'s), and every column's counts are divided by it. One column's
    change moves the median of many hardly at all; with fewer than ``min_columns`` columns
    settled the level stays what it was last (1 before the first).

    Parameters
    ----------
    min_columns : int
        Fewest settled columns for a level (0: no level, the counts as they come).
    settle : int
        Counted frames of a column before its base joins the level.
    memory : float
        Weight of the last level against the frame's own median (0: none).
    """

    def __init__(self, min_columns: int = 12, settle: int = 4, memory: float = 0.75):
        self.min_columns, self.settle, self.memory = min_columns, settle, memory
        self.last = None
        self.sums = np.zeros((0, len(RINGS_A) - 1))  # by column id: its leveled counts summed
        self.frames = np.zeros(0, np.int64)  # by column id: the frames they were counted in

    def __call__(self, ids, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``counts`` (N, R) of the columns ``ids`` (N, distinct integers ≥ 0) in one frame,
        divided by the frame's level; and that level (R,)."""
        counts = np.asarray(counts, np.float64)
        level = np.ones(counts.shape[1]) if self.last is None else self.last
        if not self.min_columns or not len(counts):
            return counts, np.ones(counts.shape[1])
        ids = np.asarray(ids, np.int64)
        self._grow(int(ids.max()) + 1)
        ok = np.isfinite(counts).all(axis=1)
        known = ok & (self.frames[ids] >= self.settle)
        if known.sum() >= self.min_columns:
            base = self.sums[ids[known]] / self.frames[ids[known], None]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(base > 0, counts[known] / base, np.nan)
            median = np.nanmedian(ratio, axis=0) if np.isfinite(ratio).any() else level
            level = np.where(np.isfinite(median) & (median > 0), median, 1.0)
            if self.last is not None:
                level = self.memory * self.last + (1 - self.memory) * level
            self.last = level
        out = counts / level
        self.sums[ids[ok]] += out[ok]
        self.frames[ids[ok]] += 1
        return out, level

    def _grow(self, size: int) -> None:
        if size > len(self.frames):
            size = max(size, 2 * len(self.frames))
            self.sums = np.concatenate([self.sums, np.zeros((size - len(self.sums),
                                                             self.sums.shape[1]))])
            self.frames = np.concatenate([self.frames, np.zeros(size - len(self.frames),
                                                                np.int64)])

    def forget(self, ids) -> None:
        """Drop the bases of columns that will not be counted again."""
        ids = np.asarray(ids, np.int64)
        ids = ids[ids < len(self.frames)]
        self.sums[ids], self.frames[ids] = 0.0, 0

    def state(self) -> dict:
        """The bases and the last level as JSON-able data."""
        held = np.flatnonzero(self.frames)
        return {"bases": {str(i): [self.sums[i].tolist(), int(self.frames[i])]
                          for i in held.tolist()},
                "last": None if self.last is None else self.last.tolist()}

    def restore(self, state: dict | None) -> RingLevel:
        """This :class:`RingLevel` as :meth:`state` described it (None: as it is)."""
        state = state or {}
        for i, (sums, frames) in state.get("bases", {}).items():
            self._grow(int(i) + 1)
            self.sums[int(i)], self.frames[int(i)] = sums, frames
        last = state.get("last")
        self.last = None if last is None else np.asarray(last, np.float64)
        return self


PHASES = 8
"""Sub-pixel places of a column centre told apart, per pixel and axis (every 1/8 pixel, the
pixel's centre included: off by 0.006 Å at most at 0.1 Å per pixel)."""


@functools.lru_cache(maxsize=8)
def _ring_offsets(pixel_size_A: float, rings_A: tuple, width: int) -> tuple:
    """Per sub-pixel place of a column's centre (``(PHASES + 1)²`` rows): the offsets (M,) in a
    flat image ``width`` pixels wide of the pixels near it, ring by ring (the last: outside),
    and where each ring starts among them (k + 1,); and the largest offset along an axis."""
    oy, ox, table = _ring_table(pixel_size_A, rings_A)
    order = np.argsort(table, axis=1, kind="stable")
    starts = np.stack([np.searchsorted(np.sort(t), np.arange(len(rings_A))) for t in table])
    half = int(max(np.abs(oy).max(), np.abs(ox).max())) if len(oy) else 0
    return (oy * width + ox)[order].astype(np.intp), starts, half


@functools.lru_cache(maxsize=8)
def _ring_table(pixel_size_A: float, rings_A: tuple) -> tuple:
    """Pixel offsets ``oy``, ``ox`` (M,) around a column's nearest pixel, and per sub-pixel
    place of its centre (``(PHASES + 1)²`` rows) each offset's ring (0 … k − 1; k: outside)."""
    edges = np.asarray(rings_A, np.float64)
    k, r = len(edges) - 1, edges[-1] / pixel_size_A
    half = int(np.ceil(r + 0.5))
    off = np.arange(-half, half + 1)
    oy, ox = [a.ravel() for a in np.meshgrid(off, off, indexing="ij")]
    near = np.hypot(oy, ox) <= r + 0.75                      # within reach of any sub-pixel place
    oy, ox = oy[near], ox[near]
    f = (np.arange(PHASES + 1) - PHASES // 2) / PHASES
    fy, fx = [a.ravel() for a in np.meshgrid(f, f, indexing="ij")]
    d = np.hypot(ox[None, :] - fx[:, None], oy[None, :] - fy[:, None]) * pixel_size_A
    table = np.minimum(np.searchsorted(edges, d, side="right") - 1, k)
    table[d >= edges[-1]] = k
    return oy, ox, table.astype(np.int32)
