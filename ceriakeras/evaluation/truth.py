"""Labelled image files for ``evaluate --images … --truth truth.csv``: the truth table, the
per-image table (``images.csv``: dose, pixel size) and the plan that pairs each image with its truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..config import AnalyzeConfig, InputError

TRUTH_COLUMNS = ("file", "x_px", "y_px", "height")
"""Columns a truth table must have: the image file, a Ce column's centre in the image's own pixels
(pixel ``i``'s centre at ``i``) and its height (Ce atoms); one row per true column."""
IMAGE_TABLE_NAME = "images.csv"
"""The per-image table read from the truth table's folder: ``file``, ``dose`` (e⁻/Å² per image;
``dose_e_per_A2`` also accepted) and ``pixel_size_A`` (Å); other columns are ignored."""
ESTIMATED_DOSE_DIGITS = 2
"""A dose estimated from counts is rounded to this many significant digits to group images."""


def _read_csv_rows(path: Path, required: Sequence[str], what: str) -> list[dict]:
    """The rows of a CSV file as dicts, after checking that it has the ``required`` columns."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise InputError(f"{what} {path} lacks the column(s) {', '.join(missing)}: it needs "
                                 f"{', '.join(required)} (header line first)")
            reader.fieldnames = header
            return list(reader)
    except OSError as err:
        raise InputError(f"{what} {path} is unreadable ({err.strerror or err})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{what} {path} is not a text CSV file ({_short(err)})") from None


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:120] or type(err).__name__


def _number(text, path: Path, line: int, column: str, *, positive: bool = False,
            integer: bool = False, optional: bool = False) -> float | None:
    """One CSV cell as a finite number (checked), or None for an empty optional cell."""
    text = (text or "").strip()
    if optional and text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    bad = not math.isfinite(value) or (positive and value <= 0) or (integer and value != round(value))
    if bad:
        want = ("a whole number of Ce atoms ≥ 1" if integer else
                "a positive number" if positive else "a finite number")
        raise InputError(f"{path} line {line}: {column}={text!r} is not {want}; fix that row")
    return value


def read_truth(path: str | Path) -> dict[str, np.ndarray]:
    """The true Ce columns of each labelled image, from a truth table.

    Parameters
    ----------
    path : path
        CSV with the header ``file,x_px,y_px,height`` (:data:`TRUTH_COLUMNS`; other columns are
        ignored): one row per Ce column, its centre in the image's own pixels (x = column index,
        y = row index, pixel ``i``'s centre at ``i``), its height in Ce atoms (≥ 1).

    Returns
    -------
    dict
        ``file`` as written → ``(M, 3)`` float64 array ``x_px, y_px, height``.

    Raises
    ------
    InputError
        Unreadable file, a missing column, an empty file name, or a NaN, non-numeric, negative
        coordinate or non-integer height (the message names the line).
    """
    path = Path(path)
    rows = _read_csv_rows(path, TRUTH_COLUMNS, "truth table")
    truth: dict[str, list] = {}
    for line, row in enumerate(rows, start=2):
        name = (row.get("file") or "").strip()
        if not name:
            raise InputError(f"{path} line {line}: the file name is empty; fix that row")
        x = _number(row.get("x_px"), path, line, "x_px")
        y = _number(row.get("y_px"), path, line, "y_px")
        h = _number(row.get("height"), path, line, "height", positive=True, integer=True)
        truth.setdefault(name, []).append((x, y, h))
    if not truth:
        raise InputError(f"truth table {path} has no rows: one row per Ce column is needed")
    return {name: np.asarray(cols, np.float64).reshape(-1, 3) for name, cols in truth.items()}


def read_image_table(path: str | Path) -> dict[str, dict]:
    """Dose and pixel size of each labelled image, from an ``images.csv``.

    Parameters
    ----------
    path : path
        CSV with a ``file`` column and, optionally per row, ``dose`` (or ``dose_e_per_A2``;
        e⁻/Å² per image) and ``pixel_size_A`` (Å); an empty cell means unknown.

    Returns
    -------
    dict
        ``file`` → ``{"dose_e_per_A2": float | None, "pixel_size_A": float | None}``.

    Raises
    ------
    InputError
        Unreadable file, no ``file`` column, a file listed twice, or a value that is not a
        positive number.
    """
    path = Path(path)
    rows = _read_csv_rows(path, ("file",), "image table")
    dose_key = "dose_e_per_A2" if rows and "dose_e_per_A2" in rows[0] else "dose"
    table: dict[str, dict] = {}
    for line, row in enumerate(rows, start=2):
        name = (row.get("file") or "").strip()
        if not name:
            raise InputError(f"{path} line {line}: the file name is empty; fix that row")
        if name in table:
            raise InputError(f"{path} line {line}: {name} is listed twice; keep one row per image")
        table[name] = {
            "dose_e_per_A2": _number(row.get(dose_key), path, line, dose_key, positive=True,
                                     optional=True),
            "pixel_size_A": _number(row.get("pixel_size_A"), path, line, "pixel_size_A",
                                    positive=True, optional=True),
        }
    return table


def _name_index(names: Iterable[str], base: Path):
    """A lookup ``path -> entry`` of a truth or image table: the entry whose path relative to the
    table's folder ``base`` is this file, else the only entry with the same file name."""
    by_path, by_name = {}, {}
    for name in names:
        by_path[(base / name).resolve()] = name
        by_name.setdefault(Path(name).name, []).append(name)

    def lookup(path: Path) -> str | None:
        found = by_path.get(path.resolve())
        if found is None and len(by_name.get(path.name, ())) == 1:
            found = by_name[path.name][0]
        return found

    return lookup


def round_dose(dose_e_per_A2: float, digits: int = ESTIMATED_DOSE_DIGITS) -> float:
    """``dose_e_per_A2`` rounded to ``digits`` significant digits (to group estimated doses)."""
    if not dose_e_per_A2 > 0:
        return float(dose_e_per_A2)
    return float(f"{dose_e_per_A2:.{digits}g}")


def labelled_image_plan(paths: Sequence[Path], truth: dict[str, np.ndarray], truth_dir: Path,
                        table: dict[str, dict], *, pixel_size_A: float | None,
                        model_pixel_A: float, config: AnalyzeConfig) -> tuple[list[dict], list[str]]:
    """Check every labelled image's header, pixel size and truth before any model work.

    The pixel size of each file comes from its ``images.csv`` row, else ``pixel_size_A`` (the
    ``--pixel-size`` option: as in ``analyze``, it overrides the file's calibration), else the
    file's calibration; the dose from its ``images.csv`` row, else (later) from its counts.

    Returns
    -------
    plan : list of dict
        Per file: ``path``, ``source``, ``name`` (its truth entry), ``truth`` (M, 3),
        ``shape``, ``pixel_size_A``, ``pixel_size_from``, ``factor``, ``dose_e_per_A2`` (or None).
    unused : list of str
        Truth entries that name no given file (ignored).

    Raises
    ------
    InputError
        A file with no truth rows that ``images.csv`` does not list either (a labelled image
        with no columns must be listed there), a series of several frames, no pixel size, a
        pixel size the model cannot use, or true columns outside the image.
    """
    from ..io.series import open_series
    from ..inference.resample import resample_factor

    plan, used = [], {}
    truth_entry, table_entry = _name_index(truth, truth_dir), _name_index(table, truth_dir)
    for path in paths:
        name, row_name = truth_entry(path), table_entry(path)
        if (name or row_name) in used:
            raise InputError(f"{used[name or row_name]} and {path} both take the truth of "
                             f"{name or row_name}: give files with distinct names, or name them in "
                             "the truth table by their path relative to its folder")
        if name is None and row_name is None:
            raise InputError(f"{path} has no rows in the truth table (and is not listed in "
                             f"{IMAGE_TABLE_NAME} as an image without columns): label it or leave "
                             "it out of --images")
        row = table.get(row_name, {}) if row_name is not None else {}
        true_columns = truth[name] if name is not None else np.zeros((0, 3))
        used[name or row_name] = path
        csv_px = row.get("pixel_size_A")
        with open_series(path, csv_px if csv_px is not None else pixel_size_A) as series:
            if series.n_frames != 1:
                raise InputError(f"{path} holds {series.n_frames} frames; --images takes single "
                                 "labelled images (save each frame as its own file)")
            factor = resample_factor(series.pixel_size_A, model_pixel_A,
                                     min_pixel_A=config.min_pixel_size_A,
                                     max_pixel_A=config.max_pixel_size_A)
            h, w = series.shape
            origin = (f"{IMAGE_TABLE_NAME}" if csv_px is not None else series.pixel_size_from)
            if len(true_columns):
                x, y = true_columns[:, 0], true_columns[:, 1]
                if x.min() < -0.5 or y.min() < -0.5 or x.max() > w - 0.5 or y.max() > h - 0.5:
                    raise InputError(f"the truth table puts columns of {path} outside its {w}×{h} px "
                                     "image: are x_px, y_px in this image's own pixels?")
            plan.append({"path": path, "source": series.source, "name": name or row_name,
                         "truth": true_columns, "shape": (h, w),
                         "pixel_size_A": series.pixel_size_A, "pixel_size_from": origin,
                         "factor": factor, "dose_e_per_A2": row.get("dose_e_per_A2")})
    unused = sorted(set(truth) - set(used))
    return plan, unused
