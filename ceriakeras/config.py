"""Settings for every stage, as dataclasses with units, and the physical constants they share.

One dataclass per stage; each run saves the one it used beside its results (``to_dict``) and
can be rebuilt from that file (``load_config``). Units are in the field names: ``_A`` ångström,
``_nm`` nanometre, ``_um`` micrometre, ``_mm`` millimetre, ``_keV`` kilo-electronvolt,
``_mrad`` milliradian, ``_deg`` degree, ``_e_per_A2`` electrons per Å², ``_px`` pixels.

Sign convention for defocus: abTEM's ``defocus`` (positive = underfocus, weakened lens), which
is the negative of the aberration coefficient C10. All defocus values here use abTEM's sign.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# --- physics -----------------------------------------------------------------------------------
CEO2_LATTICE_A = 5.411
"""Cubic lattice constant of fluorite CeO2, Å."""
CE_COLUMN_SPACING_A = CEO2_LATTICE_A / math.sqrt(2.0)
"""Distance between neighbouring Ce atoms inside one [110] column, Å (≈ 3.83)."""
MIN_COLUMN_SEPARATION_A = 3.3
"""Smallest projected distance between two Ce columns along [110], Å."""
FOCAL_SPREAD_MODELS = ("incoherent", "envelope")
"""Focal-spread models of :class:`OpticsConfig` (see ``focal_spread_models``)."""
SCHEMA_VERSION = 1
"""Version of the TFRecord schema written by :mod:`ceriakeras.data.records`."""
CALIBRATION_MAPS = ("platt", "logistic", "isotonic")
"""Confidence maps :mod:`ceriakeras.evaluation.calibration` can fit (``export --calibration-map``, ``calibrate --map``)."""


class CeriakerasError(Exception):
    """An error the user can fix; its message says what was wrong and what to do.

    The CLI prints it as one line and exits with status 2.
    """


class ConfigError(CeriakerasError, ValueError):
    """A setting is unknown or outside what the physics or the code allows."""


class DataError(CeriakerasError):
    """A dataset (TFRecord shards, manifest) is missing, corrupt or inconsistent."""


class InputError(CeriakerasError):
    """An input image or series cannot be analysed (unreadable, wrong shape, bad values)."""


class ModelError(CeriakerasError):
    """A model or training run is missing, incomplete or incompatible."""


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    a, b = value
    if not (lo <= a <= b <= hi):
        raise ConfigError(
            f"{name}={list(value)} must be an increasing pair inside [{lo}, {hi}]"
        )


def _check_unit(name: str, values, unit: str, smallest: float, example: str) -> None:
    """Refuse values whose largest magnitude is non-zero but below ``smallest`` ``unit``: a
    length given in metres (or another unit) by mistake, e.g. a defocus of 1e-8."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    largest = max((abs(v) for v in values), default=0.0)
    if 0.0 < largest < smallest:
        raise ConfigError(
            f"{name}={values} is implausibly small: the unit is {unit}, not metres "
            f"(write e.g. {example})"
        )


