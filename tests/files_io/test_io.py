"""Readers (TIFF, ImageJ, OME, .npy, DM3, EMD), calibration, bad input and resampling (ceriakeras.io).

Includes property-based tests (hypothesis): whatever bytes, shapes, dtypes or values a file
holds, the readers give a correct result or a clean one-line InputError, never another exception.
"""

import io as stdio
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ceriakeras.config import InputError
from ceriakeras.io.files import atomic_path, write_text_atomic
from ceriakeras.io.series import check_frame, expand_inputs, length_unit_to_A, open_series
from ceriakeras.inference.resample import model_to_input_px, resample_counts, resample_factor

REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata"


def frames(path, pixel_size_A=None):
    with open_series(path, pixel_size_A) as s:
        return s, list(s.frames())


def counts(shape, seed=0, lam=20.0):
    return np.random.default_rng(seed).poisson(lam, shape).astype(np.uint16) + 1


# --- atomic writes (kept as they were) ----------------------------------------------------------
def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "one")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# --- readers and calibration --------------------------------------------------------------------
def test_single_page_tiff_with_resolution_tags_in_cm(tmp_path):
    data = counts((40, 48))
    tifffile.imwrite(tmp_path / "a.tif", data, resolution=(1e8 / 0.125, 1e8 / 0.125),
                     resolutionunit="CENTIMETER")
    s, fr = frames(tmp_path / "a.tif")
    assert (s.n_frames, s.shape) == (1, (40, 48))
    assert s.pixel_size_A == pytest.approx(0.125) and s.pixel_size_from == "TIFF resolution tags"
    np.testing.assert_array_equal(fr[0].image, data.astype(np.float32))
    assert fr[0].image.dtype == np.float32


def test_multipage_series_streams_pages_and_pixel_size_option_wins(tmp_path):
    data = counts((5, 32, 36))
    with tifffile.TiffWriter(tmp_path / "s.tif") as tw:
        for page in data:
            tw.write(page, photometric="minisblack", resolution=(1e8 / 0.1, 1e8 / 0.1),
                     resolutionunit="CENTIMETER")
    s, fr = frames(tmp_path / "s.tif", pixel_size_A=0.08)
    assert s.n_frames == 5 and s.pixel_size_A == 0.08 and s.pixel_size_from == "--pixel-size"
    for i, f in enumerate(fr):
        assert f.index == i and f.error is None
        np.testing.assert_array_equal(f.image, data[i])
    with open_series(tmp_path / "s.tif") as s:
        assert [f.index for f in s.frames(start=3)] == [3, 4]  # resume mid-series


def test_a_frame_carries_its_pixel_size_and_what_the_file_says_of_gain_and_dose(tmp_path):
    data = counts((3, 24, 28))
    np.save(tmp_path / "s.npy", data)
    s, fr = frames(tmp_path / "s.npy", pixel_size_A=0.1)
    assert s.counts_per_electron is None  # .npy files state no gain
    for f in fr:
        assert (f.pixel_size_A, f.counts_per_electron, f.dose_e_per_A2) == (0.1, None, None)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((24, 28), np.nan, np.float32))
    _, (f,) = frames(bad, pixel_size_A=0.125)
    assert f.image is None and f.error and f.pixel_size_A == 0.125


@pytest.mark.parametrize("unit, scale_A", [("nm", 10.0), ("micron", 1e4), ("\\u00B5m", 1e4),
                                           ("\\u00C5", 1.0), ("pm", 0.01)])
def test_imagej_hyperstack_calibration(tmp_path, unit, scale_A):
    data = counts((2, 3, 24, 20))  # T, Z: both are frames
    px_unit = 0.1 / scale_A
    tifffile.imwrite(tmp_path / "ij.tif", data, imagej=True, resolution=(1 / px_unit, 1 / px_unit),
                     metadata={"unit": unit, "axes": "TZYX"})
    s, fr = frames(tmp_path / "ij.tif")
    assert s.n_frames == 6 and s.shape == (24, 20)
    assert s.pixel_size_A == pytest.approx(0.1, rel=1e-5)
    np.testing.assert_array_equal(fr[4].image, data.reshape(6, 24, 20)[4])


