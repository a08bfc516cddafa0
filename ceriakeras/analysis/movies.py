"""A series' annotated movie: every frame as :func:`.pictures.render_frame` draws it, in an MP4.

:class:`MovieWriter` streams pictures into an H.264 MP4 through PyAV (FFmpeg's libraries inside
the wheel; no ``ffmpeg`` program is needed), one frame in memory at a time; :func:`write_movie`
reads a series from its file again and draws every frame, its columns coloured by height and
each change of height marked while it happens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..io.files import atomic_path
from ..io.series import open_series
from ..noise import estimate_dose
from .pictures import frame_caption, particle_box, render_frame, union_box

MOVIE_FPS = 10
"""Frames per second of the movie."""


def check_movie_writer() -> None:
    """Raise ``ConfigError`` (what to do) if PyAV, which writes the movies, is not installed."""
    import importlib.util

    if importlib.util.find_spec("av") is None:
        raise ConfigError("the movie of a series needs PyAV: `pip install av` (a dependency of "
                          "ceriakeras; reinstall it), or pass --no-movie")


class MovieWriter:
    """Stream pictures into an H.264 MP4 (PyAV), written under a temporary name and renamed.

    All pictures must have the size of the first. Use as a context manager::

        with MovieWriter("OUT/series_movie.mp4") as movie:
            for picture in pictures:
                movie.add(picture)

    Parameters
    ----------
    path : path
        The MP4 file.
    fps : float
        Movie frames per second.
    crf : int
        x264 quality (lower = better and larger; 18–23 looks clean on noisy frames). The
        "superfast" preset: 10 ms per 600² frame on one core, about 60 kB per frame.
    """

    def __init__(self, path, fps: float = MOVIE_FPS, crf: int = 22):
        self.path, self.fps, self.crf = Path(path), fps, crf
        self._container = self._stream = self._ctx = self._tmp = None
        self.frames = 0

    def __enter__(self) -> MovieWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        return self

    def add(self, picture: np.ndarray) -> None:
        """Append one (h, w, 3) uint8 picture (h, w even)."""
        import av

        if self._container is None:
            h, w = picture.shape[:2]
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
            stream = self._container.add_stream("libx264", rate=int(round(self.fps)))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(self.crf), "preset": "superfast"}
            self._stream = stream
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._container is not None:
                if exc_type is None:
                    for packet in self._stream.encode():
                        self._container.mux(packet)
                self._container.close()
        except BaseException as err:
            self._ctx.__exit__(type(err), err, err.__traceback__)  # removes the temporary file
            raise
        if exc_type is None and self.frames == 0:  # nothing to show: no file
            self._ctx.__exit__(ValueError, ValueError("no frames"), None)
            return False
        return self._ctx.__exit__(exc_type, exc, tb)


def write_movie(path: Path, item: dict, pixel_size_A, positions: dict, max_height: int,
                dose_of=None, recognised_of=None, marks_of=None) -> int:
    """The annotated movie of one series: every analysed frame, read again from its file.

    Each frame is cropped to the same box (the union of the frames' particle boxes), its columns
    drawn as rings coloured by height, captioned with the frame number, the dose and the number
    of columns (:func:`ceriakeras.analysis.pictures.render_frame`), each change of height marked
    where and while it happens, and streamed into an MP4.

    Parameters
    ----------
    path : Path
        The ``.mp4`` file.
    item : dict
        The input (``path``, ``source``, ``n_frames``, ``shape``, ``pixel_size_A``).
    pixel_size_A : float or None
        The ``--pixel-size`` override, as the run was given it.
    positions : dict
        ``{frame: (x_px (N,), y_px (N,), height (N,))}`` of the analysed frames that have
        columns (frames.csv's frames without columns are drawn without rings).
    max_height : int
        The model's largest height, Ce atoms (the legend).
    dose_of : callable, optional
        ``dose_of(frame_index, image (H, W) counts) -> e⁻/Å²``, the dose in the caption;
        default :func:`ceriakeras.noise.estimate_dose` of the image at the input's pixel size.
    recognised_of : callable, optional
        ``recognised_of(frame_index) -> bool or None``; False adds "NOT RECOGNISED" to the
        caption (:func:`ceriakeras.inference.recognise.recognise_frame`).
    marks_of : callable, optional
        ``marks_of(frame_index) -> [(x_px, y_px, "3→4"), …] or None``: the changes of height to
        point out in that frame, each marked on the picture and named in the caption (tracks:
        :func:`ceriakeras.analysis.tracking.event_marks`).

    Returns
    -------
    int
        Frames in the movie.
    """
    px = item["pixel_size_A"]
    if dose_of is None:
        def dose_of(index, image):
            return estimate_dose(image, px)
    shape = tuple(item["shape"])
    box = union_box(particle_box(x, y, shape, px) for x, y, _ in positions.values())
    empty = (np.zeros(0), np.zeros(0), np.zeros(0, np.int32))
    with MovieWriter(path) as movie, open_series(item["path"], pixel_size_A) as series:
        for frame in series.frames():
            if frame.image is None:
                continue
            x, y, h = positions.get(frame.index, empty)
            text = frame_caption(item, frame.index, dose_of(frame.index, frame.image), len(x),
                                 recognised_of(frame.index) if recognised_of else None)
            marks = (marks_of(frame.index) if marks_of is not None else None) or []
            if marks:
                text += "   change " + ", ".join(label for *_, label in marks) + " Ce"
            movie.add(render_frame(frame.image, x, y, h, pixel_size_A=px, max_height=max_height,
                                   box=box or (0, shape[0], 0, shape[1]), caption=text,
                                   marks=marks))
    return movie.frames
