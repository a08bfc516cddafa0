"""HRTEM images from abTEM: vacuum, contrast at the columns, labels, determinism, convergence, coordinates."""

import dataclasses
import hashlib
import json
import math
import subprocess
import sys

import abtem
import numpy as np
import pytest
from ase import Atoms

from ceriakeras.config import ConfigError, OpticsConfig, SimulationConfig, StructureConfig
from ceriakeras.physics.simulate import (
    Example,
    check_simulation_config,
    contrast_rms_difference,
    defocus_samples,
    delocalisation_A,
    draw_optics,
    envelope_delocalisation_A,
    multislice_convergence,
    exit_wave,
    image_from_exit_wave,
    label_mask,
    multislice_cell,
    particle_exit_wave,
    place_in_cell,
    simulate_particle,
    wavelength_A,
)
from ceriakeras.physics.structures import build_particle, column_table

SMALL = SimulationConfig.legacy(
    structure=StructureConfig(diameter_range_A=(12.0, 16.0)),
    optics=OpticsConfig(defocus_range_nm=(-6.0, 6.0), cs_range_um=(-10.0, 10.0)),
    cell_size_A=32.0,
    optics_per_exit_wave=3,
)
PLAIN = dict(energy_keV=300.0, cs_um=0.0, c5_mm=0.0, focal_spread_nm=0.0, astigmatism_nm=0.0,
             astigmatism_angle_deg=0.0, aperture_mrad=40.0)


@pytest.fixture(scope="module")
def examples():
    return simulate_particle(3, 11, SMALL)


@pytest.fixture(scope="module")
def particle_wave():
    atoms = place_in_cell(build_particle(5, SMALL.structure), SMALL.cell_size_A)
    return atoms, exit_wave(atoms, 0.1, 2.0, 300.0, image_sampling=0.1)


def test_examples_have_the_documented_fields(examples):
    assert len(examples) == SMALL.optics_per_exit_wave
    n = SMALL.image_size_px
    for ex in examples:
        assert isinstance(ex, Example)
        assert ex.image.shape == (n, n) and ex.image.dtype == np.float32
        assert ex.label.shape == (n, n) and ex.label.dtype == np.uint8
        assert ex.columns.dtype == np.float32 and ex.columns.shape[1] == 3
        assert ex.pixel_size_A == SMALL.pixel_size_A
        meta = json.loads(json.dumps(ex.metadata))
        for key in ("defocus_nm", "cs_um", "c5_mm", "focal_spread_nm", "astigmatism_nm",
                    "astigmatism_angle_deg", "aperture_mrad", "energy_keV", "tilt_deg", "seed",
                    "particle_id", "diameter_A"):
            assert key in meta, key
        assert meta["zone_axis"] == "[110]"
        assert set(meta["versions"]) == {"abtem", "ase", "numpy", "ceriakeras"}
        assert (meta["seed"], meta["particle_id"]) == (11, 3)
        np.testing.assert_allclose(ex.atoms.cell.lengths()[:2], SMALL.cell_size_A)
    # Every optics draw differs; the particle does not.
    assert len({ex.metadata["defocus_nm"] for ex in examples}) == len(examples)
    assert not np.array_equal(examples[0].image, examples[1].image)
    np.testing.assert_array_equal(examples[0].label, examples[1].label)


def test_vacuum_is_one_far_from_the_particle(examples):
    for ex in examples:
        edge = np.concatenate([ex.image[:4].ravel(), ex.image[-4:].ravel(),
                               ex.image[:, :4].ravel(), ex.image[:, -4:].ravel()])
        assert abs(float(np.median(edge)) - 1.0) < 0.02
        assert abs(float(ex.image.mean()) - 1.0) < 0.05