@dataclass(frozen=True)
class StructureConfig:
    """How nanoparticles are built (:mod:`ceriakeras.physics.structures`)."""

    diameter_range_A: tuple[float, float] = (15.0, 50.0)
    """Particle size across, Å (1.5–5 nm)."""
    max_height: int = 14
    """Largest column height drawn, Ce atoms; particles with taller columns are redrawn."""
    facet_families: tuple[str, ...] = ("111", "100", "110")
    """Facet families that cut the particle."""
    facet_jitter: float = 0.15
    """Relative spread of the distance of each facet plane from the centre."""
    origin_offset_A: float = 1.5
    """Largest shift of the cut origin from a Ce site, Å (makes shapes off-centre)."""
    surface_ce_removal_rate: float = 0.05
    """Fraction of surface Ce atoms removed (steps, missing atoms)."""
    surface_ce_addition_rate: float = 0.03
    """Extra Ce adatoms per surface Ce site, placed on empty lattice sites next to the surface."""
    ce_vacancy_rate: float = 0.005
    """Fraction of bulk Ce atoms removed."""
    o_vacancy_rate: float = 0.03
    """Fraction of O atoms removed (after dangling O are dropped)."""
    max_tilt_deg: float = 0.5
    """Largest tilt of [110] away from the beam, degrees."""
    vacuum_A: float = 7.0
    """Smallest vacuum between the particle and the cell edge, Å (the simulation needs
    ``diameter_range_A[1] + 2 * vacuum_A <= cell_size_A``)."""

    def validate(self) -> None:
        _check_range("diameter_range_A", self.diameter_range_A, 5.0, 120.0)
        if not 1 <= self.max_height <= 255:
            raise ConfigError(f"max_height={self.max_height} must be between 1 and 255 atoms")
        for fam in self.facet_families:
            if fam not in ("111", "100", "110"):
                raise ConfigError(f"facet family {fam!r} must be one of 111, 100, 110")
        for name in ("surface_ce_removal_rate", "surface_ce_addition_rate", "ce_vacancy_rate",
                     "o_vacancy_rate", "facet_jitter"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name}={v} must be a fraction in [0, 1]")
        if not 0.0 <= self.max_tilt_deg <= 5.0:
            raise ConfigError(f"max_tilt_deg={self.max_tilt_deg} must be in [0, 5] degrees")


@dataclass(frozen=True)
class OpticsConfig:
    """Ranges from which the microscope's optics are drawn for each image (uniformly)."""

    energy_keV: float = 300.0
    """Beam energy, keV."""
    defocus_range_nm: tuple[float, float] = (-12.0, 12.0)
    """Defocus, nm, abTEM sign (= −C10)."""
    cs_range_um: tuple[float, float] = (-25.0, 25.0)
    """Spherical aberration C30, µm."""
    c5_range_mm: tuple[float, float] = (0.0, 5.0)
    """Fifth-order spherical aberration C50, mm."""
    focal_spread_range_nm: tuple[float, float] = (2.0, 6.0)
    """Focal spread (1/e half width of the defocus distribution), nm."""
    max_astigmatism_nm: float = 2.0
    """Largest two-fold astigmatism C12, nm (its angle is uniform)."""
    aperture_mrad: float = 40.0
    """Objective aperture semi-angle, mrad (used for every image unless
    ``aperture_range_mrad`` is given)."""
    aperture_range_mrad: tuple[float, float] | None = None
    """If given, the aperture semi-angle is drawn per image, uniformly in this range, mrad."""
    focal_spread_models: tuple[str, ...] = ("incoherent",)
    """Focal-spread models drawn per image (uniformly among those listed): ``"incoherent"``, an
    incoherent sum of coherent images over the defocus distribution, or ``"envelope"``, the
    quasi-coherent temporal envelope ``exp(-(π λ Δ k² / 2)²)`` on the wave that abTEM's ``CTF``
    applies."""
    max_coma_nm: float = 0.0
    """Largest residual axial coma C21, nm (magnitude uniform in [0, max], angle uniform)."""
    max_three_fold_astigmatism_nm: float = 0.0
    """Largest residual three-fold astigmatism C23, nm (magnitude uniform, angle uniform)."""

    @property
    def max_aperture_mrad(self) -> float:
        """Largest objective aperture semi-angle any image can have, mrad."""
        if self.aperture_range_mrad is None:
            return float(self.aperture_mrad)
        return float(self.aperture_range_mrad[1])

    def validate(self) -> None:
        if self.aperture_range_mrad is not None:
            _check_range("aperture_range_mrad", self.aperture_range_mrad, 1.0, 200.0)
        if not self.focal_spread_models or any(
                m not in FOCAL_SPREAD_MODELS for m in self.focal_spread_models):
            raise ConfigError(f"focal_spread_models={list(self.focal_spread_models)} must be a "
                              f"non-empty list of {', '.join(FOCAL_SPREAD_MODELS)}")
        for name in ("max_coma_nm", "max_three_fold_astigmatism_nm"):
            if not 0.0 <= getattr(self, name) <= 1000.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1000] nm")
        if not 20.0 <= self.energy_keV <= 1000.0:
            raise ConfigError(f"energy_keV={self.energy_keV} must be between 20 and 1000 keV")
        _check_range("defocus_range_nm", self.defocus_range_nm, -1000.0, 1000.0)
        _check_range("cs_range_um", self.cs_range_um, -5000.0, 5000.0)
        _check_range("c5_range_mm", self.c5_range_mm, -100.0, 100.0)
        _check_range("focal_spread_range_nm", self.focal_spread_range_nm, 0.0, 50.0)
        if not 0.0 <= self.max_astigmatism_nm <= 100.0:
            raise ConfigError(f"max_astigmatism_nm={self.max_astigmatism_nm} must be in [0, 100] nm")
        if not 1.0 <= self.aperture_mrad <= 200.0:
            raise ConfigError(f"aperture_mrad={self.aperture_mrad} must be in [1, 200] mrad")
        # in range but far below anything physical: given in metres by mistake
        _check_unit("defocus_range_nm", self.defocus_range_nm, "nm", 0.01, "[-12, 12] for ±12 nm")
        _check_unit("focal_spread_range_nm", self.focal_spread_range_nm, "nm", 0.01,
                    "[2, 6] for 2–6 nm")
        _check_unit("max_astigmatism_nm", self.max_astigmatism_nm, "nm", 0.001, "2 for 2 nm")
        _check_unit("cs_range_um", self.cs_range_um, "µm", 0.01, "[-25, 25] for ±25 µm")
        _check_unit("c5_range_mm", self.c5_range_mm, "mm", 0.001, "[0, 5] for 0–5 mm")


