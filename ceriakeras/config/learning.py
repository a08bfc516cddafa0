"""How a model learns: the input pipeline (:class:`PipelineConfig`), the network (:class:`ModelConfig`)
and the training run (:class:`TrainConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .base import ConfigError, check_range


@dataclass(frozen=True)
class PipelineConfig:
    """How records become training batches (:mod:`ceriakeras.data.pipeline`)."""

    crop_px: int = 128
    """Side of the square training crop, pixels."""
    batch_size: int = 8
    """Global batch size (split across replicas)."""
    dose_range_e_per_A2: tuple[float, float] = (20.0, 20000.0)
    """Dose drawn log-uniformly per training image, e⁻/Å²."""
    validation_doses_e_per_A2: tuple[float, ...] = (50.0, 200.0, 1000.0)
    """Fixed doses for validation, e⁻/Å² (fixed seeds too, so epochs compare)."""
    shuffle_buffer: int = 512
    """Examples held for shuffling."""
    seed: int = 0
    """Seed of the shuffle, crops and noise."""
    deterministic: bool = False
    """Same batches in the same order on every run (slower; for tests)."""
    crops_per_image: int = 4
    """Random training crops taken from each decoded record (at most as many as fit without
    overlap, e.g. 4 crops of 128 px from a 320 px image), so decompression is amortized."""
    crop_jitter_px: int | None = None
    """Where training crops are taken: ``None``, anywhere in the image (uniform); a number J,
    around the image centre (where ``simulate`` puts the particle), shifted by at most J pixels
    along each axis (uniform), so a crop as large as the particle holds all of it and the network
    learns from whole particles rather than from vacuum and cut-off halves. Pixels."""

    def validate(self) -> None:
        if self.crop_jitter_px is not None and (not isinstance(self.crop_jitter_px, int)
                                                or self.crop_jitter_px < 0):
            raise ConfigError(f"crop_jitter_px={self.crop_jitter_px} must be at least 0 pixels "
                              "(or absent: crops anywhere in the image)")
        if not 1 <= self.crops_per_image <= 64:
            raise ConfigError(f"crops_per_image={self.crops_per_image} must be in [1, 64]")
        if self.crop_px < 16 or self.crop_px % 16:
            raise ConfigError(f"crop_px={self.crop_px} must be a multiple of 16, at least 16 px")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        check_range("dose_range_e_per_A2", self.dose_range_e_per_A2, 1e-3, 1e8)
        for d in self.validation_doses_e_per_A2:
            if not 0 < d < math.inf:
                raise ConfigError(f"validation dose {d} e-/Å² must be positive and finite")


MODEL_ARCHITECTURES = ("unet", "context_unet")
"""Values of :attr:`ModelConfig.architecture`."""


@dataclass(frozen=True)
class ModelConfig:
    """The network (:mod:`ceriakeras.nn.model`).

    ``architecture='unet'`` is the U-Net of model versions 1–2 (:func:`~ceriakeras.nn.model.build_unet`);
    ``'context_unet'`` (:func:`~ceriakeras.nn.model.build_context_unet`) works on a grid coarsened
    by a strided stem, reaches ``pixel_size_A * 2**depth`` at its bottleneck, and may add dilated
    convolutions and a global branch that also estimates the frame's optics.
    """

    depth: int = 3
    """Number of down-sampling steps (input is padded to a multiple of 2**depth); for
    'context_unet' the strided stem is the first of them (depth 5: 0.2 Å → 6.4 Å)."""
    base_filters: int = 16
    """Filters of the first level; doubled at each level down."""
    architecture: str = "unet"
    """'unet' (versions 1–2) or 'context_unet'."""
    max_filters: int = 192
    """'context_unet': cap on the filters of any level."""
    full_resolution_filters: int = 8
    """'context_unet': filters of the thin path at the model's own pixel size (0.2 Å)."""
    dilations: tuple[int, ...] = (2,)
    """'context_unet': dilation rates of extra 3×3 convolutions at the bottleneck (widen the
    receptive field at little cost); () for none."""
    global_branch: bool = True
    """'context_unet': global pooling of the bottleneck → dense → added back to every
    bottleneck pixel, and a per-frame estimate of the optics (``optics`` output: defocus nm,
    Cs µm, largest column height in atoms)."""
    global_units: int = 64
    """'context_unet': width of the global branch's hidden dense layer."""
    skip_merge: str = "concatenate"
    """'context_unet': how the decoder joins each encoder skip, 'concatenate' (versions 3–6)
    or 'add' (the same receptive field; each level's first decoder convolution reads half the
    channels, ≈ 17 % fewer FLOP at version 4's widths)."""
    detector_correlation_max: float = 0.0
    """Training only: after the Poisson draw, blur the counts with a detector MTF whose
    neighbour-pixel noise correlation is drawn per image uniformly in [0, this]; 0 = off
    (versions 1–2). Physical detectors: about 0.1–0.3."""
    intensity_reference: str = "frame_mean"
    """What the input counts are divided by: 'frame_mean' (versions 1–2; the result depends on
    how much vacuum the frame holds) or 'vacuum' (the ``vacuum_quantile`` of the frame's local
    means over ``vacuum_tile_A`` windows, :class:`~ceriakeras.nn.model.NormalizeToVacuum`)."""
    vacuum_tile_A: float = 4.0
    """'vacuum': side of the windows whose means give the vacuum level, Å."""
    vacuum_quantile: float = 0.9
    """'vacuum': the quantile of the window means taken as the vacuum level."""
    global_pool: str = "average"
    """'context_unet': how the global branch pools the bottleneck, 'average' or 'max' (max does
    not fade as the frame's vacuum grows)."""
    normalization: str = "batch"
    """'batch', 'group' or 'none'."""
    dropout: float = 0.1
    """Dropout rate at the bottleneck."""
    max_height: int = 16
    """Largest height class; the model has max_height + 1 outputs (0 = no Ce column)."""
    pixel_size_A: float = 0.2
    """Pixel size the model works at, Å."""

    def validate(self) -> None:
        if self.architecture not in MODEL_ARCHITECTURES:
            raise ConfigError(f"architecture={self.architecture!r} must be one of "
                              f"{', '.join(MODEL_ARCHITECTURES)}")
        if not 1 <= self.depth <= 6:
            raise ConfigError(f"depth={self.depth} must be in [1, 6]")
        if self.architecture == "context_unet" and self.depth < 2:
            raise ConfigError(f"depth={self.depth} must be at least 2 for context_unet")
        if self.max_filters < self.base_filters or self.full_resolution_filters < 1:
            raise ConfigError(f"max_filters={self.max_filters} must be ≥ base_filters="
                              f"{self.base_filters} and full_resolution_filters ≥ 1")
        if any(int(d) != d or not 1 <= d <= 16 for d in self.dilations):
            raise ConfigError(f"dilations={list(self.dilations)} must be whole numbers in [1, 16]")
        if self.skip_merge not in ("concatenate", "add"):
            raise ConfigError(f"skip_merge={self.skip_merge!r} must be concatenate or add")
        if self.global_units < 1:
            raise ConfigError(f"global_units={self.global_units} must be at least 1")
        if not 0.0 <= self.detector_correlation_max <= 0.5:
            raise ConfigError(f"detector_correlation_max={self.detector_correlation_max} must "
                              "be a neighbour-pixel correlation in [0, 0.5]")
        if self.base_filters < 2:
            raise ConfigError(f"base_filters={self.base_filters} must be at least 2")
        if self.intensity_reference not in ("frame_mean", "vacuum"):
            raise ConfigError(f"intensity_reference={self.intensity_reference!r} must be "
                              "frame_mean or vacuum")
        if not 0.5 <= self.vacuum_tile_A <= 20.0 or not 0.5 <= self.vacuum_quantile < 1.0:
            raise ConfigError(f"vacuum_tile_A={self.vacuum_tile_A} must be in [0.5, 20] Å and "
                              f"vacuum_quantile={self.vacuum_quantile} in [0.5, 1)")
        if self.global_pool not in ("average", "max"):
            raise ConfigError(f"global_pool={self.global_pool!r} must be average or max")
        if self.normalization not in ("batch", "group", "none"):
            raise ConfigError(f"normalization={self.normalization!r} must be batch, group or none")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not 1 <= self.max_height <= 255:
            raise ConfigError(f"max_height={self.max_height} must be in [1, 255] atoms")
        if not 0.01 <= self.pixel_size_A <= 1.0:
            raise ConfigError(f"pixel_size_A={self.pixel_size_A} must be in [0.01, 1] Å (the "
                              "unit is ångström)")


