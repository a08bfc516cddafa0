"""Reading an analysis's inputs: frames read and resampled to the model's pixel size, in batches;
read again, as the file holds them, for the tracks stage (:func:`series_counts`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..config import AnalyzeConfig, InputError
from ..inference.resample import resample_counts
from ..io.series import open_series


@dataclass
class Batch:
    """Consecutive frames of one input: ``frames`` is a list of ``(Frame, small)``, ``small`` the
    frame resampled to the model's pixel size (None for a bad frame)."""

    item: dict
    offset: int
    frames: list


def read_batches(plan: list, start: int, pixel_size_A, config: AnalyzeConfig, single: bool,
                 timings: dict) -> Iterator[Batch]:
    """Read and resample the frames from global frame ``start`` on, in batches (one input each)."""
    offset = 0
    for item in plan:
        n = item["n_frames"]
        if offset + n <= start:
            offset += n
            continue
        batch: list = []
        with open_series(item["path"], pixel_size_A) as series:
            frames = series.frames(max(0, start - offset))
            while True:
                t0 = time.perf_counter()
                frame = next(frames, None)
                timings["read"] += time.perf_counter() - t0
                if frame is not None:
                    if frame.error is not None and single:
                        raise InputError(frame.error)
                    t0 = time.perf_counter()
                    small = (None if frame.image is None
                             else resample_counts(frame.image, item["factor"]))
                    timings["resample"] += time.perf_counter() - t0
                    batch.append((frame, small))
                ready = sum(small is not None for _, small in batch)
                if batch and (frame is None or ready >= config.batch_size):
                    yield Batch(item, offset, batch)
                    batch = []
                if frame is None:
                    break
        offset += n


def series_counts(item: dict):
    """The frames of the series ``item['path']`` (a plan entry with ``pixel_size_A``) as
    ``(index, image)``, ``image`` in the file's counts (None for a frame that cannot be read):
    the ``frame_reader`` of :func:`ceriakeras.analysis.tracking.write_tracks` and what the
    stacked readings add up (:func:`ceriakeras.analysis.stacking.model_reader`)."""
    with open_series(item["path"], item["pixel_size_A"]) as series:
        for frame in series.frames(checked=False):  # checked in the frames' pass
            yield frame.index, frame.image


class FrameCursor:
    """A series' frames taken in increasing order (``frames``: an iterator of ``(index,
    image)`` or None): :meth:`get` skips to a frame, None where there is none; a source that
    cannot be read ends the frames, ``error`` says why."""

    def __init__(self, frames):
        self.frames, self.head, self.error = frames, None, None

    def get(self, index: int):
        while self.frames is not None and (self.head is None or self.head[0] < index):
            try:
                self.head = next(self.frames, None)
            except (InputError, OSError) as err:  # moved or damaged since the frames' pass
                self.head, self.error = None, str(err)
            if self.head is None:
                self.frames = None
        return self.head[1] if self.head is not None and self.head[0] == index else None

    def close(self):
        if self.frames is not None and hasattr(self.frames, "close"):
            self.frames.close()
        self.frames, self.head = None, None

