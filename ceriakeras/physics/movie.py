"""Movies of a drifting particle whose surface columns change: states → frames (NumPy, abTEM).

A movie holds a few *states* of one particle. Between two states some surface columns change by
one Ce atom: the top Ce atom of a column leaves (with the O atoms it alone held), or a Ce adatom
lands on top of a column. Each state is simulated once (:func:`ceriakeras.physics.simulate.
particle_exit_wave` and one set of optics for the whole movie); every frame is that state's
noise-free image shifted by the frame's drift (an exact Fourier shift) and drawn again with
fresh Poisson noise at the movie's dose. The truth is the layout of ``../shared/crossmovie``
(``movies.csv``, ``truth.csv``, ``events.csv``), so the same ``score.py`` scores both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms

from ..config import CE_COLUMN_SPACING_A, ConfigError, SimulationConfig
from .multislice import Z_MARGIN_A
from .simulate import (
    draw_optics,
    image_from_exit_wave,
    image_sampling_A,
    particle_exit_wave,
    place_in_cell,
)
from .structures import build_particle, column_table

COLUMN_TOLERANCE_A = 1.0
"""Projected distance, Å, within which two Ce atoms share a column (as :func:`column_table`)."""
O_BOND_A = 2.6
"""An O atom within this distance, Å, of a leaving Ce atom and of no other Ce atom leaves too."""


def column_of_atoms(atoms: Atoms, table: np.ndarray) -> np.ndarray:
    """Index into ``table`` (:func:`column_table`) of each Ce atom's column; -1 for O atoms."""
    ce = np.asarray(atoms.get_chemical_symbols()) == "Ce"
    index = np.full(len(atoms), -1, np.int64)
    if len(table):
        d = np.hypot(atoms.positions[:, None, 0] - table[None, :, 0],
                     atoms.positions[:, None, 1] - table[None, :, 1])
        index[ce] = d[ce].argmin(axis=1)
    return index


def surface_columns(table: np.ndarray, neighbour_A: float = 4.5) -> np.ndarray:
    """Indices of the columns on the particle's projected outline (fewest projected neighbours)."""
    d = np.hypot(table[:, None, 0] - table[None, :, 0], table[:, None, 1] - table[None, :, 1])
    neighbours = (d < neighbour_A).sum(axis=1) - 1
    return np.flatnonzero(neighbours <= np.percentile(neighbours, 40))


def change_column(atoms: Atoms, xy_A: tuple[float, float], sign: int) -> Atoms:
    """The particle with one Ce atom fewer (``sign`` −1) or more (+1) in the column at ``xy_A``.

    −1 removes the column's top Ce atom (largest z) and the O atoms bonded to it alone
    (:data:`O_BOND_A`); +1 puts a Ce adatom one Ce spacing (:data:`CE_COLUMN_SPACING_A`) above
    the column's top atom, and the cell grows in z to keep :data:`Z_MARGIN_A` above it (abTEM's
    periodic potential would otherwise wrap an adatom above the cell to the particle's bottom).
    """
    out = atoms.copy()
    symbols = np.asarray(out.get_chemical_symbols())
    ce = symbols == "Ce"
    near = ce & (np.hypot(out.positions[:, 0] - xy_A[0], out.positions[:, 1] - xy_A[1])
                 < COLUMN_TOLERANCE_A)
    if not near.any():
        raise ConfigError(f"no Ce column at {xy_A} Å: pick a column of the particle")
    top = np.flatnonzero(near)[np.argmax(out.positions[near, 2])]
    if sign > 0:
        position = out.positions[top] + [0.0, 0.0, CE_COLUMN_SPACING_A]
        out += Atoms("Ce", positions=[position])
        cell = out.cell.array.copy()
        cell[2, 2] = max(cell[2, 2], position[2] + Z_MARGIN_A)
        out.cell = cell
        return out
    o = np.flatnonzero(symbols == "O")
    d_top = np.linalg.norm(out.positions[o] - out.positions[top], axis=1)
    others = np.flatnonzero(ce)
    others = others[others != top]
    d_other = np.linalg.norm(out.positions[o, None] - out.positions[None, others], axis=2)
    alone = o[(d_top < O_BOND_A) & ~(d_other < O_BOND_A).any(axis=1)]
    del out[sorted([int(top), *alone.tolist()])]
    return out


