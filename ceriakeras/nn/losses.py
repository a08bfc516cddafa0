"""The training objective: class weights from the labels, the weighted loss and the metrics
(registered with Keras, so checkpoints load), the learning-rate schedule and :func:`compile_model`."""

from __future__ import annotations

import keras
import numpy as np
import scipy.ndimage
import tensorflow as tf

from ..config import TrainConfig
from .model import OPTICS_OUTPUTS, has_optics

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
