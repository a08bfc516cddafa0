"""Knowledge distillation: a student network learns from a served teacher's probabilities too.

Version 6 averages two networks (23.1 GFLOP per 512² frame); one cheaper network can learn
from its averaged probabilities (soft targets) as well as from the true labels. Each training
step, on the device and after batching::

    expected counts (B, H, W, 1) → student (training): its PoissonNoise layer → noisy counts
                                            → the rest of it → logits z, optics
    the same noisy counts → teacher (a served model, inference) → p_T (B, H, W, C), calibrated
    loss = (1 − λ) · CE_w(label, z) + λ · T² · KL(q_T ‖ softmax(z / T)) + optics weight · optics loss

so teacher and student see the same noisy crop. ``CE_w`` is the class-weighted cross-entropy
of :func:`ceriakeras.nn.train.compile_model` (per-pixel weights = class weight of the true
label, mean over pixels). The teacher's probabilities are calibrated (the export divides each
member's softmax by its class weights), while a student trained with class weights learns
``∝ w · p``; so the soft target is ``q_T ∝ (w · p_T)^(1/T)``, and the export's prior correction
of the student gives calibrated probabilities again. The KL term carries the same per-pixel
weights as the cross-entropy, so λ trades two losses of the same scale; ``T²`` keeps its
gradients' size independent of ``T`` (Hinton et al. 2015).

The model being trained, saved and exported stays the plain student (:func:`attach_teacher`
replaces only its ``train_step``); validation, checkpoints, early stopping and resuming are
those of :func:`ceriakeras.nn.train.train`, with the validation loss on the true labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import tensorflow as tf

from ..config import ModelError, TrainConfig
from ..io.files import file_sha256, read_json, write_text_atomic


# --- the teacher -------------------------------------------------------------------------------
def load_teacher(path, config: TrainConfig):
    """Load the served teacher model (a version folder, or ``saved_models/NAME``: its newest).

    Raises
    ------
    ModelError
        No served model there, or one made for another pixel size or number of height classes
        than the student's ``config.model``.
    """
    from ..inference.served import load_served_model

    served = load_served_model(path)
    pixel, heights = served.info.get("pixel_size_A"), served.info.get("max_height")
    if pixel is None or abs(float(pixel) - config.model.pixel_size_A) > 1e-6 or \
            int(heights or -1) != config.model.max_height:
        raise ModelError(f"the teacher {served.path} works at {pixel} Å with heights up to "
                         f"{heights}, the student at {config.model.pixel_size_A} Å up to "
                         f"{config.model.max_height}; name a teacher made for the same data")
    return served


def teacher_record(served) -> dict:
    """What the run records of its teacher (``dataset.json``): its folder and the sha256 of its
    graph and of its variables' index (which holds a checksum of every weight)."""
    folder = Path(served.path)
    return {"path": str(folder.resolve()),
            "saved_model_sha256": file_sha256(folder / "saved_model.pb"),
            "variables_index_sha256": file_sha256(folder / "variables" / "variables.index")}


def check_same_teacher(run_dir, previous: dict, record: dict | None) -> None:
    """On resume: the soft targets must not change in the middle of a run.

    Raises
    ------
    ModelError
        The teacher (or its absence) differs from the one the run's ``dataset.json`` names.
    """
    before = previous.get("teacher")
    same = (before is None and record is None) or (
        before is not None and record is not None
        and all(before.get(k) == record[k] for k in ("saved_model_sha256",
                                                      "variables_index_sha256")))
    if not same:
        was = before["path"] if before else "none"
        raise ModelError(f"{run_dir} was trained with teacher {was}; resume with that --teacher "
                         "(or none) or start a new run")


def add_teacher_record(run_dir, record: dict) -> None:
    """Add the teacher to the run's ``dataset.json`` (written just before)."""
    path = Path(run_dir) / "dataset.json"
    write_text_atomic(path, json.dumps({**read_json(path, error=ModelError), "teacher": record},
                                       indent=2))


# --- the losses --------------------------------------------------------------------------------
def soft_targets(teacher_probabilities, class_weights, temperature: float):
    """The student's soft targets ``q_T ∝ (w · p_T)^(1/T)``.

    Parameters
    ----------
    teacher_probabilities : (B, H, W, C) float
        The teacher's calibrated probabilities.
    class_weights : (C,) float
        The student's class weights (its raw softmax learns ``∝ w · p``).
    temperature : float
        ``T ≥ 1`` softens the targets.

    Returns
    -------
    (B, H, W, C) float32, summing to 1 over the last axis.
    """
    p = tf.cast(teacher_probabilities, tf.float32)
    log_target = tf.math.log(tf.maximum(p, 1e-30)) + tf.math.log(
        tf.constant(class_weights, tf.float32))
    return tf.nn.softmax(log_target / temperature, axis=-1)