def _converged_structure() -> StructureConfig:
    """Structure ranges of the version-3 training data (configs/ceria110_v3_data.toml)."""
    return StructureConfig(diameter_range_A=(15.0, 60.0), vacuum_A=2.0)


def _converged_optics() -> OpticsConfig:
    """Optics ranges of the version-3 training data (configs/ceria110_v3_data.toml)."""
    return OpticsConfig(aperture_range_mrad=(25.0, 40.0), focal_spread_models=FOCAL_SPREAD_MODELS,
                        max_coma_nm=40.0, max_three_fold_astigmatism_nm=40.0)


@dataclass(frozen=True)
class SimulationConfig:
    """How images and labels are simulated and stored (:mod:`ceriakeras.physics.simulate`).

    The defaults are the converged settings of the shipped model's training data
    (``configs/ceria110_v3_data.toml``: 0.04 Å sampling, 1 Å slices, a 128 Å cell with room for
    the delocalisation, the multislice in the particle + 8 Å). The older, cheaper and
    unconverged settings (0.1 Å sampling, 2 Å slices, 64 Å cell: the version-1/2 data) are
    reachable only by naming them: :meth:`legacy` or ``configs/legacy_fast.toml``.
    """

    structure: StructureConfig = field(default_factory=_converged_structure)
    """Particle ranges; default 1.5–6 nm (caliper) with 2 Å vacuum beyond the delocalisation."""
    optics: OpticsConfig = field(default_factory=_converged_optics)
    """Optics ranges; default the operating envelope with a 25–40 mrad aperture, both
    focal-spread models, and ≤ 40 nm coma and three-fold astigmatism."""
    cell_size_A: float = 128.0
    """Side of the square simulation cell, Å."""
    sampling_A: float = 0.04
    """Multislice grid spacing, Å."""
    slice_thickness_A: float = 1.0
    """Multislice slice thickness, Å."""
    pixel_size_A: float = 0.2
    """Pixel size of the stored image and label, Å (an integer multiple of ``sampling_A``)."""
    optics_per_exit_wave: int = 8
    """Images drawn with different optics from one exit wave (multislice run)."""
    label_radius_A: float = 0.5
    """Radius of the labelled disk around each Ce column, Å."""
    max_height: int = 16
    """Largest label class, Ce atoms; taller columns are an error."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Fractions of particles in train, validation and test."""
    vacuum_for_delocalisation: bool = True
    """If true, the cell must hold the largest particle plus, on each side, the delocalisation
    of the optics envelope (:func:`ceriakeras.physics.simulate.delocalisation_A`) and
    ``structure.vacuum_A``, so that no image's delocalised contrast wraps around the periodic
    cell onto the particle or its fringes. If false (the version-1/2 datasets), only
    ``structure.vacuum_A`` on each side. Default true."""
    multislice_margin_A: float | None = 8.0
    """If set, the multislice runs in a smaller square cell that holds the particle's lateral
    extent plus this margin on each side (Å; rounded up to whole pixels and to a grid size that
    FFTs well), and the exit wave is then embedded, on the image grid, in the ``cell_size_A``
    cell with the vacuum wave around it before the lens is applied
    (:func:`ceriakeras.physics.simulate.embed_exit_wave`). The delocalisation then still has the whole
    cell to spread into, while the multislice costs far less. Default 8 Å; None:
    the multislice runs in the whole cell, as in version 1/2."""

    def validate(self) -> None:
        self.structure.validate()
        self.optics.validate()
        if not 16.0 <= self.cell_size_A <= 400.0:
            raise ConfigError(f"cell_size_A={self.cell_size_A} must be in [16, 400] Å")
        if not 0.01 <= self.sampling_A <= 0.25:
            raise ConfigError(f"sampling_A={self.sampling_A} must be in [0.01, 0.25] Å")
        if not 0.2 <= self.slice_thickness_A <= 10.0:
            raise ConfigError(f"slice_thickness_A={self.slice_thickness_A} must be in [0.2, 10] Å")
        ratio = self.pixel_size_A / self.sampling_A
        if ratio < 1 - 1e-6 or abs(ratio - round(ratio)) > 1e-6:
            raise ConfigError(
                f"pixel_size_A={self.pixel_size_A} must be an integer multiple of "
                f"sampling_A={self.sampling_A}"
            )
        n = self.cell_size_A / self.pixel_size_A
        if abs(n - round(n)) > 1e-6:
            raise ConfigError(
                f"cell_size_A={self.cell_size_A} must be a whole number of pixels of "
                f"{self.pixel_size_A} Å"
            )
        if self.optics_per_exit_wave < 1:
            raise ConfigError("optics_per_exit_wave must be at least 1")
        if self.multislice_margin_A is not None and not 1.0 <= self.multislice_margin_A <= 100.0:
            raise ConfigError(f"multislice_margin_A={self.multislice_margin_A} must be in [1, 100] Å "
                              "(or left out: multislice in the whole cell)")
        if not 0.1 <= self.label_radius_A <= MIN_COLUMN_SEPARATION_A / 2:
            raise ConfigError(
                f"label_radius_A={self.label_radius_A} must be in [0.1, {MIN_COLUMN_SEPARATION_A / 2}] Å"
            )
        if not 1 <= self.max_height <= 255:
            raise ConfigError(f"max_height={self.max_height} must be in [1, 255] atoms")
        if self.structure.max_height > self.max_height:
            raise ConfigError(
                f"structure.max_height={self.structure.max_height} exceeds the label classes "
                f"max_height={self.max_height}"
            )
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ConfigError(f"split_fractions={self.split_fractions} must be ≥ 0 and sum to 1")

    @property
    def image_size_px(self) -> int:
        """Side of the stored image, pixels."""
        return int(round(self.cell_size_A / self.pixel_size_A))

    @classmethod
    def legacy(cls, **changes: Any) -> SimulationConfig:
        """The old, unconverged defaults of the version-1/2 data, with ``changes`` applied.

        0.1 Å sampling, 2 Å slices, a 64 Å cell with 7 Å vacuum and no room for the
        delocalisation, the multislice in the whole cell, a fixed 40 mrad aperture, the
        incoherent focal spread only, no coma (``StructureConfig()``, ``OpticsConfig()``).
        2–6 CPU s per particle of 8 images against 12–13 s for the defaults (two particles,
        issue 23), and 10–19 % off a converged image (docs/model.md): for tests, quick looks
        and reproducing version 1/2 only. The same settings as a file:
        ``configs/legacy_fast.toml``.
        """
        base = cls(structure=StructureConfig(), optics=OpticsConfig(), cell_size_A=64.0,
                   sampling_A=0.1, slice_thickness_A=2.0, vacuum_for_delocalisation=False,
                   multislice_margin_A=None)
        return dataclasses.replace(base, **changes)


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
        _check_range("dose_range_e_per_A2", self.dose_range_e_per_A2, 1e-3, 1e8)
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
    min_stretch: int = 3
    """Fewest frames in a stretch of constant height (tracks)."""

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


