"""How frames are analysed: column extraction, recognition, tracks and pictures (:class:`AnalyzeConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import ConfigError

MAX_ANALYZE_BATCH = 64
"""Most frames per inference batch of ``analyze`` (memory grows with it; speed does not)."""
DEFAULT_COLUMN_THRESHOLD = 0.3
"""Column threshold (column probability, in (0, 1)) of models that do not name their own."""


@dataclass(frozen=True)
class AnalyzeConfig:
    """Column extraction and analysis (:mod:`ceriakeras.inference.columns`, :mod:`ceriakeras.analysis.run`)."""

    min_distance_A: float = 2.0
    """Smallest distance between two detected columns, Å."""
    threshold: float | None = None
    """Smallest column probability (1 − p(background)) at a column centre, in (0, 1); None: the
    model's own ``column_threshold`` (chosen at export on our own validation data,
    ``scripts/studies/threshold_study.py``), else :data:`DEFAULT_COLUMN_THRESHOLD`
    (:func:`ceriakeras.inference.served.with_model_threshold`)."""
    batch_size: int = 4
    """Frames per inference batch."""
    model_workers: int = 1
    """Model calls running at once, each on ``cores // model_workers`` cores (set before
    TensorFlow starts; see :func:`ceriakeras.analysis.run.share_cores`)."""
    overlay_every: int | None = None
    """Write an overlay for every K-th frame (frames); None: a sample of ``overlay_samples``."""
    overlay_samples: int = 10
    """Overlays per series when ``overlay_every`` is None: evenly spaced frames, the first and
    last included (every frame of a shorter series; 0 = none)."""
    movie: bool = True
    """Write an annotated movie (MP4) of every series."""
    min_pixel_size_A: float = 0.05
    """Finest input pixel size accepted, Å."""
    max_pixel_size_A: float = 0.2
    """Coarsest input pixel size accepted, Å (also never coarser than the model's own)."""
    test_time_augmentation: bool = False
    """Average the model's probabilities over the 8 flips and 90° rotations of each frame
    (:func:`ceriakeras.inference.served.dihedral_average`): 8× the model time."""
    tracks: bool = True
    """Follow every column of a series (tracks, heights read from each stretch of constant
    height, change events; :mod:`ceriakeras.analysis.tracking`)."""
    min_stretch: int = 5
    """Fewest frames in a stretch of constant height (tracks; 5: chosen with the change
    statistic on our own movies, docs/tracks.md)."""
    stack_frames: int = 64
    """Longest run of frames added up (drift removed) and read once more by the model, to read
    the tracks' heights (:mod:`ceriakeras.analysis.stacking`; one model call per run, at most
    ``1 / stack_frames`` of the per-frame model time); 0: heights from the frames alone."""

    def validate(self) -> None:
        if not 0 < self.min_pixel_size_A <= self.max_pixel_size_A:
            raise ConfigError(
                f"min_pixel_size_A={self.min_pixel_size_A} Å and max_pixel_size_A="
                f"{self.max_pixel_size_A} Å must be positive and increasing"
            )
        if self.min_distance_A <= 0:
            raise ConfigError(f"min_distance_A={self.min_distance_A} must be positive")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold={self.threshold} must be in (0, 1)")
        if self.batch_size < 1 or (self.overlay_every is not None and self.overlay_every < 1):
            raise ConfigError("batch_size and overlay_every must be at least 1")
        if self.batch_size > MAX_ANALYZE_BATCH:
            raise ConfigError(f"batch_size={self.batch_size} frames is more than "
                              f"{MAX_ANALYZE_BATCH}: larger batches only hold more frames in "
                              "memory, they are not faster (the default is 4)")
        if self.model_workers < 1:
            raise ConfigError(f"model_workers={self.model_workers} must be at least 1")
        if self.overlay_samples < 0:
            raise ConfigError(f"overlay_samples={self.overlay_samples} must be ≥ 0 (frames)")
        if self.min_stretch < 1:
            raise ConfigError(f"min_stretch={self.min_stretch} must be ≥ 1 (frames)")
        if self.stack_frames < 0:
            raise ConfigError(f"stack_frames={self.stack_frames} must be ≥ 0 (frames; 0: off)")
