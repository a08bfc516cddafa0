"""What is simulated: particles (:class:`StructureConfig`), the microscope (:class:`OpticsConfig`) and
the whole simulation (:class:`SimulationConfig`); units in the field names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .base import (
    FOCAL_SPREAD_MODELS,
    MIN_COLUMN_SEPARATION_A,
    ConfigError,
    check_range,
    check_unit,
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
        check_range("diameter_range_A", self.diameter_range_A, 5.0, 120.0)
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
            check_range("aperture_range_mrad", self.aperture_range_mrad, 1.0, 200.0)
        if not self.focal_spread_models or any(
                m not in FOCAL_SPREAD_MODELS for m in self.focal_spread_models):
            raise ConfigError(f"focal_spread_models={list(self.focal_spread_models)} must be a "
                              f"non-empty list of {', '.join(FOCAL_SPREAD_MODELS)}")
        for name in ("max_coma_nm", "max_three_fold_astigmatism_nm"):
            if not 0.0 <= getattr(self, name) <= 1000.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1000] nm")
        if not 20.0 <= self.energy_keV <= 1000.0:
            raise ConfigError(f"energy_keV={self.energy_keV} must be between 20 and 1000 keV")
        check_range("defocus_range_nm", self.defocus_range_nm, -1000.0, 1000.0)
        check_range("cs_range_um", self.cs_range_um, -5000.0, 5000.0)
        check_range("c5_range_mm", self.c5_range_mm, -100.0, 100.0)
        check_range("focal_spread_range_nm", self.focal_spread_range_nm, 0.0, 50.0)
        if not 0.0 <= self.max_astigmatism_nm <= 100.0:
            raise ConfigError(f"max_astigmatism_nm={self.max_astigmatism_nm} must be in [0, 100] nm")
        if not 1.0 <= self.aperture_mrad <= 200.0:
            raise ConfigError(f"aperture_mrad={self.aperture_mrad} must be in [1, 200] mrad")
        # in range but far below anything physical: given in metres by mistake
        check_unit("defocus_range_nm", self.defocus_range_nm, "nm", 0.01, "[-12, 12] for ±12 nm")
        check_unit("focal_spread_range_nm", self.focal_spread_range_nm, "nm", 0.01,
                    "[2, 6] for 2–6 nm")
        check_unit("max_astigmatism_nm", self.max_astigmatism_nm, "nm", 0.001, "2 for 2 nm")
        check_unit("cs_range_um", self.cs_range_um, "µm", 0.01, "[-25, 25] for ±25 µm")
        check_unit("c5_range_mm", self.c5_range_mm, "mm", 0.001, "[0, 5] for 0–5 mm")


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
