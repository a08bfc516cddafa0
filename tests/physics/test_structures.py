"""Structure invariants of CeO2 nanoparticles and their Ce column table."""

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ceriakeras.config import CE_COLUMN_SPACING_A, MIN_COLUMN_SEPARATION_A, ConfigError, StructureConfig
from ceriakeras.physics.structures import build_particle, column_table

SEEDS = range(6)


@pytest.fixture(scope="module")
def particles():
    config = StructureConfig(diameter_range_A=(15.0, 35.0))
    return [build_particle(seed, config) for seed in SEEDS]


def _ce(atoms):
    return atoms.positions[np.asarray(atoms.get_chemical_symbols()) == "Ce"]


def _o(atoms):
    return atoms.positions[np.asarray(atoms.get_chemical_symbols()) == "O"]


def test_near_ceo2_stoichiometry(particles):
    for atoms in particles:
        n_ce, n_o = len(_ce(atoms)), len(_o(atoms))
        assert (n_ce, n_o) == (atoms.info["n_ce"], atoms.info["n_o"])
        assert 1.75 <= n_o / n_ce <= 2.25, (n_ce, n_o)


def test_no_dangling_oxygen(particles):
    ce_o = 5.411 * math.sqrt(3) / 4
    for atoms in particles:
        counts = cKDTree(_ce(atoms)).query_ball_point(_o(atoms), ce_o + 0.1, return_length=True)
        assert counts.min() >= 2


def test_size_in_range_and_centred(particles):
    for atoms in particles:
        assert 0.8 * 15.0 <= atoms.info["diameter_A"] <= 35.0
        lo, hi = atoms.positions.min(0), atoms.positions.max(0)
        np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-9)


def test_heights_equal_ce_atoms_counted_per_column(particles):
    for atoms in particles:
        table = column_table(atoms)
        ce = _ce(atoms)
        tree = cKDTree(ce[:, :2])
        counted = tree.query_ball_point(table[:, :2], 1.0, return_length=True)
        np.testing.assert_array_equal(counted, table[:, 2])
        assert table[:, 2].sum() == len(ce)


def test_columns_are_110_columns(particles):
    for atoms in particles:
        table = column_table(atoms)
        xy = table[:, :2]
        d, _ = cKDTree(xy).query(xy, k=2)
        assert d[:, 1].min() >= MIN_COLUMN_SEPARATION_A - 0.1
        # Inside a column, Ce atoms are a whole number of a/√2 apart along z.
        ce = _ce(atoms)
        tallest = table[np.argmax(table[:, 2])]
        members = ce[np.hypot(*(ce[:, :2] - tallest[:2]).T) < 1.0]
        gaps = np.diff(np.sort(members[:, 2])) / CE_COLUMN_SPACING_A
        np.testing.assert_allclose(gaps, np.round(gaps), atol=0.01)


def test_rotation_keeps_column_count(particles):
    for atoms in particles[:3]:
        table = column_table(atoms)
        for angle in (17.0, 90.0, 233.0):
            turned = atoms.copy()
            turned.rotate(angle, "z", center=(0, 0, 0))
            rotated = column_table(turned)
            assert len(rotated) == len(table)
            np.testing.assert_array_equal(np.sort(rotated[:, 2]), np.sort(table[:, 2]))


def test_tilt_at_most_half_a_degree(particles):
    for atoms in particles:
        assert 0.0 <= atoms.info["tilt_deg"] <= 0.5
        beam = np.asarray(atoms.info["zone_axis_lab"])
        assert math.degrees(math.acos(beam[2])) == pytest.approx(atoms.info["tilt_deg"], abs=1e-6)
        # Measured from the atoms: direction of the tallest column.
        table = column_table(atoms)
        ce = _ce(atoms)
        tallest = table[np.argmax(table[:, 2])]
        members = ce[np.hypot(*(ce[:, :2] - tallest[:2]).T) < 1.0]
        centred = members - members.mean(0)
        axis = np.linalg.svd(centred)[2][0]
        angle = math.degrees(math.acos(abs(axis[2])))
        assert angle <= 0.5 + 1e-6
        assert angle == pytest.approx(atoms.info["tilt_deg"], abs=1e-3)


def test_in_plane_rotation_varies(particles):
    angles = [atoms.info["rotation_deg"] for atoms in particles]
    assert np.ptp(angles) > 30.0


def test_same_seed_same_particle_other_seed_differs():
    config = StructureConfig(diameter_range_A=(15.0, 25.0))
    a, b = build_particle(7, config), build_particle(7, config)
    c = build_particle(8, config)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.get_chemical_symbols() == b.get_chemical_symbols()
    assert a.info == b.info
    assert len(a) != len(c) or not np.array_equal(a.positions, c.positions)


def test_heights_never_exceed_max_height():
    config = StructureConfig(diameter_range_A=(30.0, 45.0), max_height=7)
    for seed in range(4):
        atoms = build_particle(seed, config)
        assert column_table(atoms)[:, 2].max() <= 7


def test_impossible_max_height_raises():
    config = StructureConfig(diameter_range_A=(20.0, 25.0), max_height=1)
    with pytest.raises(ConfigError, match="max_height"):
        build_particle(0, config)


def test_defects_and_facets_recorded(particles):
    totals = {}
    for atoms in particles:
        info = atoms.info
        assert set(info["facet_distances_A"]) == {"111", "100", "110"}
        assert len(info["facet_distances_A"]["111"]) == 8
        assert len(info["facet_distances_A"]["100"]) == 6
        assert len(info["facet_distances_A"]["110"]) == 12
        for key, value in info["defects"].items():
            totals[key] = totals.get(key, 0) + value
    for key in ("surface_ce_removed", "ce_adatoms", "o_vacancies", "dangling_o_dropped"):
        assert totals[key] > 0, key


def test_column_table_groups_a_known_column():
    from ase import Atoms

    z = np.arange(5) * CE_COLUMN_SPACING_A
    positions = [(0.0, 0.0, zi) for zi in z] + [(3.83, 0.1, zi) for zi in z[:3]] + [(0, 0, 1.0)]
    atoms = Atoms(["Ce"] * 8 + ["O"], positions=positions)
    table = column_table(atoms)
    np.testing.assert_allclose(table, [[0.0, 0.0, 5.0], [3.83, 0.1, 3.0]])


def test_v3_size_range_reaches_14_atom_columns():
    """The version-3 data's size range holds 14-atom columns (seed 340: a particle 5 nm across,
    the thickest height the data must contain), and never more than max_height."""
    from pathlib import Path

    from ceriakeras.config import SimulationConfig, load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "ceria110_v3_data.toml"
    config = load_config(SimulationConfig, path).structure
    atoms = build_particle(340, config)
    heights = column_table(atoms)[:, 2]
    assert heights.max() == 14 == config.max_height
    assert atoms.info["diameter_A"] <= config.diameter_range_A[1]
    assert heights.min() >= 1
