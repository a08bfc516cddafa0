"""Resuming ``analyze``: ``progress.json``, recovering ``columns.csv`` to whole frames, clearing outputs.

``OUT/progress.json`` records, after each batch, how many frames (in input order) are done and
how long ``columns.csv`` is at that point, so an interrupted run resumes where it stopped: each
frame ends up in the CSV exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

from ..config import InputError
from ..io.files import atomic_path, read_json

PROGRESS_VERSION = 1
"""Version of ``progress.json``'s layout."""
OUTPUT_NAMES = ("columns.csv", "frames.csv", "progress.json", "summary.json", "events.csv")
"""Files of ``OUT`` that ``--overwrite`` removes."""
OUTPUT_DIRS = ("overlays", "xyz", "tracking")
"""Folders of ``OUT`` that ``--overwrite`` removes."""


class ProgressJson:
    """``progress.json``'s text, as ``json.dumps(state, indent=1)`` writes it, with each frame's
    entry (``state["frames"][k]``, ``state["optics"][source][k]``) serialized once.

    The state is written after every batch and holds an entry per frame: dumped whole each time
    (by the pure-Python encoder that ``indent`` takes), a 10 000-frame run spent about 0.2 s a
    batch and a few MB of short-lived strings on it. An entry is not changed once added (a new
    dict replaces it); the cache keeps its line of text, about 300 bytes a frame.
    """

    def __init__(self):
        self._lines: dict = {}

    def dumps(self, state: dict) -> str:
        """The text of ``state`` (a dict), identical to ``json.dumps(state, indent=1)``."""
        def top(key, value):
            if key == "frames" and isinstance(value, dict):
                return _dict_text(value, 1, lambda k, v: self._line(("frames", k), k, v, 2))
            if key == "optics" and isinstance(value, dict) and all(
                    isinstance(v, dict) for v in value.values()):
                return _dict_text(value, 1, lambda source, per_frame: _line(source, _dict_text(
                    per_frame, 2, lambda k, v: self._line(("optics", source, k), k, v, 3))))
            return _value_text(value, 1)
        try:
            return _dict_text(state, 0, lambda k, v: _line(k, top(k, v)))
        except TypeError:  # a key that is not a str: JSON's own conversion (or its error)
            return json.dumps(state, indent=1)

    def _line(self, cache_key: tuple, key: str, value, level: int) -> str:
        hit = self._lines.get(cache_key)
        if hit is None or hit[0] is not value:
            hit = self._lines[cache_key] = (value, _line(key, _value_text(value, level)))
        return hit[1]


def _line(key: str, text: str) -> str:
    """``"key": text``; a key that is not a str is a TypeError (JSON would convert it)."""
    if type(key) is not str:
        raise TypeError(f"not a str key: {key!r}")
    return json.dumps(key) + ": " + text


def _value_text(value, level: int) -> str:
    """``value`` as ``json.dumps(..., indent=1)`` writes it nested ``level`` deep."""
    return json.dumps(value, indent=1).replace("\n", "\n" + " " * level)


def _dict_text(d: dict, level: int, line_of) -> str:
    """A dict nested ``level`` deep as ``json.dumps(..., indent=1)`` writes it, its items'
    lines from ``line_of(key, value)``."""
    if not d:
        return "{}"
    pad = ",\n" + " " * (level + 1)
    return ("{\n" + " " * (level + 1) + pad.join([line_of(k, v) for k, v in d.items()])
            + "\n" + " " * level + "}")


def read_progress(progress_path: Path) -> dict:
    """``progress.json`` as a dict.

    Raises
    ------
    InputError
        If it is missing, unreadable or not a JSON object.
    """
    return read_json(progress_path, error=InputError, advice="use --overwrite or another --out")