def plan_states(rng: np.random.Generator, atoms: Atoms, n_states: int, changes_per_step: int
                ) -> tuple[list[Atoms], list[list[tuple[int, int]]]]:
    """The states of a movie: ``atoms`` then ``n_states − 1`` steps of surface changes.

    Returns the states and, per step, ``(column index in the first state's table, sign)`` of
    each change. A column changes at most once; a column leaves only if it keeps ≥ 1 atom.
    """
    table = column_table(atoms)
    candidates = list(rng.permutation(surface_columns(table)))
    states, steps = [atoms], []
    heights = table[:, 2].copy()
    for _ in range(n_states - 1):
        step, current = [], states[-1]
        while len(step) < changes_per_step and candidates:
            j = int(candidates.pop())
            sign = int(rng.choice([-1, 1])) if heights[j] >= 2 else 1
            current = change_column(current, (table[j, 0], table[j, 1]), sign)
            heights[j] += sign
            step.append((j, sign))
        states.append(current)
        steps.append(step)
    return states, steps


def drift_path(rng: np.random.Generator, n_frames: int, max_drift_A: float) -> np.ndarray:
    """(n_frames, 2) drift, Å, from 0 at frame 0: a smooth random curve reaching ``max_drift_A``."""
    t = np.linspace(0.0, 1.0, n_frames)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    bend = rng.normal(size=2) * 0.3
    path = t[:, None] * direction[None, :] + (t * (1 - t))[:, None] * bend[None, :]
    scale = np.max(np.linalg.norm(path, axis=1))
    return path * (max_drift_A / scale if scale > 0 else 0.0)


def fourier_shift(image: np.ndarray, shift_px: tuple[float, float]) -> np.ndarray:
    """``image`` moved by ``(dx, dy)`` px (periodic, exact for a band-limited image)."""
    from scipy.ndimage import fourier_shift as shift_spectrum

    spectrum = shift_spectrum(np.fft.fft2(image), (shift_px[1], shift_px[0]))
    return np.fft.ifft2(spectrum).real.astype(np.float32)


