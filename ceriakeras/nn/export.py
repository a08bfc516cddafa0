"""SavedModel export for TF Serving (``saved_models/NAME/VERSION/``) and loading it back.

The SavedModel has one signature, ``serving_default``::

    inputs:  image          float32 [batch, H, W, 1]   raw counts or any linear intensity
    outputs: probabilities  float32 [batch, H, W, max_height + 1]
             height         int32   [batch, H, W]      most probable height, Ce atoms
    and, for models with a global branch (version 3 on; an additive change):
             defocus_nm     float32 [batch]   estimated defocus of each frame, nm (abTEM sign)
             cs_um          float32 [batch]   estimated spherical aberration C30, µm
             max_column_height_atoms  float32 [batch]  estimated largest column height, Ce atoms

Normalization and padding live inside the graph, so clients send raw frames of any size.
``assets/ceriakeras.json`` tells every consumer what the model needs (pixel size, classes,
label radius) and where it came from (training manifest hash, or hashes ``manifest_sha256s`` of
every chunk it was trained on, validation metrics, versions).
The JSON file is placed in the SavedModel's ``assets/`` folder directly (it is read as a file,
not by the graph), so TF Serving and ``saved_model_cli`` ignore it and copy it along.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import ModelError
from ..io.files import give_ordinary_permissions, read_json
from ..inference.served import (ASSET_NAME, OPTICS_DESCRIPTIONS, DihedralAveraged, ServedModel,
                                new_version_folder)
from ..data.records import run_datasets


CHECKPOINTS = ("best", "last")
"""Which checkpoint of a run :func:`export_run` exports: the lowest validation loss, or the end."""


def run_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """The run's ``checkpoints/best.keras`` (else ``last.keras``), or with ``which='last'`` the
    checkpoint of its last finished epoch (``state.json``; else ``last.keras``)."""
    if which not in CHECKPOINTS:
        raise ModelError(f"checkpoint={which!r} must be one of {', '.join(CHECKPOINTS)}")
    names = ["best.keras", "last.keras"]
    if which == "last":
        names = ["last.keras"]
        try:
            names.insert(0, read_json(run_dir / "state.json", error=ModelError)["checkpoint"])
        except (ModelError, KeyError, TypeError):
            pass
    for name in names:
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    raise ModelError(f"{run_dir} has no checkpoints/{' or '.join(names)}; train it first "
                     f"(ceriakeras train --out {run_dir})")


def ensemble_members(run_dir, checkpoint="best") -> tuple[list[Path], list[str]]:
    """The run folders of an export and the checkpoint ('best' or 'last') of each.

    ``run_dir`` is one folder or a sequence of them; ``checkpoint`` one value for all or one per
    folder.

    Raises
    ------
    ModelError
        No run, or as many checkpoints as neither 1 nor the runs.
    """
    runs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    which = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    if not runs:
        raise ModelError("no run given: pass --run runs/NAME (repeat it for an ensemble)")
    if len(which) == 1:
        which = which * len(runs)
    if len(which) != len(runs):
        raise ModelError(f"{len(which)} checkpoints for {len(runs)} runs: give one --checkpoint "
                         "for all runs or one per --run, in the same order")
    return [Path(r) for r in runs], which


def ensemble_info(run_dirs, infos: list[dict]) -> dict:
    """``assets/ceriakeras.json`` of an export of one run, or of an ensemble of several.

    The first member's info, and for several members an ``ensemble`` list (run, checkpoint,
    class weights and training config of each) and the union of their training datasets.

    Raises
    ------
    ModelError
        Members that differ in pixel size, largest height, label radius or outputs.
    """
    info = dict(infos[0])
    if len(infos) == 1:
        return info
    for key in ("pixel_size_A", "max_height", "label_radius_A", "signature"):
        values = [i.get(key) for i in infos]
        if any(v != values[0] for v in values[1:]):
            raise ModelError(f"the runs differ in {key} ({', '.join(map(str, values))}); "
                             "an ensemble needs members trained for the same pixels and heights")
    info["ensemble"] = [
        {"run": str(r), "checkpoint": i["checkpoint"], "class_weights": i["class_weights"],
         "metrics": i["metrics"], "training_config": i["training_config"]}
        for r, i in zip(run_dirs, infos)]
    pairs = {}
    for i in infos:
        pairs.update(zip(i["manifest_sha256s"], i["data_dirs"]))
    info["manifest_sha256s"], info["data_dirs"] = list(pairs), list(pairs.values())
    info["prior_correction"] = ("each member's softmax divided by its training class weights "
                                "and renormalized, then averaged over the members")
    return info


def read_run_json(path: Path) -> dict:
    """A run folder's JSON record (``config.json``, ``dataset.json``, ``metrics.json``); {} if
    the run has none (an older run)."""
    return read_json(path, error=ModelError, missing={},
                     advice="train the run again or export another")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("ceriakeras", "tensorflow", "keras", "numpy", "abtem", "ase"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def model_info(run_dir: Path, checkpoint: Path, optics: bool | None = None) -> dict:
    """The contents of ``assets/ceriakeras.json`` for a run (see the module docstring).

    ``optics``: whether the model has the per-frame optics outputs (default: from the run's
    config, a context U-Net with a global branch)."""
    config = read_run_json(run_dir / "config.json")
    dataset = read_run_json(run_dir / "dataset.json")
    model = config.get("model", {})
    metrics = read_run_json(run_dir / "metrics.json")
    if optics is None:
        optics = model.get("architecture") == "context_unet" and model.get("global_branch", True)
    outputs = {"probabilities": "float32 [batch, H, W, max_height + 1]",
               "height": "int32 [batch, H, W], Ce atoms"}
    if optics:
        outputs.update(OPTICS_DESCRIPTIONS)
    return {
        "pixel_size_A": model.get("pixel_size_A", dataset.get("pixel_size_A")),
        "max_height": model.get("max_height"),
        "label_radius_A": dataset.get("label_radius_A") or 0.5,
        "manifest_sha256": dataset.get("manifest_sha256"),
        "data_dir": dataset.get("data_dir"),
        # every dataset (chunk) the run was trained on; [the one above] for a single-dataset run
        "manifest_sha256s": [d["manifest_sha256"] for d in run_datasets(dataset)],
        "data_dirs": [d["data_dir"] for d in run_datasets(dataset)],
        "checkpoint": checkpoint.name,
        "class_weights": dataset.get("class_weights"),
        "prior_correction": (
            "probabilities are the network's softmax divided by the training class weights and "
            "renormalized, which undoes the prior the weighted loss puts on rare classes"
            if dataset.get("class_weights") else "none (the run recorded no class weights)"),
        "metrics": metrics,
        "versions": _versions(),
        "training_config": config,
        "signature": {
            "name": "serving_default",
            "inputs": {"image": "float32 [batch, H, W, 1], raw counts or linear intensity"},
            "outputs": outputs,
        },
    }


def export_run(run_dir, out_dir, version: int | None = None, *, calibrate_on=None,
               calibration_images: int = 48, calibration_split: str = "validation",
               progress: bool = False, calibration_map: str | None = None,
               checkpoint="best", column_threshold: float | None = None) -> Path:
    """Export a training run's best (or last) checkpoint as a TF Serving SavedModel version.

    Parameters
    ----------
    run_dir : path or sequence of paths
        Run folder of ``ceriakeras train``; uses ``checkpoints/best.keras`` (else ``last.keras``).
        Several runs make an ensemble: one SavedModel whose ``probabilities`` are the mean of
        the members' (each with its own prior correction) and whose optics outputs are the
        members' mean; the signature is a single model's. The members must share pixel size,
        largest height, label radius and outputs. ``assets/ceriakeras.json`` describes the
        first member and lists all of them under ``ensemble`` (an additive key).
    checkpoint : {'best', 'last'} or sequence of them
        'best': the lowest validation loss; 'last': the last finished epoch (``state.json``).
        Take 'last' when the data changed during the run: validation losses measured on
        different validation splits do not rank checkpoints. For an ensemble, one value for
        every member or one per member, in the order of ``run_dir``.
    out_dir : path
        Model base folder, ``saved_models/NAME``; the version goes in ``out_dir/<version>/``.
    version : int, optional
        Version number (a positive integer); default: one more than the highest present.
    calibrate_on : path or list of paths, optional
        Dataset(s) whose validation split (or ``PATH:SPLIT``) calibrates the column
        ``confidence``, pooled: a map per dose at each of
        :data:`ceriakeras.evaluation.calibration.CALIBRATION_DOSES_E_PER_A2`
        (:func:`ceriakeras.evaluation.calibration.fit_model_calibrations`), for plain inference and for
        test-time augmentation, recorded with the datasets it was fitted on in
        ``assets/ceriakeras.json`` as ``confidence_calibration`` and
        ``confidence_calibration_tta`` and applied by :func:`ceriakeras.inference.columns.find_columns`.
        The serving graph is the same either way.
    calibration_images, calibration_split, progress : int, str, bool
        How many images of each dataset, the split of datasets given without one, and a
        progress bar while calibrating.
    calibration_map : str, optional
        :data:`ceriakeras.evaluation.calibration.CALIBRATION_MAPS` entry; default
        :data:`ceriakeras.evaluation.calibration.DEFAULT_MAP`.
    column_threshold : float, optional
        The model's column threshold (column probability ``1 − p(background)``, in (0, 1)),
        recorded as ``column_threshold`` and used by ``analyze``, ``evaluate`` and the calibration
        unless an :class:`ceriakeras.config.AnalyzeConfig` sets its own; chosen on our own
        validation data (:mod:`ceriakeras.evaluation.threshold`). Default: none recorded.

    Returns
    -------
    Path
        The version folder.

    Raises
    ------
    ModelError
        No checkpoint in the run, or the version exists already (never overwritten); for an
        ensemble, also members that differ in pixels, heights or outputs, or as many
        checkpoints as neither 1 nor the runs (:func:`ensemble_members`, :func:`ensemble_info`).
    """
    if column_threshold is not None and not 0.0 < float(column_threshold) < 1.0:
        raise ModelError(f"column_threshold={column_threshold} must be in (0, 1) (a column "
                         "probability); choose it with scripts/studies/threshold_study.py")
    run_dirs, checkpoints = ensemble_members(run_dir, checkpoint)
    out_dir = Path(out_dir)
    checkpoints = [run_checkpoint(r, c) for r, c in zip(run_dirs, checkpoints)]
    target = new_version_folder(out_dir, version)
    models, infos = _load_members(run_dirs, checkpoints)
    info = ensemble_info(run_dirs, infos)
    if column_threshold is not None:
        info["column_threshold"] = float(column_threshold)
    serve = _serving_function(models, infos)
    if calibrate_on is not None:
        from ..evaluation.calibration import fit_model_calibrations

        served = ServedModel(path=target, info=info, signature=serve)  # what consumers will run
        info.update(fit_model_calibrations(
            served.predict, DihedralAveraged(served).predict, calibrate_on, info,
            method=calibration_map, max_images=calibration_images, split=calibration_split,
            progress=progress))

    _write_version(models, serve, info, out_dir, target, version)
    return target


def _load_members(run_dirs: list[Path], checkpoints: list[Path]) -> tuple[list, list[dict]]:
    """Each member's Keras model (checkpoints made by ``ceriakeras train`` only) and its info."""
    from ..modelcheck import check_keras_archive
    from . import losses as _registers_custom_metrics  # noqa: F401
    from .model import has_optics, load_checkpoint

    for c in checkpoints:
        check_keras_archive(c)
    models = [load_checkpoint(c, compile=False,
                              instead="export only checkpoints made by ceriakeras train")
              for c in checkpoints]
    infos = [model_info(r, c, optics=has_optics(m))
             for r, c, m in zip(run_dirs, checkpoints, models)]
    return models, infos


