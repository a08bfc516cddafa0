"""Which files in ``--out`` are ``analyze``'s, so earlier results are never overwritten.

:data:`OUTPUT_NAMES`, :data:`OUTPUT_GLOBS` and :data:`OUTPUT_FOLDERS` are a whitelist of every
file ``analyze`` writes (:mod:`ceriakeras.analysis.run`'s module doc): any of them present means
earlier results, refused without ``--overwrite`` (:func:`check_no_earlier_results`), except an
unfinished run's own files, which the same command resumes. Files of other programs in the
folder are neither counted nor touched. :func:`remove_stale_temporaries` deletes the temporary
files a killed run left behind (``.NAME.XXXX.tmp`` beside each output, written by
:func:`ceriakeras.io.files.atomic_path`), once this run holds the folder's lock.
"""

from __future__ import annotations

from pathlib import Path

from ..config import InputError

OUTPUT_NAMES = ("columns.csv", "frames.csv", "summary.json", "progress.json", "events.csv")
"""Tables and records in ``OUT`` itself."""
OUTPUT_GLOBS = ("*_movie.mp4", "*_series.png")
"""Per-series pictures in ``OUT`` (``<input>_movie.mp4``, ``<input>_series.png``)."""
OUTPUT_FOLDERS = {"overlays": "*.png", "xyz": "*.xyz", "tracking": "*"}
"""Sub-folders and the files ``analyze`` writes in them (``overlays/<input>_<frame>.png``,
``xyz/<input>_<frame>.xyz``)."""


def earlier_results(out_dir) -> list[Path]:
    """The files of :data:`OUTPUT_NAMES`, :data:`OUTPUT_GLOBS` and :data:`OUTPUT_FOLDERS` that
    exist in ``out_dir``, sorted (empty if the folder does not exist)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [out / name for name in OUTPUT_NAMES if (out / name).exists()]
    for pattern in OUTPUT_GLOBS:
        found += out.glob(pattern)
    for folder, pattern in OUTPUT_FOLDERS.items():
        if (out / folder).is_dir():
            found += (out / folder).glob(pattern)
    return sorted(found)


def check_no_earlier_results(out_dir, resumable: bool) -> None:
    """Refuse ``out_dir`` if it holds results of an earlier ``analyze``.

    Parameters
    ----------
    out_dir : path
    resumable : bool
        ``out_dir`` holds an unfinished run (``progress.json`` not complete,
        :func:`ceriakeras.analysis.run.unfinished_progress`): its files are the run's own and
        the same command resumes it, so they are allowed.

    Raises
    ------
    InputError
        Any whitelisted file is there (and the run is not resumable); the message names up to
        three of them.
    """
    if resumable:
        return
    found = earlier_results(out_dir)
    if found:
        from ..io.inputpaths import shown

        names = ", ".join(shown(p.relative_to(out_dir)) for p in found[:3])
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise InputError(f"{shown(out_dir)} already holds results of an earlier analysis "
                         f"({names}{more}): pass --overwrite or choose another --out")


def remove_stale_temporaries(out_dir) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files of ``analyze``'s outputs that a killed run left in
    ``out_dir``; return them. Call it only while holding the folder's lock
    (:func:`ceriakeras.io.outlock.locked_out_dir`): then no other run is writing them."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    stale = []
    for name in OUTPUT_NAMES:
        stale += out.glob(f".{name}.*.tmp")
    for pattern in OUTPUT_GLOBS:
        stale += out.glob(f".{pattern}.*.tmp")
    for folder, pattern in OUTPUT_FOLDERS.items():
        if (out / folder).is_dir():
            stale += (out / folder).glob(f".{pattern}.*.tmp")
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