def distillation_loss(targets, student_logits, sample_weight, temperature: float):
    """``T² · mean over pixels of w · KL(targets ‖ softmax(z / T))``.

    Parameters
    ----------
    targets : (B, H, W, C) float32
        :func:`soft_targets`.
    student_logits : (B, H, W, C)
        The student's pre-softmax outputs ``z``.
    sample_weight : (B, H, W) float
        Per-pixel weights (class weight of the true label), as for the cross-entropy.
    temperature : float

    Returns
    -------
    scalar float32 (0 where the student's tempered softmax equals the targets).
    """
    log_student = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature, axis=-1)
    kl = tf.reduce_sum(tf.math.xlogy(targets, targets) - targets * log_student, axis=-1)
    return temperature**2 * tf.reduce_mean(tf.cast(sample_weight, tf.float32) * kl)


def weighted_cross_entropy(label, student_logits, sample_weight):
    """Mean over pixels of ``w · (− log softmax(z)[label])`` (Keras' ``sum_over_batch_size``)."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.cast(label, tf.int32), tf.cast(student_logits, tf.float32))
    return tf.reduce_mean(tf.cast(sample_weight, tf.float32) * ce)


# --- the student ---------------------------------------------------------------------------------
def student_taps(model: keras.Model) -> keras.Model:
    """The student with more outputs: the same graph and layers, from ``image`` to
    ``{'noisy': counts after its PoissonNoise layer, 'logits': before the softmax,
    'optics': (only with a global branch)}``, so one call draws the noise once and gives both
    what the teacher must see and what the student made of it."""
    outputs = {"noisy": model.get_layer("poisson_noise").output,
               "logits": model.get_layer("logits").output}
    if isinstance(model.output, dict) and "optics" in model.output:
        outputs["optics"] = model.output["optics"]
    return keras.Model(model.inputs[0], outputs, name="student_taps")


class DistillationLogs(keras.callbacks.Callback):
    """The epoch means of the loss's two parts: ``label_ce`` (class-weighted cross-entropy on
    the true labels) and ``distill_kl`` (``T² · KL``), reset at each epoch's start."""

    def __init__(self):
        super().__init__()
        self.label_ce = keras.metrics.Mean(name="label_ce")
        self.distill_kl = keras.metrics.Mean(name="distill_kl")

    def on_epoch_begin(self, epoch, logs=None):
        self.label_ce.reset_state()
        self.distill_kl.reset_state()


def attach_teacher(model: keras.Model, teacher, class_weights, config: TrainConfig):
    """Make ``model.fit`` train the compiled ``model`` against ``teacher`` as well.

    Replaces the model's ``train_step`` (not saved: checkpoints hold the plain student) by the
    distillation step of the module docstring, with ``λ = config.distill_weight`` and
    ``T = config.distill_temperature``. Call it after :func:`ceriakeras.nn.train.compile_model`
    (whose optics loss it keeps, weighted by ``config.optics_loss_weight``).

    Returns
    -------
    DistillationLogs
        The callback that keeps the ``label_ce`` and ``distill_kl`` logs; add it to ``fit``'s.
    """
    taps = student_taps(model)
    weight, temperature = float(config.distill_weight), float(config.distill_temperature)
    optics_loss = model.loss.get("optics") if isinstance(model.loss, dict) else None
    optics_weight = float(config.optics_loss_weight)
    loss_tracker = next(m for m in model.metrics if m.name == "loss")
    logs = DistillationLogs()
    weights = [float(w) for w in class_weights]

    def train_step(data):
        image, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        label = y["probabilities"] if isinstance(y, dict) else y
        pixel_weight = sample_weight["probabilities"] if isinstance(y, dict) else sample_weight
        with tf.GradientTape() as tape:
            out = taps(image, training=True)
            targets = tf.stop_gradient(soft_targets(  # the same noisy counts as the student's
                teacher.signature(image=out["noisy"])["probabilities"], weights, temperature))
            ce = weighted_cross_entropy(label, out["logits"], pixel_weight)
            kl = distillation_loss(targets, out["logits"], pixel_weight, temperature)
            loss = (1.0 - weight) * ce + weight * kl
            if optics_loss is not None:  # as compiled: the optics output's own loss
                loss += optics_weight * optics_loss(y["optics"], out["optics"])
            if model.losses:
                loss += tf.add_n(model.losses)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = model.optimizer.scale_loss(loss / replicas)
        gradients = tape.gradient(scaled, model.trainable_weights)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_weights))
        loss_tracker.update_state(loss, sample_weight=tf.shape(image)[0])
        logs.label_ce.update_state(ce)
        logs.distill_kl.update_state(kl)
        probabilities = tf.nn.softmax(tf.cast(out["logits"], tf.float32), axis=-1)
        y_pred = ({"probabilities": probabilities, "optics": out["optics"]}
                  if "optics" in out else probabilities)
        results = model.compute_metrics(image, y, y_pred, sample_weight)
        return {**results, "label_ce": logs.label_ce.result(),
                "distill_kl": logs.distill_kl.result()}

    model.jit_compile = False  # the teacher is a SavedModel function, not an XLA cluster
    model.train_function = None
    model.train_step = train_step
    return logs


