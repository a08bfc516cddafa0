"""What a stage that reads a dataset checks first, from its ``manifest.json`` alone (no TensorFlow).

No module imported here imports TensorFlow, Keras or abTEM at module level, so the command line
calls this before TensorFlow loads (``tests/cli/test_cli.py`` checks that a refused command never
imports TensorFlow).
"""

from __future__ import annotations

import math

from ..config import DataError


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