# --- (de)serialization -------------------------------------------------------------------------
C = TypeVar("C")


def to_dict(config: Any) -> dict:
    """The config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[C], data: dict, *, where: str = "", base: C | None = None) -> C:
    """Build ``cls`` from nested plain data, refusing keys that do not exist.

    Fields missing from ``data`` take their values from ``base`` if given (e.g.
    ``SimulationConfig.legacy()`` for a manifest written before a field existed), else the
    class defaults. A nested table given in ``data`` is built from its own class's defaults.

    Raises
    ------
    ConfigError
        If ``data`` is not a table, a key is unknown (the message names it and lists the valid
        ones) or a value has the wrong type or is not finite (:mod:`ceriakeras.validate`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"the {cls.__name__} settings{' of ' + where.rstrip('.') if where else ''} "
                          f"must be a table of keys and values (a JSON object), not "
                          f"{type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key {where + key!r}; valid keys: {', '.join(sorted(names))}"
            )
        ftype = names[key].type
        sub = _dataclass_by_name(ftype)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where=f"{where}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    config = cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    _check_types(config, where)
    return config


def _check_types(config: Any, where: str = "") -> None:
    """:func:`ceriakeras.validate.check_types`, its error as this module's :class:`ConfigError`."""
    from . import validate

    try:
        validate.check_types(config, where)
    except validate.ConfigError as err:
        raise ConfigError(str(err)) from None