def test_imagej_multichannel_is_not_a_series(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", counts((2, 24, 20)), imagej=True,
                     metadata={"axes": "CYX"})
    with pytest.raises(InputError, match="channels"):
        open_series(tmp_path / "c.tif", 0.1)


def test_ome_tiff_physical_size(tmp_path):
    data = counts((3, 24, 20))
    tifffile.imwrite(tmp_path / "o.ome.tif", data, ome=True,
                     metadata={"axes": "TYX", "PhysicalSizeX": 15.0, "PhysicalSizeXUnit": "pm",
                               "PhysicalSizeY": 15.0, "PhysicalSizeYUnit": "pm"})
    s, fr = frames(tmp_path / "o.ome.tif")
    assert s.n_frames == 3 and s.pixel_size_A == pytest.approx(0.15)
    assert s.pixel_size_from == "OME PhysicalSizeX"
    np.testing.assert_array_equal(fr[2].image, data[2])


def test_npy_image_and_series(tmp_path):
    np.save(tmp_path / "one.npy", counts((20, 30)).astype(np.float64))
    np.save(tmp_path / "many.npy", counts((4, 20, 30)))
    s, fr = frames(tmp_path / "one.npy", 0.1)
    assert s.n_frames == 1 and fr[0].image.shape == (20, 30)
    s, fr = frames(tmp_path / "many.npy", 0.1)
    assert s.n_frames == 4 and len(fr) == 4
    with pytest.raises(InputError, match="pass --pixel-size"):
        open_series(tmp_path / "one.npy")