# --- a student started from a run whose layers partly differ -------------------------------------
def partial_source(run_dir) -> dict:
    """The checkpoint of ``run_dir``'s last finished epoch and the record of it for the new
    run's ``dataset.json`` (``initialized_from``, with ``partial``).

    Raises
    ------
    ModelError
        The run has no checkpoint.
    """
    run_dir = Path(run_dir)
    try:
        state = read_json(run_dir / "state.json", error=ModelError, missing={})
    except ModelError:  # a broken state.json: the last checkpoint
        state = {}
    checkpoint = run_dir / "checkpoints" / state.get("checkpoint", "last.keras")
    if not checkpoint.is_file():
        checkpoint = run_dir / "checkpoints" / "last.keras"
    if not checkpoint.is_file():
        raise ModelError(f"--init-partial {run_dir} has no checkpoints/last.keras; name a "
                         "training run folder")
    return {"checkpoint": checkpoint,
            "initialized_from": {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint.name,
                                 "epoch": int(state.get("epoch", 0)),
                                 "partial": "weights of the layers whose shapes agree"}}


def copy_matching_weights(model: keras.Model, donor: keras.Model) -> dict:
    """Copy into ``model`` the weights of ``donor``'s layers whose weight shapes are the same.

    Layers with weights are paired in graph order within each kind (the k-th ``Conv2D`` of one
    with the k-th of the other, …); a pair whose weights all have equal shapes is copied, the
    others keep their fresh initialisation.

    Returns
    -------
    dict
        ``layers_copied``, ``layers`` (of ``model`` with weights), ``parameters_copied``,
        ``parameters`` (all of ``model``'s weights, trainable or not).
    """
    def by_kind(m):
        kinds: dict[str, list] = {}
        for layer in m.layers:
            if layer.weights:
                kinds.setdefault(type(layer).__name__, []).append(layer)
        return kinds

    donors = by_kind(donor)
    copied = parameters = total = layers = 0
    for kind, own in by_kind(model).items():
        for i, layer in enumerate(own):
            layers += 1
            size = sum(int(w.numpy().size) for w in layer.weights)
            total += size
            other = donors.get(kind, [])[i] if i < len(donors.get(kind, [])) else None
            if other is not None and [tuple(w.shape) for w in layer.weights] == \
                    [tuple(w.shape) for w in other.weights]:
                layer.set_weights(other.get_weights())
                copied, parameters = copied + 1, parameters + size
    return {"layers_copied": copied, "layers": layers, "parameters_copied": parameters,
            "parameters": total}


def init_partial(model: keras.Model, source: dict, run_dir) -> dict:
    """Start ``model`` from ``source``'s checkpoint (:func:`partial_source`) where the shapes
    agree; record the share copied in ``run_dir/dataset.json`` and say it."""
    from .model import load_checkpoint

    donor = load_checkpoint(source["checkpoint"], compile=False,
                            instead="name another --init-partial run")
    summary = copy_matching_weights(model, donor)
    path = Path(run_dir) / "dataset.json"
    record = read_json(path, error=ModelError)
    record["initialized_from"] = {**record.get("initialized_from", {}), **summary}
    write_text_atomic(path, json.dumps(record, indent=2))
    rest = ("; the others from a fresh initialisation"
            if summary["layers_copied"] < summary["layers"] else "")
    print(f"{run_dir}: {summary['layers_copied']} of {summary['layers']} layers "
          f"({summary['parameters_copied']} of {summary['parameters']} weights) start from "
          f"{source['checkpoint']}{rest}", flush=True)
    return summary