def test_label_equals_height_at_every_column(examples):
    ex = examples[0]
    table = ex.columns
    for x, y, h in table:
        assert ex.label[int(round(y)), int(round(x))] == h
    # Labelled area ≈ one disk per column.
    disk_px = math.pi * (SMALL.label_radius_A / SMALL.pixel_size_A) ** 2
    assert abs((ex.label > 0).sum() / len(table) - disk_px) < 0.5 * disk_px
    # Column table in pixels matches the atoms' column table in Å.
    reference = column_table(ex.atoms)
    np.testing.assert_allclose(table[:, 0], reference[:, 0] / SMALL.pixel_size_A - 0.5, atol=1e-4)
    np.testing.assert_allclose(table[:, 2], reference[:, 2])
    ce = np.asarray(ex.atoms.get_chemical_symbols()) == "Ce"
    assert table[:, 2].sum() == ce.sum()


def test_label_mask_refuses_too_tall_columns():
    with pytest.raises(ConfigError, match="max_height"):
        label_mask(np.array([[5.0, 5.0, 17.0]]), (16, 16), 0.2, 0.5, 16)
    mask = label_mask(np.array([[5.0, 7.0, 3.0]]), (16, 16), 0.2, 0.5, 16)
    assert mask[7, 5] == 3 and mask[5, 7] == 0
    assert mask[7, 7] == 3 and mask[7, 8] == 0  # radius 2.5 px


def test_same_seed_gives_identical_arrays(examples):
    again = simulate_particle(3, 11, SMALL)
    for a, b in zip(examples, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.columns, b.columns)
        assert a.metadata == b.metadata


def test_same_arrays_in_another_process(examples):
    code = (
        "import hashlib, dataclasses\n"
        "from ceriakeras.physics.simulate import simulate_particle\n"
        "from ceriakeras.config import SimulationConfig, StructureConfig, OpticsConfig\n"
        f"config = {SMALL!r}\n"
        "exs = simulate_particle(3, 11, config)\n"
        "print(hashlib.sha256(b''.join(e.image.tobytes() + e.label.tobytes() for e in exs)).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = hashlib.sha256(b"".join(e.image.tobytes() + e.label.tobytes() for e in examples))
    assert out.stdout.strip() == here.hexdigest()


def test_columns_sit_on_contrast_extrema(particle_wave):
    """Noise-free (infinite dose), Cs = 0: Ce columns are bright at −4 nm and dark at +4 nm."""
    atoms, wave = particle_wave
    p = SMALL.pixel_size_A
    table = column_table(atoms)
    for defocus, find in ((-4.0, np.argmax), (4.0, np.argmin)):
        image = image_from_exit_wave(wave, dict(PLAIN, defocus_nm=defocus), p)
        for x_A, y_A, _ in table:
            x, y = x_A / p - 0.5, y_A / p - 0.5
            i, j = int(round(y)), int(round(x))
            yy, xx = np.mgrid[i - 7:i + 8, j - 7:j + 8]
            dist = np.hypot(xx - x, yy - y)
            values = np.where(dist <= 7.5, image[i - 7:i + 8, j - 7:j + 8], np.nan)
            values = -values if find is np.argmin else values
            k = np.unravel_index(np.nanargmax(values), values.shape)
            assert dist[k] <= 1.0, (defocus, x, y)


def test_halving_sampling_and_slice_changes_image_little(particle_wave):
    """0.1 Å / 2 Å against 0.05 Å / 1 Å: contrast RMS difference ≤ 20 %, correlation ≥ 0.98."""
    atoms, coarse = particle_wave
    fine = exit_wave(atoms, 0.05, 1.0, 300.0, image_sampling=0.1)
    for defocus in (-4.0, 4.0):
        optics = dict(PLAIN, defocus_nm=defocus, focal_spread_nm=3.0)
        a = image_from_exit_wave(coarse, optics, 0.2) - 1.0
        b = image_from_exit_wave(fine, optics, 0.2) - 1.0
        relative = np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))
        assert relative < 0.2, relative
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_pixel_coordinates_are_exact():
    """A lone Ce atom at a pixel centre (x_A = (i + ½)p) images mirror-symmetric about pixel i;
    at a pixel edge (x_A = i·p) symmetric about the edge. Rows are y, columns x."""
    p, L = 0.2, 12.8
    optics = dict(PLAIN, defocus_nm=3.0)

    def image_of(x_A, y_A):
        atoms = Atoms("Ce", positions=[(x_A, y_A, 1.0)], cell=[L, L, 2.0], pbc=True)
        wave = exit_wave(atoms, 0.1, 2.0, 300.0, image_sampling=0.1)
        return image_from_exit_wave(wave, optics, p)

    im = image_of(32.5 * p, 25.5 * p)  # centre of column 32, row 25
    row, col = im[25], im[:, 32]
    k = np.arange(1, 6)
    np.testing.assert_allclose(row[32 - k], row[32 + k], rtol=1e-4)
    np.testing.assert_allclose(col[25 - k], col[25 + k], rtol=1e-4)
    assert abs(im[25, 32] - 1.0) == np.abs(im - 1.0).max()

    im = image_of(32.0 * p, 25.0 * p)  # corner between pixels 31|32 and 24|25
    np.testing.assert_allclose(im[25, 31 - k + 1], im[25, 32 + k - 1], rtol=1e-4)
    np.testing.assert_allclose(im[24 - k + 1, 32], im[25 + k - 1, 32], rtol=1e-4)

    # The check is sensitive: half a fine sample (0.05 Å) off breaks the symmetry.
    im = image_of(32.5 * p + 0.05, 25.5 * p)
    assert np.abs(im[25, 32 - k] - im[25, 32 + k]).max() > 1e-3


