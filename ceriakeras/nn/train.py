"""Training: class weights, loss and metrics, the distribution strategy, callbacks, fit and resume.

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

The pieces (:func:`choose_strategy`, :func:`compile_model`, :func:`make_callbacks`, the datasets)
are separate functions so that a custom distributed training step can reuse them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import scipy.ndimage
import tensorflow as tf

from ..config import ConfigError, ModelConfig, ModelError, TrainConfig, from_dict, to_dict
from ..io.files import file_sha256, write_text_atomic
from .model import OPTICS_OUTPUTS, build_model, has_optics, load_checkpoint, split_outputs

_PACKAGE = "ceriakeras"


# --- class weights -----------------------------------------------------------------------------
def class_weights_from_histogram(
    histogram,
    scheme: str = "median_frequency",
    max_weight: float = 10.0,
    background_weight: float = 0.1,
    num_classes: int | None = None,
) -> np.ndarray:
    """Per-class loss weights from the label histogram of the training set.

    Median-frequency balancing over the column classes (heights 1 … max_height): a class seen
    in a fraction ``f_k`` of the column pixels gets ``w_k = median(f) / f_k``, the median taken
    over the column classes present, so the median column class weighs 1, rare heights more and
    common ones less. Weights are capped at ``max_weight``. Heights absent from the histogram get
    ``max_weight`` (they never occur in training; should one occur in validation it counts as
    much as the rarest class). The background class 0 (no Ce column) gets ``background_weight``.

    Parameters
    ----------
    histogram : sequence of int, or mapping {class: pixel count}
        Pixel count of each label class, index = height in Ce atoms (0 = background).
    scheme : {'median_frequency', 'none'}
        'none' gives every class weight 1.
    max_weight : float
        Cap on any column class weight, relative to the median column class.
    background_weight : float
        Weight of class 0, relative to the median column class.
    num_classes : int, optional
        Length of the result (max_height + 1); default: the histogram's length.

    Returns
    -------
    (num_classes,) float32 array of weights.
    """
    if isinstance(histogram, dict):
        counts = {int(k): float(v) for k, v in histogram.items()}
        size = max(counts) + 1 if counts else 1
        hist = np.zeros(size)
        for k, v in counts.items():
            hist[k] = v
    else:
        hist = np.asarray(histogram, dtype=np.float64)
    n = int(num_classes or len(hist))
    hist = np.pad(hist, (0, max(0, n - len(hist))))[:n]
    if scheme == "none":
        return np.ones(n, np.float32)
    if scheme != "median_frequency":
        raise ValueError(f"unknown class weight scheme {scheme!r}")
    columns = hist[1:]
    present = columns > 0
    weights = np.full(n, max_weight, np.float64)
    if present.any():
        freq = columns[present] / columns[present].sum()
        weights[1:][present] = np.minimum(np.median(freq) / freq, max_weight)
    weights[0] = background_weight
    return weights.astype(np.float32)


# --- metrics -----------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package=_PACKAGE)
class ColumnPixelAccuracy(keras.metrics.Metric):
    """Fraction of column pixels (label > 0) whose most probable class is the true height."""

    def __init__(self, name="column_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):  # weights ignored on purpose
        y_true = tf.cast(y_true, tf.int64)
        is_column = tf.cast(y_true > 0, "float32")
        hit = tf.cast(tf.equal(tf.argmax(y_pred, axis=-1), y_true), "float32")
        self.correct.assign_add(tf.reduce_sum(hit * is_column))
        self.total.assign_add(tf.reduce_sum(is_column))

    def result(self):
        return tf.math.divide_no_nan(self.correct, self.total)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class UnweightedMeanIoU(keras.metrics.MeanIoU):
    """Mean IoU over the height classes from probabilities, ignoring the loss's sample weights."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(y_true, y_pred)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class OpticsLoss(keras.losses.Loss):
    """Mean squared error of the per-frame optics in normalised units, ``((y − p) / scale)²``
    averaged over the known components (:data:`ceriakeras.nn.model.OPTICS_OUTPUTS` scales);
    non-finite targets (a record without that metadata) count as known-perfect (0)."""

    def __init__(self, scale=None, name="optics_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = [float(s) for s in (scale or [s for _, _, s in OPTICS_OUTPUTS])]

    def call(self, y_true, y_pred):
        y_pred = keras.ops.cast(y_pred, "float32")
        y_true = keras.ops.cast(y_true, "float32")
        known = keras.ops.isfinite(y_true)
        y_true = keras.ops.where(known, y_true, y_pred)
        error = (y_true - y_pred) / keras.ops.convert_to_tensor(self.scale)
        return keras.ops.mean(keras.ops.square(error), axis=-1)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class OpticsAbsoluteError(keras.metrics.Metric):
    """Mean absolute error of one optics component in its physical unit (nm, µm, atoms),
    over the frames whose target is known (finite)."""

    def __init__(self, index=0, name="defocus_mae_nm", **kwargs):
        super().__init__(name=name, **kwargs)
        self.index = int(index)
        self.error = self.add_variable(shape=(), initializer="zeros", name="error")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.cast(y_true, "float32")[:, self.index]
        y_pred = tf.cast(y_pred, "float32")[:, self.index]
        known = tf.math.is_finite(y_true)
        error = tf.where(known, tf.abs(y_true - y_pred), 0.0)
        self.error.assign_add(tf.reduce_sum(error))
        self.count.assign_add(tf.reduce_sum(tf.cast(known, "float32")))

    def result(self):
        return tf.math.divide_no_nan(self.error, self.count)

    def get_config(self):
        return {**super().get_config(), "index": self.index}


OPTICS_METRIC_NAMES = ("defocus_mae_nm", "cs_mae_um", "max_column_height_mae_atoms")
"""Names of the :class:`OpticsAbsoluteError` metrics, in the order of the optics output."""


def pack_targets(optics_model: bool, label, weight, optics=None):
    """The ``(y, sample_weight)`` a model is fitted with: ``(label, weight)`` for a model with
    probabilities only, dicts keyed ``probabilities``/``optics`` for one with the optics output
    (``optics (B, 3)`` in the units of :data:`ceriakeras.nn.model.OPTICS_OUTPUTS`, NaN = unknown;
    its sample weight is 1 per frame)."""
    if not optics_model:
        return label, weight
    ones = tf.ones(tf.shape(label)[:1], tf.float32)
    return {"probabilities": label, "optics": optics}, {"probabilities": weight, "optics": ones}


def training_targets_spec(model, label, weight, optics):
    """:func:`pack_targets` for ``model`` (NumPy arrays in, for quick tests and benchmarks)."""
    y, w = pack_targets(has_optics(model), label, weight, optics)
    return tf.nest.map_structure(np.asarray, y), tf.nest.map_structure(np.asarray, w)


def column_height_accuracy(labels: np.ndarray, probabilities: np.ndarray) -> tuple[int, int]:
    """Count the true columns whose height is recovered exactly.

    Each column is one connected disk of ``label > 0``; the predicted height is the class with
    the largest probability mass summed over the disk's pixels.

    Parameters
    ----------
    labels : (B, H, W) int
        True label masks (height in Ce atoms, 0 = none).
    probabilities : (B, H, W, C) float
        Model output.

    Returns
    -------
    (correct, total) : number of columns recovered exactly, number of columns.
    """
    correct = total = 0
    for label, prob in zip(labels, probabilities):
        disks, n = scipy.ndimage.label(label > 0)
        if n == 0:
            continue
        mass = np.zeros((n + 1, prob.shape[-1]))
        np.add.at(mass, disks.ravel(), prob.reshape(-1, prob.shape[-1]))
        truth = np.zeros(n + 1, np.int64)
        np.maximum.at(truth, disks.ravel(), label.ravel().astype(np.int64))
        correct += int(np.sum(mass[1:].argmax(axis=1) == truth[1:]))
        total += n
    return correct, total


# --- model, optimizer, strategy ----------------------------------------------------------------
def learning_rate_schedule(config: TrainConfig) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up to ``config.learning_rate``, then cosine decay to 0 at the last step."""
    total = config.epochs * config.steps_per_epoch
    warmup = min(config.warmup_steps, max(total - 1, 0))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(total - warmup, 1),
        warmup_target=config.learning_rate,
        warmup_steps=warmup,
    )


def compile_model(model: keras.Model, config: TrainConfig, optimizer=None) -> keras.Model:
    """Compile with Adam on the cosine schedule, weighted cross-entropy and the pixel metrics.

    The per-pixel class weights come from the data as sample weights (Keras' ``class_weight``
    argument does not handle per-pixel labels). A model with the ``optics`` output (the
    context U-Net's global branch) gets dict losses: the cross-entropy on ``probabilities``
    plus ``config.optics_loss_weight`` × :class:`OpticsLoss`, and the optics MAE metrics
    (Keras then prefixes the metric names with the output's, e.g. ``probabilities_mean_iou``). ``optimizer`` keeps an existing (restored)
    optimizer and only replaces its learning-rate schedule.
    """
    if optimizer is None:
        optimizer = keras.optimizers.Adam(learning_rate_schedule(config))
    else:
        optimizer.learning_rate = learning_rate_schedule(config)
    num_classes = config.model.max_height + 1
    pixel_metrics = [
        ColumnPixelAccuracy(),
        UnweightedMeanIoU(num_classes=num_classes, sparse_y_pred=False, name="mean_iou"),
    ]
    if not has_optics(model):
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=pixel_metrics)
        return model
    model.compile(
        optimizer=optimizer,
        loss={"probabilities": keras.losses.SparseCategoricalCrossentropy(),
              "optics": OpticsLoss()},
        loss_weights={"probabilities": 1.0, "optics": config.optics_loss_weight},
        metrics={"probabilities": pixel_metrics,
                 "optics": [OpticsAbsoluteError(i, name)
                            for i, name in enumerate(OPTICS_METRIC_NAMES)]},
    )
    return model


def choose_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy if ``TF_CONFIG`` is set, MirroredStrategy with several GPUs,
    else the default (one device) strategy. The global batch is split across the replicas."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


@contextlib.contextmanager
def precision_policy(setting: str):
    """Use ``mixed_float16`` inside the block when asked ('on') or when a GPU is visible ('auto')."""
    mixed = setting == "on" or (setting == "auto" and bool(tf.config.list_logical_devices("GPU")))
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        yield mixed
    finally:
        keras.mixed_precision.set_global_policy(previous)


# --- callbacks ---------------------------------------------------------------------------------
def _save_keras_atomic(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _link_atomic(source: Path, path: Path) -> None:
    """Make ``path`` hold the bytes of ``source`` (a hard link, or a copy), replaced atomically."""
    tmp = path.with_name(f".{path.stem}.link{path.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


class RunCheckpoints(keras.callbacks.Callback):
    """After each epoch: best.keras (if validation loss improved), the epoch's checkpoint
    ``epoch-NNNN.keras``, state.json naming it, then last.keras (the same file)."""

    def __init__(self, run_dir: Path, best_val_loss: float = np.inf, best_epoch: int = 0):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.best_val_loss = best_val_loss
        self.best_epoch = best_epoch

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        checkpoints = self.run_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        val_loss = float(logs.get("val_loss", logs.get("loss", np.inf)))
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch = val_loss, epoch + 1
            _save_keras_atomic(self.model, checkpoints / "best.keras")
            best = {k: float(v) for k, v in logs.items() if k.startswith("val_")}
            write_text_atomic(self.run_dir / "metrics.json",
                              json.dumps({"epoch": epoch + 1, "validation": best}, indent=2))
        # The epoch's checkpoint gets its own name and state.json points to it, so a kill at any
        # moment leaves state.json naming a complete checkpoint of the epoch it records.
        name = f"epoch-{epoch + 1:04d}.keras"
        _save_keras_atomic(self.model, checkpoints / name)
        state = {"epoch": epoch + 1, "checkpoint": name, "best_epoch": self.best_epoch,
                 "best_val_loss": self.best_val_loss}
        write_text_atomic(self.run_dir / "state.json", json.dumps(state, indent=2))
        _link_atomic(checkpoints / name, checkpoints / "last.keras")
        for old in checkpoints.glob("epoch-*.keras"):
            if old.name != name:
                old.unlink()


class ValidationReport(keras.callbacks.Callback):
    """After each epoch: column-level exact-height accuracy on validation, and TensorBoard panels.

    Adds ``val_column_height_accuracy`` to the epoch logs (so the CSV log, TensorBoard and
    early stopping see it) and writes image | label | prediction panels of the first validation
    batch (fixed dose and seed) under ``tensorboard/panels``.
    """

    def __init__(self, dataset, steps, log_dir: Path | None, max_height: int, panels: int = 3):
        super().__init__()
        self.dataset, self.steps, self.max_height, self.panels = dataset, steps, max_height, panels
        self.writer = tf.summary.create_file_writer(str(log_dir)) if log_dir else None

    def on_epoch_end(self, epoch, logs=None):
        correct = total = 0
        batches = self.dataset if self.steps is None else self.dataset.take(self.steps)
        for i, (image, label, *_) in enumerate(batches):
            label = label["probabilities"] if isinstance(label, dict) else label
            prob = split_outputs(self.model(image, training=False))[0].numpy()
            c, t = column_height_accuracy(label.numpy(), prob)
            correct, total = correct + c, total + t
            if i == 0 and self.writer is not None:
                self._write_panels(image.numpy(), label.numpy(), prob, epoch + 1)
        if logs is not None:
            logs["val_column_height_accuracy"] = correct / total if total else 0.0

    def _write_panels(self, image, label, prob, step):
        img = image[: self.panels, ..., 0]
        lo = img.min(axis=(1, 2), keepdims=True)
        img = (img - lo) / np.maximum(img.max(axis=(1, 2), keepdims=True) - lo, 1e-12)
        lab = label[: self.panels] / self.max_height
        pred = prob[: self.panels].argmax(-1) / self.max_height
        panel = np.concatenate([img, lab, pred], axis=2)
        with self.writer.as_default():
            write_image_summary("image | label | prediction", panel, step)
        self.writer.flush()


# TensorBoard event files are written with TensorFlow's own summary op and the metadata of
# TensorBoard's scalar and image plugins, so the `tensorboard` package is needed only to view them.
def _plugin(name: str):
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=name))


def write_scalar_summary(tag: str, value: float, step: int) -> None:
    """One scalar for TensorBoard's Scalars tab (inside ``writer.as_default()``)."""
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step,
                     metadata=_plugin("scalars"))


def write_image_summary(tag: str, images: np.ndarray, step: int) -> None:
    """Grey images (N, H, W) in [0, 1] for TensorBoard's Images tab, as PNGs."""
    pngs = [tf.io.encode_png(tf.cast(np.clip(im, 0, 1)[..., None] * 255 + 0.5, tf.uint8))
            for im in images]
    h, w = images.shape[1:3]
    tensor = tf.stack([tf.constant(str(w)), tf.constant(str(h)), *pngs])
    tf.summary.write(tag, tensor, step=step, metadata=_plugin("images"))


class TensorBoardScalars(keras.callbacks.Callback):
    """Epoch scalars in ``log_dir/train`` and ``log_dir/validation`` (``val_`` keys), and the
    learning rate."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.train_writer = tf.summary.create_file_writer(str(Path(log_dir) / "train"))
        self.val_writer = tf.summary.create_file_writer(str(Path(log_dir) / "validation"))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        with self.train_writer.as_default():
            for key, value in logs.items():
                if not key.startswith("val_"):
                    write_scalar_summary(f"epoch_{key}", value, epoch + 1)
            lr = self.model.optimizer.learning_rate
            write_scalar_summary("epoch_learning_rate", float(np.asarray(lr)), epoch + 1)
        with self.val_writer.as_default():
            for key, value in logs.items():
                if key.startswith("val_"):
                    write_scalar_summary(f"epoch_{key[4:]}", value, epoch + 1)
        self.train_writer.flush()
        self.val_writer.flush()


def make_callbacks(run_dir: Path, config: TrainConfig, validation, *, resume: bool,
                   best_val_loss: float = np.inf, best_epoch: int = 0) -> list:
    """The callbacks of a run, in the order they must run (the validation report first)."""
    return [
        ValidationReport(validation, config.validation_steps, run_dir / "tensorboard" / "panels",
                         config.model.max_height),
        keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=resume),
        RunCheckpoints(run_dir, best_val_loss, best_epoch),
        TensorBoardScalars(run_dir / "tensorboard"),
        keras.callbacks.EarlyStopping(monitor="val_loss",
                                      patience=config.early_stopping_patience),
        keras.callbacks.TerminateOnNaN(),  # a NaN loss never recovers: stop, refused below
    ]


# --- several machines --------------------------------------------------------------------------
def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run: always, except under MultiWorkerMirroredStrategy,
    where only the task ``chief`` (or ``worker`` 0 in a cluster without a chief) does."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def fit_multi_worker(model: keras.Model, strategy: tf.distribute.Strategy, training, validation,
                     config: TrainConfig, callbacks: list, *, initial_epoch: int = 0,
                     progress: bool = True) -> dict:
    """``model.fit`` for MultiWorkerMirroredStrategy, as a custom distributed training step.

    Keras 3's ``fit`` fails under this strategy (keras-team/keras#20585), so each step runs
    ``strategy.run`` inside a ``tf.function``: every replica computes the class-weighted
    cross-entropy of its share of the global batch divided by the *global* number of pixels,
    the optimizer all-reduces (sums) the gradients, and ``strategy.reduce`` sums the losses
    into the global mean. Training data are sharded across workers by element
    (``AutoShardPolicy.DATA``); batch-normalization statistics are averaged over the replicas
    after each epoch. Validation runs on every worker alone (identical weights, so
    identical results, and the same early-stopping decision everywhere). The callbacks are
    those of :func:`make_callbacks`, called as ``fit`` would.

    Returns
    -------
    dict
        Per-epoch logs, like ``fit(...).history`` (``loss`` and the ``val_`` metrics).
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = iter(strategy.experimental_distribute_dataset(training.with_options(options)))
    global_batch = config.pipeline.batch_size
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    optimizer = model.optimizer

    optics_loss = OpticsLoss(reduction=None)

    def replica_step(image, label, weight):
        targets = label
        if isinstance(label, dict):
            label, weight = label["probabilities"], weight["probabilities"]
        with tf.GradientTape() as tape:
            probabilities, optics = split_outputs(model(image, training=True))
            pixels = tf.cast(tf.reduce_prod(tf.shape(label)[1:]), "float32")
            per_pixel = cross_entropy(label, probabilities) * weight
            loss = tf.reduce_sum(tf.cast(per_pixel, "float32")) / (global_batch * pixels)
            if optics is not None:
                loss += config.optics_loss_weight * tf.reduce_sum(
                    optics_loss(targets["optics"], optics)) / global_batch
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(iterator):
        per_replica = strategy.run(replica_step, args=next(iterator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    # Batch-normalization moving statistics are updated by each replica from its own share of
    # the data; an exponential moving average is linear, so averaging them over the replicas at
    # the end of an epoch equals averaging every step's batch statistics.
    statistics = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]

    @tf.function
    def average_statistics():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                       [tf.identity(v.value) for v in statistics])
            for v, mean in zip(statistics, means):
                v.assign(mean)
        strategy.run(replica_fn)

    def validate() -> dict:
        metrics = [ColumnPixelAccuracy(), UnweightedMeanIoU(
            num_classes=config.model.max_height + 1, sparse_y_pred=False, name="mean_iou")]
        optics_metrics = [OpticsAbsoluteError(i, name) for i, name in enumerate(OPTICS_METRIC_NAMES)]
        total = count = optics_total = frames = 0.0
        data = validation if config.validation_steps is None else validation.take(
            config.validation_steps)
        for image, label, weight in data:
            targets = label
            if isinstance(label, dict):
                label, weight = label["probabilities"], weight["probabilities"]
            probabilities, optics = split_outputs(model(image, training=False))
            per_pixel = cross_entropy(label, probabilities) * weight
            total += float(tf.reduce_sum(per_pixel))
            count += float(tf.size(per_pixel))
            for metric in metrics:
                metric.update_state(label, probabilities)
            if optics is not None:
                optics_total += float(tf.reduce_sum(optics_loss(targets["optics"], optics)))
                frames += float(tf.shape(optics)[0])
                for metric in optics_metrics:
                    metric.update_state(targets["optics"], optics)
        logs = {"val_loss": total / max(count, 1.0),
                **{f"val_{m.name}": float(m.result()) for m in metrics}}
        if frames:  # as Keras' fit names them for a model with two outputs
            logs["val_loss"] += config.optics_loss_weight * optics_total / frames
            logs.update({f"val_optics_{m.name}": float(m.result()) for m in optics_metrics})
        return logs

    history: dict[str, list] = {}
    model.stop_training = False
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    for epoch in range(initial_epoch, config.epochs):
        start, losses = time.monotonic(), []
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        for _ in range(config.steps_per_epoch):
            losses.append(float(train_step(batches)))
        if statistics:
            average_statistics()
        logs = {"loss": float(np.mean(losses)), **validate()}
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        if progress:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {logs['loss']:.4f}, val_loss "
                  f"{logs['val_loss']:.4f} ({time.monotonic() - start:.1f} s)", flush=True)
        if model.stop_training:
            break
    for callback in callbacks:
        callback.on_train_end()
    return history


def _drop_log_rows(path: Path, first_epoch: int) -> None:
    """Keep the header and the rows of epochs before ``first_epoch`` in the CSV log (a run
    killed between its log row and its checkpoint redoes that epoch: its row must not stay)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [row for row in lines[1:]
                        if row.split(",", 1)[0].strip().isdigit()
                        and int(row.split(",", 1)[0]) < first_epoch]
    if keep != lines:
        write_text_atomic(path, "".join(keep))


# --- the run -----------------------------------------------------------------------------------
def manifest_sha256(data_dir) -> str:
    """sha256 (hex) of ``data_dir/manifest.json``, the identity of a dataset."""
    return file_sha256(Path(data_dir) / "manifest.json")


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ModelError("pass either --resume or --overwrite, not both")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / "checkpoints" / "last.keras").is_file():
            fix = ("start it again with --overwrite instead of --resume" if exists
                   else "drop --resume to start a new run")
            raise ModelError(f"nothing to resume in {run_dir} (no checkpoints/last.keras); {fix}")
        return
    if exists and not overwrite:
        raise ModelError(f"run folder {run_dir} already exists; pass --resume to continue it "
                         "or --overwrite to start again")
    if exists:
        if not ((run_dir / "config.json").is_file() or (run_dir / "checkpoints").is_dir()):
            raise ModelError(f"{run_dir} is not empty and does not look like a training run; "
                             "refusing to overwrite it, choose another --out")
        for entry in run_dir.iterdir():  # the folder itself stays: it holds the --out lock
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _match_dataset(config: TrainConfig, manifest: dict, data_dir: Path) -> TrainConfig:
    """The model works at the dataset's pixel size and must have a class for every height."""
    data_max = int(manifest.get("max_height", config.model.max_height))
    if data_max > config.model.max_height:
        raise ConfigError(f"{data_dir} has heights up to {data_max} but model.max_height is "
                          f"{config.model.max_height}; set model.max_height ≥ {data_max} in --config")
    pixel = float(manifest.get("pixel_size_A", config.model.pixel_size_A))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pixel_size_A=pixel))


