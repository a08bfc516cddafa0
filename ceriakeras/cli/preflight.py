"""Cheap checks of a command's arguments, paths and file headers, before TensorFlow loads.

Each ``check_*`` function refuses, with the same one-line :class:`~ceriakeras.config.CeriakerasError`
the stage itself would raise later, what can be seen without running anything heavy: missing or
unreadable inputs, damaged image headers, a pixel size the model cannot use, a missing model or
dataset, results already in ``--out``. They read only headers and JSON files (``io.open_series``,
``modelinfo``, ``records.read_manifest``), so bad input is refused in a fraction of a second
instead of after TensorFlow's import. The stages still check everything themselves: these
functions only move the refusal earlier, they never accept what a stage would refuse.

No module imported here imports TensorFlow, Keras or abTEM at module level
(``tests/test_cli.py`` checks that a refused command never imports TensorFlow).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..config import AnalyzeConfig, ConfigError, DataError, InputError, ModelError
from ..io.series import expand_inputs, open_series
from ..inference.resample import resample_factor
from ..inference.modelinfo import find_version, model_settings, read_info
from ..io.inputpaths import shown
from ..modelcheck import check_keras_archive, check_model_files


def model_version(model) -> tuple[Path, dict]:
    """The version folder and ``assets/ceriakeras.json`` of ``model`` (a path, or None for the
    shipped model), read as JSON without loading the graph.

    Raises
    ------
    ModelError
        The folder does not exist, holds no SavedModel, or its description is missing or invalid.
    """
    if model is None:
        from ..analysis.run import default_model_path

        path = default_model_path()
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"model {path} does not exist: pass --model saved_models/NAME")
    version = find_version(path)
    info = read_info(version)
    model_settings(info)
    return version, info


def _check_dataset(data_dir, split: str, pixel_size_A: float | None, what: str) -> dict:
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


def check_out_dir(out_dir) -> Path:
    """``out_dir`` as a Path, refused if it or a folder above it is a file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {shown(out_dir)} is a file: choose a folder")
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {shown(out_dir)} lies under the file {shown(parent)}: "
                                  "choose a folder")
            break
    return out_dir


def check_pixels(paths, pixel_size_A: float | None = None) -> None:
    """Refuse inputs whose pixels ``analyze`` would refuse after creating ``--out``: a single
    frame with NaN, infinite or negative counts (or all zero), or inputs none of whose frames is
    usable. Frames are read until the first usable one (usually one frame in all).

    Raises
    ------
    InputError
        The single frame's problem, or the first frame's problem when none is usable.
    """
    first_error = None
    single = len(paths) == 1
    for path in paths:
        with open_series(path, pixel_size_A) as series:
            single = single and series.n_frames == 1
            for frame in series.frames():
                if frame.error is None:
                    return
                first_error = first_error or frame.error
                if single:
                    raise InputError(frame.error)
    if first_error is not None:
        raise InputError(f"no frame could be analysed; first problem: {first_error}")