def test_ctf_matches_abtem_conventions(particle_wave):
    """Our NumPy CTF (no focal spread) gives abTEM's own CTF image."""
    _, wave = particle_wave
    optics = dict(PLAIN, defocus_nm=5.0, cs_um=-15.0, c5_mm=2.0, astigmatism_nm=1.5,
                  astigmatism_angle_deg=30.0, aperture_mrad=200.0)
    ours = image_from_exit_wave(wave, optics, 0.1)
    real_space = np.fft.ifft2(wave.fourier)
    waves = abtem.Waves(real_space, energy=300e3, sampling=0.1)
    ctf = abtem.CTF(defocus=50.0, Cs=-15.0e4, C50=2.0e7, C12=15.0, phi12=math.radians(30.0),
                    semiangle_cutoff=200.0, energy=300e3)
    theirs = np.asarray(waves.apply_ctf(ctf).intensity().compute().array).T
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_focal_spread_sum_reproduces_temporal_envelope():
    """The defocus quadrature averages every passed frequency to the exact Gaussian envelope."""
    lam = wavelength_A(300.0)
    k_max = 0.040 / lam
    for spread_A in (20.0, 40.0, 60.0):
        offsets, weights = defocus_samples(spread_A, k_max, 300.0)
        assert weights.sum() == pytest.approx(1.0)
        omega = np.linspace(0.0, math.pi * lam * k_max**2, 400)
        quadrature = (weights[None] * np.exp(1j * omega[:, None] * offsets[None])).sum(1)
        envelope = np.exp(-((omega * spread_A / 2.0) ** 2))
        assert np.abs(quadrature - envelope).max() < 2e-3


def test_particle_too_big_for_cell_is_refused():
    config = dataclasses.replace(SMALL, structure=StructureConfig(diameter_range_A=(20.0, 30.0)))
    with pytest.raises(ConfigError, match="cell_size_A"):
        simulate_particle(0, 0, config)


# --- version-3 data (issue 11) ------------------------------------------------------------------
V3_OPTICS = dataclasses.replace(SMALL.optics, aperture_range_mrad=(25.0, 40.0),
                                focal_spread_models=("incoherent", "envelope"),
                                max_coma_nm=40.0, max_three_fold_astigmatism_nm=40.0)