@dataclass(frozen=True)
class TrainConfig:
    """Training (:mod:`ceriakeras.nn.train`), with the pipeline and model it uses."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 20
    steps_per_epoch: int = 200
    learning_rate: float = 2e-3
    """Peak learning rate of the cosine schedule."""
    warmup_steps: int = 100
    weight_scheme: str = "median_frequency"
    """Class weights: 'median_frequency' or 'none'."""
    max_class_weight: float = 10.0
    """Cap on any class weight (relative to the median column class)."""
    background_weight: float = 0.1
    """Weight of the background class 0 relative to the median column class."""
    early_stopping_patience: int = 5
    """Epochs without validation improvement before stopping."""
    validation_steps: int | None = None
    """Validation batches per epoch (None = whole validation split)."""
    mixed_precision: str = "auto"
    """'auto' (mixed_float16 when a GPU is visible), 'on' or 'off'."""
    optics_loss_weight: float = 0.1
    """Weight of the optics regression loss (mean squared error of normalised defocus, Cs and
    largest column height) next to the cross-entropy, for models with a global branch."""
    teacher: str | None = None
    """Served model (``saved_models/NAME/VERSION``) to distil from (:mod:`ceriakeras.nn.distill`);
    None: train on the true labels alone."""
    distill_weight: float = 0.5
    """With a teacher: λ in ``(1 − λ) · cross-entropy + λ · T² · KL(teacher ‖ student)``."""
    distill_temperature: float = 1.0
    """With a teacher: the softmax temperature T of both sides of the KL term."""

    def validate(self) -> None:
        self.pipeline.validate()
        self.model.validate()
        if not 0.0 <= self.optics_loss_weight <= 10.0:
            raise ConfigError(f"optics_loss_weight={self.optics_loss_weight} must be in [0, 10]")
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ConfigError("epochs and steps_per_epoch must be at least 1")
        if not 0.0 < self.learning_rate <= 1.0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be in (0, 1] (peak of "
                              "the cosine schedule; the default is 2e-3)")
        if not 0.0 <= self.distill_weight <= 1.0 or not 0.1 <= self.distill_temperature <= 20.0:
            raise ConfigError(f"distill_weight={self.distill_weight} must be in [0, 1] and "
                              f"distill_temperature={self.distill_temperature} in [0.1, 20]")
        if self.weight_scheme not in ("median_frequency", "none"):
            raise ConfigError(f"weight_scheme={self.weight_scheme!r} must be median_frequency or none")
        if self.mixed_precision not in ("auto", "on", "off"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} must be auto, on or off")
