"""Training: a run from its data to its checkpoints, fit and resume (the pieces: ``nn.losses``,
``nn.callbacks``, ``nn.distribute``, ``nn.rundir``).

A run folder holds everything needed to continue or reproduce it::

    runs/NAME/
      config.json          the TrainConfig used (loads with ``load_config(TrainConfig, path)``)
      dataset.json         the training data folders and the sha256 of their manifest.json,
                           the class weights, when datasets were added (``changes``) and,
                           for a warm restart, the run and epoch it started from
      checkpoints/last.keras, checkpoints/best.keras   (best = lowest validation loss)
      state.json           epochs completed, best epoch and validation loss
      metrics.json         validation metrics of the best epoch (read by ``export``)
      log.csv              one row per epoch
      tensorboard/         scalars (train/, validation/) and image | label | prediction panels

The pieces (:func:`~ceriakeras.nn.distribute.choose_strategy`, :func:`~ceriakeras.nn.losses.compile_model`,
:func:`~ceriakeras.nn.callbacks.make_callbacks`, the datasets)
are separate functions so that a custom distributed training step can reuse them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from ..config import ConfigError, ModelError, TrainConfig, to_dict
from ..io.files import write_text_atomic
from .callbacks import make_callbacks
from .distribute import choose_strategy, fit_multi_worker, is_chief, precision_policy
from .losses import (  # noqa: F401  (re-exported: the training API in one place)
    OpticsAbsoluteError,
    OpticsLoss,
    class_weights_from_histogram,
    column_height_accuracy,
    compile_model,
    training_targets_spec,
)
from .model import build_model, load_checkpoint
from .rundir import (
    dataset_record,
    drop_log_rows,
    prepare_run_dir,
    read_run_file,
    saved_model_config,
    warm_start_source,
)


def _match_dataset(config: TrainConfig, manifest: dict, data_dir: Path) -> TrainConfig:
    """The model works at the dataset's pixel size and must have a class for every height."""
    data_max = int(manifest.get("max_height", config.model.max_height))
    if data_max > config.model.max_height:
        raise ConfigError(f"{data_dir} has heights up to {data_max} but model.max_height is "
                          f"{config.model.max_height}; set model.max_height ≥ {data_max} in --config")
    pixel = float(manifest.get("pixel_size_A", config.model.pixel_size_A))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pixel_size_A=pixel))


def _partial_source(init_partial, run_dir: Path, other_start: bool, digests) -> dict | None:
    """:func:`ceriakeras.nn.distill.partial_source` of ``--init-partial`` (None without it);
    the class weights come from this run's datasets (``digests``)."""
    if init_partial is None:
        return None
    if other_start:
        raise ModelError("pass only one of --resume, --init-from and --init-partial")
    if Path(init_partial).resolve() == run_dir.resolve():
        raise ModelError(f"--init-partial {init_partial} is --out itself; give the new run "
                         "another folder")
    from .distill import partial_source

    return {**partial_source(init_partial), "class_weights_from": list(digests)}


def _load_teacher(config: TrainConfig, multi_worker: bool):
    """The served teacher of ``config.teacher`` and its record (None, None without one)."""
    if config.teacher is None:
        return None, None
    if multi_worker:
        raise ModelError("distillation (--teacher) runs on one machine; unset TF_CONFIG")
    from .distill import load_teacher, teacher_record

    teacher = load_teacher(config.teacher, config)
    return teacher, teacher_record(teacher)