def test_folder_expands_to_sorted_supported_files(tmp_path):
    for name in ("b.tif", "a.npy", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.npy", "b.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(InputError, match="unknown file type"):
        expand_inputs([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="does not exist"):
        expand_inputs([tmp_path / "nope.tif"])


@pytest.mark.parametrize("name, shape, pixel_A", [
    ("example_Au_nanoparticle.emd", (2048, 2048), 0.0749840),
    ("example_Se_implanted_MoS2.dm3", (1024, 1024), 0.1269531),
])
def test_vendor_files_with_their_calibration(name, shape, pixel_A):
    path = REALDATA / name
    if not path.exists():
        pytest.skip("../shared/realdata is not here")
    s, fr = frames(path)
    assert s.shape == shape and s.n_frames == 1
    assert s.pixel_size_A == pytest.approx(pixel_A, rel=1e-5)
    assert "calibration" in s.pixel_size_from
    assert fr[0].error is None and fr[0].image.shape == shape and fr[0].image.max() > 0


def test_missing_rosettasciio_is_one_line(tmp_path, monkeypatch):
    import sys

    for name in ("rsciio", "rsciio.digitalmicrograph"):
        monkeypatch.setitem(sys.modules, name, None)  # import now fails
    (tmp_path / "x.dm4").write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="pip install rosettasciio"):
        open_series(tmp_path / "x.dm4")


# --- bad input ----------------------------------------------------------------------------------
def test_rgb_tiff_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.ones((20, 20, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="RGB"):
        open_series(tmp_path / "rgb.tif", 0.1)


def test_rgb_npy_and_4d_npy_are_refused(tmp_path):
    np.save(tmp_path / "rgb.npy", np.ones((20, 20, 3), np.uint8))
    with pytest.raises(InputError, match="RGB"):
        open_series(tmp_path / "rgb.npy", 0.1)
    np.save(tmp_path / "4d.npy", np.ones((2, 2, 20, 20)))
    with pytest.raises(InputError, match="not an image"):
        open_series(tmp_path / "4d.npy", 0.1)


def test_truncated_tiff_is_refused_or_its_frames_reported(tmp_path):
    with tifffile.TiffWriter(tmp_path / "s.tif") as tw:
        for page in counts((4, 64, 64)):
            tw.write(page, photometric="minisblack")
    data = (tmp_path / "s.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 2])
    try:
        s, fr = frames(tmp_path / "t.tif", 0.1)
    except InputError as err:
        assert "\n" not in str(err)
    else:
        good = [f for f in fr if f.error is None]
        np.testing.assert_array_equal(good[0].image, counts((4, 64, 64))[0])
        assert any(f.error for f in fr) or s.n_frames < 4


@pytest.mark.parametrize("bad, message", [
    (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-3.0, "negative"),
    (1e39, "beyond float32"),
])
def test_bad_values(bad, message):
    img = np.ones((16, 16))
    img[3, 4] = bad
    with pytest.raises(InputError, match=message):
        check_frame(img, "x")


def test_all_zero_and_complex_frames():
    with pytest.raises(InputError, match="all zero"):
        check_frame(np.zeros((16, 16)))
    with pytest.raises(InputError, match="real number"):
        check_frame(np.ones((16, 16), np.complex64))


def test_bad_frame_inside_a_series_is_reported_and_skipped(tmp_path):
    data = counts((4, 20, 20)).astype(np.float32)
    data[1, 2, 2] = np.nan
    data[2] = 0
    np.save(tmp_path / "s.npy", data)
    _, fr = frames(tmp_path / "s.npy", 0.1)
    assert [f.error is None for f in fr] == [True, False, False, True]
    assert "frame 1" in fr[1].error and "NaN" in fr[1].error
    assert "frame 2" in fr[2].error and "all zero" in fr[2].error
    with open_series(tmp_path / "s.npy", 0.1) as series:  # a second read, as the file holds it
        raw = list(series.frames(checked=False))
    assert all(f.error is None for f in raw) and np.isnan(raw[1].image[2, 2])
    assert np.array_equal(raw[3].image, data[3]) and raw[3].image.dtype == data.dtype


def test_huge_declared_size_is_refused_before_reading(tmp_path):
    np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8,
                              shape=(20000, 20))
    with pytest.raises(InputError, match="16384"):
        open_series(tmp_path / "big.npy", 0.1)


def test_pixel_size_option_must_be_positive(tmp_path):
    np.save(tmp_path / "a.npy", counts((20, 20)))
    for bad in (-0.1, 0.0, float("nan")):
        with pytest.raises(InputError, match="positive"):
            open_series(tmp_path / "a.npy", bad)


def test_units():
    assert length_unit_to_A("nm") == 10 and length_unit_to_A("Å") == 1
    assert length_unit_to_A(" PM ") == 0.01 and length_unit_to_A("furlong") is None


# --- resampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("input_A", [0.05, 0.08, 0.1, 0.2])
def test_resampling_conserves_counts_and_maps_coordinates_exactly(input_A):
    f = resample_factor(input_A, 0.2)
    n = 101
    img = counts((n, n + 7), seed=int(input_A * 1000)).astype(np.float32)
    small = resample_counts(img, f)
    h, w = small.shape
    assert (h, w) == (math.floor(n / f + 1e-9), math.floor((n + 7) / f + 1e-9))
    covered = img[: int(round(h * f)), : int(round(w * f))] if f == int(f) else None
    if covered is not None:
        assert small.sum() == covered.sum()
    # total counts: everything inside the covered area [0, h·f) × [0, w·f)
    assert small.sum() <= img.sum()
    # a single count at input pixel centre (x, y) lands in the model pixel whose area holds it,
    # and model pixel centres map back to (j + 0.5)·f − 0.5 on the input grid
    for j in range(h):
        centre = model_to_input_px(j, f)
        assert centre == pytest.approx((j + 0.5) * f - 0.5, abs=1e-12)
        assert j * f - 0.5 <= centre <= (j + 1) * f - 0.5
    # the first moment of a smooth blob is kept: centroid in, centroid out
    yy, xx = np.mgrid[0:n, 0 : n + 7]
    blob = np.exp(-((xx - 47.3) ** 2 + (yy - 52.8) ** 2) / (2 * (0.3 / input_A) ** 2))
    out = resample_counts(blob.astype(np.float32), f)
    oy, ox = np.mgrid[0:h, 0:w]
    cx = model_to_input_px((out * ox).sum() / out.sum(), f)
    cy = model_to_input_px((out * oy).sum() / out.sum(), f)
    assert cx == pytest.approx(47.3, abs=0.02) and cy == pytest.approx(52.8, abs=0.02)


def test_non_integer_ratio_shares_pixels_by_area():
    f = resample_factor(0.08, 0.2)
    assert f == pytest.approx(2.5)
    img = np.zeros((5, 5), np.float32)
    img[2, 2] = 1.0  # straddles the edge between model pixels 0 and 1 (at 2.5)
    out = resample_counts(img, f)
    np.testing.assert_allclose(out, [[0.25, 0.25], [0.25, 0.25]])


@pytest.mark.parametrize("pixel_A, message", [(0.04, "outside"), (0.25, "outside"),
                                              (0.15, "coarser")])
def test_resample_factor_refuses(pixel_A, message):
    with pytest.raises(InputError, match=message):
        resample_factor(pixel_A, 0.1)


# --- property-based: never anything but a result or a clean InputError ---------------------------
def _read_all(path, pixel_size_A=0.1):
    """Open and read every frame; return the frames or the InputError (other exceptions escape)."""
    try:
        with open_series(path, pixel_size_A) as s:
            out = []
            for f in s.frames():
                assert (f.image is None) != (f.error is None)
                if f.error is not None:
                    assert "\n" not in f.error
                else:
                    assert f.image.dtype == np.float32 and f.image.shape == s.shape
                    assert np.isfinite(f.image).all() and f.image.min() >= 0 and f.image.max() > 0
                out.append(f)
                if len(out) > 64:
                    break
            return out
    except InputError as err:
        assert "\n" not in str(err)
        return err


HYPO = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@HYPO
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".tif", ".npy", ".dm3", ".emd", ".ser"]))
def test_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"r{suffix}"
    path.write_bytes(data)
    _read_all(path)