def test_delocalisation_of_pure_defocus_and_cs():
    """|∇chi|/2π at the aperture edge: α·|C10| for defocus, α³·C30 for Cs (α = λ k_ap)."""
    plain = dict(PLAIN, defocus_nm=0.0)
    assert delocalisation_A(dict(plain, defocus_nm=-10.0)) == pytest.approx(0.040 * 100.0, rel=1e-3)
    assert delocalisation_A(dict(plain, cs_um=25.0)) == pytest.approx(0.040**3 * 25e4, rel=1e-3)
    # Defocus and Cs of opposite effect partly cancel; the envelope takes the worst corner.
    both = delocalisation_A(dict(plain, defocus_nm=10.0, cs_um=25.0))
    assert both < 0.040**3 * 25e4
    worst = envelope_delocalisation_A(OpticsConfig(focal_spread_range_nm=(0.0, 0.0),
                                                   max_astigmatism_nm=0.0, c5_range_mm=(0.0, 0.0)))
    assert worst == pytest.approx(0.040 * 120.0 + 0.040**3 * 25e4, rel=1e-3)


def test_cell_must_hold_the_delocalisation():
    config = dataclasses.replace(SMALL, optics=V3_OPTICS, vacuum_for_delocalisation=True)
    with pytest.raises(ConfigError, match="delocalis.*need cell_size_A >= "):
        check_simulation_config(config)
    r = envelope_delocalisation_A(V3_OPTICS)
    need = SMALL.structure.diameter_range_A[1] + 2 * (r + SMALL.structure.vacuum_A)
    big_enough = float(math.ceil(need / 0.2) * 0.2)
    check_simulation_config(dataclasses.replace(config, cell_size_A=big_enough))
    # Without the rule (the version-1/2 datasets) only the plain vacuum is checked.
    check_simulation_config(dataclasses.replace(config, vacuum_for_delocalisation=False))


def test_new_optics_are_drawn_per_image_and_old_draws_unchanged():
    draws = []
    for seed in range(40):
        old = draw_optics(np.random.default_rng(seed), SMALL.optics)
        new = draw_optics(np.random.default_rng(seed), V3_OPTICS)
        for key in ("defocus_nm", "cs_um", "c5_mm", "focal_spread_nm", "astigmatism_nm",
                    "astigmatism_angle_deg"):
            assert old[key] == new[key]  # the version-1/2 draws come first, as before
        assert old["aperture_mrad"] == SMALL.optics.aperture_mrad
        assert old["focal_spread_model"] == "incoherent" and old["coma_nm"] == 0.0
        draws.append(new)
    apertures = [d["aperture_mrad"] for d in draws]
    assert 25.0 <= min(apertures) < max(apertures) <= 40.0 and np.std(apertures) > 2.0
    assert {d["focal_spread_model"] for d in draws} == {"incoherent", "envelope"}
    for key, top in (("coma_nm", 40.0), ("three_fold_astigmatism_nm", 40.0)):
        values = [d[key] for d in draws]
        assert 0.0 <= min(values) < max(values) <= top


def test_new_optics_recorded_in_the_metadata():
    config = dataclasses.replace(SMALL, optics=V3_OPTICS, optics_per_exit_wave=6)
    examples = simulate_particle(3, 11, config)
    metas = [json.loads(json.dumps(ex.metadata)) for ex in examples]
    for meta, ex in zip(metas, examples):
        for key in ("aperture_mrad", "focal_spread_model", "coma_nm", "coma_angle_deg",
                    "three_fold_astigmatism_nm", "three_fold_astigmatism_angle_deg",
                    "delocalisation_A", "max_column_height_atoms", "mean_column_height_atoms",
                    "thickness_A", "defocus_nm", "cs_um", "max_column_height"):
            assert key in meta, key
        assert meta["max_column_height_atoms"] == int(ex.columns[:, 2].max())
        assert meta["mean_column_height_atoms"] == pytest.approx(float(ex.columns[:, 2].mean()))
        assert meta["delocalisation_A"] == pytest.approx(delocalisation_A(meta))
    assert len({m["aperture_mrad"] for m in metas}) == len(metas)
    assert len({m["coma_nm"] for m in metas}) == len(metas)
    # The same particle through other optics: images differ, labels do not.
    assert not np.allclose(examples[0].image, examples[1].image)
    np.testing.assert_array_equal(examples[0].label, examples[1].label)