@dataclass
class MovieFaults:
    """What a microscope adds to a movie that our default movies lack (all off by default): for
    robustness studies (docs/tracks.md). Drawn from a random stream of their own, so that a
    movie with faults has the particle, states, drift, optics and shot noise of the same seed's
    movie without."""

    dose_fall: float = 0.0
    """Relative fall of the dose from the first frame to the last (a cold FEG's decay)."""
    dose_flicker: float = 0.0
    """Relative standard deviation of each frame's dose (the beam current's flicker)."""
    state_scale: float = 0.0
    """Relative standard deviation of each state's image scale (images normalised each on its
    own, or a beam that jumps when the particle changes)."""
    focus_drift_nm: float = 0.0
    """Change of defocus, nm, from the first frame to the last (linear, centred on the drawn
    defocus)."""
    drift_jump_A: float = 0.0
    """A sudden step of the drift, Å (at 45° to the axes), on top of its smooth path."""
    drift_jump_frame: int = 0
    """The first frame after the step (0: the middle of the movie)."""
    psf_px: float = 0.0
    """Detector: the standard deviation, pixels, of a Gaussian spread of each electron."""
    gain: float = 1.0
    """Detector: counts per electron."""
    read_noise: float = 0.0
    """Detector: Gaussian read noise, counts."""

    def dose_factors(self, rng: np.random.Generator, n_frames: int) -> np.ndarray:
        """(n_frames,) each frame's dose relative to the movie's nominal one."""
        t = np.arange(n_frames) / max(n_frames - 1, 1)
        return (1 - self.dose_fall * t) * (1 + self.dose_flicker * rng.standard_normal(n_frames))

    def detect(self, electrons: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Counts a detector records of a frame's ``electrons`` per pixel (uint16)."""
        out = np.asarray(electrons, np.float64)
        if self.psf_px > 0:
            from scipy.ndimage import gaussian_filter

            out = gaussian_filter(out, self.psf_px, mode="wrap")
        if self.gain != 1.0 or self.read_noise > 0:
            out = out * self.gain + rng.normal(0.0, self.read_noise, out.shape)
        return np.clip(np.rint(out), 0, 65535)


def _truth(states: list, steps: list, change_frames, state_of: np.ndarray, drift: np.ndarray,
           p: float) -> tuple[list, list]:
    """Every Ce column of every frame (``frame, column, x_px, y_px, height``; a column's id is
    its nearest column of the first state) and every change (``column, frame, x_px, y_px,
    height_before, height_after``), in the drifted frames' pixels (pixel i's centre at i;
    ``drift`` Å, ``p`` the pixel size, Å)."""
    base = column_table(states[0])
    tables = [column_table(s) for s in states]
    truth, events = [], []
    for f in range(len(state_of)):
        table = tables[state_of[f]]
        ids = np.hypot(table[:, None, 0] - base[None, :, 0],
                       table[:, None, 1] - base[None, :, 1]).argmin(axis=1)
        for (x, y, h), c in zip(table, ids):
            truth.append((f, int(c), x / p - 0.5 + drift[f, 0] / p, y / p - 0.5 + drift[f, 1] / p,
                          int(h)))
    for step, f in zip(steps, change_frames):
        before, after = tables[state_of[f - 1]], tables[state_of[f]]
        for j, _ in step:
            hb = int(before[np.hypot(*(before[:, :2] - base[j, :2]).T).argmin(), 2])
            ha = int(after[np.hypot(*(after[:, :2] - base[j, :2]).T).argmin(), 2])
            events.append((j, f, base[j, 0] / p - 0.5 + drift[f, 0] / p,
                           base[j, 1] / p - 0.5 + drift[f, 1] / p, hb, ha))
    return truth, events


def simulate_movie(seed: int, config: SimulationConfig, *, doses: tuple[float, ...],
                   n_frames: int, change_frames: tuple[int, ...], changes_per_step: int,
                   max_drift_A: float, faults: MovieFaults | None = None) -> dict:
    """Simulate one particle's movie at each dose in ``doses`` (same states, drift, optics).

    Parameters
    ----------
    seed : int
        Drives the particle, the changes, the optics, the drift and the noise.
    config : SimulationConfig
        Cell, pixel size, multislice settings, particle and optics ranges.
    doses : tuple of float
        e⁻/Å² per frame, one movie per dose.
    n_frames : int
        Frames per movie.
    change_frames : tuple of int
        First frame of each new state (increasing, within the movie).
    changes_per_step : int
        Columns that change by one Ce atom at each change frame.
    max_drift_A : float
        Largest drift from frame 0, Å.
    faults : MovieFaults, optional
        What a microscope adds (none by default).

    Returns
    -------
    dict
        ``movies`` ({dose: (n_frames, H, W) uint16 counts}), ``truth`` (rows ``frame, column,
        x_px, y_px, height``), ``events`` (rows ``column, frame, x_px, y_px, height_before,
        height_after``), ``optics``, ``drift_A`` (n_frames, 2) and ``diameter_A``.
    """
    if list(change_frames) != sorted(change_frames) or not all(0 < f < n_frames
                                                                for f in change_frames):
        raise ConfigError(f"change_frames={change_frames} must increase inside 1…{n_frames - 1}")
    rng = np.random.default_rng(seed)
    particle = build_particle(int(rng.integers(2**31)), config.structure)
    atoms = place_in_cell(particle, config.cell_size_A)
    states, steps = plan_states(rng, atoms, len(change_frames) + 1, changes_per_step)
    optics = draw_optics(rng, config.optics)
    p = config.pixel_size_A
    grid = image_sampling_A(p, config.sampling_A, config.optics.energy_keV,
                            config.optics.max_aperture_mrad)
    faults = faults or MovieFaults()
    fault_rng = np.random.default_rng([seed, 7])
    waves = [particle_exit_wave(s, config, grid)[0] for s in states]
    images = [image_from_exit_wave(w, optics, p) for w in waves]
    scales = 1 + faults.state_scale * fault_rng.standard_normal(len(states))
    drift = drift_path(rng, n_frames, max_drift_A)
    if faults.drift_jump_A:
        drift[faults.drift_jump_frame or n_frames // 2:] += faults.drift_jump_A / np.sqrt(2)
    state_of = np.searchsorted(np.asarray(change_frames), np.arange(n_frames), side="right")
    truth, events = _truth(states, steps, change_frames, state_of, drift, p)
    level = faults.dose_factors(fault_rng, n_frames)

    def clean(f: int) -> np.ndarray:  # frame f's noise-free image, before its drift
        image = images[state_of[f]]
        if faults.focus_drift_nm:
            image = image_from_exit_wave(waves[state_of[f]], {**optics, "defocus_nm": optics[
                "defocus_nm"] + faults.focus_drift_nm * (f / max(n_frames - 1, 1) - 0.5)}, p)
        return image if scales[state_of[f]] == 1 else image * scales[state_of[f]]

    movies = {}
    for dose in doses:
        frames = np.empty((n_frames, *images[0].shape), np.uint16)
        for f in range(n_frames):
            lam = np.clip(fourier_shift(clean(f), tuple(drift[f] / p)), 0, None) * dose * p * p
            if level[f] != 1:
                lam = lam * level[f]
            frames[f] = faults.detect(rng.poisson(lam), fault_rng)
        movies[float(dose)] = frames
    return {"movies": movies, "truth": truth, "events": events, "optics": optics,
            "drift_A": drift, "diameter_A": float(particle.info.get("diameter_A", np.nan))}
