"""The image file formats: TIFF (single, multi-page, ImageJ, OME), NumPy ``.npy`` and vendor files
(DM3/DM4, EMD, SER via rosettasciio) opened as frame readers with the pixel size (Å) and the
detector gain (counts per electron) their headers state."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np

from ..config import InputError

# Everything below turns a file into a stream of (H, W) float32 frames with a pixel size in Å.
# Problems a user can fix (unreadable file, RGB, NaN, no calibration) raise InputError with one
# line that says what to do; nothing else escapes the readers.

TIFF_SUFFIXES = (".tif", ".tiff")
NUMPY_SUFFIXES = (".npy",)
VENDOR_SUFFIXES = {".dm3": "digitalmicrograph", ".dm4": "digitalmicrograph",
                   ".emd": "emd", ".ser": "tia"}
"""Vendor formats read with rosettasciio (``pip install rosettasciio``), by rsciio plugin."""
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + NUMPY_SUFFIXES + tuple(VENDOR_SUFFIXES)

MAX_FRAME_SIDE_PX = 16384
"""Largest frame side accepted, pixels (a header declaring more is refused before reading)."""
MIN_FRAME_SIDE_PX = 8
"""Smallest frame side accepted, pixels."""
MAX_IN_MEMORY_BYTES = 1 << 30
"""A series that can only be read whole (compressed, non-page layout) must fit in this, bytes."""

_LENGTH_UNITS_A = {
    "m": 1e10, "meter": 1e10, "metre": 1e10, "cm": 1e8, "mm": 1e7,
    "µm": 1e4, "μm": 1e4, "um": 1e4, "micron": 1e4, "microns": 1e4, "micrometer": 1e4,
    "\\u00b5m": 1e4, "nm": 10.0, "nanometer": 10.0, "nanometre": 10.0,
    "å": 1.0, "\\u00c5": 1.0, "a": 1.0, "ang": 1.0, "angstrom": 1.0, "ångström": 1.0, "angstroem": 1.0,
    "pm": 0.01, "picometer": 0.01, "picometre": 0.01,
}
_TIFF_RESUNIT_A = {2: 2.54e8, 3: 1e8, 4: 1e7, 5: 1e4}  # inch, cm, mm, µm in Å


def length_unit_to_A(unit: str) -> float | None:
    """Å per ``unit`` for a length unit name (``'nm'``, ``'pm'``, ``'Å'``, ``'micron'`` …), else None."""
    if not isinstance(unit, str):
        return None
    return _LENGTH_UNITS_A.get(unit.strip().lower())


def reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


def open_file(path: Path):
    """The reader of ``path`` by its suffix: ``(n_frames, (H, W), pixel size Å or None, where the
    calibration came from, read(i) -> (H, W) array, close or None, the gain its header states in
    counts per electron or None)``.

    Raises
    ------
    InputError
        An unknown file type, or an unreadable, damaged or oversized file (one line).
    """
    suffix = path.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            return (*_open_tiff(path), None)  # TIFF and .npy files record no gain
        if suffix in NUMPY_SUFFIXES:
            return (*_open_npy(path), None)
        if suffix in VENDOR_SUFFIXES:
            return _open_vendor(path, VENDOR_SUFFIXES[suffix])
        raise InputError(f"{path}: unknown file type {path.suffix!r}; give one of "
                         f"{', '.join(SUPPORTED_SUFFIXES)}")
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{path}: declares more data than fits in memory; is it damaged?") from None
    except Exception as err:  # any reader failure on a damaged file is the user's input problem
        raise InputError(f"{path} is unreadable or damaged ({reason(err)})") from None


def check_shape(path: Path, n_frames: int, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise InputError(f"{path}: frames of shape {tuple(shape)} are not 2D images")
    h, w = shape
    if max(h, w) > MAX_FRAME_SIDE_PX:
        raise InputError(f"{path}: frames of {h}×{w} px exceed {MAX_FRAME_SIDE_PX} px a side; "
                         "crop or bin the image")
    if min(h, w) < MIN_FRAME_SIDE_PX:
        raise InputError(f"{path}: frames of {h}×{w} px are too small (at least "
                         f"{MIN_FRAME_SIDE_PX} px a side)")
    if n_frames < 1:
        raise InputError(f"{path} holds no frames")


def _frame_axes(path: Path, axes: str, shape: tuple[int, ...]) -> int:
    """Number of frames for a series with tifffile-style ``axes``; refuse RGB and channels."""
    if "S" in axes and shape[axes.index("S")] > 1:
        raise InputError(f"{path} is an RGB/colour image; give grey-scale counts (one channel)")
    if "C" in axes and shape[axes.index("C")] > 1:
        raise InputError(f"{path} has {shape[axes.index('C')]} channels, not a time series; "
                         "split the channels and give one")
    if not axes.endswith("YX"):
        raise InputError(f"{path}: data with axes {axes!r} {tuple(shape)} is not an image or "
                         "a series of images")
    return int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1


def _open_tiff(path: Path):
    import tifffile

    from .tiffcheck import check_tiff_pages

    whole, declared_pages = check_tiff_pages(path)  # before tifffile parses any page
    if declared_pages - whole > 1:  # a cut file loses its last page; more is damage
        raise InputError(f"{path} is damaged: {declared_pages - whole} of its {declared_pages} "
                         "pages point past the end of the file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tif = tifffile.TiffFile(path)
    try:
        if not tif.series:
            raise InputError(f"{path} is unreadable or damaged (no image found in it)")
        if len(tif.series) > 1:
            shapes = {tuple(s.shape) for s in tif.series}
            if len(shapes) > 1:
                raise InputError(f"{path} holds pages of different shapes {sorted(shapes)[:3]}, "
                                 "not one series; split it into files of one shape")
            if len(shapes.pop()) == 2:  # one 2D series per page (tifffile, page by page)
                return _open_tiff_pages(path, tif)
        series = tif.series[0]
        page = series.pages[0] if len(series.pages) else tif.pages[0]
        if getattr(page, "photometric", None) is not None and int(page.photometric) in (2, 3, 6):
            raise InputError(f"{path} is an RGB/colour image; give grey-scale counts (one channel)")
        shape = tuple(int(n) for n in series.shape)
        axes = series.axes
        if len(shape) < 2:
            raise InputError(f"{path}: data of shape {shape} is not an image")
        n_frames = _frame_axes(path, axes, shape)
        frame_shape = shape[-2:]
        declared = (tif.imagej_metadata or {}).get("images", 1) if tif.is_imagej else 1
        check_shape(path, n_frames, frame_shape)
        dtype = np.dtype(series.dtype)
        if dtype.kind not in "uifb":
            raise InputError(f"{path}: pixel type {dtype} is not a real number; give counts")
        calib, calib_from = _tiff_calibration(tif, page)
        if isinstance(declared, int) and declared > n_frames:  # a cut ImageJ stack
            n_frames = declared
            read = _imagej_cut_reader(path, tif, page, declared, frame_shape)
        else:
            read = _tiff_reader(path, tif, series, n_frames, frame_shape)
    except BaseException:
        tif.close()
        raise
    return n_frames, frame_shape, calib, calib_from, read, tif.close


def _imagej_cut_reader(path: Path, tif, page, declared: int, frame_shape):
    """Frame reader of an ImageJ stack cut short, whose page table lost the later pages: its
    frames are contiguous from the first page's data (:func:`_contiguous_reader`)."""
    offset = int(page.dataoffsets[0]) if page.dataoffsets else None
    if offset is None or not page.is_contiguous or int(page.compression) != 1:
        raise InputError(f"{path} is truncated: ImageJ declares {declared} images, the file "
                         "holds fewer")
    return _contiguous_reader(path, tif, page.dtype, offset, declared, frame_shape)