def test_residual_aberrations_and_envelope_match_abtem(particle_wave):
    """Coma, three-fold astigmatism and the quasi-coherent envelope: abTEM's CTF gives the same
    image, and 30 nm of coma or three-fold astigmatism change it by more than 2 % RMS."""
    _, wave = particle_wave
    base = dict(PLAIN, defocus_nm=4.0, cs_um=-10.0, focal_spread_nm=3.0,
                focal_spread_model="envelope")
    optics = dict(base, coma_nm=30.0, coma_angle_deg=20.0, three_fold_astigmatism_nm=25.0,
                  three_fold_astigmatism_angle_deg=50.0)
    ours = image_from_exit_wave(wave, optics, 0.1)
    real_space = np.fft.ifft2(wave.fourier)
    waves = abtem.Waves(real_space, energy=300e3, sampling=0.1)
    ctf = abtem.CTF(defocus=40.0, Cs=-10.0e4, C21=300.0, phi21=math.radians(20.0), C23=250.0,
                    phi23=math.radians(50.0), focal_spread=30.0, semiangle_cutoff=40.0,
                    energy=300e3, soft=False)
    theirs = np.asarray(waves.apply_ctf(ctf).intensity().compute().array).T
    np.testing.assert_allclose(ours, theirs, atol=3e-3)
    plain = image_from_exit_wave(wave, base, 0.2)
    for key in ("coma_nm", "three_fold_astigmatism_nm"):
        changed = image_from_exit_wave(wave, dict(base, **{key: 30.0}), 0.2)
        assert contrast_rms_difference(changed, plain) > 0.02, key
    incoherent = image_from_exit_wave(wave, dict(base, focal_spread_model="incoherent"), 0.2)
    assert 0.0 < contrast_rms_difference(incoherent, plain) < 0.5


def test_contrast_rms_difference():
    rng = np.random.default_rng(0)
    reference = 1.0 + 0.3 * rng.standard_normal((32, 32))
    assert contrast_rms_difference(reference, reference) == 0.0
    assert contrast_rms_difference(np.ones_like(reference), reference) == pytest.approx(1.0)
    scaled = 1.0 + 1.05 * (reference - 1.0)
    assert contrast_rms_difference(scaled, reference) == pytest.approx(0.05)
    # Vacuum around both does not change the figure.
    pad = lambda a: np.pad(a, 16, constant_values=1.0)  # noqa: E731
    assert contrast_rms_difference(pad(scaled), pad(reference)) == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="shapes"):
        contrast_rms_difference(reference[:8], reference)
    with pytest.raises(ConfigError, match="flat"):
        contrast_rms_difference(reference, np.ones_like(reference))


def test_multislice_convergence_helper():
    """A short Ce column: the reference row is 0 %, a coarser grid is off by more than a finer."""
    z = 1.0 + 3.83 * np.arange(4)
    atoms = Atoms("Ce4", positions=[(4.85, 4.85, zi) for zi in z], cell=[9.6, 9.6, 14.0], pbc=True)
    optics = [dict(PLAIN, defocus_nm=f, focal_spread_nm=2.0) for f in (-4.0, 6.0)]
    rows = multislice_convergence(atoms, [(0.2, 2.0), (0.1, 2.0), (0.05, 1.0)], (0.05, 1.0),
                                  optics, 0.2)
    assert [(r["sampling_A"], r["slice_thickness_A"]) for r in rows] == [(0.2, 2.0), (0.1, 2.0),
                                                                         (0.05, 1.0)]
    assert rows[2]["rms_percent"] == [0.0, 0.0]
    for coarse, fine in zip(rows[0]["rms_percent"], rows[1]["rms_percent"]):
        assert coarse > fine > 0.0
    assert all(r["cpu_s"] >= 0.0 and len(r["rms_percent"]) == 2 for r in rows)


