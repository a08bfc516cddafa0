"""The multislice exit wave of a particle (abTEM 1.0): the particle placed in its cell, the
multislice run in a sub-cell around it, the wave put back in the full cell.

Conventions are those of :mod:`ceriakeras.physics.simulate`.
"""

from __future__ import annotations

import math

import numpy as np
from ase import Atoms

from ..config import ConfigError, SimulationConfig
from .optics import ExitWave, abtem_settings


Z_MARGIN_A = 1.0
"""Vacuum above and below the particle along the beam inside the multislice cell, Å."""


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
    with abtem.config.set(abtem_settings()), dask.config.set(scheduler="synchronous"):
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
    with abtem.config.set(abtem_settings()):
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
