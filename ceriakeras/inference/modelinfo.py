"""What an exported model is, read from its ``assets/ceriakeras.json`` alone (JSON, no TensorFlow).

A SavedModel version folder ``saved_models/NAME/VERSION/`` holds the graph and, in
``assets/ceriakeras.json``, what every consumer needs to know before running it: the pixel size
it works at (Å), its largest height class (Ce atoms), the label radius (Å), the confidence
calibration. These functions find the version and read that file without loading the graph, so
the command line can check an input against the model before TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import DEFAULT_COLUMN_THRESHOLD, AnalyzeConfig, ModelError

ASSET_NAME = "ceriakeras.json"
"""File name of the model's description in its ``assets/`` folder."""


def find_version(path) -> Path:
    """The SavedModel folder for ``path``: a version folder, or the newest integer version in a
    model base folder ``saved_models/NAME``.

    Raises
    ------
    ModelError
        If there is no SavedModel there.
    """
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    versions = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()
                       and (p / "saved_model.pb").is_file()) if path.is_dir() else [])
    if not versions:
        raise ModelError(f"no SavedModel at {path}; export one with "
                         f"`ceriakeras export --run runs/NAME --out {path}`")
    return path / str(versions[-1])


def new_version_folder(out_dir, version: int | None = None) -> Path:
    """The folder ``out_dir/<version>`` a new model version is written to, checked without
    loading TensorFlow: ``version`` defaults to the next free integer; versions are never
    overwritten.

    Raises
    ------
    ModelError
        A version below 1, or one that exists already.
    """
    out_dir = Path(out_dir)
    if version is None:
        taken = [int(p.name) for p in out_dir.iterdir() if p.name.isdigit()] if out_dir.is_dir() else []
        version = max(taken, default=0) + 1
    if int(version) < 1:
        raise ModelError(f"--version {version} must be a positive integer")
    target = out_dir / str(int(version))
    if target.exists():
        raise ModelError(f"{target} already exists; versions are never overwritten, choose "
                         "another --version or leave it out for the next free one")
    return target


def read_info(version_dir) -> dict:
    """The ``assets/ceriakeras.json`` of a SavedModel version folder (pixel size, max_height, …).

    Raises
    ------
    ModelError
        If it is missing or unreadable.
    """
    info_path = Path(version_dir) / "assets" / ASSET_NAME
    if not info_path.is_file():
        raise ModelError(f"{version_dir} has no assets/{ASSET_NAME}; re-export it with "
                         "`ceriakeras export`")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {info_path}: {err}; re-export the model") from None
    if not isinstance(info, dict):
        raise ModelError(f"{info_path} is not a JSON object; re-export the model")
    return info


def model_settings(info: dict) -> tuple[float, int, float]:
    """``(pixel_size_A, max_height, label_radius_A)`` from a model's ``ceriakeras.json``.

    Returns
    -------
    pixel_size_A : float
        Pixel size the model works at, Å.
    max_height : int
        Largest height class, Ce atoms (default 16 for models that do not say).
    label_radius_A : float
        Radius of the label disk, Å (default 0.5).

    Raises
    ------
    ModelError
        If a value is missing or invalid (the model must be re-exported).
    """
    try:
        pixel = float(info["pixel_size_A"])
        max_height = int(info.get("max_height", 16))
        radius = float(info.get("label_radius_A", 0.5))
    except (KeyError, TypeError, ValueError):
        raise ModelError("the model's ceriakeras.json lacks pixel_size_A (Å); re-export it") from None
    if not (pixel > 0 and max_height >= 1 and radius > 0):
        raise ModelError(f"the model's ceriakeras.json has an invalid pixel_size_A={pixel} Å, "
                         f"max_height={max_height} or label_radius_A={radius} Å; re-export it")
    return pixel, max_height, radius


def with_model_threshold(config: AnalyzeConfig, info: dict) -> AnalyzeConfig:
    """``config`` with its column threshold made concrete.

    A threshold set in ``config`` wins; otherwise the model's own ``column_threshold`` (recorded
    by ``ceriakeras export --column-threshold``, chosen on our own validation data with
    ``scripts/studies/threshold_study.py``), else :data:`ceriakeras.config.DEFAULT_COLUMN_THRESHOLD`.

    Raises
    ------
    ModelError
        If the model's ``column_threshold`` is not a number in (0, 1).
    """
    if config.threshold is not None:
        return config
    value = info.get("column_threshold", DEFAULT_COLUMN_THRESHOLD)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise ModelError(f"the model's ceriakeras.json has column_threshold="
                         f"{info.get('column_threshold')!r}, not in (0, 1); re-export it")
    return dataclasses.replace(config, threshold=value)
