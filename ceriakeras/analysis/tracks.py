"""One pass over a series' frames: columns → tracks → stretches of constant height.

:class:`Tracker` takes the frames in order (:meth:`Tracker.add_frame`: the columns' positions
and class probabilities), links them to tracks (:mod:`ceriakeras.analysis.linking`) through the
drift and through frames where a column is lost, and splits each track into stretches of
constant height (:mod:`ceriakeras.analysis.changepoints`), from the model's class probabilities
and, when the frames are given, the electrons in rings around each column
(:mod:`ceriakeras.analysis.rings`). Memory is bounded: a track keeps at
most ``window`` units (a frame each, or a block of older frames of its current stretch folded
into one sum); a track lost for more than ``max_gap`` frames is closed and its stretches are
handed out (:meth:`Tracker.pop_stretches`). The whole state is plain JSON
(:meth:`Tracker.state`, :meth:`Tracker.from_state`), so a run can stop and resume mid-series.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .changepoints import (
    assign_heights,
    change_probability,
    change_statistic,
    expected_height,
    frame_variance,
    ring_dispersion,
    log_probabilities,
    platt,
    posterior_at,
    ring_statistic,
    segment_tracks,
    settle_parts,
)
from .linking import link_with_drift
from .rings import RINGS_A, DoseLevel, RingLevel, ring_counts
from .track_settings import EVIDENCE, TrackSettings

RINGS = len(RINGS_A) - 1
"""Rings counted around each column (:mod:`ceriakeras.analysis.rings`)."""


def stretch_evidence(unit: dict, index: int, variance: float, settings: TrackSettings
                     ) -> np.ndarray:
    """The evidence behind a stretch's height (``index`` = height − 1), one value per
    :data:`EVIDENCE` name.

    ``posterior_logit``: logit of the tempered height posterior (:func:`posterior_at`, the sum
    scaled to ``confidence_frames``), clipped to ±12; ``mean_log_probability``: the mean
    per-frame log-probability of that height (nats, ≥ −10); ``coverage``: the share of the
    stretch's frames in which the column was found; ``log_frames``: log of that number of frames;
    ``frame_scatter_atoms``: the track's per-frame scatter of the expected height (Ce atoms);
    ``frame_confidence_logit``: logit of the mean per-frame (calibrated) confidence of the
    column over the stretch, clipped to ±6 (0 when the frames gave none);
    ``stacked_posterior_logit``: logit of the height's probability in the stretch's readings of
    summed frames (:func:`reread_confidence`), clipped to ±12; until then (and without them)
    ``posterior_logit``.
    """
    n = float(unit["n"])
    posterior_logit, mean_log_probability = _frames_evidence(unit["sum"], n, index, settings)
    return np.array([
        posterior_logit,
        mean_log_probability,
        n / (unit["last"] - unit["first"] + 1),
        float(np.log(n)),
        float(np.sqrt(max(variance, 0.0))),
        _logit(unit.get("c1", 0.5 * n) / n, 6.0),
        posterior_logit,
    ])


def _frames_evidence(total, n: float, index: int, settings: TrackSettings
                     ) -> tuple[float, float]:
    """``posterior_logit`` and ``mean_log_probability`` of :func:`stretch_evidence`, from
    ``total`` (a stretch's ``n`` frames' summed class log-probabilities) for height − 1 =
    ``index``."""
    total = np.asarray(total, np.float64)
    post = posterior_at(total * min(1.0, settings.confidence_frames / n), index,
                        settings.confidence_temper)
    return _logit(post, 12.0), max(float(total[index]) / n, -10.0)


def reread_confidence(stretch: dict, settings: TrackSettings,
                      stacked: np.ndarray | None = None) -> None:
    """A handed-out stretch's ``evidence`` and ``confidence`` again, for its ``height_index``
    as it is now (read again from summed frames, :mod:`ceriakeras.analysis.stacking`).

    ``stacked``: the stretch's readings of summed frames, their class log-probabilities summed
    with each reading weighted by its frames, and ``stretch['stacked']`` those frames (None:
    not read so)."""
    index = stretch["height_index"]
    evidence = np.asarray(stretch["evidence"], np.float64).copy()
    evidence[0], evidence[1] = _frames_evidence(stretch["sum"], float(stretch["frames"]), index,
                                                settings)
    evidence[6] = evidence[0] if stacked is None else _logit(
        posterior_at(np.asarray(stacked, np.float64) / stretch["stacked"], index, 1.0), 12.0)
    stretch["evidence"], stretch["confidence"] = evidence.tolist(), stretch_confidence(
        evidence, settings, stacked is not None)


def _logit(p: float, clip: float) -> float:
    p = min(max(float(p), 1e-9), 1 - 1e-9)
    return float(np.clip(np.log(p / (1 - p)), -clip, clip))


def stretch_confidence(evidence: np.ndarray, settings: TrackSettings, stacked: bool = False
                       ) -> float:
    """The calibrated confidence of a stretch's height from its :func:`stretch_evidence`
    (``stacked``: a height read from summed frames, with ``stacked_confidence_weights``)."""
    w = np.asarray(settings.stacked_confidence_weights if stacked
                   else settings.confidence_weights, np.float64)
    if not len(w):
        return platt(1.0 / (1.0 + np.exp(-evidence[0])), settings.confidence_slope,
                     settings.confidence_intercept)
    z = float(np.dot(w[:-1], evidence) + w[-1])
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0))))


def _frame_units(frame: int, logp: np.ndarray, height: np.ndarray, confidence: np.ndarray,
                 xy_px: np.ndarray, xy_A: np.ndarray, rings: np.ndarray) -> list[dict]:
    """One unit per column of a frame (a track's record of one frame): ``sum`` its class
    log-probabilities (a row of ``logp``, a list once in :meth:`Tracker.state`), ``s1`` / ``s2``
    its expected height (atoms) and its square, ``c1`` its confidence, ``pos`` (x, y in pixels,
    x, y in Å), ``rings`` the electrons around it (zeros where not counted) and ``ni`` (1 where
    counted)."""
    pos = np.concatenate([xy_px, xy_A], axis=1).tolist()
    counted = np.isfinite(rings).all(axis=1)
    rings = np.where(counted[:, None], rings, 0.0)
    return [{"first": frame, "last": frame, "n": 1, "sum": p, "s1": h, "s2": h2, "c1": c,
             "pos": xy, "rings": r, "ni": int(k)}
            for p, h, h2, c, xy, r, k in zip(list(logp), height.tolist(),
                                             (height * height).tolist(), confidence.tolist(),
                                             pos, rings.tolist(), counted.tolist())]


def _plain_track(track: dict) -> dict:
    """``track`` as plain JSON data (its units' ``sum`` rows as lists)."""
    units = [{**u, "sum": u["sum"].tolist()} if isinstance(u["sum"], np.ndarray) else u
             for u in track["units"]]
    return {**track, "units": units}


class Tracker:
    """Tracks of one series, built frame by frame.

    Parameters
    ----------
    settings : TrackSettings
    """

    def __init__(self, settings: TrackSettings | None = None):
        self.settings = settings or TrackSettings()
        self.settings.validate()
        self.tracks: list[dict] = []      # open tracks
        self.next_id = 0
        self.drift = np.zeros(2)          # Å, of the last frame relative to the first
        self.out: list[dict] = []         # finished stretches, not yet popped
        self.counted = False              # frames given: ring counts in the statistic
        self.dose = DoseLevel()           # each frame's dose against the first's (ring counts)
        self.ring_level = RingLevel(self.settings.ring_level_columns,  # the rings' part all
                                    memory=self.settings.ring_level_memory)  # columns share
        self.level = np.ones(RINGS)       # ... in the last frame
        self.frame_dose = 1.0             # the last frame's dose against the first's

    # --- state --------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue, as JSON-able data."""
        return {"settings": asdict(self.settings),
                "tracks": [_plain_track(t) for t in self.tracks],
                "next_id": self.next_id, "drift": self.drift.tolist(), "out": self.out,
                "counted": self.counted, "dose_first": self.dose.first,
                "ring_level": self.ring_level.state()}

    @classmethod
    def from_state(cls, state: dict) -> Tracker:
        """The tracker :meth:`state` described."""
        tracker = cls(TrackSettings(**state["settings"]))
        tracker.tracks, tracker.next_id = state["tracks"], int(state["next_id"])
        tracker.drift, tracker.out = np.asarray(state["drift"], np.float64), state["out"]
        tracker.counted = bool(state.get("counted", False))
        tracker.dose = DoseLevel(state.get("dose_first"))
        tracker.ring_level.restore(state.get("ring_level"))
        return tracker

    # --- frames -------------------------------------------------------------------------------
    def add_frame(self, frame: int, xy_A: np.ndarray, probabilities: np.ndarray,
                  xy_px: np.ndarray | None = None, confidence: np.ndarray | None = None,
                  image: np.ndarray | None = None, pixel_size_A: float | None = None,
                  counts_per_electron: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Link one frame's columns to the tracks.

        Parameters
        ----------
        frame : int
            Frame index (increasing from call to call).
        xy_A : (N, 2) float
            Column positions, Å.
        probabilities : (N, K) float
            Each column's class probabilities over heights 1 … K, Ce atoms.
        xy_px : (N, 2) float, optional
            Positions in the input's pixels (kept for events); default ``xy_A``.
        confidence : (N,) float, optional
            Each column's calibrated per-frame confidence (evidence for the stretch's
            confidence); default 0.5.
        image : (H, W) array, optional
            The frame, counts per pixel: the electrons in rings around each column
            (:mod:`ceriakeras.analysis.rings`), centred where its track says it is, join the
            change statistic. Positions in Å are then ``pixel_size_A`` × pixels.
        pixel_size_A : float, optional
            The frame's pixel size, Å (with ``image``).
        counts_per_electron : float
            The detector's counts per electron (with ``image``).

        Returns
        -------
        track : (N,) int
            Each column's track id.
        drift : (2,) float
            The frame's drift from the first frame, Å.
        """
        s = self.settings
        xy_A = np.asarray(xy_A, np.float64).reshape(-1, 2)
        xy_px = xy_A if xy_px is None else np.asarray(xy_px, np.float64).reshape(-1, 2)
        logp = log_probabilities(probabilities) if len(xy_A) else np.zeros((0, 1))
        height = expected_height(probabilities) if len(xy_A) else np.zeros(0)
        conf = (np.full(len(xy_A), 0.5) if confidence is None
                else np.asarray(confidence, np.float64).reshape(-1))
        refs = np.array([t["ref"] for t in self.tracks], np.float64).reshape(-1, 2)
        i, j, shift = link_with_drift(refs + self.drift, xy_A, s.max_distance_A, s.search_A)
        self.drift = self.drift + shift
        ids = np.full(len(xy_A), -1, np.int64)
        ids[j] = [self.tracks[a]["id"] for a in i.tolist()]
        new = np.flatnonzero(ids < 0)
        ids[new] = np.arange(self.next_id, self.next_id + len(new))
        self.next_id += len(new)
        # each track's position (drift removed) moves towards its sighting, all at once
        m, seen = s.position_memory, xy_A - self.drift
        refs = np.concatenate([refs[i] * m + seen[j] * (1 - m),
                               seen[new] * m + seen[new] * (1 - m)]).tolist()
        counted = self._count_rings(image, pixel_size_A, counts_per_electron)
        rings = np.full((len(xy_A), RINGS), np.nan)
        rings[j] = counted[i]
        centres = self._centres(i, j, new, seen)
        units = _frame_units(frame, logp, height, conf, xy_px, xy_A, rings)
        extended = [self.tracks[a] for a in i.tolist()]
        for b in new.tolist():
            extended.append({"id": int(ids[b]), "ref": [], "last": frame, "units": [],
                             "done": [], "variance": 1.0})
        self.tracks += extended[len(i):]
        for track, ref, b, centre in zip(extended, refs, j.tolist() + new.tolist(), centres):
            track["ref"], track["last"] = ref, frame
            track["centre"] = centre
            track["sightings"] = track.get("sightings", 0) + 1
            track["units"].append(units[b])
        self._add_missed(frame, set(i.tolist()), counted, pixel_size_A)
        self._settle([t for t in extended if len(t["units"]) > s.window], final=False)
        closed = [t for t in self.tracks if frame - t["last"] > s.max_gap]
        self._settle([t for t in closed if t["units"]], final=True)
        self.ring_level.forget([t["id"] for t in closed])
        self.tracks = [t for t in self.tracks if frame - t["last"] <= s.max_gap]
        return ids, self.drift.copy()

    def _count_rings(self, image, pixel_size_A, counts_per_electron: float) -> np.ndarray:
        """The electrons in rings (:mod:`.rings`) around each open track's centre (before this
        frame, drift added): (tracks, RINGS), NaN without ``image`` or ``ring_after`` sightings.
        Sets the frame's dose against the first frame's (``frame_dose``; 1 without ``image``)
        and its ring level (``level``)."""
        out = np.full((len(self.tracks), RINGS), np.nan)
        self.level, self.frame_dose = np.ones(RINGS), 1.0
        if image is None or not pixel_size_A or self.settings.ring_weight <= 0:
            return out
        self.counted = True
        self.frame_dose = self.dose(image)
        settled = np.array([t.get("sightings", 0) >= self.settings.ring_after for t in self.tracks])
        if settled.any():
            where = np.array([_centre(t) for t, ok in zip(self.tracks, settled) if ok],
                             np.float64) + self.drift
            counts = ring_counts(image, where / pixel_size_A, pixel_size_A,
                                 counts_per_electron * self.frame_dose)
            out[settled], self.level = self.ring_level(
                [t["id"] for t, ok in zip(self.tracks, settled) if ok], counts)
        return out

    def _add_missed(self, frame: int, found: set, counted: np.ndarray, pixel_size_A) -> None:
        """A unit of ring counts alone (no reading: ``n`` 0) for each track open before this
        frame whose column was not ``found`` in it but whose rings were ``counted``
        (:meth:`_count_rings`): the model loses a column in some frames, its electrons stay."""
        for a, (track, r) in enumerate(zip(self.tracks, counted)):  # new tracks come after
            if a in found or not track["units"] or not np.isfinite(r).all():
                continue
            at = (np.asarray(_centre(track)) + self.drift).tolist()
            k = len(track["units"][-1]["sum"])
            track["units"].append({"first": frame, "last": frame, "n": 0, "sum": [0.0] * k,
                                   "s1": 0.0, "s2": 0.0, "c1": 0.0, "rings": r.tolist(),
                                   "ni": 1, "pos": [at[0] / pixel_size_A, at[1] / pixel_size_A,
                                                    at[0], at[1]]})

    def _centres(self, i: np.ndarray, j: np.ndarray, new: np.ndarray, seen: np.ndarray) -> list:
        """The ring centres (Å, drift removed) of the linked tracks ``i`` and the new columns,
        moved towards their sightings ``seen`` (a running mean of the first ones, then a slow
        average: ``ring_memory``)."""
        old = np.array([_centre(self.tracks[a]) for a in i.tolist()], np.float64).reshape(-1, 2)
        k = np.array([self.tracks[a].get("sightings", 1) for a in i.tolist()], np.float64)
        w = np.maximum(1.0 / (k + 1), 1 - self.settings.ring_memory)[:, None]
        return np.concatenate([old * (1 - w) + seen[j] * w, seen[new]]).tolist()

    def finish(self) -> None:
        """Close every open track (the series ended)."""
        self._settle([t for t in self.tracks if t["units"]], final=True)
        self.ring_level.forget([t["id"] for t in self.tracks])
        self.tracks = []

    def pop_stretches(self) -> list[dict]:
        """The stretches of the tracks closed since the last call: ``track, first, last, frames,
        height_index`` (height − 1), ``confidence, change_probability`` (None for a track's
        first stretch), ``x_px, y_px, x_A, y_A`` (where the column was in the stretch's first
        frame), ``sum`` (its frames' summed class log-probabilities) and ``mean`` (their mean
        expected height, Ce atoms). A track's stretches are read together when it closes (their
        heights depend on each other, :func:`ceriakeras.analysis.changepoints.assign_heights`),
        after merging each change its ring counts do not confirm (``ring_confirm``)."""
        out, self.out = self.out, []
        return out

    # --- inside -------------------------------------------------------------------------------
    def _settle(self, tracks: list[dict], final: bool) -> None:
        """Split each track's units (all tracks in one :func:`segment_tracks`); keep the settled
        stretches in ``track['done']``. Unless ``final``, the last stretch stays open, its frames
        older than half the window folded into one unit; with ``final`` the tracks' stretches
        are read and handed out, in order. The ring counts of the frames after a column was last
        found stay with its last stretch: a column the model stops finding may have changed."""
        s = self.settings
        if not tracks:
            return
        flat = [u for track in tracks for u in track["units"]]  # all tracks' units at once
        columns = {k: np.array([u[k] for u in flat], np.float64) for k in ("sum", "s1", "s2", "n")}
        columns["rings"] = np.array([u.get("rings", [0.0] * RINGS) for u in flat], np.float64)
        columns["ni"] = np.array([u.get("ni", 0) for u in flat], np.float64)
        ends = np.cumsum([len(track["units"]) for track in tracks]).tolist()
        arrays = []
        for track, a, b in zip(tracks, [0] + ends[:-1], ends):
            unit_arrays = {k: v[a:b] for k, v in columns.items()}
            singles = unit_arrays["s1"][unit_arrays["n"] == 1]
            if len(singles) >= 4:
                track["variance"] = frame_variance(singles)
            counted = unit_arrays["rings"][(unit_arrays["n"] <= 1) & (unit_arrays["ni"] == 1)]
            if len(counted) >= 4:
                track["dispersion"] = ring_dispersion(counted, s.ring_systematic,
                                                      s.confidence_frames)
            arrays.append(unit_arrays)
        all_parts = segment_tracks(arrays, kind=s.method, temper=s.temper,
                                   penalty=s.ring_penalty if self.counted else s.penalty,
                                   min_stretch=s.min_stretch,
                                   variances=[t.get("variance", 1.0) for t in tracks],
                                   ring_weight=[_ring_weight(t, s) for t in tracks])
        for track, parts, unit_arrays in zip(tracks, all_parts, arrays):
            units, sums = track["units"], unit_arrays["sum"]
            done, track["units"] = settle_parts(
                units, parts, final, s.window,
                lambda a, b, units=units, sums=sums: _merge(units[a:b], sums[a:b]))
            track["done"] += done
            if final:
                self._hand_out(track)

    def _hand_out(self, track: dict) -> None:
        """Heights, confidences and change probabilities of a closed track's stretches."""
        s = self.settings
        variance, weight = track.get("variance", 1.0), _ring_weight(track, s)
        done = _confirmed(track["done"], weight, s.ring_confirm if self.counted else 0.0)
        means = np.array([u["s1"] / u["n"] for u in done])
        heights = assign_heights(np.array([u["sum"] for u in done]) * s.temper,
                                 np.sign(np.diff(means)).astype(np.int64))
        for k, u in enumerate(done):
            p = None
            if k:
                stat = change_statistic(s.method, done[k - 1], u, temper=s.temper,
                                        variance=variance, ring_weight=weight)
                p = (change_probability(stat, s.ring_penalty, *s.ring_event_map) if self.counted
                     else change_probability(stat, s.penalty, s.event_scale, s.event_offset))
            evidence = stretch_evidence(u, int(heights[k]), variance, s)
            self.out.append({
                "track": track["id"], "first": u["first"], "last": u["last"],
                "frames": int(u["n"]), "height_index": int(heights[k]),
                "confidence": stretch_confidence(evidence, s), "evidence": evidence.tolist(),
                "change_probability": p, "x_px": u["pos"][0], "y_px": u["pos"][1],
                "x_A": u["pos"][2], "y_A": u["pos"][3], "sum": list(u["sum"]),
                "mean": float(means[k])})
        track["done"] = []


