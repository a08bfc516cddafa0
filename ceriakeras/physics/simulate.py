"""abTEM HRTEM images of one particle: multislice exit wave → images at drawn optics; label masks.

The lens (drawn optics, images from an exit wave) is :mod:`ceriakeras.physics.optics`, the
multislice :mod:`ceriakeras.physics.multislice`; this module puts them together per particle
(:func:`simulate_particle`, :func:`image_of_atoms`) and keeps their names importable from here.

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

from ceriakeras.config import ConfigError, SimulationConfig
from ceriakeras.physics.multislice import (Z_MARGIN_A, embed_exit_wave, exit_wave,  # noqa: F401
                                           multislice_cell, particle_exit_wave, place_in_cell)
from ceriakeras.physics.optics import (ExitWave, defocus_samples, delocalisation_A,  # noqa: F401
                                       draw_optics, envelope_delocalisation_A,
                                       image_from_exit_wave, image_sampling_A, wavelength_A)
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


def software_versions() -> dict:
    """Versions of the software that made an image (JSON-able)."""
    import abtem
    import ase

    import ceriakeras

    return {"abtem": abtem.__version__, "ase": ase.__version__, "numpy": np.__version__,
            "ceriakeras": ceriakeras.__version__}


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
    common = _particle_metadata(seed, particle_id, particle, atoms, table, config, grid,
                                cell_info)
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


def _particle_metadata(seed: int, particle_id: int, particle: Atoms, atoms: Atoms,
                       table: np.ndarray, config: SimulationConfig, grid: float,
                       cell_info: dict) -> dict:
    """The metadata every image of one particle shares: the particle, its columns, the cell,
    the sampling, the conventions and the software versions."""
    p = config.pixel_size_A
    info = _jsonable(dict(particle.info))
    return {
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
