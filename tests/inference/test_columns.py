"""Column extraction from probability maps and the 3D model (ceriakeras.inference.columns)."""

import numpy as np
import pytest

from ceriakeras.inference.columns import columns_to_atoms, find_columns
from ceriakeras.config import CE_COLUMN_SPACING_A

PIXEL_A = 0.2
N_CLASSES = 17


def soft_disk_map(centres, class_mass, shape=(96, 96), radius_px=2.5, edge_px=0.6):
    """A probability map like the network's: soft disks at sub-pixel ``centres`` (x, y).

    ``class_mass[k]`` is the distribution over height classes 1…C-1 inside disk k.
    """
    h, w = shape
    p = np.zeros((h, w, N_CLASSES))
    column = np.zeros((h, w))
    reach = int(np.ceil(radius_px + 8 * edge_px))
    for (cx, cy), dist in zip(centres, class_mass):
        y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 2)
        x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        c = 0.95 / (1.0 + np.exp((np.hypot(xx - cx, yy - cy) - radius_px) / edge_px))
        column[y0:y1, x0:x1] += c * float(np.sum(dist))
        p[y0:y1, x0:x1, 1:] += c[..., None] * np.asarray(dist)[None, None, :]
    p[..., 0] = 1.0 - column
    return p.astype(np.float32)


def one_hot(h, n=N_CLASSES - 1):
    d = np.zeros(n)
    d[h - 1] = 1.0
    return d


@pytest.fixture
def lattice():
    rng = np.random.default_rng(3)
    centres, heights = [], []
    for gy in range(4):
        for gx in range(4):
            centres.append((12 + 22 * gx + rng.uniform(-0.5, 0.5),
                            12 + 22 * gy + rng.uniform(-0.5, 0.5)))
            heights.append(int(rng.integers(1, 15)))
    return np.array(centres), np.array(heights)


def test_positions_subpixel_and_heights(lattice):
    centres, heights = lattice
    p = soft_disk_map(centres, [one_hot(h) for h in heights])
    table = find_columns(p, PIXEL_A, label_radius_A=0.5)
    assert len(table["x_px"]) == len(centres)
    assert np.all(np.diff(table["y_px"]) >= -1.0)  # rows come sorted by y (then x)
    found = np.column_stack([table["x_px"], table["y_px"]])
    for (cx, cy), h in zip(centres, heights):
        k = np.argmin(np.hypot(found[:, 0] - cx, found[:, 1] - cy))
        assert abs(found[k, 0] - cx) < 0.1 and abs(found[k, 1] - cy) < 0.1
        assert table["height"][k] == h
        assert table["confidence"][k] == pytest.approx(1.0)
        assert table["expected_height"][k] == pytest.approx(h)
        assert table["height_std"][k] == pytest.approx(0.0, abs=1e-6)


def test_mixed_classes_confidence_expectation_and_std():
    dist = np.zeros(N_CLASSES - 1)
    dist[[4, 5, 6]] = [0.2, 0.7, 0.1]  # heights 5, 6, 7
    p = soft_disk_map([(40.3, 30.7)], [dist], shape=(64, 80))
    t = find_columns(p, PIXEL_A)
    assert len(t["height"]) == 1
    assert t["height"][0] == 6
    assert t["confidence"][0] == pytest.approx(0.7, abs=1e-6)
    assert t["expected_height"][0] == pytest.approx(5 * 0.2 + 6 * 0.7 + 7 * 0.1, abs=1e-6)
    var = 0.2 * (5 - 5.9) ** 2 + 0.7 * (6 - 5.9) ** 2 + 0.1 * (7 - 5.9) ** 2
    assert t["height_std"][0] == pytest.approx(np.sqrt(var), abs=1e-6)
    assert abs(t["x_px"][0] - 40.3) < 0.1 and abs(t["y_px"][0] - 30.7) < 0.1
    assert t["class_probabilities"][0] == pytest.approx(dist, abs=1e-6)  # tracks (issue 22)