def test_v3_data_config_holds_its_delocalisation_and_round_trips():
    """configs/ceria110_v3_data.toml passes its own cell rule and survives the manifest."""
    from pathlib import Path

    from ceriakeras.config import from_dict, load_config, to_dict

    path = Path(__file__).resolve().parents[2] / "configs" / "ceria110_v3_data.toml"
    config = load_config(SimulationConfig, path)
    assert config.vacuum_for_delocalisation and config.multislice_margin_A is not None
    check_simulation_config(config)
    assert from_dict(SimulationConfig, json.loads(json.dumps(to_dict(config)))) == config
    # 10 Å less cell would let the worst optics wrap around.
    with pytest.raises(ConfigError, match="wrap around"):
        check_simulation_config(dataclasses.replace(config, cell_size_A=config.cell_size_A - 10.0))


def test_defaults_are_the_v3_data_and_the_old_settings_need_naming(tmp_path):
    """SimulationConfig() is configs/ceria110_v3_data.toml; the old, unconverged settings come
    only from SimulationConfig.legacy() or configs/legacy_fast.toml (issue 23)."""
    from pathlib import Path

    from ceriakeras.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    default = SimulationConfig()
    assert default == load_config(SimulationConfig, configs / "ceria110_v3_data.toml")
    assert (default.sampling_A, default.slice_thickness_A, default.cell_size_A) == (0.04, 1.0, 128.0)
    check_simulation_config(default)
    legacy = SimulationConfig.legacy()
    assert (legacy.sampling_A, legacy.slice_thickness_A, legacy.cell_size_A) == (0.1, 2.0, 64.0)
    assert not legacy.vacuum_for_delocalisation and legacy.multislice_margin_A is None
    assert legacy.optics == OpticsConfig() and legacy.structure == StructureConfig()
    assert load_config(SimulationConfig, configs / "legacy_fast.toml") == legacy
    assert SimulationConfig.legacy(cell_size_A=32.0).cell_size_A == 32.0
    named = tmp_path / "named.toml"
    named.write_text('preset = "legacy"\nsampling_A = 0.05\n[structure]\nvacuum_A = 6.0\n')
    assert load_config(SimulationConfig, named) == SimulationConfig.legacy(
        sampling_A=0.05, structure=StructureConfig(vacuum_A=6.0))
    named.write_text('preset = "fast"\n')
    with pytest.raises(ConfigError, match="only preset is"):
        load_config(SimulationConfig, named)


# --- multislice in a small cell, lens in the whole cell --------------------------------------
def test_multislice_cell_holds_the_margin_on_whole_pixels():
    atoms = place_in_cell(build_particle(2, SMALL.structure), 64.0)
    (ox, oy), m = multislice_cell(atoms, 64.0, 0.2, 0.04, 5.0)
    lo, hi = atoms.positions[:, :2].min(0), atoms.positions[:, :2].max(0)
    assert np.all(np.array([ox, oy]) * 0.2 <= lo - 5.0) and np.all((np.array([ox, oy]) + m) * 0.2 >= hi + 5.0)
    assert m * 0.2 < (hi - lo).max() + 10.0 + 2.0  # not much more than needed
    n = m * 5  # multislice grid points: even, only factors 2, 3, 5
    assert n % 2 == 0
    for prime in (2, 3, 5):
        while n % prime == 0:
            n //= prime
    assert n == 1
    # A margin that does not fit: the whole cell.
    assert multislice_cell(atoms, 64.0, 0.2, 0.04, 40.0) == ((0, 0), 320)