def check_analyze(inputs, out_dir, *, model=None, pixel_size_A: float | None = None,
                  config: AnalyzeConfig | None = None, overwrite: bool = False) -> list[Path]:
    """What ``ceriakeras analyze`` checks before the model loads.

    Every input exists and has a readable header and a pixel size (Å, ``pixel_size_A`` if
    given) the model can use (:func:`ceriakeras.inference.resample.resample_factor` against the model's
    ``pixel_size_A`` and the config's limits); the model exists and its files are whole
    (:func:`ceriakeras.modelcheck.check_model_files`); ``out_dir`` is not under a file and holds
    none of ``analyze``'s outputs (:mod:`ceriakeras.analysis.outguard`; unless ``overwrite``);
    the pixels are usable (:func:`check_pixels`). An unfinished run is left to
    :func:`ceriakeras.analysis.run.analyze` to resume or refuse.

    Returns
    -------
    list of Path
        The input files (folders expanded).

    Raises
    ------
    InputError, ModelError, ConfigError
    """
    config = config or AnalyzeConfig()
    config.validate()
    if pixel_size_A is not None and not 0 < pixel_size_A < float("inf"):
        raise InputError(f"--pixel-size {pixel_size_A} must be a positive pixel size in Å "
                         f"({config.min_pixel_size_A:g}–{config.max_pixel_size_A:g} Å)")
    paths = expand_inputs(inputs)
    version, info = model_version(model)
    model_px, _, _ = model_settings(info)
    series_given = False
    for path in paths:
        with open_series(path, pixel_size_A) as series:
            resample_factor(series.pixel_size_A, model_px, min_pixel_A=config.min_pixel_size_A,
                            max_pixel_A=config.max_pixel_size_A)
            series_given |= series.n_frames >= 2
    if config.movie and series_given:
        from ..analysis.pictures import check_movie_writer

        check_movie_writer()
    out_dir = check_out_dir(out_dir)
    if not overwrite:
        from ..analysis.outguard import check_no_earlier_results
        from ..analysis.run import unfinished_progress

        check_no_earlier_results(out_dir, resumable=unfinished_progress(out_dir) is not None)
    check_model_files(version, info)  # integrity last: the argument checks speak first
    check_pixels(paths, pixel_size_A)
    return paths


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
    _check_dataset(data_dir, split, model_px, "simulate the test data")
    out_dir = check_out_dir(out_dir)
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds an evaluation: pass --overwrite or choose "
                          "another --out")
    check_model_files(version, info)


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
    from ..nn.export import _checkpoint, _read_json, ensemble_info, ensemble_members, model_info
    from ..inference.modelinfo import new_version_folder

    run_dirs, checkpoints = ensemble_members(run_dir, checkpoint)
    out_dir = Path(out_dir)
    found = []
    for run, which in zip(run_dirs, checkpoints):
        if not run.is_dir():
            raise ModelError(f"run folder {run} does not exist: train one with "
                             f"`ceriakeras train --out {run}`")
        found.append(_checkpoint(run, which))
    if len(run_dirs) > 1:  # the same refusal as export_run's, minutes earlier
        ensemble_info(run_dirs, [model_info(r, c) for r, c in zip(run_dirs, found)])
    run_dir = run_dirs[0]
    check_out_dir(out_dir)
    new_version_folder(out_dir, version)
    if calibrate_on is not None:
        model = _read_json(run_dir / "config.json").get("model", {})
        pixel = model.get("pixel_size_A", _read_json(run_dir / "dataset.json").get("pixel_size_A"))
        check_calibration_data(calibrate_on, None if pixel is None else float(pixel),
                               calibration_split)
    for run, checkpoint in zip(run_dirs, found):  # integrity last: the argument checks speak first
        _check_finite_run(run, checkpoint)
        check_keras_archive(checkpoint)


def _check_finite_run(run: Path, checkpoint: Path) -> None:
    """Refuse a run that never reached a finite validation loss (no best checkpoint, a NaN or
    infinite ``best_val_loss`` in ``state.json``): its weights are not a model."""
    if checkpoint.name == "best.keras":
        return
    try:
        best = float(json.loads((run / "state.json").read_text(encoding="utf-8"))["best_val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not math.isfinite(best):
        raise ModelError(f"run {run} never reached a finite validation loss (best {best}); its "
                         "weights are not a model: train it again with a smaller learning_rate")


def check_calibration_data(datasets, pixel_size_A: float | None,
                           split: str = "validation") -> None:
    """Every calibration dataset (a path, ``PATH:SPLIT``, or a list of them;
    :func:`ceriakeras.evaluation.calibration.parse_dataset`) has a non-empty split and pixels the model can
    use: ``pixel_size_A`` (Å) or finer, down to 0.05 Å (they are resampled as ``analyze`` does).

    Raises
    ------
    DataError, ConfigError
    """
    from ..evaluation.calibration import dataset_factor, parse_dataset

    specs = [datasets] if isinstance(datasets, (str, Path, tuple)) else list(datasets)
    if not specs:
        raise ConfigError("no calibration dataset given: pass at least one folder")
    for spec in specs:
        path, which = parse_dataset(spec, split)
        if not Path(path).is_dir():
            raise DataError(f"calibration dataset {path} does not exist: simulate it with "
                            "`ceriakeras simulate`")
        manifest = _check_dataset(path, which, None, "calibrate on data")
        if pixel_size_A is not None:
            dataset_factor(path, float(manifest.get("pixel_size_A", pixel_size_A)), pixel_size_A)


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
    read_manifests(data_dir)
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / "checkpoints" / "last.keras").is_file():
            fix = ("start it again with --overwrite instead of --resume" if exists
                   else "drop --resume to start a new run")
            raise ModelError(f"nothing to resume in {run_dir} (no checkpoints/last.keras); {fix}")
        record = run_dir / "dataset.json"
        if not allow_data_change and record.is_file():
            from ..io.files import file_sha256
            from ..data.records import as_data_dirs, data_change_message

            try:
                saved = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return  # the stage refuses it with its own message
            digests = [file_sha256(Path(d) / "manifest.json") for d in as_data_dirs(data_dir)]
            _, removed = compare_run_datasets(saved, digests)
            if removed:
                raise ModelError(data_change_message(run_dir, saved, removed))
        return
    if "TF_CONFIG" in os.environ or not exists:
        return
    if not overwrite:
        raise ModelError(f"run folder {run_dir} already exists; pass --resume to continue it "
                         "or --overwrite to start again")
    if not ((run_dir / "config.json").is_file() or (run_dir / "checkpoints").is_dir()):
        raise ModelError(f"{run_dir} is not empty and does not look like a training run; "
                         "refusing to overwrite it, choose another --out")
