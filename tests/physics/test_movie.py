"""The movie simulator's pieces (no multislice: fast)."""

from __future__ import annotations

import numpy as np

from ceriakeras.config import StructureConfig
from ceriakeras.physics.movie import (
    Z_MARGIN_A,
    MovieFaults,
    change_column,
    drift_path,
    fourier_shift,
    plan_states,
)
from ceriakeras.physics.multislice import place_in_cell
from ceriakeras.physics.structures import build_particle, column_table


def test_fourier_shift_moves_a_blob_by_subpixel_amounts():
    yy, xx = np.mgrid[0:64, 0:64]
    blob = np.exp(-((xx - 30.0) ** 2 + (yy - 20.0) ** 2) / 8.0)
    moved = fourier_shift(blob, (2.3, -1.6))
    total = moved.sum()
    assert abs((moved * xx).sum() / total - 32.3) < 1e-3
    assert abs((moved * yy).sum() / total - 18.4) < 1e-3


def test_drift_path_starts_at_rest_and_reaches_its_largest_drift():
    path = drift_path(np.random.default_rng(0), 48, 2.5)
    assert np.allclose(path[0], 0) and np.isclose(np.linalg.norm(path, axis=1).max(), 2.5)
    assert np.abs(np.diff(path, axis=0)).max() < 0.3  # smooth: < 0.3 Å per frame


def test_a_change_moves_one_ce_atom_on_the_chosen_column():
    atoms = build_particle(3, StructureConfig(diameter_range_A=(15.0, 18.0)))
    table = column_table(atoms)
    j = int(np.argmax(table[:, 2]))
    for sign in (-1, 1):
        changed = change_column(atoms, tuple(table[j, :2]), sign)
        after = column_table(changed)
        k = np.hypot(*(after[:, :2] - table[j, :2]).T).argmin()
        assert after[k, 2] == table[j, 2] + sign
        assert after[:, 2].sum() == table[:, 2].sum() + sign


def test_an_adatom_on_the_tallest_column_stays_inside_the_cell():
    """abTEM's periodic potential would wrap an adatom above the cell to the particle's bottom."""
    atoms = place_in_cell(build_particle(3, StructureConfig(diameter_range_A=(15.0, 18.0))), 40.0)
    ce = np.flatnonzero(np.asarray(atoms.get_chemical_symbols()) == "Ce")
    top = int(ce[np.argmax(atoms.positions[ce, 2])])
    landed = change_column(atoms, tuple(atoms.positions[top, :2]), 1)
    assert landed.positions[:, 2].max() + Z_MARGIN_A <= landed.cell[2, 2] + 1e-9
    assert landed.cell[2, 2] > atoms.cell[2, 2] - 1e-9
    left = change_column(atoms, tuple(atoms.positions[top, :2]), -1)
    assert left.cell[2, 2] == atoms.cell[2, 2]


def test_plan_states_changes_distinct_surface_columns():
    atoms = build_particle(4, StructureConfig(diameter_range_A=(15.0, 18.0)))
    states, steps = plan_states(np.random.default_rng(1), atoms, 3, 2)
    assert len(states) == 3 and [len(s) for s in steps] == [2, 2]
    columns = [j for step in steps for j, _ in step]
    assert len(set(columns)) == 4
    totals = [column_table(s)[:, 2].sum() for s in states]
    assert totals[1] - totals[0] == sum(sign for _, sign in steps[0])


def test_movie_faults_are_off_by_default():
    faults = MovieFaults()
    rng = np.random.default_rng(0)
    assert np.array_equal(faults.dose_factors(rng, 48), np.ones(48))
    electrons = rng.poisson(3.0, (32, 32))
    assert np.array_equal(faults.detect(electrons, rng), electrons)  # counts as they came


def test_movie_faults_fade_flicker_and_detect():
    rng = np.random.default_rng(1)
    level = MovieFaults(dose_fall=0.1).dose_factors(rng, 11)
    assert level[0] == 1.0 and abs(level[-1] - 0.9) < 1e-12 and np.all(np.diff(level) < 0)
    flicker = MovieFaults(dose_flicker=0.03).dose_factors(rng, 4000)
    assert abs(flicker.std() - 0.03) < 0.003 and abs(flicker.mean() - 1) < 0.003
    electrons = rng.poisson(50.0, (64, 64)).astype(np.float64)
    counts = MovieFaults(psf_px=0.6, gain=2.0, read_noise=2.0).detect(electrons, rng)
    assert abs(counts.mean() / electrons.mean() - 2.0) < 0.01  # gain, nothing lost
    assert counts.var() < 4 * electrons.var()  # the spread takes noise out
    assert counts.dtype == np.float64 and counts.min() >= 0 and counts.max() <= 65535