def _serving_function(models: list, infos: list[dict]):
    """The ``serving_default`` function of the members: each one's softmax divided by its
    training class weights and renormalized, averaged; with a global branch, the members'
    mean per-frame optics."""
    import tensorflow as tf

    from .model import OPTICS_OUTPUTS, split_outputs

    # A loss weighted by w_k is minimized by q_k ∝ w_k p_k, not by the class probabilities p_k:
    # dividing by w and renormalizing gives calibrated probabilities (and fewer false columns).
    inverse_weights = [tf.constant(
        1.0 / np.asarray(i["class_weights"] or np.ones(i["max_height"] + 1), np.float32))
        for i in infos]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32, name="image")])
    def serve(image):
        members = []
        for model, inverse in zip(models, inverse_weights):
            raw, optics = split_outputs(model(image, training=False))
            weighted = tf.cast(raw, tf.float32) * inverse
            members.append((weighted / tf.reduce_sum(weighted, axis=-1, keepdims=True), optics))
        probabilities = tf.add_n([p for p, _ in members]) / len(members)
        height = tf.cast(tf.argmax(probabilities, axis=-1), tf.int32)
        out = {"probabilities": probabilities, "height": height}
        if members[0][1] is not None:  # additive: per-frame optics of the global branch
            optics = tf.add_n([tf.cast(o, tf.float32) for _, o in members]) / len(members)
            for i, (name, _, _) in enumerate(OPTICS_OUTPUTS):
                out[name] = optics[:, i]
        return out

    return serve


def _write_version(models: list, serve, info: dict, out_dir: Path, target: Path,
                   version: int | None) -> None:
    """Write the SavedModel and its ``assets/ceriakeras.json`` into ``target`` atomically (a
    temporary folder renamed), never over an existing version."""
    import keras

    from ..modelcheck import files_sha256

    archive = keras.export.ExportArchive()
    for model in models:
        archive.track(model)
    archive.add_endpoint("serving_default", serve)

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=out_dir))
    try:
        archive.write_out(str(tmp), verbose=False)
        (tmp / "assets").mkdir(exist_ok=True)
        info["files_sha256"] = files_sha256(tmp)  # checked before every load (modelcheck)
        (tmp / "assets" / ASSET_NAME).write_text(json.dumps(info, indent=2))
        if target.exists():  # appeared meanwhile
            raise ModelError(f"{target} already exists; choose another --version")
        give_ordinary_permissions(tmp)  # mkdtemp makes 0700; TF Serving may run as another user
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
