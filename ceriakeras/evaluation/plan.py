"""What ``evaluate`` and a calibration check before the model loads: model, datasets, ``--out``.

No module imported here imports TensorFlow, Keras or abTEM at module level, so the command line
calls this before TensorFlow loads (``tests/cli/test_cli.py`` checks that a refused command never
imports TensorFlow).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError, DataError, InputError
from ..data.plan import check_dataset
from ..inference.resample import resample_factor
from ..inference.served import model_settings, model_version
from ..io.files import check_out_dir
from ..modelcheck import check_model_files


def check_evaluate(model, data_dir, out_dir, *, split: str = "test",
                   overwrite: bool = False) -> None:
    """What ``ceriakeras evaluate`` checks before the model loads: the model and the dataset
    exist, the dataset is at the model's pixel size (Å) and its ``split`` is not empty, and
    ``out_dir`` holds no earlier evaluation (unless ``overwrite``).

    Raises
    ------
    ModelError, DataError, ConfigError
    """
    version, info = model_version(model)
    model_px, _, _ = model_settings(info)
    check_dataset(data_dir, split, model_px, "simulate the test data")
    out_dir = check_out_dir(out_dir)
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds an evaluation: pass --overwrite or choose "
                          "another --out")
    check_model_files(version, info)  # integrity last: the argument checks speak first


def check_calibration_data(datasets, pixel_size_A: float | None,
                           split: str = "validation") -> None:
    """Every calibration dataset (a path, ``PATH:SPLIT``, or a list of them;
    :func:`parse_dataset`) has a non-empty split and pixels the model can
    use: ``pixel_size_A`` (Å) or finer, down to 0.05 Å (they are resampled as ``analyze`` does).

    Raises
    ------
    DataError, ConfigError
    """
    specs = [datasets] if isinstance(datasets, (str, Path, tuple)) else list(datasets)
    if not specs:
        raise ConfigError("no calibration dataset given: pass at least one folder")
    for spec in specs:
        path, which = parse_dataset(spec, split)
        if not Path(path).is_dir():
            raise DataError(f"calibration dataset {path} does not exist: simulate it with "
                            "`ceriakeras simulate`")
        manifest = check_dataset(path, which, None, "calibrate on data")
        if pixel_size_A is not None:
            dataset_factor(path, float(manifest.get("pixel_size_A", pixel_size_A)), pixel_size_A)


CALIBRATION_SPLITS = ("train", "validation", "test")
"""Splits a calibration dataset spec ``PATH:SPLIT`` may name."""


def parse_dataset(spec: str | os.PathLike | tuple, split: str = "validation") -> tuple[str, str]:
    """``(folder, split)`` of a calibration dataset given as ``PATH``, ``PATH:SPLIT`` or a pair.

    A suffix ``:train``, ``:validation`` or ``:test`` names the split; anything else is part of
    the path and the split is ``split``.
    """
    if isinstance(spec, tuple):
        path, which = spec
        return str(path), str(which)
    text = os.fspath(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head and tail in CALIBRATION_SPLITS:
        return head, tail
    return text, split


def dataset_factor(data_dir, data_pixel_A: float, model_pixel_A: float) -> float:
    """``model pixel / dataset pixel`` (≥ 1) of a calibration dataset.

    Raises
    ------
    DataError
        If the dataset's pixels are coarser than the model's or finer than 0.05 Å.
    """
    try:
        return resample_factor(data_pixel_A, model_pixel_A)
    except InputError:
        raise DataError(
            f"{data_dir} has {data_pixel_A:g} Å pixels but the model works at {model_pixel_A:g} Å: "
            "calibrate on data at the model's pixel size or finer, down to 0.05 Å (--pixel-size "
            "of `ceriakeras simulate`)") from None
