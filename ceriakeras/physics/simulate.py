"""abTEM HRTEM images of one particle: multislice exit wave → images at drawn optics; label masks.

One multislice run (abTEM 1.0, plane wave, Lobato potential with infinite projection) gives the
exit wave of a particle; ``optics_per_exit_wave`` images are then made from it, each with its own
draw of the objective lens (defocus, Cs, C5, two-fold astigmatism, focal spread, aperture).

Conventions
-----------
- Defocus uses abTEM's sign: ``defocus = -C10`` (positive = underfocus). Cs is C30 in µm, C5 is
  C50 in mm, astigmatism is C12 in nm at angle phi12. The phase is abTEM's
  ``chi = 2π/λ (α²/2 (C10 + C12 cos 2(φ - φ12)) + α⁴/4 C30 + α⁶/6 C50)`` and the wave in the
  image plane is ``ifft(fft(ψ) · A(α) · exp(-i chi))`` with a hard aperture ``A``.
- Focal spread (partial temporal coherence) is the 1/e half width Δ of a Gaussian defocus
  distribution ``p(f) ∝ exp(-(f - f0)² / Δ²)`` (the convention of abTEM's ``TemporalEnvelope``
  and Kirkland). Model ``"incoherent"`` (the default) does it properly for a non-linear image:
  the image is the incoherent, weighted sum of coherent images at defocus values on a uniform
  grid spanning ±3Δ, spaced finely enough that the sum does not alias any frequency the
  aperture passes (see :func:`defocus_samples`). Model ``"envelope"`` is the quasi-coherent
  approximation abTEM's ``CTF`` makes: one coherent image of the wave multiplied by the
  temporal envelope ``exp(-(π λ Δ k² / 2)²)``. Which one is drawn per image
  (``OpticsConfig.focal_spread_models``) and recorded as ``focal_spread_model``.
- Residual aberrations: axial coma C21 (``coma_nm``, angle ``coma_angle_deg``) and three-fold
  astigmatism C23 (``three_fold_astigmatism_nm``, ``three_fold_astigmatism_angle_deg``) add
  ``2π/λ · α³/3 · (C21 cos(φ - φ21) + C23 cos 3(φ - φ23))`` to chi (abTEM's polar form).
- Intensity: the incident plane wave has |ψ|² = 1, so vacuum = 1 in every image.
- Coordinates (docs/architecture.md): pixel ``i`` of the stored image covers
  ``[i·p, (i+1)·p)`` in the cell, so ``x_px = x_A / p - 0.5``. abTEM samples its grid at
  ``x = j·s``; the atoms are handed to abTEM shifted by ``-s/2`` in x and y, so fine sample ``j``
  sits at the true position ``(j + 1/2)·s`` (the midpoint of ``[j·s, (j+1)·s)``) and the mean of
  the ``p/s`` fine samples of one pixel integrates the intensity over that pixel.
- Arrays: abTEM arrays are indexed ``[x, y]``; stored images and labels are ``(H, W)`` =
  ``(rows = y, columns = x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from ceriakeras.config import ConfigError, OpticsConfig, SimulationConfig
from ceriakeras.physics.structures import build_particle, column_table

__all__ = [
    "Example",
    "ExitWave",
    "simulate_particle",
    "exit_wave",
    "draw_optics",
    "image_from_exit_wave",
    "image_sampling_A",
    "defocus_samples",
    "label_mask",
    "place_in_cell",
    "multislice_cell",
    "embed_exit_wave",
    "check_simulation_config",
    "delocalisation_A",
    "envelope_delocalisation_A",
    "contrast_rms_difference",
    "multislice_convergence",
    "software_versions",
    "wavelength_A",
]

Z_MARGIN_A = 1.0
"""Vacuum above and below the particle along the beam inside the multislice cell, Å."""
_FOCAL_SPREAD_RANGE = 3.0  # defocus grid spans ±3 Δ (weight exp(-9) at the ends)
_ALIAS_TOLERANCE = 1e-3  # temporal envelope value below which aliased frequencies may land


@dataclass
class Example:
    """One simulated training image with its ground truth.

    Attributes
    ----------
    image : (H, W) float32
        Noise-free intensity, vacuum = 1.
    label : (H, W) uint8
        Column height inside a disk of ``label_radius_A`` around each Ce column, 0 elsewhere.
    columns : (N, 3) float32
        ``x_px, y_px, height`` of every Ce column in the image's pixel grid.
    pixel_size_A : float
        Å per pixel.
    metadata : dict
        JSON-able: particle shape and defects, zone axis, optics, cell, seed, particle_id,
        software versions.
    atoms : ase.Atoms
        The particle in cell coordinates (Å; the cell is the simulation cell).
    """

    image: np.ndarray
    label: np.ndarray
    columns: np.ndarray
    pixel_size_A: float
    metadata: dict
    atoms: Atoms = field(repr=False)


@dataclass
class ExitWave:
    """An exit wave in reciprocal space, ready for many optics draws.

    Attributes
    ----------
    fourier : (Nx, Ny) complex64
        ``fft2`` of the exit wave, abTEM axis order (x first).
    sampling_A : float
        Real-space grid spacing, Å; real-space sample ``j`` sits at ``(j + 1/2)·sampling_A``.
    energy_keV : float
        Beam energy, keV.
    """

    fourier: np.ndarray
    sampling_A: float
    energy_keV: float

    @classmethod
    def from_array(cls, wave: np.ndarray, sampling_A: float, energy_keV: float) -> "ExitWave":
        """Build from a real-space exit wave ``(Nx, Ny)`` complex (abTEM axis order)."""
        from abtem.core.fft import fft2

        wave = np.ascontiguousarray(wave, dtype=np.complex64)
        return cls(fft2(wave), float(sampling_A), float(energy_keV))


def wavelength_A(energy_keV: float) -> float:
    """Relativistic electron wavelength, Å."""
    from abtem.core.energy import energy2wavelength

    return float(energy2wavelength(energy_keV * 1e3))


def software_versions() -> dict:
    """Versions of the software that made an image (JSON-able)."""
    import abtem
    import ase

    import ceriakeras

    return {"abtem": abtem.__version__, "ase": ase.__version__, "numpy": np.__version__,
            "ceriakeras": ceriakeras.__version__}


def delocalisation_A(optics: dict) -> float:
    """Largest lateral shift of any beam the aperture passes, for one set of optics, Å.

    A beam at spatial frequency ``k`` is imaged displaced by ``|∇_k chi| / 2π`` (the
    delocalisation). Bounded here by
    ``max_{k ≤ k_ap} |λk C10 + λ³k³ C30 + λ⁵k⁵ C50| + λk (|C12| + Δ) + λ²k² (|C21| + |C23|)``
    (C10 = -defocus, Δ the focal spread's 1/e half width: the defocus spread of the image).

    Parameters
    ----------
    optics : dict
        As returned by :func:`draw_optics` (``energy_keV``, ``defocus_nm``, ``cs_um``,
        ``c5_mm``, ``aperture_mrad``; optional ``astigmatism_nm``, ``focal_spread_nm``,
        ``coma_nm``, ``three_fold_astigmatism_nm``, 0 if absent).

    Returns
    -------
    float
        Delocalisation, Å.
    """
    lam = wavelength_A(optics["energy_keV"])
    k = np.linspace(0.0, optics["aperture_mrad"] * 1e-3 / lam, 2001)
    c10 = -optics["defocus_nm"] * 10.0
    c30 = optics["cs_um"] * 1e4
    c50 = optics["c5_mm"] * 1e7
    round_part = np.abs(lam * k * c10 + lam**3 * k**3 * c30 + lam**5 * k**5 * c50)
    c12 = abs(optics.get("astigmatism_nm", 0.0)) * 10.0
    spread = abs(optics.get("focal_spread_nm", 0.0)) * 10.0
    odd = 10.0 * (abs(optics.get("coma_nm", 0.0))
                  + abs(optics.get("three_fold_astigmatism_nm", 0.0)))
    return float(np.max(round_part + lam * k * (c12 + spread) + (lam * k) ** 2 * odd))


def envelope_delocalisation_A(config: OpticsConfig) -> float:
    """Largest :func:`delocalisation_A` over the whole optics envelope of ``config``, Å.

    The worst corner of the defocus, Cs and C5 ranges (the bound is linear in each), at the
    largest aperture, astigmatism, focal spread, coma and three-fold astigmatism.
    """
    worst = 0.0
    for defocus in config.defocus_range_nm:
        for cs in config.cs_range_um:
            for c5 in config.c5_range_mm:
                worst = max(worst, delocalisation_A({
                    "energy_keV": config.energy_keV, "defocus_nm": defocus, "cs_um": cs,
                    "c5_mm": c5, "aperture_mrad": config.max_aperture_mrad,
                    "astigmatism_nm": config.max_astigmatism_nm,
                    "focal_spread_nm": config.focal_spread_range_nm[1],
                    "coma_nm": config.max_coma_nm,
                    "three_fold_astigmatism_nm": config.max_three_fold_astigmatism_nm}))
    return worst


def check_simulation_config(config: SimulationConfig) -> None:
    """Validate ``config`` and check that the largest particle fits the cell with its vacuum.

    With ``config.vacuum_for_delocalisation`` the vacuum on each side must also hold the
    delocalisation of the optics envelope (:func:`envelope_delocalisation_A`), so that no
    image's contrast wraps around the periodic cell.

    With ``config.multislice_margin_A`` there are two cells: the whole cell, in which the lens
    acts (the rules above apply to it), and the multislice cell of each particle
    (:func:`multislice_cell`), which must hold the particle plus the margin on each side. The
    margin must be at least ``structure.vacuum_A``, and the multislice cell of the largest
    particle, ``diameter_range_A[1] + 2 · margin``, no larger than the whole cell (else the
    margin buys nothing: leave it out).

    Raises
    ------
    ConfigError
        With what to change.
    """
    config.validate()
    s = config.structure
    need = s.diameter_range_A[1] + 2.0 * s.vacuum_A
    if need > config.cell_size_A + 1e-9:
        raise ConfigError(
            f"particles up to {s.diameter_range_A[1]} Å with {s.vacuum_A} Å vacuum need "
            f"cell_size_A >= {need}; raise cell_size_A or lower diameter_range_A/vacuum_A"
        )
    if config.vacuum_for_delocalisation:
        o = config.optics
        r = envelope_delocalisation_A(o)
        need = s.diameter_range_A[1] + 2.0 * (r + s.vacuum_A)
        if need > config.cell_size_A + 1e-9:
            raise ConfigError(
                f"cell_size_A={config.cell_size_A} Å lets delocalised contrast wrap around the "
                f"periodic cell: particles up to {s.diameter_range_A[1]} Å plus, on each side, "
                f"{r:.1f} Å delocalisation (worst corner of the optics envelope at "
                f"{o.max_aperture_mrad} mrad, {o.energy_keV} keV) and vacuum_A={s.vacuum_A} Å "
                f"need cell_size_A >= {math.ceil(need)} Å; raise cell_size_A or narrow the "
                f"defocus/Cs/C5 ranges or the aperture"
            )
    margin = config.multislice_margin_A
    if margin is not None:
        if margin < s.vacuum_A:
            raise ConfigError(f"multislice_margin_A={margin} Å is below structure.vacuum_A="
                              f"{s.vacuum_A} Å; raise it to at least the vacuum")
        need = s.diameter_range_A[1] + 2.0 * margin
        if need > config.cell_size_A + 1e-9:
            raise ConfigError(
                f"multislice_margin_A={margin} Å: particles up to {s.diameter_range_A[1]} Å "
                f"need a multislice cell of {need} Å, more than cell_size_A="
                f"{config.cell_size_A} Å; lower the margin or leave it out (whole-cell "
                f"multislice)")


def draw_optics(rng: np.random.Generator, config: OpticsConfig) -> dict:
    """Draw the objective-lens settings of one image, uniformly inside ``config``'s ranges.

    Returns
    -------
    dict
        ``energy_keV``, ``defocus_nm`` (abTEM sign, = -C10), ``cs_um`` (C30),
        ``c5_mm`` (C50), ``focal_spread_nm`` (1/e half width), ``astigmatism_nm`` (C12),
        ``astigmatism_angle_deg`` (phi12), ``aperture_mrad`` (semi-angle),
        ``focal_spread_model`` (``"incoherent"`` or ``"envelope"``), ``coma_nm`` (C21),
        ``coma_angle_deg`` (phi21), ``three_fold_astigmatism_nm`` (C23),
        ``three_fold_astigmatism_angle_deg`` (phi23); plain floats and one string.

    Notes
    -----
    The draws of the version-1/2 settings come first and in their old order, and a new setting
    is drawn only when its range is open, so a config without the new settings gives the same
    optics (and images) as before.
    """
    optics = {
        "energy_keV": float(config.energy_keV),
        "defocus_nm": float(rng.uniform(*config.defocus_range_nm)),
        "cs_um": float(rng.uniform(*config.cs_range_um)),
        "c5_mm": float(rng.uniform(*config.c5_range_mm)),
        "focal_spread_nm": float(rng.uniform(*config.focal_spread_range_nm)),
        "astigmatism_nm": float(rng.uniform(0.0, config.max_astigmatism_nm)),
        "astigmatism_angle_deg": float(rng.uniform(0.0, 180.0)),
        "aperture_mrad": float(config.aperture_mrad),
        "focal_spread_model": config.focal_spread_models[0],
        "coma_nm": 0.0,
        "coma_angle_deg": 0.0,
        "three_fold_astigmatism_nm": 0.0,
        "three_fold_astigmatism_angle_deg": 0.0,
    }
    if config.aperture_range_mrad is not None:
        optics["aperture_mrad"] = float(rng.uniform(*config.aperture_range_mrad))
    if len(config.focal_spread_models) > 1:
        optics["focal_spread_model"] = str(
            config.focal_spread_models[int(rng.integers(len(config.focal_spread_models)))])
    if config.max_coma_nm > 0:
        optics["coma_nm"] = float(rng.uniform(0.0, config.max_coma_nm))
        optics["coma_angle_deg"] = float(rng.uniform(0.0, 360.0))
    if config.max_three_fold_astigmatism_nm > 0:
        optics["three_fold_astigmatism_nm"] = float(
            rng.uniform(0.0, config.max_three_fold_astigmatism_nm))
        optics["three_fold_astigmatism_angle_deg"] = float(rng.uniform(0.0, 120.0))
    return optics


def defocus_samples(focal_spread_A: float, max_frequency_inv_A: float, energy_keV: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Defocus offsets and weights for the incoherent focal-spread sum.

    The intensity at defocus ``f`` holds terms ``exp(-i π λ f (k1² - k2²))`` with
    ``|k1² - k2²| ≤ k_max²``, i.e. frequencies in ``f`` up to ``ω_max = π λ k_max²``.
    A uniform grid of step ``h`` with Gaussian weights reproduces each term's exact average
    (the temporal envelope ``exp(-(ωΔ/2)²)``) up to aliases at ``ω ± 2π/h``; ``h`` is chosen so
    that ``2π/h ≥ ω_max + ω_ε`` where the envelope has fallen to 1e-3 at ``ω_ε``.

    Parameters
    ----------
    focal_spread_A : float
        1/e half width Δ of the defocus distribution, Å.
    max_frequency_inv_A : float
        Largest spatial frequency in the wave (aperture), 1/Å.
    energy_keV : float
        Beam energy, keV.

    Returns
    -------
    offsets_A : (n,) float64
        Defocus offsets from the mean, Å (n odd, 1 if Δ = 0).
    weights : (n,) float64
        Normalized weights (sum 1).
    """
    if focal_spread_A <= 0:
        return np.zeros(1), np.ones(1)
    lam = wavelength_A(energy_keV)
    omega_max = math.pi * lam * max_frequency_inv_A**2
    omega_eps = 2.0 / focal_spread_A * math.sqrt(math.log(1.0 / _ALIAS_TOLERANCE))
    step = 2.0 * math.pi / (omega_max + omega_eps)
    half = max(1, int(math.ceil(_FOCAL_SPREAD_RANGE * focal_spread_A / step)))
    offsets = np.linspace(-_FOCAL_SPREAD_RANGE, _FOCAL_SPREAD_RANGE, 2 * half + 1) * focal_spread_A
    weights = np.exp(-((offsets / focal_spread_A) ** 2))
    return offsets, weights / weights.sum()


def _phase_grid(shape: tuple[int, int], sampling_A: float) -> tuple[np.ndarray, np.ndarray]:
    kx = np.fft.fftfreq(shape[0], sampling_A)
    ky = np.fft.fftfreq(shape[1], sampling_A)
    k2 = kx[:, None] ** 2 + ky[None, :] ** 2
    phi = np.arctan2(ky[None, :], kx[:, None])
    return k2, phi


def image_from_exit_wave(exit_wave: ExitWave, optics: dict, pixel_size_A: float | None = None
                         ) -> np.ndarray:
    """The HRTEM image of an exit wave through a lens with the given optics.

    Parameters
    ----------
    exit_wave : ExitWave
        The exit wave (reciprocal space, abTEM axis order, vacuum amplitude 1).
    optics : dict
        As returned by :func:`draw_optics` (units in the keys). ``energy_keV`` must match the
        exit wave's. The keys added in version 3 (``focal_spread_model``, ``coma_nm``,
        ``coma_angle_deg``, ``three_fold_astigmatism_nm``,
        ``three_fold_astigmatism_angle_deg``) may be left out: incoherent focal spread, no
        coma or three-fold astigmatism.
    pixel_size_A : float, optional
        Pixel size of the returned image, Å, an integer multiple of the exit wave's sampling
        (default: the sampling itself). Each pixel is the mean of the fine samples it covers.

    Returns
    -------
    (H, W) float32
        Intensity, vacuum = 1, rows = y, columns = x; pixel ``i`` covers ``[i·p, (i+1)·p)``.
    """
    import abtem
    from abtem.core.fft import ifft2

    if abs(optics["energy_keV"] - exit_wave.energy_keV) > 1e-6:
        raise ConfigError(f"optics energy_keV={optics['energy_keV']} differs from the exit "
                          f"wave's {exit_wave.energy_keV}; simulate a new exit wave")
    s = exit_wave.sampling_A
    p = s if pixel_size_A is None else float(pixel_size_A)
    factor = int(round(p / s))
    nx, ny = exit_wave.fourier.shape
    if factor < 1 or abs(factor * s - p) > 1e-6 * p or nx % factor or ny % factor:
        raise ConfigError(f"pixel_size_A={p} must be an integer multiple of sampling_A={s} "
                          f"that divides the grid {nx}×{ny}")
    lam = wavelength_A(exit_wave.energy_keV)
    k2, phi = _phase_grid((nx, ny), s)
    k_ap = optics["aperture_mrad"] * 1e-3 / lam
    inside = k2 <= k_ap**2
    k2_in, phi_in = k2[inside], phi[inside]
    c10 = -optics["defocus_nm"] * 10.0
    c12 = optics["astigmatism_nm"] * 10.0
    phi12 = math.radians(optics["astigmatism_angle_deg"])
    c30 = optics["cs_um"] * 1e4
    c50 = optics["c5_mm"] * 1e7
    chi0 = (math.pi * lam * k2_in * (c10 + c12 * np.cos(2.0 * (phi_in - phi12)))
            + 0.5 * math.pi * lam**3 * k2_in**2 * c30
            + math.pi / 3.0 * lam**5 * k2_in**3 * c50)
    c21 = optics.get("coma_nm", 0.0) * 10.0
    c23 = optics.get("three_fold_astigmatism_nm", 0.0) * 10.0
    if c21 or c23:
        phi21 = math.radians(optics.get("coma_angle_deg", 0.0))
        phi23 = math.radians(optics.get("three_fold_astigmatism_angle_deg", 0.0))
        # 2π/λ · α³/3 · (...), α = λk
        chi0 = chi0 + 2.0 * math.pi / 3.0 * lam**2 * k2_in**1.5 * (
            c21 * np.cos(phi_in - phi21) + c23 * np.cos(3.0 * (phi_in - phi23)))
    psi_in = exit_wave.fourier[inside]
    k_max = math.sqrt(float(k2_in.max())) if k2_in.size else 0.0
    spread_A = optics["focal_spread_nm"] * 10.0
    model = optics.get("focal_spread_model", "incoherent")
    if model == "envelope":
        # abTEM's TemporalEnvelope: exp(-(π/(2λ) Δ α²)²) with α = λk.
        psi_in = psi_in * np.exp(-(0.5 * math.pi * lam * spread_A * k2_in) ** 2).astype(np.float32)
        offsets, weights = np.zeros(1), np.ones(1)
    elif model == "incoherent":
        offsets, weights = defocus_samples(spread_A, k_max, exit_wave.energy_keV)
    else:
        raise ConfigError(f"focal_spread_model={model!r} must be 'incoherent' or 'envelope'")
    intensity = np.zeros((nx, ny), np.float64)
    buffer = np.zeros((nx, ny), np.complex64)
    with abtem.config.set(_abtem_settings()):
        for offset, weight in zip(offsets, weights):
            # defocus f0 + offset ↔ C10 - offset: chi changes by -π λ k² offset.
            chi = chi0 - math.pi * lam * offset * k2_in
            buffer[inside] = psi_in * np.exp(-1j * chi).astype(np.complex64)
            wave = ifft2(buffer)
            intensity += weight * (wave.real**2 + wave.imag**2)
    binned = intensity.reshape(nx // factor, factor, ny // factor, factor).mean(axis=(1, 3))
    return np.ascontiguousarray(binned.T, dtype=np.float32)


def label_mask(columns_px: np.ndarray, shape: tuple[int, int], pixel_size_A: float,
               label_radius_A: float, max_height: int) -> np.ndarray:
    """Label mask: each Ce column's height inside a disk around it, 0 elsewhere.

    Parameters
    ----------
    columns_px : (N, 3) array
        ``x_px, y_px, height`` per column (pixel grid: centre of pixel [0, 0] is (0, 0)).
    shape : (H, W)
        Shape of the mask.
    pixel_size_A : float
        Å per pixel.
    label_radius_A : float
        Disk radius, Å; a pixel is labelled if its centre is within the radius.
    max_height : int
        Largest allowed height, Ce atoms.

    Returns
    -------
    (H, W) uint8

    Raises
    ------
    ConfigError
        If a height exceeds ``max_height`` (or 255) or is not a positive integer.
    """
    columns_px = np.asarray(columns_px, float).reshape(-1, 3)
    heights = columns_px[:, 2]
    if len(heights):
        if np.any(heights > max_height) or max_height > 255:
            raise ConfigError(f"a column has {int(heights.max())} Ce atoms, above max_height="
                              f"{max_height}; raise max_height or lower diameter_range_A")
        if np.any(heights < 1) or np.any(heights != np.round(heights)):
            raise ConfigError("column heights must be positive whole numbers of Ce atoms")
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    r = label_radius_A / pixel_size_A
    reach = int(math.ceil(r)) + 1
    for x, y, height in columns_px:
        x0, x1 = max(int(math.floor(x)) - reach, 0), min(int(math.ceil(x)) + reach + 1, w)
        y0, y1 = max(int(math.floor(y)) - reach, 0), min(int(math.ceil(y)) + reach + 1, h)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disk = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
        mask[y0:y1, x0:x1][disk] = int(height)
    return mask


def place_in_cell(atoms: Atoms, cell_size_A: float, z_margin_A: float = Z_MARGIN_A) -> Atoms:
    """A copy of ``atoms`` centred in a square ``cell_size_A`` cell (x, y), z from the margin.

    The bounding box's centre goes to (L/2, L/2); z runs from ``z_margin_A`` to
    ``thickness + z_margin_A`` in a cell ``thickness + 2 z_margin_A`` tall. Periodic cell.
    """
    atoms = atoms.copy()
    pos = atoms.positions
    lo, hi = pos.min(0), pos.max(0)
    shift = np.array([cell_size_A / 2.0, cell_size_A / 2.0, z_margin_A])
    shift[:2] -= (lo[:2] + hi[:2]) / 2.0
    shift[2] -= lo[2]
    atoms.positions = pos + shift
    atoms.cell = [cell_size_A, cell_size_A, float(hi[2] - lo[2]) + 2.0 * z_margin_A]
    atoms.pbc = True
    return atoms


def _abtem_settings() -> dict:
    # FFTW_ESTIMATE: plans chosen by rule, not by timing, so every process computes the same
    # bits (FFTW_MEASURE may pick other plans, hence other rounding, in another process) and no
    # seconds are spent planning each new grid. Measured within 10 % of FFTW_MEASURE here.
    return {"dask.lazy": False, "fft": "fftw", "fftw.threads": 1,
            "fftw.planning_effort": "FFTW_ESTIMATE",
            "diagnostics.progress_bar": False, "device": "cpu", "precision": "float32"}


def image_sampling_A(pixel_size_A: float, sampling_A: float, energy_keV: float,
                     aperture_mrad: float) -> float:
    """Grid spacing on which images are formed before pixel integration, Å.

    The largest ``pixel_size_A / f`` (``f`` a whole number) that samples the intensity
    without aliasing (``≤ 1 / (4 k_ap)``, the intensity holding frequencies up to twice the
    aperture's ``k_ap``), but never finer than the multislice grid ``sampling_A``.
    """
    k_ap = aperture_mrad * 1e-3 / wavelength_A(energy_keV)
    f_max = int(round(pixel_size_A / sampling_A))
    f = max(1, int(math.ceil(4.0 * pixel_size_A * k_ap - 1e-9)))
    return pixel_size_A / min(f, f_max)


def exit_wave(atoms: Atoms, sampling_A: float, slice_thickness_A: float, energy_keV: float,
              image_sampling: float | None = None, gpts: int | None = None) -> ExitWave:
    """Multislice exit wave of a plane wave through ``atoms`` (abTEM, single-threaded).

    Parameters
    ----------
    atoms : ase.Atoms
        Atoms in their periodic cell (Å), true positions.
    sampling_A, slice_thickness_A : float
        Multislice lateral grid spacing and slice thickness, Å.
    energy_keV : float
        Beam energy, keV.
    image_sampling : float, optional
        Spacing of the grid the returned exit wave lives on, Å (default ``sampling_A``); a
        whole multiple of ``sampling_A``. The multislice runs at ``sampling_A`` and the wave is
        cut down in reciprocal space (exact for every frequency below that grid's Nyquist
        limit, i.e. all the objective aperture passes). The atoms are shifted by
        ``-image_sampling/2`` in x and y so that sample ``j`` of the returned grid sits at the
        true position ``(j + 1/2)·image_sampling``.
    gpts : int, optional
        Multislice grid points per side; if given, the multislice runs on exactly this grid
        (spacing ``cell / gpts``, which should be ``sampling_A``) instead of the grid abTEM
        derives from ``sampling_A`` (which rounds ``cell / sampling_A`` up and can gain a point
        from floating-point error).

    Returns
    -------
    ExitWave
    """
    import abtem
    import dask
    from abtem.core.fft import fft2

    image_sampling = sampling_A if image_sampling is None else float(image_sampling)
    shifted = atoms.copy()
    shifted.positions[:, :2] -= image_sampling / 2.0
    with abtem.config.set(_abtem_settings()), dask.config.set(scheduler="synchronous"):
        grid = {"sampling": sampling_A} if gpts is None else {"gpts": int(gpts)}
        potential = abtem.Potential(shifted, **grid,
                                    slice_thickness=slice_thickness_A,
                                    parametrization="lobato", projection="infinite")
        waves = abtem.PlaneWave(energy=energy_keV * 1e3).multislice(potential)
        if hasattr(waves, "compute"):
            waves = waves.compute(scheduler="synchronous")
        array = np.ascontiguousarray(waves.array, dtype=np.complex64)
        fourier = fft2(array)
    n_ms = np.array(fourier.shape)
    if gpts is not None:
        sampling_A = float(atoms.cell[0, 0]) / int(gpts)
    n_img = np.round(n_ms * sampling_A / image_sampling).astype(int)
    if np.any(np.abs(n_img * image_sampling - n_ms * sampling_A) > 1e-6 * n_ms * sampling_A):
        raise ConfigError(f"image grid {image_sampling} Å does not divide the cell "
                          f"{n_ms * sampling_A} Å; choose a pixel size that does")
    if np.any(n_img != n_ms):
        shifted_f = np.fft.fftshift(fourier)
        start = n_ms // 2 - n_img // 2
        cut = shifted_f[start[0]:start[0] + n_img[0], start[1]:start[1] + n_img[1]]
        fourier = np.ascontiguousarray(np.fft.ifftshift(cut)) * np.float32(
            n_img.prod() / n_ms.prod())
    return ExitWave(fourier.astype(np.complex64, copy=False), image_sampling, float(energy_keV))


def _fft_friendly(n: int) -> bool:
    # Even, and no prime factor above 5 (FFTW_ESTIMATE plans were ≈ 1.3× slower per point
    # with a factor 7, as in 1575, than at 1500 or 1620 points here).
    if n % 2:
        return False
    for prime in (2, 3, 5):
        while n % prime == 0:
            n //= prime
    return n == 1


def multislice_cell(atoms: Atoms, cell_size_A: float, pixel_size_A: float, sampling_A: float,
                    margin_A: float) -> tuple[tuple[int, int], int]:
    """The square sub-cell, in whole pixels, in which the multislice of ``atoms`` runs.

    The smallest side ``m`` (pixels) such that the sub-cell holds the atoms' lateral extent plus
    ``margin_A`` on each side and its multislice grid, ``m · pixel_size_A / sampling_A`` points,
    is even with no prime factor above 5 (fast FFTs); placed as centrally on the atoms as whole pixels
    allow. The whole cell if nothing smaller fits.

    Parameters
    ----------
    atoms : ase.Atoms
        The particle in the ``cell_size_A`` cell (e.g. from :func:`place_in_cell`), Å.
    cell_size_A, pixel_size_A, sampling_A : float
        Side of the whole cell, stored pixel size (a whole number of ``sampling_A``) and
        multislice grid spacing, Å.
    margin_A : float
        Vacuum between the atoms' centres and the sub-cell's edges, at least, Å.

    Returns
    -------
    offset_px : (int, int)
        Pixel of the whole cell at which the sub-cell starts, in x and y.
    side_px : int
        Side of the sub-cell, pixels (``side_px · pixel_size_A`` Å).
    """
    n = int(round(cell_size_A / pixel_size_A))
    ratio = int(round(pixel_size_A / sampling_A))
    pos = np.asarray(atoms.positions)[:, :2]
    lo, hi = pos.min(0) - margin_A, pos.max(0) + margin_A
    centre = (lo + hi) / 2.0
    m = max(1, int(math.ceil(float((hi - lo).max()) / pixel_size_A - 1e-9)))
    for side in range(m, n):
        if not _fft_friendly(side * ratio):
            continue
        offset = np.floor(centre / pixel_size_A - side / 2.0 + 0.5).astype(int)
        offset = np.clip(offset, 0, n - side)
        if np.all(offset * pixel_size_A <= lo + 1e-9) and np.all(
                (offset + side) * pixel_size_A >= hi - 1e-9):
            return (int(offset[0]), int(offset[1])), side
    return (0, 0), n


def embed_exit_wave(wave: ExitWave, offset: tuple[int, int], size: int) -> ExitWave:
    """Embed an exit wave in a larger periodic cell of vacuum, on the same grid.

    The larger cell's wave is the constant vacuum wave, taken as the mean of the smaller
    wave's outermost ring of samples (abTEM's plane wave is 1 in vacuum; the ring mean differs
    from 1 by the scattered tails that reach the edge, and keeps the wave continuous there),
    with the smaller wave put in at ``offset``. Applying the lens to the result lets the
    delocalised contrast spread over the larger cell instead of wrapping around the smaller.

    Parameters
    ----------
    wave : ExitWave
        Exit wave of the smaller cell, ``(ms, ms)`` samples.
    offset : (int, int)
        Sample of the larger grid at which the smaller one starts, in x and y (abTEM order).
    size : int
        Side of the larger grid, samples (``≥ offset + ms``).

    Returns
    -------
    ExitWave
        ``(size, size)``, the same sampling and energy.
    """
    import abtem
    from abtem.core.fft import fft2, ifft2

    nx, ny = wave.fourier.shape
    ox, oy = int(offset[0]), int(offset[1])
    if min(ox, oy) < 0 or ox + nx > size or oy + ny > size:
        raise ConfigError(f"an exit wave of {nx}×{ny} samples at {offset} does not fit a "
                          f"{size}×{size} grid; use a larger cell")
    with abtem.config.set(_abtem_settings()):
        small = np.asarray(ifft2(wave.fourier.copy()), dtype=np.complex64)
        ring = np.concatenate([small[0], small[-1], small[1:-1, 0], small[1:-1, -1]])
        big = np.full((size, size), np.complex64(ring.mean()), dtype=np.complex64)
        big[ox:ox + nx, oy:oy + ny] = small
        fourier = np.asarray(fft2(big), dtype=np.complex64)
    return ExitWave(fourier, wave.sampling_A, wave.energy_keV)


def particle_exit_wave(atoms: Atoms, config: SimulationConfig, image_sampling: float
                       ) -> tuple[ExitWave, dict]:
    """The exit wave of a particle in ``config``'s cell, on the image grid.

    With ``config.multislice_margin_A`` None, :func:`exit_wave` in the whole cell. Otherwise
    the multislice runs in the sub-cell of :func:`multislice_cell` (the atoms shifted into it)
    and the wave is embedded in the whole cell by :func:`embed_exit_wave`; the pixels of the
    whole cell, hence ``x_px = x_A / pixel_size_A - 0.5``, are unchanged, since the sub-cell
    starts on a whole pixel.

    Parameters
    ----------
    atoms : ase.Atoms
        The particle in the ``config.cell_size_A`` cell (:func:`place_in_cell`), Å.
    config : SimulationConfig
        Sampling, slice thickness, cell, pixel size, margin; ``optics.energy_keV``.
    image_sampling : float
        Grid of the returned wave, Å (:func:`image_sampling_A`).

    Returns
    -------
    wave : ExitWave
        ``(cell / image_sampling)²`` samples.
    metadata : dict
        ``{}`` without a margin; else ``multislice_margin_A``, ``multislice_cell_A`` (side of
        the sub-cell) and ``multislice_offset_A`` (its corner in the whole cell, x and y).
    """
    energy = config.optics.energy_keV
    if config.multislice_margin_A is None:
        return exit_wave(atoms, config.sampling_A, config.slice_thickness_A, energy,
                         image_sampling=image_sampling), {}
    p = config.pixel_size_A
    n = config.image_size_px
    (ox, oy), m = multislice_cell(atoms, config.cell_size_A, p, config.sampling_A,
                                  config.multislice_margin_A)
    sub = atoms.copy()
    sub.positions[:, 0] -= ox * p
    sub.positions[:, 1] -= oy * p
    sub.cell = [m * p, m * p, float(atoms.cell[2, 2])]
    ratio = int(round(p / config.sampling_A))
    wave = exit_wave(sub, config.sampling_A, config.slice_thickness_A, energy,
                     image_sampling=image_sampling, gpts=m * ratio)
    f = int(round(p / image_sampling))
    if m < n:
        wave = embed_exit_wave(wave, (ox * f, oy * f), n * f)
    return wave, {"multislice_margin_A": float(config.multislice_margin_A),
                  "multislice_cell_A": float(m * p),
                  "multislice_offset_A": [float(ox * p), float(oy * p)]}


def contrast_rms_difference(image: np.ndarray, reference: np.ndarray) -> float:
    """RMS difference of two noise-free images relative to the reference's contrast.

    ``sqrt(mean((image - reference)²) / mean((reference - 1)²))``: the images have vacuum = 1,
    so the denominator is the RMS contrast of the reference. 0 for identical images, 1 for a
    flat (vacuum) image; vacuum pixels add nothing to either sum, so the figure does not depend
    on how much vacuum the cell holds.

    Parameters
    ----------
    image, reference : (H, W) arrays
        Intensities, vacuum = 1, on the same grid.

    Returns
    -------
    float
        Relative RMS difference (a fraction, not %).

    Raises
    ------
    ConfigError
        If the shapes differ or the reference has no contrast.
    """
    image = np.asarray(image, np.float64)
    reference = np.asarray(reference, np.float64)
    if image.shape != reference.shape:
        raise ConfigError(f"images of shapes {image.shape} and {reference.shape} cannot be "
                          "compared; simulate both on the same cell and pixel size")
    contrast = float(np.mean((reference - 1.0) ** 2))
    if contrast <= 0.0:
        raise ConfigError("the reference image is flat (vacuum only); give one with atoms")
    return math.sqrt(float(np.mean((image - reference) ** 2)) / contrast)


def multislice_convergence(atoms: Atoms, settings: list[tuple[float, float]],
                           reference: tuple[float, float], optics_list: list[dict],
                           pixel_size_A: float) -> list[dict]:
    """How far images at several multislice settings are from a reference setting.

    Every setting's exit wave is cut to one common image grid (:func:`image_sampling_A` of the
    coarsest sampling and the largest aperture), imaged through each optics draw at
    ``pixel_size_A`` and compared with the reference's image by
    :func:`contrast_rms_difference`.

    Parameters
    ----------
    atoms : ase.Atoms
        The particle in its periodic cell (e.g. from :func:`place_in_cell`), Å.
    settings : list of (sampling_A, slice_thickness_A)
        Multislice grid spacing and slice thickness to test, Å.
    reference : (sampling_A, slice_thickness_A)
        The converged setting, Å.
    optics_list : list of dict
        Optics as from :func:`draw_optics` (one ``energy_keV`` for all).
    pixel_size_A : float
        Pixel size of the compared images, Å (a multiple of every sampling).

    Returns
    -------
    list of dict
        One per setting, in order: ``sampling_A``, ``slice_thickness_A``, ``rms_percent``
        (list, one per optics draw, % of the reference's RMS contrast), ``cpu_s`` (process CPU
        seconds of its multislice).
    """
    import time

    energies = {float(o["energy_keV"]) for o in optics_list}
    if len(energies) != 1:
        raise ConfigError(f"optics_list has energies {sorted(energies)} keV; use one")
    energy = energies.pop()
    coarsest = max(s for s, _ in [*settings, reference])
    grid = image_sampling_A(pixel_size_A, coarsest, energy,
                            max(o["aperture_mrad"] for o in optics_list))

    def images(sampling: float, dz: float) -> tuple[list[np.ndarray], float]:
        start = time.process_time()
        wave = exit_wave(atoms, sampling, dz, energy, image_sampling=grid)
        cpu = time.process_time() - start
        return [image_from_exit_wave(wave, o, pixel_size_A) for o in optics_list], cpu

    ref_images, ref_cpu = images(*reference)
    rows = []
    for sampling, dz in settings:
        if (sampling, dz) == tuple(reference):
            imgs, cpu = ref_images, ref_cpu
        else:
            imgs, cpu = images(sampling, dz)
        rows.append({
            "sampling_A": float(sampling), "slice_thickness_A": float(dz),
            "rms_percent": [100.0 * contrast_rms_difference(a, b)
                            for a, b in zip(imgs, ref_images)],
            "cpu_s": float(cpu)})
    return rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def simulate_particle(particle_id: int, seed: int, config: SimulationConfig | None = None
                      ) -> list[Example]:
    """Simulate one particle: one multislice, ``config.optics_per_exit_wave`` images.

    Deterministic in ``(seed, particle_id)``: the particle and the optics are drawn from
    ``np.random.SeedSequence([seed, particle_id])`` whatever process runs this. Runs
    single-threaded (eager abTEM, synchronous dask, one FFTW thread), so it can be a dask task.

    Parameters
    ----------
    particle_id : int
        Index of the particle in the dataset (≥ 0).
    seed : int
        Dataset seed (≥ 0).
    config : SimulationConfig, optional
        Defaults if None.

    Returns
    -------
    list of Example
        ``config.optics_per_exit_wave`` examples of the same particle.

    Raises
    ------
    ConfigError
        If the config is invalid, the particle does not fit the cell, or a column is taller
        than ``config.max_height``.
    """
    config = config or SimulationConfig()
    check_simulation_config(config)
    if particle_id < 0 or seed < 0:
        raise ConfigError(f"seed={seed} and particle_id={particle_id} must be ≥ 0")
    root = np.random.SeedSequence([int(seed), int(particle_id)])
    structure_seq, optics_seq = root.spawn(2)
    structure_seed = int(structure_seq.generate_state(1, dtype=np.uint64)[0])
    particle = build_particle(structure_seed, config.structure)
    atoms = place_in_cell(particle, config.cell_size_A)
    p = config.pixel_size_A
    table = column_table(atoms)
    columns = np.column_stack([table[:, 0] / p - 0.5, table[:, 1] / p - 0.5, table[:, 2]])
    n = config.image_size_px
    label = label_mask(columns, (n, n), p, config.label_radius_A, config.max_height)

    optics = config.optics
    grid = image_sampling_A(p, config.sampling_A, optics.energy_keV, optics.max_aperture_mrad)
    wave, cell_info = particle_exit_wave(atoms, config, grid)
    rng = np.random.default_rng(optics_seq)
    info = _jsonable(dict(particle.info))
    common = {
        "seed": int(seed),
        "particle_id": int(particle_id),
        "material": "CeO2",
        "zone_axis": "[110]",
        "particle": info,
        "diameter_A": info["diameter_A"],
        "tilt_deg": info["tilt_deg"],
        "tilt_azimuth_deg": info["tilt_azimuth_deg"],
        "rotation_deg": info["rotation_deg"],
        "n_columns": int(len(table)),
        "max_column_height": int(table[:, 2].max()) if len(table) else 0,
        "max_column_height_atoms": int(table[:, 2].max()) if len(table) else 0,
        "mean_column_height_atoms": float(table[:, 2].mean()) if len(table) else 0.0,
        "n_ce_atoms": int(table[:, 2].sum()),
        "thickness_A": float(atoms.cell[2, 2] - 2.0 * Z_MARGIN_A),
        "cell_size_A": float(config.cell_size_A),
        "cell_z_A": float(atoms.cell[2, 2]),
        "sampling_A": float(config.sampling_A),
        "image_sampling_A": float(grid),
        **cell_info,
        "slice_thickness_A": float(config.slice_thickness_A),
        "pixel_size_A": float(p),
        "potential": "abtem lobato, infinite projection",
        "optics_per_exit_wave": int(config.optics_per_exit_wave),
        "conventions": {
            "defocus": "abTEM sign, defocus = -C10 (positive = underfocus)",
            "focal_spread": "1/e half width; focal_spread_model 'incoherent': incoherent sum "
                            "over defocus, no envelope; 'envelope': abTEM's quasi-coherent "
                            "temporal envelope",
            "residual_aberrations": "coma = C21, three_fold_astigmatism = C23 (abTEM polar "
                                    "form, angles phi21, phi23)",
            "coordinates": "x_px = x_A / pixel_size_A - 0.5",
        },
        "versions": software_versions(),
    }
    examples = []
    for k in range(config.optics_per_exit_wave):
        optics = draw_optics(rng, config.optics)
        image = image_from_exit_wave(wave, optics, p)
        metadata = {**common, **optics, "optics_index": k,
                    "delocalisation_A": delocalisation_A(optics)}
        examples.append(Example(
            image=image,
            label=label.copy(),
            columns=columns.astype(np.float32),
            pixel_size_A=float(p),
            metadata=metadata,
            atoms=atoms.copy(),
        ))
    return examples


def image_of_atoms(atoms: Atoms, optics: dict, *, cell_size_A: float = 64.0,
                   pixel_size_A: float = 0.2, sampling_A: float = 0.1,
                   slice_thickness_A: float = 2.0) -> np.ndarray:
    """The noise-free HRTEM image (vacuum = 1) of any atoms, beam along z.

    For structures that are not the training particles (other materials and zone axes,
    :func:`ceriakeras.physics.structures.build_other_particle`): the same multislice and lens as
    :func:`simulate_particle`, without labels.

    Parameters
    ----------
    atoms : ase.Atoms
        Positions in Å, beam along z; centred in a square cell of ``cell_size_A`` here.
    optics : dict
        As :func:`draw_optics` returns (its ``energy_keV`` is used for the multislice).
    cell_size_A, pixel_size_A, sampling_A, slice_thickness_A : float
        Cell side, image pixel, multislice sampling and slice thickness, Å.

    Returns
    -------
    (H, W) float32, H = W = cell_size_A / pixel_size_A
    """
    placed = place_in_cell(atoms, cell_size_A)
    grid = image_sampling_A(pixel_size_A, sampling_A, optics["energy_keV"],
                            optics["aperture_mrad"])
    wave = exit_wave(placed, sampling_A, slice_thickness_A, optics["energy_keV"],
                     image_sampling=grid)
    return image_from_exit_wave(wave, optics, pixel_size_A)