def test_small_multislice_cell_embedded_in_the_whole_cell_gives_the_whole_cell_images():
    """With optics that delocalise 14–18 Å, the multislice in particle + 6 Å margin embedded in
    the 64 Å cell gives the images of the 64 Å multislice within 1 % of the contrast, while the
    lens applied in the small cell itself (wrapping around), or the wave embedded one sample
    off, is far off."""
    from ceriakeras.physics.simulate import embed_exit_wave

    config = dataclasses.replace(SMALL, cell_size_A=64.0,
                                 structure=StructureConfig(diameter_range_A=(20.0, 20.0)))
    atoms = place_in_cell(build_particle(1, config.structure), config.cell_size_A)
    full, none = particle_exit_wave(atoms, config, 0.1)
    assert none == {}
    padded, info = particle_exit_wave(
        atoms, dataclasses.replace(config, multislice_margin_A=6.0), 0.1)
    assert info["multislice_cell_A"] <= 0.6 * config.cell_size_A
    ox, oy = (round(v / 0.2) for v in info["multislice_offset_A"])
    m = round(info["multislice_cell_A"] / 0.2)
    sub = atoms.copy()
    sub.positions[:, :2] -= [ox * 0.2, oy * 0.2]
    sub.cell = [m * 0.2, m * 0.2, atoms.cell[2, 2]]
    small = exit_wave(sub, 0.1, 2.0, 300.0, image_sampling=0.1, gpts=2 * m)
    lens = dict(PLAIN, c5_mm=5.0, astigmatism_nm=1.0, coma_nm=30.0, coma_angle_deg=10.0,
                three_fold_astigmatism_nm=30.0, three_fold_astigmatism_angle_deg=50.0)
    coherent = dict(lens, defocus_nm=12.0, cs_um=25.0)
    envelope = dict(lens, defocus_nm=-12.0, cs_um=-25.0, c5_mm=0.0, focal_spread_nm=4.0,
                    focal_spread_model="envelope")
    for optics in (coherent, envelope):
        assert delocalisation_A(optics) > 14.0
        reference = image_from_exit_wave(full, optics, 0.2)
        assert contrast_rms_difference(image_from_exit_wave(padded, optics, 0.2), reference) < 0.01
    reference = image_from_exit_wave(full, coherent, 0.2)
    wrapped = image_from_exit_wave(small, coherent, 0.2)
    assert contrast_rms_difference(wrapped, reference[oy:oy + m, ox:ox + m]) > 0.03
    off = embed_exit_wave(small, (2 * ox + 1, 2 * oy), 640)
    assert contrast_rms_difference(image_from_exit_wave(off, coherent, 0.2), reference) > 0.1


def test_margin_config_is_checked_and_recorded():
    """Both cells are checked: the margin holds the vacuum, the multislice cell of the largest
    particle fits the whole cell; the multislice cell is recorded."""
    config = dataclasses.replace(SMALL, multislice_margin_A=7.0)  # vacuum_A = 7 Å, 16 Å particles
    check_simulation_config(config)
    with pytest.raises(ConfigError, match="multislice cell of 34.0 Å, more than cell_size_A"):
        check_simulation_config(dataclasses.replace(config, multislice_margin_A=9.0))
    with pytest.raises(ConfigError, match="below structure.vacuum_A"):
        check_simulation_config(dataclasses.replace(config, multislice_margin_A=5.0))
    with pytest.raises(ConfigError, match="multislice_margin_A"):
        dataclasses.replace(config, multislice_margin_A=0.0).validate()
    ex = simulate_particle(3, 11, dataclasses.replace(config, optics_per_exit_wave=1))[0]
    assert ex.metadata["multislice_margin_A"] == 7.0
    assert ex.metadata["multislice_cell_A"] < config.cell_size_A
    assert ex.image.shape == (config.image_size_px,) * 2