def _contiguous_reader(path: Path, tif, dtype, offset: int, n_frames: int, frame_shape):
    """Memory-mapped reader of ``n_frames`` uncompressed frames stored one after the other
    from byte ``offset``. If the file is cut, the whole frames still in it are read and the
    others are missing frames (skipped with a reason, as the cut pages of any multi-page TIFF)."""
    dtype = np.dtype(dtype).newbyteorder(tif.byteorder)
    frame_bytes = int(np.prod(frame_shape)) * dtype.itemsize
    size = path.stat().st_size
    whole = min(n_frames, max(0, size - offset) // frame_bytes)
    if whole < 1:
        raise InputError(f"{path} is truncated: its header declares {n_frames} frame(s) of "
                         f"{frame_bytes} bytes from byte {offset}, the file has {size} bytes")
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(whole, *frame_shape))

    def read(i):
        if i >= whole:
            raise InputError(f"{path} frame {i} is missing (the file is cut after {whole} whole "
                             f"frames of the {n_frames} declared)")
        return np.array(mm[i])
    return read


def _open_tiff_pages(path: Path, tif):
    """A TIFF whose every page is its own 2D series of one shape: the pages are the frames."""
    try:
        first = tif.series[0]
        page = first.pages[0]
        if page is None or int(page.photometric) in (2, 3, 6) or "S" in first.axes:
            raise InputError(f"{path} is an RGB/colour image; give grey-scale counts (one channel)")
        dtype = np.dtype(first.dtype)
        if dtype.kind not in "uifb":
            raise InputError(f"{path}: pixel type {dtype} is not a real number; give counts")
        frame_shape = tuple(int(n) for n in first.shape)
        n_frames = len(tif.series)
        check_shape(path, n_frames, frame_shape)
        calib, calib_from = _tiff_calibration(tif, page)

        def read(i):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.asarray(tif.asarray(series=i)).reshape(frame_shape)
    except BaseException:
        tif.close()
        raise
    return n_frames, frame_shape, calib, calib_from, read, tif.close