def test_threshold_and_min_distance():
    # a weak blob below the threshold is not a column
    p = soft_disk_map([(20, 20), (60, 20)], [one_hot(3), one_hot(2) * 0.25 / 0.95])
    t = find_columns(p, PIXEL_A, threshold=0.3)
    assert len(t["x_px"]) == 1 and abs(t["x_px"][0] - 20) < 0.1
    # two peaks 1.2 Å apart merge when min_distance_A is 2 Å, separate at 1 Å
    p = soft_disk_map([(30, 30), (36, 30)], [one_hot(4), one_hot(4)], radius_px=1.5, edge_px=0.4)
    assert len(find_columns(p, PIXEL_A, min_distance_A=2.0)["x_px"]) == 1
    assert len(find_columns(p, PIXEL_A, min_distance_A=1.0, label_radius_A=0.25)["x_px"]) == 2


def test_empty_map_and_columns_at_the_border():
    p = np.zeros((32, 32, N_CLASSES), np.float32)
    p[..., 0] = 1
    t = find_columns(p, PIXEL_A)
    assert all(len(v) == 0 for v in t.values())
    assert t["height"].dtype == np.int32
    p = soft_disk_map([(0.0, 10.0)], [one_hot(5)], shape=(32, 32))
    t = find_columns(p, PIXEL_A)
    assert len(t["x_px"]) == 1 and t["height"][0] == 5 and abs(t["y_px"][0] - 10) < 0.1


def test_bad_arguments():
    with pytest.raises(ValueError):
        find_columns(np.zeros((8, 8)), PIXEL_A)
    with pytest.raises(ValueError):
        find_columns(np.zeros((8, 8, 3)), 0.0)


def test_columns_to_atoms_stacks_on_mid_plane():
    atoms = columns_to_atoms([1.0, 5.0, 9.0], [2.0, 2.0, 3.0], [1, 4, 0])
    assert atoms.get_chemical_symbols() == ["Ce"] * 5
    pos = atoms.positions
    first = pos[atoms.arrays["column"] == 0]
    np.testing.assert_allclose(first, [[1.0, 2.0, 0.0]])
    second = pos[atoms.arrays["column"] == 1]
    np.testing.assert_allclose(second[:, :2], [[5.0, 2.0]] * 4)
    np.testing.assert_allclose(np.diff(second[:, 2]), CE_COLUMN_SPACING_A)
    assert second[:, 2].mean() == pytest.approx(0.0)
    assert len(columns_to_atoms([], [], [])) == 0


def test_find_columns_is_fast_on_a_big_map():
    import time

    rng = np.random.default_rng(0)
    centres = [(x + rng.uniform(-0.4, 0.4), y + rng.uniform(-0.4, 0.4))
               for y in range(10, 500, 17) for x in range(10, 500, 17)]
    p = soft_disk_map(centres, [one_hot(int(h)) for h in rng.integers(1, 15, len(centres))],
                      shape=(512, 512))
    t0 = time.perf_counter()
    t = find_columns(p, PIXEL_A)
    elapsed = time.perf_counter() - t0
    assert len(t["x_px"]) == len(centres)
    assert elapsed < 1.0, f"find_columns took {elapsed:.2f} s for {len(centres)} columns"


def test_local_maxima_are_scikit_images_peaks_plateaus_included():
    from scipy import ndimage
    from skimage.feature import peak_local_max

    from ceriakeras.inference.columns import local_maxima

    rng = np.random.default_rng(3)
    for k in range(12):
        img = ndimage.gaussian_filter(rng.random((96, 80)), rng.uniform(0.7, 3.0))
        img = (img - img.min()) / np.ptp(img)
        if k % 2:
            img = np.round(img * 12) / 12  # plateaus: ties inside min_distance
        for md in (1, 3, 8):
            expected = peak_local_max(img, min_distance=md, threshold_abs=0.3, exclude_border=False)
            assert np.array_equal(local_maxima(img, md, 0.3), expected), (k, md)
    assert local_maxima(np.ones((20, 20)), 3, 0.1).shape == (0, 2)
