"""What a stage that reads a dataset checks first, from its ``manifest.json`` alone (no TensorFlow).

No module imported here imports TensorFlow, Keras or abTEM at module level, so the command line
calls this before TensorFlow loads (``tests/cli/test_cli.py`` checks that a refused command never
imports TensorFlow).
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ConfigError, DataError
from .records import MAX_COUNT, MAX_COUNT_WHY, MAX_SHARDS, MAX_SHARDS_WHY


def check_dataset(data_dir, split: str, pixel_size_A: float | None, what: str) -> dict:
    """The dataset's manifest, refused if it is missing, ``split`` is empty or its pixel size is
    not ``pixel_size_A`` (Å; None = any)."""
    from ..data.records import read_manifest

    manifest = read_manifest(data_dir)
    if pixel_size_A is not None:
        data_px = float(manifest.get("pixel_size_A", pixel_size_A))
        if not math.isclose(data_px, pixel_size_A, rel_tol=1e-4):
            raise DataError(
                f"{data_dir} has {data_px:g} Å pixels but the model works at {pixel_size_A:g} Å: "
                f"{what} at the model's pixel size (--pixel-size of `ceriakeras simulate`)")
    if int(manifest["counts"].get(split, 0)) < 1:
        raise DataError(f"the {split} split of {data_dir} is empty: simulate more particles")
    return manifest


def check_write_arguments(count, shards, workers, seed, preview) -> None:
    """Refuse counts that are not whole numbers in range (one-line :class:`ConfigError`)."""
    for name, value, lo in (("count", count, 1), ("shards", shards, 1), ("workers", workers, 1),
                            ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ConfigError(f"{name}={value!r} must be an integer ≥ {lo}")
    for name, value, hi, why in (("count", count, MAX_COUNT, MAX_COUNT_WHY),
                                 ("shards", shards, MAX_SHARDS, MAX_SHARDS_WHY)):
        if value > hi:
            raise ConfigError(f"{name}={value} is more than {hi:,}: {why}")
    if preview < 0:
        raise ConfigError(f"preview={preview} must be ≥ 0")