def _tiff_reader(path: Path, tif, series, n_frames: int, frame_shape):
    """A function frame index → (H, W) array, reading one frame at a time where the layout allows."""
    pages = series.pages
    frame_bytes = int(np.prod(frame_shape)) * np.dtype(series.dtype).itemsize
    if n_frames == 1 or (len(pages) == n_frames and all_pages_2d(pages, frame_shape)):
        def read(i):
            page = pages[i]
            if page is None:
                raise InputError(f"{path} frame {i} is missing (truncated file)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if n_frames == 1:
                    data = tif.asarray(series=0)
                else:
                    data = page.asarray()
            return np.asarray(data).reshape(frame_shape)
        return read
    offset = series.dataoffset
    if offset is not None:  # contiguous, uncompressed: memory-map it (ImageJ hyperstacks)
        return _contiguous_reader(path, tif, series.dtype, offset, n_frames, frame_shape)
    if n_frames * frame_bytes > MAX_IN_MEMORY_BYTES:
        raise InputError(f"{path}: a compressed series of this layout is read whole and is too "
                         "large; save it as uncompressed multi-page TIFF")
    cache = {}

    def read_whole(i):
        if "data" not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache["data"] = np.asarray(tif.asarray(series=0)).reshape(n_frames, *frame_shape)
        return cache["data"][i]
    return read_whole


def all_pages_2d(pages, frame_shape) -> bool:
    """True when every page of a series is one (H, W) frame (checks the first and last)."""
    try:
        ends = [pages[0], pages[len(pages) - 1]]
    except Exception:
        return False
    return all(p is not None and tuple(p.shape)[-2:] == tuple(frame_shape)
               and int(np.prod(p.shape)) == int(np.prod(frame_shape)) for p in ends)


def _tiff_calibration(tif, page) -> tuple[float | None, str]:
    """Pixel size in Å from ImageJ unit + resolution, OME PhysicalSizeX, or resolution tags."""
    def from_resolution(unit_A: float) -> float | None:
        try:
            xres, yres = page.resolution
        except Exception:
            return None
        if not (xres and yres and math.isfinite(xres) and math.isfinite(yres)) or xres <= 0:
            return None
        if abs(xres - yres) > 0.01 * xres:
            raise InputError(f"{tif.filehandle.path}: non-square pixels "
                             f"({1 / xres:g} × {1 / yres:g} per unit); resample to square pixels")
        return unit_A / xres

    meta = tif.imagej_metadata if tif.is_imagej else None
    if meta and meta.get("unit"):
        unit_A = length_unit_to_A(str(meta["unit"]))
        if unit_A is not None:
            size = from_resolution(unit_A)
            if size is not None:
                return size, "ImageJ calibration"
    if tif.is_ome:
        size = _ome_pixel_size(tif.ome_metadata)
        if size is not None:
            return size, "OME PhysicalSizeX"
    try:
        unit = int(page.resolutionunit)
    except Exception:
        unit = 1
    if unit in _TIFF_RESUNIT_A:
        size = from_resolution(_TIFF_RESUNIT_A[unit])
        if size is not None:
            return size, "TIFF resolution tags"
    return None, ""


def _ome_pixel_size(xml: str | None) -> float | None:
    if not xml:
        return None
    m = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if not m:
        return None
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
    try:
        value = float(attrs["PhysicalSizeX"])
    except (KeyError, ValueError):
        return None
    unit_A = length_unit_to_A(attrs.get("PhysicalSizeXUnit", "µm"))
    if unit_A is None or not (math.isfinite(value) and value > 0):
        return None
    return value * unit_A


def _open_npy(path: Path):
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise InputError(f"{path} is not a plain NumPy array file ({reason(err)})") from None
    if not isinstance(data, np.ndarray):
        raise InputError(f"{path} is not a single NumPy array")
    if data.dtype.kind not in "uifb" or data.dtype.fields is not None:
        raise InputError(f"{path}: dtype {data.dtype} is not a real number; give counts")
    if data.ndim == 2:
        n_frames, shape = 1, data.shape
        read = lambda i: np.array(data)  # noqa: E731
    elif data.ndim == 3:
        if data.shape[-1] in (3, 4) and data.shape[0] > 4:
            raise InputError(f"{path}: array {data.shape} looks like an RGB image; give "
                             "grey-scale counts (H, W) or a series (N, H, W)")
        n_frames, shape = data.shape[0], data.shape[1:]
        read = lambda i: np.array(data[i])  # noqa: E731
    else:
        raise InputError(f"{path}: array of shape {data.shape} is not an image (H, W) or a "
                         "series (N, H, W)")
    return int(n_frames), tuple(int(n) for n in shape), None, "", read, None


def _open_vendor(path: Path, plugin: str):
    import importlib

    try:
        module = importlib.import_module(f"rsciio.{plugin}")
    except ImportError:
        raise InputError(f"reading {path.suffix} files needs rosettasciio: "
                         "pip install rosettasciio") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        signals = module.file_reader(str(path), lazy=True)
    images = []
    for sig in signals:
        axes = sig.get("axes", [])
        signal_axes = [a for a in axes if not a.get("navigate", False)]
        if len(signal_axes) == 2:
            images.append(sig)
    if not images:
        raise InputError(f"{path} holds no 2D image (spectra or other data only)")
    gain = _recorded_gain(signals)
    sig = images[0]
    data = sig["data"]
    axes = sorted(sig["axes"], key=lambda a: a.get("index_in_array", 0))
    nav = [a for a in axes if a.get("navigate", False)]
    if data.ndim != 2 + len(nav) or len(nav) > 1:
        raise InputError(f"{path}: data of shape {tuple(data.shape)} with {len(nav)} navigation "
                         "axes is not an image or a time series (4D-STEM?)")
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "uifb":
        raise InputError(f"{path}: pixel type {dtype} is not a real number; give counts")
    x_axis = axes[-1]
    unit_A = length_unit_to_A(str(x_axis.get("units", "")))
    scale = float(x_axis.get("scale", 1.0))
    calib = scale * unit_A if unit_A is not None and math.isfinite(scale) and scale > 0 else None
    if data.ndim == 2:
        n_frames = 1
        read = lambda i: np.asarray(data.compute() if hasattr(data, "compute") else data)  # noqa
    else:
        n_frames = int(data.shape[0])
        read = lambda i: np.asarray(data[i].compute() if hasattr(data, "compute") else data[i])  # noqa
    return (n_frames, tuple(int(n) for n in data.shape[-2:]), calib, f"{plugin} calibration", read,
            None, gain)


def file_counts_per_electron(path: str | Path) -> float | None:
    """The detector gain a file records, counts per electron, or None.

    Only rosettasciio's standard field ``Signal.Noise_properties.Variance_linear_model.gain_factor``
    of vendor files (DM, EMD, SER) is read, where a reader or acquisition software filled it in
    (variance = gain_factor · counts for Poisson counts: the gain). TIFF and ``.npy`` files carry
    none. The files checked in ``../shared/realdata`` carry none either, so in practice the gain
    comes from ``--counts-per-electron`` or from :mod:`ceriakeras.inference.detector`'s estimate.
    """
    path = Path(path)
    plugin = VENDOR_SUFFIXES.get(path.suffix.lower())
    if plugin is None:
        return None
    import importlib

    try:
        module = importlib.import_module(f"rsciio.{plugin}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signals = module.file_reader(str(path), lazy=True)
    except (ImportError, KeyError, IndexError, TypeError, ValueError):  # the file records no gain
        return None
    return _recorded_gain(signals)


def _recorded_gain(signals) -> float | None:
    """The gain (counts per electron) rosettasciio's ``signals`` of a file record, or None."""
    try:
        model = signals[0]["metadata"]["Signal"]["Noise_properties"]["Variance_linear_model"]
        gain = float(model["gain_factor"])
    except (KeyError, IndexError, TypeError, ValueError):  # the file records no gain
        return None
    return gain if math.isfinite(gain) and gain > 0 else None