@HYPO
@given(data=st.binary(max_size=512))
def test_random_bytes_behind_tiff_and_npy_magic(tmp_path, data):
    for magic, suffix in ((b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"II+\x00\x08\x00\x00\x00", ".tif"),
                          (b"\x93NUMPY\x01\x00", ".npy")):
        path = tmp_path / f"m{suffix}"
        path.write_bytes(magic + data)
        _read_all(path)


DTYPES = st.sampled_from(["uint8", "uint16", "uint32", "int8", "int16", "int32", "int64",
                          "float32", "float64", "float16", "bool"])


@HYPO
@given(dtype=DTYPES, n=st.integers(1, 3), h=st.integers(1, 40), w=st.integers(1, 40),
       fill=st.sampled_from(["random", "zero", "max", "min", "nan", "inf"]), cut=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_tiff_of_any_dtype_shape_and_values_maybe_truncated(tmp_path, dtype, n, h, w, fill, cut, seed):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    data = rng.integers(0, 100, (n, h, w)).astype(dt)
    if fill == "zero":
        data[:] = 0
    elif fill in ("max", "min") and dt.kind in "iu":
        data.flat[0] = getattr(np.iinfo(dt), fill)
    elif fill in ("max", "min") and dt.kind == "f":
        data.flat[0] = getattr(np.finfo(dt), fill)
    elif fill in ("nan", "inf") and dt.kind == "f":
        data.flat[-1] = getattr(np, fill)
    path = tmp_path / "t.tif"
    with tifffile.TiffWriter(path) as tw:
        for page in data:
            tw.write(page, photometric="minisblack")
    raw = path.read_bytes()
    truncated = cut < 0.5
    if truncated:
        raw = raw[: int(len(raw) * cut * 2)]
    path.write_bytes(raw)
    result = _read_all(path)
    if truncated or isinstance(result, InputError):
        return
    # an intact file either reads back exactly or its bad frames are reported
    assert len(result) == n
    for page, f in zip(data, result):
        if f.error is None:
            np.testing.assert_array_equal(f.image, page.astype(np.float32))
        else:
            a = page.astype(np.float64)
            assert (not np.isfinite(a).all() or a.min() < 0 or a.max() == 0
                    or not np.isfinite(page.astype(np.float32)).all())


@HYPO
@given(shape=st.lists(st.integers(0, 50), min_size=0, max_size=5), dtype=DTYPES,
       value=st.sampled_from([0.0, 1.0, -1.0, 1e30, 1e300, np.nan, np.inf, 65535.0]))
def test_npy_of_any_shape_dtype_and_value(tmp_path, shape, dtype, value):
    with np.errstate(all="ignore"):
        arr = np.full(shape, value).astype(dtype)
    np.save(tmp_path / "a.npy", arr)
    result = _read_all(tmp_path / "a.npy")
    if not isinstance(result, InputError):
        assert len(shape) in (2, 3)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 2**31 - 1), w=st.integers(1, 2**31 - 1), n=st.integers(1, 2**20))