_RUN_ADVICE = "start again with --overwrite"
"""What to do about a broken file in the run folder being trained (``--out``)."""


def _read_json(path: Path, advice: str = _RUN_ADVICE) -> dict:
    """A run's JSON file; a missing or broken one is a :class:`ModelError` with ``advice``."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path} ({err}); {advice}") from None


_SOURCE_ADVICE = "name another --init-from run"
"""What to do about a broken file in the run a warm restart starts from (never --overwrite:
that would start the new run afresh and leave the broken source as it is)."""


def _saved_model_config(run_dir: Path, advice: str = _RUN_ADVICE) -> dict:
    """The model settings a run was started with, with the defaults of fields added since
    (a run of versions 1–2 has no ``architecture``: it is a 'unet')."""
    saved = _read_json(run_dir / "config.json", advice).get("model") or {}
    try:
        return to_dict(from_dict(ModelConfig, saved))
    except (ConfigError, TypeError):
        return saved


def _dataset_entry(data_dir: Path, digest: str, manifest: dict) -> dict:
    return {"data_dir": str(data_dir.resolve()), "manifest_sha256": digest,
            "counts": manifest.get("counts")}


def _dataset_record(data_dirs, digests, manifests, weights, previous: dict | None,
                    epoch: int, added, removed, source: dict | None = None) -> dict:
    """The run's ``dataset.json``: the first dataset's fields as versions 1–2 wrote them (read
    by old tools), ``datasets`` (every one), summed ``counts``, the ``class_weights`` in use,
    ``changes``: the datasets added or removed on a resume, with the epoch it happened, and
    ``initialized_from``: the run and epoch a warm-started run took its weights from
    (``source``, see :func:`_warm_start_source`)."""
    from ..data.records import run_datasets

    first = manifests[0]
    counts: dict[str, int] = {}
    for m in manifests:
        for split, n in (m.get("counts") or {}).items():
            counts[split] = counts.get(split, 0) + int(n)
    entries = [_dataset_entry(d, h, m) for d, h, m in zip(data_dirs, digests, manifests)]
    changes = list((previous or {}).get("changes", []))
    if previous is not None and (added or removed):
        dirs = {e["manifest_sha256"]: e["data_dir"] for e in run_datasets(previous) + entries}
        changes.append({"after_epoch": epoch,
                        "added": [{"data_dir": dirs[h], "manifest_sha256": h} for h in added],
                        "removed": [{"data_dir": dirs[h], "manifest_sha256": h} for h in removed]})
    record = {
        "data_dir": entries[0]["data_dir"], "manifest_sha256": digests[0],
        "pixel_size_A": first.get("pixel_size_A"), "max_height": first.get("max_height"),
        "label_radius_A": first.get("config", {}).get("label_radius_A"),
        "counts": counts, "class_weights": [float(w) for w in weights],
        "datasets": entries,
    }
    # the datasets whose summed label histograms gave the class weights (a resume keeps them,
    # and a warm start takes the earlier run's)
    if source is not None:
        record["class_weights_from"] = source["class_weights_from"]
    elif previous is not None and previous.get("class_weights_from"):
        record["class_weights_from"] = previous["class_weights_from"]
    elif previous is not None and previous.get("class_weights"):
        record["class_weights_from"] = [e["manifest_sha256"] for e in run_datasets(previous)]
    else:
        record["class_weights_from"] = list(digests)
    if changes:
        record["changes"] = changes
    initialized = (source or {}).get("initialized_from") or (previous or {}).get("initialized_from")
    if initialized:
        record["initialized_from"] = initialized
    return record


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


def _warm_start_source(source_run: Path, config: TrainConfig) -> dict:
    """What a new run started from another run's weights needs of it: its checkpoint of the
    last finished epoch, its class weights (the loss must not jump) and where they came from.

    Raises
    ------
    ModelError
        The run has no checkpoint, or its model settings differ from ``config.model``.
    """
    from ..data.records import run_datasets

    if not (source_run / "checkpoints" / "last.keras").is_file():
        raise ModelError(f"--init-from {source_run} has no checkpoints/last.keras; name a "
                         "training run folder")
    if _saved_model_config(source_run, _SOURCE_ADVICE) != to_dict(config.model):
        raise ModelError(f"the model settings of --init-from {source_run} (its config.json) "
                         "differ from --config's; start from a run with the same [model] table")
    state = _read_json(source_run / "state.json", _SOURCE_ADVICE)
    record = _read_json(source_run / "dataset.json", _SOURCE_ADVICE)
    checkpoint = source_run / "checkpoints" / state.get("checkpoint", "last.keras")
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint} named by {source_run}/state.json is missing; "
                         "name another --init-from run")
    weights = record.get("class_weights")
    if weights is None or len(weights) != config.model.max_height + 1:
        raise ModelError(f"{source_run}/dataset.json has no class weights for "
                         f"{config.model.max_height + 1} classes; name another --init-from run")
    return {
        "checkpoint": checkpoint,
        "class_weights": weights,
        "class_weights_from": record.get("class_weights_from")
        or [e["manifest_sha256"] for e in run_datasets(record)],
        "initialized_from": {"run_dir": str(source_run.resolve()), "checkpoint": checkpoint.name,
                             "epoch": int(state.get("epoch", 0))},
    }


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
    from ..data.pipeline import make_dataset
    from ..data.records import (as_data_dirs, compare_run_datasets, data_change_message, read_manifests,
                          summed_label_histogram)

    config.validate()
    data_dirs, run_dir = as_data_dirs(data_dir), Path(run_dir)
    manifests = read_manifests(data_dirs)  # DataError if one is missing or they disagree
    digests = [manifest_sha256(d) for d in data_dirs]
    config = _match_dataset(config, manifests[0], data_dirs[0])
    source = None
    if init_from is not None:  # before the run folder is made (or, with overwrite, deleted)
        if resume:
            raise ModelError("pass either --resume or --init-from, not both")
        if Path(init_from).resolve() == run_dir.resolve():
            raise ModelError(f"--init-from {init_from} is --out itself; give the new run "
                             "another folder")
        source = _warm_start_source(Path(init_from), config)
    partial = _partial_source(init_partial, run_dir, resume or init_from is not None, digests)
    strategy = choose_strategy()  # before any other TensorFlow op (multi-worker needs that)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    teacher, teacher_record = _load_teacher(config, multi_worker)
    if is_chief(strategy):
        _prepare_run_dir(run_dir, resume, overwrite)
        out_dir = run_dir
    else:  # reads the chief's run (shared file system) but writes only to a private folder
        if resume:
            _prepare_run_dir(run_dir, resume, False)
        out_dir = Path(tempfile.mkdtemp(prefix="ceriakeras-worker-"))
        print(f"worker {strategy.cluster_resolver.task_type} {strategy.cluster_resolver.task_id}: "
              f"the chief writes {run_dir}; this worker's copies go to {out_dir}", flush=True)

    initial_epoch, best_val_loss, best_epoch = 0, np.inf, 0
    saved, added, removed = None, [], []
    if resume:
        saved = _read_json(run_dir / "dataset.json")
        added, removed = compare_run_datasets(saved, digests)
        from .distill import check_same_teacher

        check_same_teacher(run_dir, saved, teacher_record)
        if removed and not allow_data_change:
            raise ModelError(data_change_message(run_dir, saved, removed))
        if _saved_model_config(run_dir) != to_dict(config.model):
            raise ModelError(f"the model settings differ from those of {run_dir}/config.json; "
                             "resume with the same model config or start a new run")
        state = _read_json(run_dir / "state.json")
        initial_epoch = int(state["epoch"])
        best_val_loss = float(state.get("best_val_loss", np.inf))
        best_epoch = int(state.get("best_epoch", 0))
        checkpoint = run_dir / "checkpoints" / state.get("checkpoint", "last.keras")
        if not checkpoint.is_file():
            raise ModelError(f"{checkpoint} named by {run_dir}/state.json is missing; "
                             "start again with --overwrite")
        if out_dir == run_dir:
            _drop_log_rows(run_dir / "log.csv", initial_epoch)
    write_text_atomic(out_dir / "config.json", json.dumps(to_dict(config), indent=2))
    n_classes = config.model.max_height + 1
    kept = (saved or source or {}).get("class_weights")
    if kept is not None and len(kept) == n_classes:  # the loss must not jump on resume
        weights = np.asarray(kept, np.float32)
    else:
        weights = class_weights_from_histogram(
            summed_label_histogram(manifests), config.weight_scheme, config.max_class_weight,
            config.background_weight, num_classes=n_classes)
    if added or removed:
        print(f"{run_dir}: the training data changes after epoch {initial_epoch}: "
              f"{len(added)} dataset(s) added, {len(removed)} removed, now "
              f"{', '.join(str(d) for d in data_dirs)}; the class weights stay the run's first "
              "(recorded in dataset.json)", flush=True)
    write_text_atomic(out_dir / "dataset.json", json.dumps(_dataset_record(
        data_dirs, digests, manifests, weights, saved, initial_epoch, added, removed,
        source or partial), indent=2))
    if teacher_record is not None:
        from .distill import add_teacher_record

        add_teacher_record(out_dir, teacher_record)
    optics = config.model.architecture == "context_unet" and config.model.global_branch
    training = make_dataset(data_dirs, "train", config.pipeline, class_weights=weights,
                            training=True, optics=optics)
    validation = make_dataset(data_dirs, "validation", config.pipeline, class_weights=weights,
                              training=False, optics=optics)

    with precision_policy(config.mixed_precision), strategy.scope():
        if resume:
            model = load_checkpoint(checkpoint, instead="start again with --overwrite")
            compile_model(model, config, optimizer=model.optimizer)
            print(f"resumed {run_dir} from checkpoints/{checkpoint.name} after epoch "
                  f"{initial_epoch} (optimizer step {int(model.optimizer.iterations.numpy())})",
                  flush=True)
        else:
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
            model = compile_model(model, config)
        extra_callbacks = []
        if teacher is not None:
            from .distill import attach_teacher

            extra_callbacks.append(attach_teacher(model, teacher, weights, config))
        if initial_epoch >= config.epochs:
            print(f"{run_dir} already has {initial_epoch} epochs; pass a larger --epochs to "
                  "train further", flush=True)
            history = {}
        else:
            callbacks = make_callbacks(out_dir, config, validation, resume=resume,
                                       best_val_loss=best_val_loss,
                                       best_epoch=best_epoch) + extra_callbacks
            if multi_worker:  # Keras 3's fit fails under this strategy (keras-team/keras#20585)
                history = fit_multi_worker(model, strategy, training, validation, config,
                                           callbacks, initial_epoch=initial_epoch,
                                           progress=progress)
            else:
                history = model.fit(
                    training, validation_data=validation, epochs=config.epochs,
                    initial_epoch=initial_epoch, steps_per_epoch=config.steps_per_epoch,
                    validation_steps=config.validation_steps, callbacks=callbacks,
                    # a bar (ANSI codes) on a terminal only; one line per epoch in a log file
                    verbose=(1 if sys.stdout.isatty() else 2) if progress else 0, shuffle=False,
                ).history
    state = _read_json(out_dir / "state.json") if (out_dir / "state.json").exists() else {}
    if initial_epoch < config.epochs and not np.isfinite(
            float(state.get("best_val_loss", best_val_loss))):  # trained, never a finite loss
        raise ModelError(f"{run_dir} never reached a finite validation loss (NaN or inf: "
                         "learning_rate too high, or broken data); no best checkpoint was kept, "
                         "start again with a smaller learning_rate and --overwrite")
    return {
        "run_dir": str(run_dir),
        "resumed": resume,
        "initial_epoch": initial_epoch,
        "epochs_completed": int(state.get("epoch", initial_epoch)),
        "best_epoch": int(state.get("best_epoch", best_epoch)),
        "best_val_loss": float(state.get("best_val_loss", best_val_loss)),
        "history": {k: [float(v) for v in vals] for k, vals in history.items()},
    }
