"""Sites: where a series' columns stand, drift removed, and the changes their own pixels show.

A track lives only while the model finds its column. At low dose the model finds a small surface
column in a few frames of a series, or only after it grew (a 1 → 2 change whose one-atom column
it never finds), so the tracks' stretches cannot show those changes (docs/tracks.md). The
electrons around the column's place are there in every frame. So, after the tracks:

1. Every track seen in at least ``site_sightings`` frames gives its mean position, drift
   removed (:class:`Sightings`); tracks within ``site_merge_A`` of a better-seen one join its
   *site* (:func:`sites_of`).
2. The electrons in rings around each site (:mod:`ceriakeras.analysis.rings`) are counted in
   every frame, in the read the summed frames make (or one more without them;
   :class:`SiteChanges`, one pass, a bounded window of frames per site as the tracker keeps).
3. Each site's counts alone are split into stretches by the optimal partitioning of
   :mod:`ceriakeras.analysis.changepoints` (penalty ``site_penalty``); each split is a change
   (:meth:`SiteChanges.events`) unless a track's change already reported it. Sites whose tracks
   were seen in ``site_coverage`` of the frames are left to the tracks. Which way it went
   is the model's call where the tracks at the site read different heights on its two sides,
   else the series' own relation of ring contrast to height (:func:`contrast_map`).
4. A change inside a stretch of its track splits that stretch (:func:`split_stretches`), so
   the track's height changes where the event says.

Measured on our own tuning movies (44 particles): event recall 0.47 → 0.60 at 50 e⁻/Å² and
0.89 → 0.93 at 200, precision 0.90 → 0.89 and 0.98 → 0.98; held out 0.26 → 0.34 and 0.71 → 0.79,
precision 0.98 → 0.86 and 0.93 → 0.94; on the cross-check movies no gain (docs/tracks.md).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .changepoints import (change_probability, dispersion_of, ring_statistic, segment_tracks,
                           settle_parts)
from .rings import RINGS_A, DoseLevel, ring_counts
from .track_settings import TrackSettings

AREAS = np.diff(np.square(RINGS_A))
"""The rings' areas over π, Å² (for the contrast between rings)."""