def unfinished_progress(out_dir) -> dict | None:
    """The ``progress.json`` of an unfinished analysis in ``out_dir`` (None if there is none),
    with ``frames_done``, ``csv_bytes``, ``complete`` and ``skipped`` checked.

    Raises
    ------
    InputError
        ``columns.csv`` without ``progress.json`` (another run), an unreadable ``progress.json``,
        or a finished analysis: results are not overwritten without ``--overwrite``.
    """
    out_dir = Path(out_dir)
    csv_path, progress_path = out_dir / "columns.csv", out_dir / "progress.json"
    if not (progress_path.exists() or csv_path.exists()):
        return None
    if not progress_path.exists():
        raise InputError(f"{out_dir} already holds columns.csv from another run: use "
                         "--overwrite or another --out")
    unreadable = InputError(f"{progress_path} is unreadable: use --overwrite or another --out")
    progress = read_progress(progress_path)
    try:
        complete = bool(progress["complete"])
    except (KeyError, TypeError):
        raise unreadable from None
    if complete:
        raise InputError(f"{out_dir} already holds a finished analysis: use --overwrite "
                         "or another --out")
    try:
        int(progress["frames_done"]), int(progress["csv_bytes"]), list(progress["skipped"])
    except (ValueError, KeyError, TypeError):
        raise unreadable from None
    return progress


def prepare_out_dir(out_dir: Path, header: bytes, identity: dict, overwrite: bool,
                     plan: list) -> tuple[int, list]:
    """Clear, check or recover ``out_dir``; return (first global frame to do, skipped so far)."""
    csv_path = out_dir / "columns.csv"
    if overwrite:
        remove_outputs(out_dir)
    elif (progress := unfinished_progress(out_dir)) is not None:
        done, committed = int(progress["frames_done"]), int(progress["csv_bytes"])
        skipped = list(progress["skipped"])
        if progress.get("identity") != json.loads(json.dumps(identity)):
            raise InputError(f"{out_dir} holds an unfinished run with other inputs, model or "
                             "settings: rerun it the same way, or use --overwrite or another --out")
        if csv_path.exists():
            start = _recover_csv(csv_path, header, done, committed, plan)
            return start, [s for s in skipped if _global_index(plan, s) < start]
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(csv_path) as tmp:
        tmp.write_bytes(header)
    return 0, []


def _global_index(plan: list, entry: dict) -> int:
    offset = 0
    for item in plan:
        if item["source"] == entry["source"]:
            return offset + int(entry["frame"])
        offset += item["n_frames"]
    return -1


def _recover_csv(csv_path: Path, header: bytes, done: int, committed: int, plan: list) -> int:
    """Cut ``columns.csv`` back to whole, committed frames; return the first frame to redo.

    Normally the CSV is at least as long as the last committed length: rows written after it
    (an unfinished batch, a half-written last line) are dropped. If the CSV is shorter (rows
    lost), the last frame it holds may be incomplete: its rows are dropped and the run restarts
    at that frame (earlier frames are whole, as rows are written in frame order).
    """
    size = csv_path.stat().st_size
    with open(csv_path, "rb") as fh:
        head = fh.read(len(header))
    if head != header:
        with atomic_path(csv_path) as tmp:
            tmp.write_bytes(header)
        return 0
    if size >= committed >= len(header):
        os.truncate(csv_path, committed)
        return done
    offsets, g = {}, 0
    for item in plan:
        offsets[item["source"]] = g
        g += item["n_frames"]
    data = csv_path.read_bytes()
    end = data.rfind(b"\n") + 1
    pos, last_g, last_start = len(header), None, len(header)
    for line in data[len(header):end].splitlines(keepends=True):
        try:
            source, frame = next(csv.reader([line.decode("utf-8", "surrogateescape")]))[:2]
            gi = offsets[source] + int(frame)
        except (ValueError, KeyError, StopIteration, UnicodeDecodeError):
            break
        if gi != last_g:
            last_g, last_start = gi, pos
        pos += len(line)
    os.truncate(csv_path, last_start)
    return 0 if last_g is None else min(last_g, done)


def remove_outputs(out_dir: Path) -> None:
    """Delete what an earlier analyze wrote in ``out_dir`` (only its own files)."""
    for name in OUTPUT_NAMES:
        (out_dir / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
    for png in out_dir.glob("*_series.png"):
        png.unlink()
    for movie in out_dir.glob("*_movie.mp4"):
        movie.unlink()


def earlier_frames(progress_path: Path) -> dict:
    """Per-frame dose and recognition of an earlier run (``progress.json``'s ``frames``), or {}."""
    try:
        frames = read_progress(progress_path).get("frames", {})
    except InputError:
        return {}
    return dict(frames) if isinstance(frames, dict) else {}


def previous_optics(progress_path: Path) -> dict:
    """The per-frame optics estimates a resumed run had committed (``{source: {frame: {…}}}``)."""
    try:
        return dict(read_progress(progress_path).get("optics") or {})
    except (InputError, TypeError, ValueError):
        return {}