def train(data_dir, run_dir, config: TrainConfig = TrainConfig(), *, resume: bool = False,
          overwrite: bool = False, progress: bool = True, allow_data_change: bool = False,
          init_from=None, init_partial=None) -> dict:
    """Train the U-Net on simulated data and keep everything in ``run_dir``.

    Parameters
    ----------
    data_dir : path or sequence of paths
        Dataset folder written by ``ceriakeras simulate`` (shards and ``manifest.json``), or
        several (chunks of one dataset simulated with different seeds; they must agree on pixel
        size, max_height, label radius and image size). Training interleaves the shards of all
        of them, validation uses all their validation splits, and the class weights come from
        their summed label histograms.
    run_dir : path
        Run folder (layout in the module docstring). Must not exist or be empty, unless
        ``resume`` (continue from ``checkpoints/last.keras`` with optimizer state and epoch
        count) or ``overwrite`` (delete the earlier run and start again).
    config : TrainConfig
        Settings; saved as ``config.json``. On resume the epoch count and schedule may grow.
    progress : bool
        Show Keras' progress bar.
    allow_data_change : bool
        On resume, accept datasets that leave out or replace some the run was trained on.
        Datasets *added* to those of the run are always accepted (the run grows its data as
        chunks are finished); either change is recorded in ``dataset.json`` under ``changes``
        with the epoch it happened. A resumed run keeps the class weights it started with.
    init_from : path, optional
        Start this new run from the weights of an earlier run's last finished epoch (a warm
        restart): a fresh optimizer, ``config``'s learning-rate schedule from step 0 and
        ``config``'s seed. The model settings must be the earlier run's; the class weights are
        its too, and ``dataset.json`` records the run and epoch under ``initialized_from``.
    init_partial : path, optional
        Start this new run from an earlier run whose layers partly differ: the weights of the
        layers whose shapes agree are copied (:func:`ceriakeras.nn.distill.copy_matching_weights`),
        the others start fresh; class weights from the data, as for a new run.

    With ``config.teacher`` (a served model) the run is distilled from it
    (:mod:`ceriakeras.nn.distill`); ``dataset.json`` records the teacher, and a resume must name
    the same one.

    Returns
    -------
    dict
        ``epochs_completed``, ``initial_epoch``, ``resumed``, ``best_epoch``, ``best_val_loss``,
        ``history`` (per-epoch logs of this call), ``run_dir``.

    Raises
    ------
    ModelError
        The run folder exists (without resume/overwrite), there is nothing to resume, or the
        dataset or model differ from those of the run being resumed (or of ``init_from``).
    DataError
        From the pipeline: a missing, empty or corrupt dataset, or crops larger than the images.
    """
    from ..data.records import as_data_dirs, manifest_sha256, read_manifests

    config.validate()
    data_dirs, run_dir = as_data_dirs(data_dir), Path(run_dir)
    manifests = read_manifests(data_dirs)  # DataError if one is missing or they disagree
    digests = [manifest_sha256(d) for d in data_dirs]
    config = _match_dataset(config, manifests[0], data_dirs[0])
    source, partial = _start_sources(init_from, init_partial, run_dir, resume, config, digests)
    strategy = choose_strategy()  # before any other TensorFlow op (multi-worker needs that)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    teacher, teacher_record = _load_teacher(config, multi_worker)
    out_dir = _open_run_dir(strategy, run_dir, resume, overwrite)
    start = _resume_point(run_dir, out_dir, config, digests, manifests, teacher_record,
                          allow_data_change) if resume else _RunStart()
    write_text_atomic(out_dir / "config.json", json.dumps(to_dict(config), indent=2))
    weights = _write_dataset_record(out_dir, run_dir, config, data_dirs, digests, manifests,
                                    start, source or partial, teacher_record)
    training, validation = _datasets(data_dirs, config, weights)

    with precision_policy(config.mixed_precision), strategy.scope():
        model = _start_model(config, run_dir, out_dir, start, source, partial)
        history = _fit(model, strategy, training, validation, config, out_dir, run_dir, start,
                       teacher, weights, progress)
    return _finish(run_dir, out_dir, config, resume, start, history)


def _datasets(data_dirs, config: TrainConfig, weights):
    """The training and validation ``tf.data`` pipelines (with optics targets for a model with
    the global branch)."""
    from ..data.pipeline import make_dataset

    optics = config.model.architecture == "context_unet" and config.model.global_branch
    training = make_dataset(data_dirs, "train", config.pipeline, class_weights=weights,
                            training=True, optics=optics)
    validation = make_dataset(data_dirs, "validation", config.pipeline, class_weights=weights,
                              training=False, optics=optics)
    return training, validation


@dataclasses.dataclass
class _RunStart:
    """Where a run starts: after ``initial_epoch`` epochs, with the best so far, from
    ``checkpoint`` (a resume), with the run's ``saved`` dataset record and the datasets
    ``added`` and ``removed`` since."""

    initial_epoch: int = 0
    best_val_loss: float = np.inf
    best_epoch: int = 0
    checkpoint: Path | None = None
    saved: dict | None = None
    added: list = dataclasses.field(default_factory=list)
    removed: list = dataclasses.field(default_factory=list)