class Sightings:
    """What the tracks leave for the sites, over one series: each track's summed positions (Å,
    drift removed) and sightings, and each frame's dose against the first frame's and ring level
    (the tracker's :class:`.rings.DoseLevel` and :class:`.rings.RingLevel`), so that the sites
    take their counts against the same reference as the tracks."""

    def __init__(self):
        self.sums = np.zeros((0, 3))
        self.levels = np.ones((0, len(RINGS_A) - 1))
        self.doses = np.ones(0)

    def add(self, ids: np.ndarray, xy_A: np.ndarray, drift_A: np.ndarray, frame: int = 0,
            level=None, dose: float | None = None) -> None:
        """One frame's columns: their tracks ``ids``, positions ``xy_A`` (N, 2) and the drift;
        and the frame's ring level (None: 1) and dose against the first frame's (None: 1)."""
        if level is not None or dose is not None:
            if frame >= len(self.doses):
                size = max(2 * len(self.doses), frame + 1)
                self.levels = np.concatenate([self.levels, np.ones((size - len(self.levels),
                                                                    self.levels.shape[1]))])
                self.doses = np.concatenate([self.doses, np.ones(size - len(self.doses))])
            self.levels[frame] = 1.0 if level is None else level
            self.doses[frame] = 1.0 if dose is None else dose
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        if ids.max() >= len(self.sums):
            grown = np.zeros((max(2 * len(self.sums), int(ids.max()) + 1), 3))
            grown[:len(self.sums)] = self.sums
            self.sums = grown
        rows = np.column_stack([np.asarray(xy_A, np.float64) - drift_A, np.ones(len(ids))])
        np.add.at(self.sums, ids, rows)

    def level(self, frame: int) -> np.ndarray:
        """Frame ``frame``'s ring level (R,)."""
        return self.levels[frame] if frame < len(self.levels) else np.ones(self.levels.shape[1])

    def dose(self, frame: int) -> float:
        """Frame ``frame``'s dose against the series' first frame (1 where none was given)."""
        return float(self.doses[frame]) if frame < len(self.doses) else 1.0

    def centres(self, least: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tracks seen at least ``least`` times: ids, mean positions (Å), sightings."""
        n = self.sums[:, 2]
        ids = np.flatnonzero(n >= max(least, 1))
        return ids, self.sums[ids, :2] / n[ids, None], n[ids]


def sites_of(centres: np.ndarray, weights: np.ndarray, merge_A: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Sites of tracks at ``centres`` (Å): the best-seen track (``weights``) first takes every
    other within ``merge_A``; a site is its members' weighted mean. Returns the sites (S, 2)
    and each track's site."""
    site = np.full(len(centres), -1)
    if not len(centres):
        return np.zeros((0, 2)), site
    tree, count = cKDTree(centres), 0
    for i in np.argsort(-weights, kind="stable").tolist():
        if site[i] < 0:
            near = np.asarray(tree.query_ball_point(centres[i], merge_A), np.int64)
            site[near[site[near] < 0]] = count
            count += 1
    total = np.bincount(site, weights, count)
    xy = np.column_stack([np.bincount(site, weights * centres[:, k], count) for k in (0, 1)])
    return xy / total[:, None], site


def contrast_map(profiles: np.ndarray, heights: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Least-squares weights ``w`` of height ≈ ``w · contrast(profile) + b`` over a series'
    sites (the optics decide whether a heavier column is brighter or darker: the series says)."""
    x = np.column_stack([contrast(profiles), np.ones(len(profiles))])
    root = np.sqrt(weights)[:, None]
    return np.linalg.lstsq(x * root, heights * root[:, 0], rcond=None)[0][:-1]


def contrast(profile: np.ndarray) -> np.ndarray:
    """Electrons per area of each inner ring less the outer ring's, (…, R) → (…, R − 1)."""
    dens = np.asarray(profile, np.float64) / AREAS
    return dens[..., :-1] - dens[..., -1:]


class SiteChanges:
    """The ring counts at a series' sites, frame by frame, split into stretches.

    Parameters
    ----------
    sites_A : (S, 2) float
        The sites, Å, drift removed (:func:`sites_of`).
    drift_A : dict
        ``{frame: (dx, dy)}``, Å, each frame's drift from the first (frames without are skipped).
    pixel_size_A, counts_per_electron : float
        The input's pixel size (Å) and counts per electron.
    settings : TrackSettings
    watch : (S,) bool, optional
        The sites whose changes are read (default all); the others are counted only in the
        first ``confidence_frames`` frames, for :func:`contrast_map`.
    level : callable, optional
        ``level(frame)``: the ring level (R,) the tracks found in that frame
        (:meth:`Sightings.level`); each site's counts are divided by it.
    dose : callable, optional
        ``dose(frame)``: the frame's dose against the series' first, as the tracks took it
        (:meth:`Sightings.dose`); default: measured here (:class:`.rings.DoseLevel`).
    """

    def __init__(self, sites_A: np.ndarray, drift_A: dict, pixel_size_A: float,
                 counts_per_electron: float, settings: TrackSettings, watch=None,
                 level=None, dose=None):
        self.sites, self.drift, self.settings = sites_A, drift_A, settings
        self.level = level  # frame → the tracks' ring level (R,), or None
        self.watch = np.ones(len(sites_A), bool) if watch is None else np.asarray(watch, bool)
        self.counted = 0
        self.px, self.cpe = pixel_size_A, counts_per_electron
        own = DoseLevel()  # (frame, image) → the frame's dose against the first's
        self.dose = (lambda f, image: own(image)) if dose is None else (lambda f, image: dose(f))
        s, r = len(sites_A), len(RINGS_A) - 1
        self.units: list[list[dict]] = [[] for _ in range(s)]
        self.done: list[list[dict]] = [[] for _ in range(s)]
        self.last = np.full((s, r), np.nan)   # dispersion: von Neumann sums, as ring_dispersion
        self.diff2, self.ndiff = np.zeros((s, r)), np.zeros(s)
        self.total, self.frames = np.zeros((s, r)), np.zeros(s)

    def add(self, frame: int, image) -> None:
        """Count one frame (``image`` counts per pixel, None: unread) at the sites, drifted:
        the watched ones, and all in the first ``confidence_frames`` (the contrast map)."""
        drift_A = self.drift.get(frame)
        if image is None or drift_A is None or not len(self.sites):
            return
        look = np.flatnonzero(self.watch if self.counted >= self.settings.confidence_frames
                              else np.ones(len(self.sites), bool))
        self.counted += 1
        counts = np.full(self.last.shape, np.nan)
        image = np.asarray(image)
        counts[look] = ring_counts(image, (self.sites[look] + drift_A) / self.px, self.px,
                                   self.cpe * self.dose(frame, image))
        if self.level is not None:
            counts[look] /= self.level(frame)
        ok = np.isfinite(counts).all(axis=1)
        step = ok & np.isfinite(self.last).all(axis=1)
        self.diff2[step] += (counts[step] - self.last[step]) ** 2
        self.ndiff += step
        self.total[ok] += counts[ok]
        self.frames += ok
        self.last = counts
        for k in np.flatnonzero(ok & self.watch).tolist():
            self.units[k].append({"first": frame, "last": frame, "ni": 1, "rings": counts[k]})
        if max(map(len, self.units)) > self.settings.window:
            self._settle(final=False)

    def weights(self) -> np.ndarray:
        """Each site's ring weight: ``ring_weight`` over its dispersion (quasi-Poisson, as
        :func:`ceriakeras.analysis.changepoints.ring_dispersion` over all its frames)."""
        s = self.settings
        disp = dispersion_of(self.diff2 / np.maximum(self.ndiff, 1)[:, None],
                             self.total / np.maximum(self.frames, 1)[:, None],
                             s.ring_systematic, s.confidence_frames)
        return s.ring_weight / np.where(self.frames >= 3, disp, 1.0)

    def _settle(self, final: bool) -> None:
        """Split every site's units; keep settled stretches in ``done`` (all with ``final``;
        else the last stays open, its older frames folded into one unit)."""
        s, r = self.settings, len(RINGS_A) - 1
        arrays = []
        for units in self.units:
            m = len(units)
            n = np.array([u["ni"] for u in units], np.float64)
            arrays.append({"sum": np.zeros((m, 1)), "s1": np.zeros(m), "s2": np.zeros(m), "n": n,
                           "rings": np.array([u["rings"] for u in units]).reshape(m, r),
                           "ni": n})
        parts_all = segment_tracks(arrays, kind="classes", penalty=s.site_penalty,
                                   min_stretch=s.min_stretch, ring_weight=self.weights())
        for k, (units, parts) in enumerate(zip(self.units, parts_all)):
            if not units:
                continue
            done, self.units[k] = settle_parts(units, parts, final, s.window,
                                               lambda a, b, units=units: _fold(units[a:b]))
            self.done[k] += done

    def events(self, members: list, by_track: dict, source: str) -> list:
        """The changes at the sites: ``(frame, track, statistic, row)``, ``statistic`` the
        split's ring log-likelihood ratio (nats, weighted) and ``row`` as ``events.csv`` holds
        it. ``members``: each site's tracks; ``by_track``: the tracks'
        stretches (``first``, ``last``, ``height_index``)."""
        self._settle(final=True)
        weights = self.weights()
        profiles = self.total / np.maximum(self.frames, 1)[:, None]
        level = [_height(members[k], by_track, 0, 1 << 62) for k in range(len(self.done))]
        known = np.array([h is not None for h in level], bool) & (self.frames >= 3)
        heights = np.array([h or 0 for h in level], np.float64)
        w = (contrast_map(profiles[known], heights[known], self.frames[known])
             if known.sum() > len(RINGS_A) else np.zeros(len(RINGS_A) - 2))
        out = []
        for k, stretches in enumerate(self.done):
            for before, after in zip(stretches[:-1], stretches[1:]):
                stat = ring_statistic(before, after, weights[k])
                hb = _height(members[k], by_track, before["first"], after["first"] - 1)
                ha = _height(members[k], by_track, after["first"], after["last"])
                shift = w @ (contrast(after["rings"] / after["ni"])
                             - contrast(before["rings"] / before["ni"]))
                sign = int(np.sign(ha - hb)) if None not in (ha, hb) and ha != hb else int(
                    np.sign(shift))
                if sign == 0 or (ha is None and hb is None):  # nothing says which way
                    continue
                if ha is not None and ha == hb:  # one reading of both: the side it covers more
                    longer = (_covered(members[k], by_track, before["first"], after["first"] - 1)
                              >= _covered(members[k], by_track, after["first"], after["last"]))
                    ha, hb = (ha + sign, hb) if (longer and hb + sign >= 1) or ha - sign < 1 else (
                        ha, hb - sign)
                ha = max(0, hb + sign) if ha is None else ha
                hb = hb if hb is not None and np.sign(ha - hb) == sign else max(0, ha - sign)
                if ha == hb:
                    continue
                frame = after["first"]
                dx, dy = self.drift.get(frame, (0.0, 0.0))
                x, y = self.sites[k] + (dx, dy)
                track = _track_at(members[k], by_track, frame)
                p = change_probability(stat, self.settings.site_penalty,
                                       *self.settings.ring_event_map)
                out.append((frame, track, stat, (
                    source, track, frame, f"{x / self.px:.3f}", f"{y / self.px:.3f}",
                    f"{x:.4f}", f"{y:.4f}", hb, ha, f"{p:.4f}")))
        return out


def site_changes(sightings: Sightings | None, item: dict, drift_A: dict,
                 settings: TrackSettings) -> tuple[SiteChanges | None, list | None]:
    """The :class:`SiteChanges` of one series (``item``: a plan entry with ``pixel_size_A``
    and ``counts_per_electron``) and each site's tracks; ``(None, None)`` where there is none
    (no sightings, no pixel size, ``site_penalty`` 0)."""
    if sightings is None or not item.get("pixel_size_A") or settings.site_penalty <= 0:
        return None, None
    ids, centres, seen = sightings.centres(settings.site_sightings)
    xy, site = sites_of(centres, seen, settings.site_merge_A)
    members = [[] for _ in range(len(xy))]
    for track, k in zip(ids.tolist(), site.tolist()):
        members[k].append(track)
    covered = np.bincount(site, seen, len(xy)) / max(item.get("n_frames") or 1, 1)
    return SiteChanges(xy, drift_A, item["pixel_size_A"], item.get("counts_per_electron") or 1.0,
                       settings, watch=covered < settings.site_coverage,
                       level=sightings.level, dose=sightings.dose), members


def new_changes(changes: list, known: list, settings: TrackSettings) -> list:
    """Of one series' site ``changes`` (:meth:`SiteChanges.events`), the strongest first, those
    with no ``known`` event (``events.csv`` rows) nor a stronger one kept within ``search_A``
    and ``site_same_frames`` frames: ``(frame, track, row)``."""
    kept = [(int(r[2]), float(r[5]), float(r[6])) for r in known]
    out = []
    for frame, track, _, row in sorted(changes, key=lambda c: -c[2]):
        x, y = float(row[5]), float(row[6])
        if any(abs(frame - f) <= settings.site_same_frames
               and np.hypot(x - a, y - b) <= settings.search_A for f, a, b in kept):
            continue
        kept.append((frame, x, y))
        out.append((frame, track, row))
    return out


def split_stretches(by_track: dict, changes: list) -> list:
    """Split the stretch of each change's track that spans it (``changes``: ``(frame, track,
    row)`` of :func:`new_changes`), so the track's height changes where ``events.csv`` says;
    return the changes that split none (before or after the track's stretches, one whose
    height is neither side's, or one that would turn a neighbouring stretch's change).

    The side at the height the stretch read keeps its confidence; the other side's is that
    times the change's probability (it is right only if the change is real). Its frames are
    shared in proportion to the frames each side spans.
    """
    rest = []
    for frame, track, row in changes:
        runs = by_track.get(track, [])
        k = next((i for i, run in enumerate(runs) if run["first"] < frame <= run["last"]), None)
        before_h, after_h, p = int(row[7]), int(row[8]), float(row[9])
        if k is None or runs[k]["height_index"] + 1 not in (before_h, after_h) or not (
                _keeps(runs, k, k - 1, before_h) and _keeps(runs, k, k + 1, after_h)):
            rest.append((frame, track, row))
            continue
        run = runs[k]
        before, after = dict(run), dict(run)
        share = (frame - run["first"]) / (run["last"] - run["first"] + 1)
        before.update(last=frame - 1, height_index=before_h - 1,
                      frames=int(round(run.get("frames", 0) * share)))
        after.update(first=frame, height_index=after_h - 1, change_probability=p,
                     frames=run.get("frames", 0) - before["frames"], x_px=float(row[3]),
                     y_px=float(row[4]), x_A=float(row[5]), y_A=float(row[6]))
        for part in (before, after):
            if part["height_index"] != run["height_index"]:
                part["confidence"] = run["confidence"] * p
        runs[k:k + 1] = [before, after]
    return rest


def _keeps(runs: list, k: int, j: int, height: int) -> bool:
    """Whether stretch ``k`` at ``height`` (Ce atoms) keeps the way its neighbour ``j`` changes
    from or to it (no neighbour: yes)."""
    if not 0 <= j < len(runs):
        return True
    h, other = runs[k]["height_index"] + 1, runs[j]["height_index"] + 1
    return np.sign(other - height) == np.sign(other - h)


def _fold(units: list) -> dict:
    """Units of one stretch as one."""
    return {"first": units[0]["first"], "last": units[-1]["last"],
            "ni": int(sum(u["ni"] for u in units)),
            "rings": np.sum([u["rings"] for u in units], axis=0)}


def _height(tracks, by_track: dict, first: int, last: int):
    """The height, Ce atoms, that ``tracks``' stretches read over frames ``first … last``
    (weighted by their overlap, rounded); None where none covers them."""
    total = weight = 0.0
    for overlap, run in _overlaps(tracks, by_track, first, last):
        total, weight = total + overlap * (run["height_index"] + 1), weight + overlap
    return int(round(total / weight)) if weight else None


def _covered(tracks, by_track: dict, first: int, last: int) -> int:
    """Frames of ``first … last`` that ``tracks``' stretches cover (summed over tracks)."""
    return sum(overlap for overlap, _ in _overlaps(tracks, by_track, first, last))


def _overlaps(tracks, by_track: dict, first: int, last: int):
    """``(frames in common, stretch)`` of ``tracks``' stretches that overlap ``first … last``."""
    for t in tracks:
        for run in by_track.get(t, ()):
            overlap = min(last, run["last"]) - max(first, run["first"]) + 1
            if overlap > 0:
                yield overlap, run


def _track_at(tracks, by_track: dict, frame: int) -> int:
    """Of ``tracks``, the one whose stretches come nearest to ``frame``."""
    def gap(t):
        return min((max(run["first"] - frame, frame - run["last"], 0)
                    for run in by_track.get(t, ())), default=1 << 62)
    return int(min(tracks, key=gap))
