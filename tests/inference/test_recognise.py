"""Frames the model does not know: the lattice check (ceriakeras.inference.recognise) and `analyze`'s mark.

The first tests check the lattice check on ideal projected lattices. The last runs `analyze`
with the shipped model on simulated CeO2 [110] (recognised) and on what it was not trained
for: Pt [110], CeO2 [100], vacuum, and the real MoS2 STEM file of ../shared/realdata.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ceriakeras.config import CEO2_LATTICE_A
from ceriakeras.inference.recognise import lattice_columns, recognise_frame

ROOT = Path(__file__).resolve().parents[2]
MOS2 = next((p / "shared" / "realdata" / "example_Se_implanted_MoS2.dm3" for p in ROOT.parents
             if (p / "shared" / "realdata").is_dir()), None)


def projected_lattice(a1, a2, radius_A=12.0, angle_deg=0.0, jitter_A=0.0, seed=0):
    """(N, 2) Å: lattice points i·a1 + j·a2 inside a disk, rotated, with Gaussian jitter."""
    i, j = np.mgrid[-12:13, -12:13]
    pts = i.ravel()[:, None] * np.asarray(a1) + j.ravel()[:, None] * np.asarray(a2)
    pts = pts[np.hypot(*pts.T) <= radius_A]
    t = np.deg2rad(angle_deg)
    pts = pts @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    return pts + np.random.default_rng(seed).normal(0, jitter_A, pts.shape)


def fcc_110(a):
    """Projected column lattice of an fcc crystal along [110]: centred rectangle a/√2 × a."""
    return (a / np.sqrt(2), 0.0), (a / np.sqrt(8), a / 2)


@pytest.mark.parametrize("angle", [0.0, 37.0, 101.0])
def test_ceo2_110_columns_fit_at_any_rotation(angle):
    pts = projected_lattice(*fcc_110(CEO2_LATTICE_A), angle_deg=angle, jitter_A=0.12, seed=1)
    assert lattice_columns(*pts.T).mean() > 0.9
    assert recognise_frame(*pts.T, 500.0)["recognised"]


@pytest.mark.parametrize("name, a1, a2", [
    ("Pt [110]", *fcc_110(3.924)),
    ("Au [110]", *fcc_110(4.078)),
    ("CeO2 [100]", (CEO2_LATTICE_A / 2, 0.0), (0.0, CEO2_LATTICE_A / 2)),
    ("MoS2 hexagonal", (3.16, 0.0), (1.58, 3.16 * np.sqrt(3) / 2)),
    ("rectangle 3.92 × 5.55 (half of Pt [110])", (2 * 2.775, 0.0), (0.0, 3.924)),
])
def test_other_lattices_do_not_fit(name, a1, a2):
    pts = projected_lattice(a1, a2, angle_deg=23.0, jitter_A=0.05)
    assert lattice_columns(*pts.T).mean() < 0.2, name
    mark = recognise_frame(*pts.T, 500.0)
    assert not mark["recognised"] and "lattice" in mark["reason"]


def test_vacuum_few_columns_and_dose_outside_the_envelope():
    empty = recognise_frame([], [], 500.0)
    assert not empty["recognised"] and "0 columns" in empty["reason"]
    assert np.isnan(empty["lattice_fraction"])
    pts = projected_lattice(*fcc_110(CEO2_LATTICE_A))
    assert not recognise_frame(*pts[:5].T)["recognised"]
    low = recognise_frame(*pts.T, 5.0)
    assert not low["recognised"] and "dose" in low["reason"]
    assert recognise_frame(*pts.T, None)["recognised"]


@pytest.mark.slow
def test_shipped_model_marks_what_it_does_not_know(tmp_path):
    """`analyze` with the shipped model: CeO2 [110] at ≥ 200 e-/Å² recognised; Pt [110],
    CeO2 [100], vacuum and a real MoS2 STEM image not, their columns marked 0."""
    from ceriakeras.analysis.run import analyze
    from ceriakeras.config import AnalyzeConfig, OpticsConfig, SimulationConfig, StructureConfig
    from ceriakeras.physics.simulate import draw_optics, image_of_atoms, simulate_particle
    from ceriakeras.physics.structures import build_other_particle

    pixel_A, cell_A = 0.2, 48.0
    config = SimulationConfig.legacy(structure=StructureConfig(diameter_range_A=(22.0, 30.0)),
                                     cell_size_A=cell_A, pixel_size_A=pixel_A, optics_per_exit_wave=2)
    known = [ex.image for ex in simulate_particle(0, 5151, config)]
    rng = np.random.default_rng(5)
    others = [image_of_atoms(build_other_particle(m, axis, 26.0, rotation_deg=17.0),
                             draw_optics(rng, OpticsConfig()), cell_size_A=cell_A,
                             pixel_size_A=pixel_A)
              for m, axis in (("Pt", (1, 1, 0)), ("CeO2", (1, 0, 0)))]
    vacuum = np.ones_like(known[0])
    doses = [200.0, 1000.0, 1000.0, 1000.0, 1000.0]
    scenes = known + others + [vacuum]
    counts = np.stack([rng.poisson(im * d * pixel_A**2) for im, d in zip(scenes, doses)])
    np.save(tmp_path / "frames.npy", counts.astype(np.float32))
    summary = analyze([tmp_path / "frames.npy"], tmp_path / "out", pixel_size_A=pixel_A,
                      progress=False, config=AnalyzeConfig(overlay_every=100),
                      counts_per_electron=1.0)
    with open(tmp_path / "out" / "frames.csv", newline="") as fh:
        frames = list(csv.DictReader(fh))
    assert [int(r["recognised"]) for r in frames] == [1, 1, 0, 0, 0], frames
    assert [float(r["dose_e_per_A2"]) for r in frames] == pytest.approx(doses, rel=0.05)
    assert summary["frames_recognised"] == 2 and summary["frames_not_recognised"] == 3
    with open(tmp_path / "out" / "columns.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    marks = {int(r["frame"]): r["recognised"] for r in rows}
    assert marks[0] == marks[1] == "1" and marks[2] == marks[3] == "0"   # Pt, CeO2 [100]: columns kept, marked
    stored = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert stored["frames_not_recognised"] == 3
    if MOS2 is None:
        pytest.skip("../shared/realdata is not here")
    pytest.importorskip("rsciio")
    real = analyze([MOS2], tmp_path / "mos2", progress=False,
                   config=AnalyzeConfig(overlay_every=100))
    assert real["frames_recognised"] == 0 and real["frames_not_recognised"] == 1


def test_vacuum_fraction_is_the_area_beyond_reach_of_every_column():
    from ceriakeras.inference.recognise import VACUUM_REACH_A, vacuum_fraction

    assert vacuum_fraction([], [], 40.0, 40.0) == 1.0
    # one column in the middle of a 40 Å frame: all but a disk of the reach
    one = vacuum_fraction([20.0], [20.0], 40.0, 40.0)
    assert one == pytest.approx(1 - np.pi * VACUUM_REACH_A**2 / 1600, abs=0.01)
    # a 12 Å particle: the same number of columns leaves less vacuum in a smaller frame
    pts = projected_lattice(*fcc_110(CEO2_LATTICE_A), radius_A=12.0)
    shares = [vacuum_fraction(*(pts + size / 2).T, size, size) for size in (24.0, 40.0, 80.0)]
    assert shares[0] < 0.05 and shares[0] < shares[1] < shares[2]
    assert shares[2] == pytest.approx(1 - np.pi * (12 + VACUUM_REACH_A) ** 2 / 6400, abs=0.03)


def test_a_vacuum_normalised_model_needs_vacuum_and_the_others_do_not():
    from ceriakeras.inference.recognise import required_vacuum_fraction

    def info(**model):
        return {"training_config": {"model": model}}

    # the bare minimum 1 − q (a tenth for q = 0.9) and a quarter more, for the spread of the measure
    assert required_vacuum_fraction(info(intensity_reference="vacuum",
                                         vacuum_quantile=0.9)) == pytest.approx(0.125)
    assert required_vacuum_fraction(info(intensity_reference="vacuum",
                                         vacuum_quantile=0.95)) == pytest.approx(0.0625)
    assert required_vacuum_fraction(info(intensity_reference="frame_mean")) is None
    assert required_vacuum_fraction(info()) is None and required_vacuum_fraction({}) is None
    pts = projected_lattice(*fcc_110(CEO2_LATTICE_A))
    assert recognise_frame(*pts.T, 500.0, vacuum=0.5, min_vacuum=0.2)["recognised"]
    low = recognise_frame(*pts.T, 500.0, vacuum=0.05, min_vacuum=0.2)
    assert not low["recognised"] and "5% of the frame is vacuum" in low["reason"]
    assert recognise_frame(*pts.T, 500.0, vacuum=0.05)["recognised"]    # no need stated
