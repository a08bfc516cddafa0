"""Reading TIFF / NumPy / vendor (DM, EMD, SER) image series with their pixel size, frame by frame (the
formats themselves: :mod:`ceriakeras.io.formats`)."""


from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import InputError
from .formats import (  # noqa: F401  (re-exported: the formats' names where they were)
    MAX_FRAME_SIDE_PX, MAX_IN_MEMORY_BYTES, MIN_FRAME_SIDE_PX, NUMPY_SUFFIXES, SUPPORTED_SUFFIXES,
    TIFF_SUFFIXES, VENDOR_SUFFIXES, all_pages_2d, check_shape, file_counts_per_electron,
    length_unit_to_A, open_file, reason,
)


@dataclass
class Frame:
    """One frame of an input: the image, or why it cannot be analysed.

    Attributes
    ----------
    source : str
        The input file as given.
    index : int
        0-based frame index in the file's series (0 for a single image).
    image : (H, W) float32 or None
        Counts (or any linear intensity ≥ 0); None when the frame is bad.
    error : str or None
        One line saying what is wrong with a bad frame.
    pixel_size_A : float or None
        Pixel size, Å, as its series resolved it (``--pixel-size`` or the file's calibration).
    counts_per_electron : float or None
        The detector gain the file states, counts per electron; None where it states none.
    dose_e_per_A2 : float or None
        The dose of the frame, e⁻/Å², where it is known (files do not state it: None).
    """

    source: str
    index: int
    image: np.ndarray | None
    error: str | None = None
    pixel_size_A: float | None = None
    counts_per_electron: float | None = None
    dose_e_per_A2: float | None = None


@dataclass
class ImageSeries:
    """An opened input: its frame count, frame shape and pixel size; frames are read on demand.

    Use :func:`open_series` to make one and :meth:`frames` to stream its frames (one in memory
    at a time, whatever the series length). Close it (or use ``with``) to release the file.
    """

    source: str
    n_frames: int
    shape: tuple[int, int]
    pixel_size_A: float
    pixel_size_from: str
    """Where the pixel size came from: ``'--pixel-size'`` or the file's calibration kind."""
    counts_per_electron: float | None = None
    """The detector gain the file's header states, counts per electron (None: it states none)."""
    _read: object = field(repr=False, default=None)
    _close: object = field(repr=False, default=None)

    def frames(self, start: int = 0, checked: bool = True) -> Iterator[Frame]:
        """Yield frames ``start, start + 1, …`` as :class:`Frame` (bad frames carry an error).

        ``checked=False``: each frame as the file holds it, without :func:`check_frame`'s
        conversion and checks (for a second read of frames that were checked once already).
        """
        known = {"pixel_size_A": self.pixel_size_A, "counts_per_electron": self.counts_per_electron}
        for i in range(start, self.n_frames):
            try:
                raw = self._read(i)
            except InputError as err:
                yield Frame(self.source, i, None, str(err), **known)
                continue
            except Exception as err:  # a damaged page inside a readable file
                yield Frame(self.source, i, None, f"{self.source} frame {i} is unreadable "
                            f"({reason(err)})", **known)
                continue
            if not checked:
                yield Frame(self.source, i, np.asarray(raw), **known)
                continue
            try:
                yield Frame(self.source, i, check_frame(raw, f"{self.source} frame {i}"), **known)
            except InputError as err:
                yield Frame(self.source, i, None, str(err), **known)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> "ImageSeries":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def expand_inputs(inputs) -> list[Path]:
    """Paths of the image files named by ``inputs`` (files as given; folders → their supported
    files, sorted), each file once (:func:`ceriakeras.io.inputpaths.find_inputs`).

    Raises
    ------
    InputError
        If a path does not exist or is not a regular file or folder (a FIFO, a symbolic-link
        loop), a folder holds no supported file, or a file type is unknown.
    """
    from .inputpaths import find_inputs

    return find_inputs(inputs, SUPPORTED_SUFFIXES).paths


def open_series(path: str | Path, pixel_size_A: float | None = None) -> ImageSeries:
    """Open an image or series, check its header and find its pixel size; frames are not read yet.

    Parameters
    ----------
    path : str or Path
        A TIFF (single page, multi-page series, ImageJ hyperstack, OME), ``.npy`` (``(H, W)`` or
        ``(N, H, W)``) or vendor file (DM3/DM4, Velox EMD, TIA SER; needs rosettasciio).
    pixel_size_A : float, optional
        Pixel size, Å; overrides the file's calibration. Needed when the file has none.

    Raises
    ------
    InputError
        Unreadable or truncated file, not a grey-scale image or series (RGB, multi-channel,
        4D-STEM), a declared size beyond :data:`MAX_FRAME_SIDE_PX`, or no pixel size.
    """
    path = Path(path)
    source = str(path)
    if pixel_size_A is not None:
        pixel_size_A = float(pixel_size_A)
        if not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise InputError(f"--pixel-size {pixel_size_A} Å must be a positive number of Å")
    opened = open_file(path)
    n_frames, shape, calib, calib_from, read, close, gain = opened
    try:
        check_shape(path, n_frames, shape)
        if pixel_size_A is not None:
            size, origin = pixel_size_A, "--pixel-size"
        elif calib is not None:
            size, origin = calib, calib_from
        else:
            raise InputError(f"{path} has no pixel size calibration: pass --pixel-size (Å)")
    except BaseException:
        if close is not None:
            close()
        raise
    return ImageSeries(source, n_frames, shape, float(size), origin, counts_per_electron=gain,
                       _read=read, _close=close)


def check_frame(image, where: str = "image") -> np.ndarray:
    """Return ``image`` as an (H, W) float32 array of counts, or raise :class:`InputError`.

    Refused: not 2D, complex, NaN or infinite pixels (also values beyond float32), negative
    counts, an all-zero frame.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise InputError(f"{where}: shape {image.shape} is not a 2D image")
    if image.dtype.kind not in "uifb":
        raise InputError(f"{where}: pixel type {image.dtype} is not a real number; give counts")
    with np.errstate(over="ignore", invalid="ignore"):
        out = image.astype(np.float32)
    if not np.isfinite(out).all():
        raise InputError(f"{where} has NaN or infinite pixels (or values beyond float32); "
                         "give finite counts")
    if out.min() < 0:
        raise InputError(f"{where} has negative counts (min {float(out.min()):g}); give raw "
                         "detector counts, not offset-subtracted values")
    if out.max() == 0:
        raise InputError(f"{where} is all zero (no signal)")
    return out
