"""How columns are linked into tracks and tracks split into stretches: :class:`TrackSettings`.

One settings object for the tracks stage (:mod:`ceriakeras.analysis.tracks`,
:mod:`ceriakeras.analysis.tracking`); ``analyze`` fills it from its
:class:`ceriakeras.config.AnalyzeConfig`. Every number was chosen on our own simulated movies
(``scripts/tools/make_movies.py``), never on the cross-check movies (docs/tracks.md).

``TUNING_SETS``: the movie sets the maps, ``ring_confirm`` and the ``site_*`` settings were
chosen on (seed, pixel size Å; 4 particles each at 50 and 200 e⁻/Å² per frame, 48 frames). Held out from every choice:
seeds 200 (0.1 Å), 500 (0.08 Å), 600 (0.125 Å), 700 (0.1 Å), 2000 (0.1 Å), 2100 (0.08 Å) and
2200 (0.125 Å).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

TUNING_SETS = ((100, 0.1), (400, 0.1), (800, 0.1), (900, 0.08), (1000, 0.125), (1100, 0.1),
               (1200, 0.08), (1300, 0.125), (1400, 0.1), (1500, 0.08), (1600, 0.125))


@dataclass
class TrackSettings:
    """How columns are linked and tracks split (frames, Å, nats).

    ``method``, ``penalty``, ``confidence_temper`` and ``confidence_frames`` were chosen on our
    own simulated movies (``scripts/tools/make_movies.py --seed 100``, 4 particles × 50 and 200
    e⁻/Å² per frame, model version 6; ``scripts/studies/track_study.py``), never on the
    cross-check movies.
    """

    max_distance_A: float = 1.0
    """Largest distance, Å, between a track's predicted position and its column."""
    search_A: float = 1.5
    """Largest link, Å, while a frame's drift is estimated (drift per frame + noise)."""
    max_gap: int = 10
    """Frames a track may miss before it is closed."""
    min_stretch: int = 5
    """Fewest frames in a stretch of constant height (chosen with ``ring_penalty``)."""
    method: str = "bayes"
    """Change statistic (:mod:`ceriakeras.analysis.changepoints`): ``"bayes"`` (mean shift of
    the expected height, each stretch's mean integrated out), ``"mean_shift"`` (the same,
    maximum likelihood) or ``"classes"`` (tempered class log-likelihood)."""
    temper: float = 0.3
    """Weight τ of one frame's class log-probabilities (heights; the ``"classes"`` statistic)."""
    penalty: float = 6.0
    """Cost of one change, nats (``"bayes"``: the log prior odds against a change), when the
    model's readings alone split a track (no frames given to the tracker)."""
    confidence_temper: float = 0.2
    """Weight of one frame's log-probabilities in a stretch's height posterior."""
    confidence_slope: float = 1.0
    """Platt map of a stretch's posterior: ``σ(slope · logit(posterior) + intercept)``."""
    confidence_intercept: float = 0.0
    """See ``confidence_slope`` (both fitted on our own movies, scripts/studies/track_study.py)."""
    confidence_frames: int = 16
    """A stretch's frames beyond this many add no confidence (the model's misreading of a
    column repeats in every frame of a state): its summed log-probabilities are scaled to
    this many frames."""
    confidence_weights: tuple = (0.7255, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.23)
    """Logistic map of a stretch's evidence (:func:`.tracks.stretch_evidence`, ``EVIDENCE``) to
    its confidence, ``σ(w · evidence + b)`` as ``(*w, b)``, for a height read from the frames
    alone; empty: the Platt map above. Fitted on our own tuning movies (``TUNING_SETS``, 44
    particles; the posterior logit alone: the lowest ECE with one particle left out;
    ``scripts/studies/track_calibration.py``, docs/tracks.md)."""
    stacked_confidence_weights: tuple = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.6476, 0.4908)
    """The same for a height read from summed frames (:mod:`ceriakeras.analysis.stacking`);
    fitted on the same movies so read (the stacked posterior alone: the lowest ECE with one
    particle left out)."""
    event_scale: float = 0.0808
    """Slope of the logistic that maps a change's statistic to its probability (fitted with
    ``event_offset`` on the events found in our own ``tune`` and ``tune2`` movies)."""
    event_offset: float = 1.7766
    """Offset of that logistic: ``p = σ(event_scale · (statistic − penalty) + event_offset)``."""
    window: int = 128
    """Units a track keeps; older frames of its current stretch are folded into one."""
    position_memory: float = 0.7
    """Weight of a track's old position against a new sighting (drift removed)."""
    ring_weight: float = 1.0
    """Weight of the ring counts' Poisson log-likelihood in the change statistic (0: none;
    :mod:`.rings`), divided by each track's :func:`.changepoints.ring_dispersion`."""
    ring_penalty: float = 12.0
    """Cost of one change, nats, when the ring counts join the statistic (frames given to the
    tracker; chosen on our own ``tune`` and ``tune2`` movies, docs/tracks.md)."""
    ring_event_map: tuple = (0.2213, 0.1997)
    """``(event_scale, event_offset)`` with the ring counts (fitted on the 377 events found so in
    the tuning movies, 18 of them false; ``scripts/studies/track_calibration.py``)."""
    ring_systematic: float = 0.01
    """Relative error of a ring's count that more frames do not average out (drift wander, ring
    edges crossing pixels; :func:`.changepoints.ring_dispersion`): tempers bright series."""
    ring_after: int = 3
    """Sightings of a track before its rings are counted: its centre settles first (the
    first sightings move it most)."""
    ring_confirm: float = 8.0
    """Least share of a change's statistic, nats, from the column's own ring counts: a change
    with less (a shift of the model's readings alone, which a neighbour's change can cause) is
    merged into the stretch before it. Used only with the ring counts (chosen on the tuning
    movies: precision 0.94 → 0.98 at 200 e⁻/Å², recall unchanged; docs/tracks.md)."""
    ring_memory: float = 0.95
    """Weight of a track's old ring centre against a new sighting (drift removed): a running
    mean of its first sightings, then this slow average."""
    ring_level_columns: int = 12
    """Fewest tracks whose rings' shared part (:class:`.rings.RingLevel`: a focus that drifts)
    is taken out of every track's and site's counts (0: none). A focus drifting 2 nm over 48
    frames gave 156 events at 200 e⁻/Å² on our seed-3100 movies (19 at a steady focus), 35 with
    it (docs/tracks.md)."""
    ring_level_memory: float = 0.75
    """Weight of the last frame's ring level against the frame's own (chosen on the tuning
    movies and the focus-drift movies)."""

    site_penalty: float = 12.0
    """Cost of one change, nats, at a site's ring counts alone (:mod:`.sites`: every frame
    counted, the column found or not; 0: no changes read at sites). Chosen on the tuning movies
    (docs/tracks.md)."""
    site_coverage: float = 0.9
    """Sites whose tracks were seen in at least this share of a series' frames are left to the
    tracks' own changes (the cost of counting every site in every frame; see docs/tracks.md)."""
    site_sightings: int = 4
    """Fewest sightings of a track that makes or joins a site."""
    site_merge_A: float = 0.6
    """Tracks closer than this, Å (drift removed), share a site."""
    site_same_frames: int = 3
    """A site's change within this many frames and ``search_A`` of a reported one is that one."""
    penalty_dose_scale: tuple = ((50.0, 1.0), (200.0, 0.86))
    """``((dose, scale), …)``, doses in e⁻/Å² per frame, increasing: ``ring_penalty`` and
    ``site_penalty`` are multiplied by ``scale`` for a series of that median dose (log-linear
    between the points, the end's scale beyond them; empty: not scaled; :meth:`at_dose`). The
    ring statistic of columns that do not change runs lower at a higher dose (the floor
    ``ring_systematic`` weighs more there): the 99th percentile of the statistic of unchanged
    windows is 7.7 nats at 50 e⁻/Å² and 6.6 at 200 on the tuning pool
    (``scripts/studies/event_ceiling.py``), a ratio of 0.86. So the penalties keep one share
    of false changes at both doses (docs/tracks.md)."""

    def at_dose(self, dose_e_per_A2: float | None) -> TrackSettings:
        """These settings for a series whose median dose is ``dose_e_per_A2`` (e⁻/Å² per frame;
        None or not positive: unchanged): the penalties scaled by ``penalty_dose_scale``, which
        the result no longer has (so it is applied once)."""
        if not self.penalty_dose_scale or not dose_e_per_A2 or not dose_e_per_A2 > 0:
            return self
        doses, scales = np.array(self.penalty_dose_scale, np.float64).reshape(-1, 2).T
        scale = float(np.interp(np.log(dose_e_per_A2), np.log(doses), scales))
        return replace(self, ring_penalty=self.ring_penalty * scale,
                       site_penalty=self.site_penalty * scale, penalty_dose_scale=())

    def validate(self) -> None:
        from ..config import ConfigError

        if self.min_stretch < 1 or self.max_gap < 0 or self.window < 4 * self.min_stretch:
            raise ConfigError(f"min_stretch={self.min_stretch} must be ≥ 1 frame, max_gap ≥ 0 "
                              f"and window ≥ 4 × min_stretch: choose a smaller --min-stretch")
        if not (0 < self.temper <= 1 and 0 < self.confidence_temper <= 1):
            raise ConfigError("temper and confidence_temper must be in (0, 1]")
        if self.method not in ("mean_shift", "bayes", "classes"):
            raise ConfigError(f"method={self.method!r}: use 'mean_shift', 'bayes' or 'classes'")
        if (min(self.ring_weight, self.ring_systematic, self.ring_after, self.ring_confirm,
                self.ring_level_columns) < 0
                or not 0 <= self.ring_memory < 1 or not 0 <= self.ring_level_memory < 1):
            raise ConfigError("ring_weight, ring_systematic, ring_after, ring_confirm and "
                              "ring_level_columns must be ≥ 0, ring_memory and "
                              "ring_level_memory in [0, 1)")
        if self.site_penalty < 0 or self.site_sightings < 1 or self.site_merge_A <= 0 or (
                self.site_same_frames < 0 or self.site_coverage <= 0):
            raise ConfigError("site_penalty and site_same_frames must be ≥ 0, site_sightings ≥ 1, "
                              "site_merge_A > 0 Å and site_coverage > 0")
        try:
            table = np.array(self.penalty_dose_scale, np.float64)
            paired = table.size == 0 or (table.ndim == 2 and table.shape[1] == 2 and (
                table > 0).all() and (np.diff(table[:, 0]) > 0).all())
        except (TypeError, ValueError):
            paired = False
        if not paired:
            raise ConfigError("penalty_dose_scale must be (dose e⁻/Å², scale) pairs, both "
                              "positive, doses increasing")
        if not 0 < self.max_distance_A <= self.search_A:
            raise ConfigError("max_distance_A must be positive and ≤ search_A (Å)")
        for weights in (self.confidence_weights, self.stacked_confidence_weights):
            if len(weights) not in (0, len(EVIDENCE) + 1):
                raise ConfigError(f"confidence weights need {len(EVIDENCE) + 1} numbers "
                                  f"({', '.join(EVIDENCE)}, intercept) or none")


EVIDENCE = ("posterior_logit", "mean_log_probability", "coverage", "log_frames",
            "frame_scatter_atoms", "frame_confidence_logit", "stacked_posterior_logit")
"""What :func:`.tracks.stretch_evidence` returns, in order."""
