"""The tracks stage's probability log: ``OUT/tracking/probabilities.bin``.

While frames are analysed, each column's class probabilities are appended here in
``columns.csv``'s row order (:class:`ProbabilityLog`); :func:`read_probability_log` reads them
back for :func:`ceriakeras.analysis.tracking.write_tracks`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

LOG_NAME = "tracking/probabilities.bin"
"""The log, relative to the run's folder."""
_HEAD = struct.Struct("<qii")  # global frame, columns, classes


class ProbabilityLog:
    """``OUT/tracking/probabilities.bin``: per analysed frame, its columns' class probabilities
    (in ``columns.csv``'s row order), appended as frames are written.

    Opening it for a run that starts at global frame ``start`` drops the frames from ``start``
    on (a resumed run writes them again); ``start`` 0 empties it and removes ``events.csv``.
    """

    def __init__(self, out_dir, start: int):
        self.path = Path(out_dir) / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start == 0:
            (Path(out_dir) / "events.csv").unlink(missing_ok=True)
            self.path.write_bytes(b"")
        elif self.path.exists():
            keep = 0
            for g, _, _, end in _blocks(self.path):
                if g >= start:
                    break
                keep = end
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
        self.file = open(self.path, "ab")  # noqa: SIM115 -- open for the whole run, closed by close()

    def add(self, global_frame: int, probabilities: np.ndarray) -> None:
        """Append one frame's (N, K) class probabilities."""
        p = np.ascontiguousarray(probabilities, np.float32)
        p = p.reshape(len(p), -1) if p.ndim != 2 else p
        self.file.write(_HEAD.pack(int(global_frame), p.shape[0], p.shape[1]) + p.tobytes())

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _blocks(path: Path):
    """``(global frame, n, k, end offset)`` of each whole block of a probability log."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        pos = 0
        while pos + _HEAD.size <= size:
            fh.seek(pos)
            g, n, k = _HEAD.unpack(fh.read(_HEAD.size))
            end = pos + _HEAD.size + 4 * n * k
            if end > size:
                return
            yield g, n, k, end
            pos = end


def read_probability_log(path: Path):
    """Iterate ``(global frame, (n, k) float32)`` over a probability log (empty if absent)."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for g, n, k, end in _blocks(path):
            fh.seek(end - 4 * n * k)
            yield g, np.frombuffer(fh.read(4 * n * k), np.float32).reshape(n, k)
