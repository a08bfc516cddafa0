"""Reading an analysis's inputs: frames read and resampled to the model's pixel size, in batches."""

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
