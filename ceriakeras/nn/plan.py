"""What ``train`` and ``export`` check before Keras loads: datasets, run folders, checkpoints, versions.

No module imported here imports TensorFlow, Keras or abTEM at module level, so the command line
calls this before TensorFlow loads (``tests/cli/test_cli.py`` checks that a refused command never
imports TensorFlow).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..config import ModelError
from ..io.files import check_out_dir, read_json
from ..modelcheck import check_keras_archive


def check_train(data_dir, run_dir, *, resume: bool = False, overwrite: bool = False,
                allow_data_change: bool = False, init_from=None) -> None:
    """What ``ceriakeras train`` checks before TensorFlow loads: every dataset's manifest (one
    folder or a list), that they agree (:func:`ceriakeras.data.records.read_manifests`), that the run
    folder can be started, resumed or overwritten as asked, on resume that the datasets
    include all of the run's (unless ``allow_data_change``), and that an ``init_from`` run has a
    checkpoint to start from.

    Under ``TF_CONFIG`` (several workers) an existing run folder is the chief's, so only
    ``--resume`` with nothing to resume is refused here.

    Raises
    ------
    DataError, ModelError
    """
    from ..data.records import compare_run_datasets, read_manifests

    if resume and overwrite:
        raise ModelError("pass either --resume or --overwrite, not both")
    if init_from is not None:
        if resume:
            raise ModelError("pass either --resume or --init-from, not both")
        if Path(init_from).resolve() == Path(run_dir).resolve():
            raise ModelError(f"--init-from {init_from} is --out itself; give the new run "
                             "another folder")
        if not (Path(init_from) / "checkpoints" / "last.keras").is_file():
            raise ModelError(f"--init-from {init_from} has no checkpoints/last.keras; name a "
                             "training run folder")
    run_dir = check_out_dir(run_dir)
    if init_from is not None:
        check_keras_archive(Path(init_from) / "checkpoints" / "last.keras",
                            what="--init-from checkpoint")
    if resume and (run_dir / "checkpoints" / "last.keras").is_file():
        check_keras_archive(run_dir / "checkpoints" / "last.keras", what="checkpoint to resume")
    manifests = read_manifests(data_dir)
    check_run_folder(run_dir, resume=resume, overwrite=overwrite,
                     shared="TF_CONFIG" in os.environ)
    if resume:
        record = run_dir / "dataset.json"
        if not allow_data_change and record.is_file():
            from ..data.records import as_data_dirs, data_change_message, manifest_sha256

            try:
                saved = read_json(record, error=ModelError)
            except ModelError:
                return  # the stage refuses it with its own message
            digests = [manifest_sha256(d) for d in as_data_dirs(data_dir)]
            _, removed = compare_run_datasets(saved, digests, manifests)
            if removed:
                raise ModelError(data_change_message(run_dir, saved, removed))


def check_run_folder(run_dir: Path, *, resume: bool, overwrite: bool,
                     shared: bool = False) -> bool:
    """Whether the run folder can be resumed, started or overwritten as asked; used by
    :func:`check_train` before TensorFlow loads and by the stage when it prepares the folder.

    ``shared``: the folder belongs to several workers (``TF_CONFIG``), so an existing one is the
    chief's and is not refused. Returns whether the folder exists with something in it.

    Raises
    ------
    ModelError
    """
    if resume and overwrite:
        raise ModelError("pass either --resume or --overwrite, not both")
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / "checkpoints" / "last.keras").is_file():
            fix = ("start it again with --overwrite instead of --resume" if exists
                   else "drop --resume to start a new run")
            raise ModelError(f"nothing to resume in {run_dir} (no checkpoints/last.keras); {fix}")
        return exists
    if shared or not exists:
        return exists
    if not overwrite:
        raise ModelError(f"run folder {run_dir} already exists; pass --resume to continue it "
                         "or --overwrite to start again")
    if not ((run_dir / "config.json").is_file() or (run_dir / "checkpoints").is_dir()):
        raise ModelError(f"{run_dir} is not empty and does not look like a training run; "
                         "refusing to overwrite it, choose another --out")
    return exists


def check_export(run_dir, out_dir, version: int | None = None, *, calibrate_on=None,
                 calibration_split: str = "validation", checkpoint="best") -> None:
    """What ``ceriakeras export`` checks before Keras loads: each run (one, or several for an
    ensemble) has its checkpoint, the members of an ensemble agree on pixel size, largest height,
    label radius and outputs (from their ``config.json`` and ``dataset.json``), the version is
    positive and not taken, and a calibration dataset is at the run's pixel size (Å) with a
    non-empty ``calibration_split``.

    Raises
    ------
    ModelError, DataError
    """
    from .export import (ensemble_info, ensemble_members, model_info, read_run_json,
                         run_checkpoint)
    from ..inference.served import new_version_folder

    run_dirs, checkpoints = ensemble_members(run_dir, checkpoint)
    out_dir = Path(out_dir)
    found = []
    for run, which in zip(run_dirs, checkpoints):
        if not run.is_dir():
            raise ModelError(f"run folder {run} does not exist: train one with "
                             f"`ceriakeras train --out {run}`")
        found.append(run_checkpoint(run, which))
    if len(run_dirs) > 1:  # the same refusal as export_run's, minutes earlier
        ensemble_info(run_dirs, [model_info(r, c) for r, c in zip(run_dirs, found)])
    run_dir = run_dirs[0]
    check_out_dir(out_dir)
    new_version_folder(out_dir, version)
    if calibrate_on is not None:
        model = read_run_json(run_dir / "config.json").get("model", {})
        pixel = model.get("pixel_size_A", read_run_json(run_dir / "dataset.json").get("pixel_size_A"))
        from ..evaluation.plan import check_calibration_data

        check_calibration_data(calibrate_on, None if pixel is None else float(pixel),
                               calibration_split)
    for run, found_checkpoint in zip(run_dirs, found):  # integrity last: arguments speak first
        check_finite_run(run, found_checkpoint)
        check_keras_archive(found_checkpoint)


def check_finite_run(run: Path, checkpoint: Path) -> None:
    """Refuse a run that never reached a finite validation loss (no best checkpoint, a NaN or
    infinite ``best_val_loss`` in ``state.json``): its weights are not a model.

    Raises
    ------
    ModelError
    """
    if checkpoint.name == "best.keras":
        return
    try:
        best = float(read_json(run / "state.json", error=ModelError)["best_val_loss"])
    except (ModelError, KeyError, TypeError, ValueError):
        return
    if not math.isfinite(best):
        raise ModelError(f"run {run} never reached a finite validation loss (best {best}); its "
                         "weights are not a model: train it again with a smaller learning_rate")