def _dataclass_by_name(ftype: Any) -> type | None:
    name = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", "")
    return globals().get(name) if name in _CONFIG_CLASSES else None


_CONFIG_CLASSES = {
    "StructureConfig", "OpticsConfig", "SimulationConfig", "PipelineConfig", "ModelConfig",
    "TrainConfig", "AnalyzeConfig",
}


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Read a JSON or TOML config file (or none) into ``cls``, apply overrides and validate.

    Parameters
    ----------
    cls : dataclass type
        The stage's config class, e.g. :class:`SimulationConfig`.
    path : str or Path, optional
        ``.json`` or ``.toml`` file holding a subset of the fields (nested tables for nested
        configs). Missing fields keep their defaults; a :class:`SimulationConfig` file with
        ``preset = "legacy"`` starts from :meth:`SimulationConfig.legacy` instead.
    **overrides
        Top-level fields to replace (e.g. from CLI options); ``None`` values are ignored.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            data = tomllib.loads(text.decode()) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid {path.suffix[1:] or 'JSON'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings (a JSON object or "
                          f"TOML keys), not a {type(data).__name__}")
    preset = data.pop("preset", None)
    if preset is not None and (preset != "legacy" or not hasattr(cls, "legacy")):
        raise ConfigError(f"preset={preset!r} is unknown: the only preset is \"legacy\" "
                          f"(SimulationConfig's old, unconverged settings); remove the line")
    config = from_dict(cls, data, base=cls.legacy() if preset else None)
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    _check_types(config)
    config.validate()
    return config
