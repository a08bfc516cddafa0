"""Training on several devices or machines: the strategy, mixed precision, who writes the run,
and the custom distributed step for MultiWorkerMirroredStrategy (:func:`fit_multi_worker`)."""

from __future__ import annotations

import contextlib
import os
import time

import keras
import numpy as np
import tensorflow as tf

from ..config import TrainConfig
from .losses import (
    OPTICS_METRIC_NAMES,
    ColumnPixelAccuracy,
    OpticsAbsoluteError,
    OpticsLoss,
    UnweightedMeanIoU,
)
from .model import split_outputs


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
    train_step = _distributed_train_step(model, strategy, config)
    # Batch-normalization moving statistics are updated by each replica from its own share of
    # the data; an exponential moving average is linear, so averaging them over the replicas at
    # the end of an epoch equals averaging every step's batch statistics.
    statistics = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]
    average_statistics = _statistics_averager(strategy, statistics)

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
        logs = {"loss": float(np.mean(losses)), **validate_replica(model, validation, config)}
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


def _distributed_train_step(model: keras.Model, strategy: tf.distribute.Strategy,
                            config: TrainConfig):
    """One step of :func:`fit_multi_worker` as a ``tf.function(iterator) -> global mean loss``:
    each replica's class-weighted cross-entropy over the *global* number of pixels (plus the
    optics loss and regularisation), gradients all-reduced by the optimizer."""
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

    return train_step


def _statistics_averager(strategy: tf.distribute.Strategy, statistics: list):
    """A ``tf.function()`` that sets each of ``statistics`` (variables) to its mean over the
    replicas."""

    @tf.function
    def average_statistics():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                       [tf.identity(v.value) for v in statistics])
            for v, mean in zip(statistics, means):
                v.assign(mean)
        strategy.run(replica_fn)

    return average_statistics


def validate_replica(model: keras.Model, validation, config: TrainConfig) -> dict:
    """The ``val_`` logs of one epoch as Keras' ``fit`` names them, computed on this worker
    alone (``val_loss``, the pixel metrics and, for a model with optics, the optics ones)."""
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    optics_loss = OpticsLoss(reduction=None)
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
