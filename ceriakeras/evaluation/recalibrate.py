"""A copy of an exported model with its confidence calibration re-fitted (``ceriakeras calibrate``).

The graph and variables are copied unchanged; only ``assets/ceriakeras.json`` gets new
``confidence_calibration`` / ``confidence_calibration_tta`` tables
(:func:`ceriakeras.evaluation.calibration.fit_model_calibrations`) and ``recalibrated_from``. Useful to
calibrate a shipped model on data from one's own simulator, or on a mixture of datasets made
with other simulator settings than the training data (docs/model.md, "Calibration off the
training generator"). The source version is never modified, and no version is overwritten.

Imports ``calibration`` and the served model (:mod:`ceriakeras.inference.served`); not ``nn``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .calibration import DEFAULT_MAP, fit_model_calibrations
from ..config import ModelError
from ..inference.served import ASSET_NAME, find_version, new_version_folder, read_info


def target_version(model_dir, out_dir, version: int | None = None) -> tuple[Path, Path]:
    """``(source version folder, target version folder)``, checked without loading TensorFlow.

    Raises
    ------
    ModelError
        No model at ``model_dir``, a version below 1, or the target exists (never overwritten).
    """
    source = find_version(model_dir)
    read_info(source)
    return source, new_version_folder(out_dir, version)


def recalibrate(model_dir, out_dir, datasets, *, version: int | None = None,
                method: str = DEFAULT_MAP, max_images: int = 48, split: str = "validation",
                tta: bool = True, progress: bool = False) -> Path:
    """Write a copy of an exported model whose confidence calibration is fitted on ``datasets``.

    Parameters
    ----------
    model_dir : path
        ``saved_models/NAME`` (newest version) or a version folder.
    out_dir : path
        Model base folder of the copy; it goes in ``out_dir/<version>/``.
    datasets : sequence
        Calibration datasets at the model's pixel size, each ``PATH``, ``PATH:SPLIT`` or
        ``(PATH, SPLIT)`` (:func:`ceriakeras.evaluation.calibration.parse_dataset`); their columns are pooled.
    version : int, optional
        Version of the copy; default one more than the highest in ``out_dir``.
    method : str
        Calibration map (:data:`ceriakeras.evaluation.calibration.CALIBRATION_MAPS`).
    max_images, split : int, str
        Images per dataset, and the split of datasets given without one.
    tta : bool
        Also fit the test-time augmentation table (8× the prediction time); without it the
        source's TTA table is dropped (it would no longer match).
    progress : bool
        Progress bars.

    Returns
    -------
    Path
        The new version folder.

    Raises
    ------
    ModelError
        No model at ``model_dir``, or the target version exists.
    """
    from ..inference.served import DihedralAveraged, load_served_model
    from ..io.files import give_ordinary_permissions

    source, target = target_version(model_dir, out_dir, version)
    served = load_served_model(source)
    info = dict(served.info)
    specs = [datasets] if isinstance(datasets, (str, os.PathLike, tuple)) else list(datasets)
    fits = fit_model_calibrations(served.predict, DihedralAveraged(served).predict if tta else None,
                                  specs, info, method=method, max_images=max_images, split=split,
                                  progress=progress)
    info.pop("confidence_calibration_tta", None)
    info.update(fits)
    info["recalibrated_from"] = str(source)

    out_dir = target.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=out_dir))
    try:
        staged = tmp / "model"
        shutil.copytree(source, staged)
        asset = staged / "assets" / ASSET_NAME
        asset.unlink()  # a new file, never written through to the source
        asset.write_text(json.dumps(info, indent=2))
        if target.exists():  # appeared meanwhile
            raise ModelError(f"{target} already exists; choose another --version")
        give_ordinary_permissions(staged)
        os.rename(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