def test_huge_dimensions_declared_in_headers(tmp_path, h, w, n):
    # a .npy header declaring a huge array over a tiny file
    header = {"descr": "<u2", "fortran_order": False, "shape": (n, h, w)}
    with open(tmp_path / "h.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(b"\0" * 100)
    assert isinstance(_read_all(tmp_path / "h.npy"), (InputError, list))
    # a TIFF whose first IFD declares the same size with a strip beyond the file's end
    buf = stdio.BytesIO()
    tifffile.imwrite(buf, np.ones((16, 16), np.uint16), photometric="minisblack")
    raw = bytearray(buf.getvalue())
    with tifffile.TiffFile(stdio.BytesIO(bytes(raw))) as tif:
        tags = tif.pages[0].tags
        for code, value in ((256, w), (257, h)):
            tag = tags[code]
            fmt = "<I" if tag.dtype == 4 else "<H"
            if fmt == "<H" and value > 0xFFFF:
                continue
            import struct

            struct.pack_into(fmt, raw, tag.valueoffset, value)
    (tmp_path / "h.tif").write_bytes(bytes(raw))
    result = _read_all(tmp_path / "h.tif")
    if not isinstance(result, InputError):
        assert all(f.error or f.image.shape == (h, w) for f in result)


def test_imagej_truncated_layout_is_memory_mapped(tmp_path):
    # ImageJ's own layout for big stacks: one IFD, frames stored contiguously after it
    data = counts((5, 24, 20))
    tifffile.imwrite(tmp_path / "big.tif", data, imagej=True, truncate=True,
                     resolution=(100.0, 100.0), metadata={"unit": "nm", "axes": "TYX"})
    s, fr = frames(tmp_path / "big.tif")
    assert s.n_frames == 5 and s.pixel_size_A == pytest.approx(0.1)
    for i, f in enumerate(fr):
        np.testing.assert_array_equal(f.image, data[i])
    raw = (tmp_path / "big.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[:-100])  # cut inside the last frame: 4 whole ones
    s, fr = frames(tmp_path / "cut.tif")
    assert s.n_frames == 5
    for i, f in enumerate(fr[:4]):
        np.testing.assert_array_equal(f.image, data[i])
    assert fr[4].image is None and "missing" in fr[4].error
    (tmp_path / "stub.tif").write_bytes(raw[:len(raw) - 5 * 24 * 20 * data.itemsize + 10])
    with pytest.raises(InputError, match="truncated"):
        open_series(tmp_path / "stub.tif")