def _ring_weight(track: dict, settings: TrackSettings) -> float:
    """The weight of a track's ring counts in its change statistic: ``ring_weight`` over its
    :func:`.changepoints.ring_dispersion` (1 until it has one)."""
    return settings.ring_weight / track.get("dispersion", 1.0)


def _confirmed(done: list, ring_weight: float, least: float) -> list:
    """A track's stretches with each change whose ring counts give less than ``least`` nats
    (:func:`.changepoints.ring_statistic`) merged into the stretch before it."""
    out = list(done[:1])
    for u in done[1:]:
        if least > 0 and ring_statistic(out[-1], u, ring_weight) < least:
            out[-1] = _merge([out[-1], u], np.array([out[-1]["sum"], u["sum"]], np.float64))
        else:
            out.append(u)
    return out


def _centre(track: dict) -> list:
    """A track's ring centre, Å, drift removed (its position until it has one)."""
    return track.get("centre") or track["ref"]


def _merge(units: list, sums: np.ndarray) -> dict:
    """Units of one stretch as one (sums added, in order; the first frame's position);
    ``sums`` (len(units), K) their class log-probabilities."""
    return {"first": units[0]["first"], "last": units[-1]["last"],
            "n": int(sum([u["n"] for u in units])),
            "sum": np.sum(sums, axis=0).tolist(),
            "s1": float(sum([u["s1"] for u in units])),
            "s2": float(sum([u["s2"] for u in units])),
            "c1": float(sum([u.get("c1", 0.5 * u["n"]) for u in units])),
            "rings": np.sum([u.get("rings", [0.0] * RINGS) for u in units], axis=0).tolist(),
            "ni": int(sum([u.get("ni", 0) for u in units])),
            "pos": units[0]["pos"]}
