"""The callbacks of a training run: checkpoints and state.json, the validation report and
TensorBoard scalars and panels (:func:`make_callbacks`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..config import TrainConfig
from ..io.files import write_text_atomic
from .losses import column_height_accuracy
from .model import split_outputs


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


class RunEarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping on the validation loss that counts over the whole run, resumes included.

    Keras' ``EarlyStopping`` starts each ``fit`` with no best and no wait, so a run resumed
    every session would count its patience from each resume and could never stop, or stop
    late. This one starts from the run's best validation loss and its epoch (``state.json``):
    after a resume at ``initial_epoch`` it has waited ``initial_epoch − best_epoch`` epochs.

    Parameters
    ----------
    patience : int
        Epochs without a lower validation loss before the run stops.
    best_val_loss : float
        The run's lowest validation loss so far (``inf`` for a new run).
    best_epoch : int
        Its epoch, counted from 1 (0 for a new run).
    initial_epoch : int
        Epochs already done when this ``fit`` starts.
    """

    def __init__(self, patience: int, best_val_loss: float = np.inf, best_epoch: int = 0,
                 initial_epoch: int = 0):
        super().__init__(monitor="val_loss", patience=patience)
        self.run_best = (float(best_val_loss), int(best_epoch), int(initial_epoch))

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        best_val_loss, best_epoch, initial_epoch = self.run_best
        if np.isfinite(best_val_loss) and best_epoch > 0:
            self.best, self.best_epoch = best_val_loss, best_epoch - 1  # Keras counts from 0
            self.wait = max(0, initial_epoch - best_epoch)


def make_callbacks(run_dir: Path, config: TrainConfig, validation, *, resume: bool,
                   best_val_loss: float = np.inf, best_epoch: int = 0,
                   initial_epoch: int = 0) -> list:
    """The callbacks of a run, in the order they must run (the validation report first).

    ``best_val_loss`` and ``best_epoch`` (from 1) are the run's so far and ``initial_epoch`` the
    epochs it has done (a resume), for the best checkpoint and early stopping."""
    return [
        ValidationReport(validation, config.validation_steps, run_dir / "tensorboard" / "panels",
                         config.model.max_height),
        keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=resume),
        RunCheckpoints(run_dir, best_val_loss, best_epoch),
        TensorBoardScalars(run_dir / "tensorboard"),
        RunEarlyStopping(config.early_stopping_patience, best_val_loss, best_epoch,
                         initial_epoch),
        keras.callbacks.TerminateOnNaN(),  # a NaN loss never recovers: stop, refused below
    ]