def _start_sources(init_from, init_partial, run_dir: Path, resume: bool, config: TrainConfig,
                   digests) -> tuple[dict | None, dict | None]:
    """The warm start (``--init-from``) and partial start (``--init-partial``) sources, checked
    before the run folder is made (or, with overwrite, deleted)."""
    source = None
    if init_from is not None:
        if resume:
            raise ModelError("pass either --resume or --init-from, not both")
        if Path(init_from).resolve() == run_dir.resolve():
            raise ModelError(f"--init-from {init_from} is --out itself; give the new run "
                             "another folder")
        source = warm_start_source(Path(init_from), config)
    partial = _partial_source(init_partial, run_dir, resume or init_from is not None, digests)
    return source, partial


def _open_run_dir(strategy, run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """The folder this process writes: the run folder for the chief, else a private one."""
    if is_chief(strategy):
        prepare_run_dir(run_dir, resume, overwrite)
        return run_dir
    # reads the chief's run (shared file system) but writes only to a private folder
    if resume:
        prepare_run_dir(run_dir, resume, False)
    out_dir = Path(tempfile.mkdtemp(prefix="ceriakeras-worker-"))
    print(f"worker {strategy.cluster_resolver.task_type} {strategy.cluster_resolver.task_id}: "
          f"the chief writes {run_dir}; this worker's copies go to {out_dir}", flush=True)
    return out_dir


def _resume_point(run_dir: Path, out_dir: Path, config: TrainConfig, digests, manifests,
                  teacher_record, allow_data_change: bool) -> _RunStart:
    """The state a resumed run continues from, checked against its data, teacher and model."""
    from ..data.records import compare_run_datasets, data_change_message
    from .distill import check_same_teacher

    saved = read_run_file(run_dir / "dataset.json")
    added, removed = compare_run_datasets(saved, digests, manifests)
    check_same_teacher(run_dir, saved, teacher_record)
    if removed and not allow_data_change:
        raise ModelError(data_change_message(run_dir, saved, removed))
    if saved_model_config(run_dir) != to_dict(config.model):
        raise ModelError(f"the model settings differ from those of {run_dir}/config.json; "
                         "resume with the same model config or start a new run")
    state = read_run_file(run_dir / "state.json")
    start = _RunStart(initial_epoch=int(state["epoch"]),
                      best_val_loss=float(state.get("best_val_loss", np.inf)),
                      best_epoch=int(state.get("best_epoch", 0)),
                      checkpoint=run_dir / "checkpoints" / state.get("checkpoint", "last.keras"),
                      saved=saved, added=added, removed=removed)
    if not start.checkpoint.is_file():
        raise ModelError(f"{start.checkpoint} named by {run_dir}/state.json is missing; "
                         "start again with --overwrite")
    if out_dir == run_dir:
        drop_log_rows(run_dir / "log.csv", start.initial_epoch)
    return start


def _write_dataset_record(out_dir: Path, run_dir: Path, config: TrainConfig, data_dirs, digests,
                          manifests, start: _RunStart, source: dict | None,
                          teacher_record: dict | None) -> np.ndarray:
    """The class weights (kept from the run or the warm-start source, else from the summed
    label histograms), written with the run's ``dataset.json`` (and the teacher's record)."""
    from ..data.records import summed_label_histogram

    n_classes = config.model.max_height + 1
    kept = (start.saved or source or {}).get("class_weights")
    if kept is not None and len(kept) == n_classes:  # the loss must not jump on resume
        weights = np.asarray(kept, np.float32)
    else:
        weights = class_weights_from_histogram(
            summed_label_histogram(manifests), config.weight_scheme, config.max_class_weight,
            config.background_weight, num_classes=n_classes)
    if start.added or start.removed:
        print(f"{run_dir}: the training data changes after epoch {start.initial_epoch}: "
              f"{len(start.added)} dataset(s) added, {len(start.removed)} removed, now "
              f"{', '.join(str(d) for d in data_dirs)}; the class weights stay the run's first "
              "(recorded in dataset.json)", flush=True)
    write_text_atomic(out_dir / "dataset.json", json.dumps(dataset_record(
        data_dirs, digests, manifests, weights, start.saved, start.initial_epoch, start.added,
        start.removed, source), indent=2))
    if teacher_record is not None:
        from .distill import add_teacher_record

        add_teacher_record(out_dir, teacher_record)
    return weights


def _start_model(config: TrainConfig, run_dir: Path, out_dir: Path, start: _RunStart,
                 source: dict | None, partial: dict | None):
    """The compiled model: resumed from its checkpoint, or new (from a warm or partial start)."""
    if start.checkpoint is not None:
        model = load_checkpoint(start.checkpoint, instead="start again with --overwrite")
        compile_model(model, config, optimizer=model.optimizer)
        print(f"resumed {run_dir} from checkpoints/{start.checkpoint.name} after epoch "
              f"{start.initial_epoch} (optimizer step {int(model.optimizer.iterations.numpy())})",
              flush=True)
        return model
    model = build_model(config.model, noise_seed=config.pipeline.seed)
    if source is not None:
        donor = load_checkpoint(source["checkpoint"], compile=False,
                                instead="name another --init-from run")
        try:
            model.set_weights(donor.get_weights())
        except ValueError as err:
            raise ModelError(f"the weights of {source['checkpoint']} do not fit this "
                             f"model ({err}); name another --init-from run") from None
        print(f"{run_dir}: starting from the weights of {source['checkpoint']} "
              f"(epoch {source['initialized_from']['epoch']}), with a new optimizer "
              "and learning-rate schedule", flush=True)
    if partial is not None:
        from .distill import init_partial as copy_partial

        copy_partial(model, partial, out_dir)
    return compile_model(model, config)


def _fit(model, strategy, training, validation, config: TrainConfig, out_dir: Path,
         run_dir: Path, start: _RunStart, teacher, weights, progress: bool) -> dict:
    """Keras' ``fit`` (or :func:`fit_multi_worker`) from ``start``; the per-epoch logs."""
    extra_callbacks = []
    if teacher is not None:
        from .distill import attach_teacher

        extra_callbacks.append(attach_teacher(model, teacher, weights, config))
    if start.initial_epoch >= config.epochs:
        print(f"{run_dir} already has {start.initial_epoch} epochs; pass a larger --epochs to "
              "train further", flush=True)
        return {}
    callbacks = make_callbacks(out_dir, config, validation, resume=start.checkpoint is not None,
                               best_val_loss=start.best_val_loss,
                               best_epoch=start.best_epoch,
                               initial_epoch=start.initial_epoch) + extra_callbacks
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Keras 3's fit fails under this strategy (keras-team/keras#20585)
        return fit_multi_worker(model, strategy, training, validation, config, callbacks,
                                initial_epoch=start.initial_epoch, progress=progress)
    return model.fit(
        training, validation_data=validation, epochs=config.epochs,
        initial_epoch=start.initial_epoch, steps_per_epoch=config.steps_per_epoch,
        validation_steps=config.validation_steps, callbacks=callbacks,
        # a bar (ANSI codes) on a terminal only; one line per epoch in a log file
        verbose=(1 if sys.stdout.isatty() else 2) if progress else 0, shuffle=False,
    ).history


def _finish(run_dir: Path, out_dir: Path, config: TrainConfig, resume: bool, start: _RunStart,
            history: dict) -> dict:
    """The result of :func:`train`; a run that trained but never reached a finite validation
    loss is refused."""
    state = read_run_file(out_dir / "state.json") if (out_dir / "state.json").exists() else {}
    if start.initial_epoch < config.epochs and not np.isfinite(
            float(state.get("best_val_loss", start.best_val_loss))):  # never a finite loss
        raise ModelError(f"{run_dir} never reached a finite validation loss (NaN or inf: "
                         "learning_rate too high, or broken data); no best checkpoint was kept, "
                         "start again with a smaller learning_rate and --overwrite")
    return {
        "run_dir": str(run_dir),
        "resumed": resume,
        "initial_epoch": start.initial_epoch,
        "epochs_completed": int(state.get("epoch", start.initial_epoch)),
        "best_epoch": int(state.get("best_epoch", start.best_epoch)),
        "best_val_loss": float(state.get("best_val_loss", start.best_val_loss)),
        "history": {k: [float(v) for v in vals] for k, vals in history.items()},
    }
