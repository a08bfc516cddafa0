"""Distillation: soft targets undo the export's prior correction, a copy of the student as its own
teacher costs nothing, the student moves towards its teacher, partial starts, resume, refusals."""

import dataclasses
import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from helpers import CONTEXT, make_synthetic_dataset

from ceriakeras.config import ConfigError, ModelError, TrainConfig, load_config
from ceriakeras.nn.distill import (
    distillation_loss,
    load_teacher,
    soft_targets,
    student_taps,
)
from ceriakeras.nn.export import export_run
from ceriakeras.nn.model import load_checkpoint
from ceriakeras.nn.train import train

STUDENT = dataclasses.replace(CONTEXT, learning_rate=1e-2, warmup_steps=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def teacher_run(dataset, tmp_path_factory):
    """A context U-Net trained 2 steps, and its export (the teacher of the tests)."""
    root = tmp_path_factory.mktemp("teacher")
    keras.utils.set_random_seed(1)
    train(dataset, root / "run", CONTEXT, progress=False)
    served = export_run(root / "run", root / "saved_models" / "tiny", checkpoint="last")
    return root / "run", served


# --- the losses ------------------------------------------------------------------------------
def test_soft_targets_undo_the_prior_correction_of_the_export():
    rng = np.random.default_rng(0)
    raw = rng.dirichlet(np.ones(5), size=(2, 3, 3)).astype(np.float32)  # a weighted softmax
    w = np.array([0.1, 1.0, 2.0, 0.5, 10.0], np.float32)
    calibrated = raw / w / (raw / w).sum(-1, keepdims=True)             # what export serves
    np.testing.assert_allclose(soft_targets(calibrated, w, 1.0), raw, atol=1e-6)
    hot = soft_targets(calibrated, w, 4.0).numpy()
    entropy = [-(t * np.log(t)).sum(-1).mean() for t in (raw, hot)]
    assert entropy[1] > entropy[0], "a higher temperature softens the targets"


def test_distillation_loss_vanishes_only_where_the_student_matches():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
    weight = rng.uniform(0.1, 3.0, (2, 4, 4)).astype(np.float32)
    for t in (1.0, 3.0):
        matched = tf.nn.softmax(logits / t).numpy()
        assert abs(float(distillation_loss(matched, logits, weight, t))) < 1e-6
    other = tf.nn.softmax(rng.normal(size=logits.shape)).numpy().astype(np.float32)
    loss = float(distillation_loss(other, logits, weight, 1.0))
    kl = (other * (np.log(other) - np.log(tf.nn.softmax(logits).numpy()))).sum(-1)
    assert loss == pytest.approx(float((weight * kl).mean()), rel=1e-4) and loss > 0


def test_config_refuses_weights_and_temperatures_out_of_range():
    with pytest.raises(ConfigError, match="distill_weight"):
        load_config(TrainConfig, None, distill_weight=1.5)
    with pytest.raises(ConfigError, match="distill_temperature"):
        load_config(TrainConfig, None, distill_temperature=0.0)


# --- a teacher that is a frozen copy of the student ------------------------------------------------
def test_a_frozen_copy_of_the_student_as_teacher_gives_zero_distillation_loss(teacher_run):
    run, served = teacher_run
    config = load_config(TrainConfig, run / "config.json")
    teacher = load_teacher(served, config)
    student = load_checkpoint(run / "checkpoints" / "last.keras", compile=False, instead="-")
    weights = json.loads((run / "dataset.json").read_text())["class_weights"]
    taps = student_taps(student)
    counts = np.random.default_rng(2).poisson(500, (2, 40, 48, 1)).astype(np.float32)
    out = taps(counts, training=False)
    weight = np.ones((2, 40, 48), np.float32)
    for t in (1.0, 2.0):
        targets = soft_targets(teacher.signature(image=out["noisy"])["probabilities"], weights, t)
        assert abs(float(distillation_loss(targets, out["logits"], weight, t))) < 1e-5
    np.testing.assert_allclose(tf.nn.softmax(out["logits"]),
                               student(counts, training=False)["probabilities"], atol=1e-6)
    # in training the teacher is shown the student's own noise draw, not the expected counts
    assert not np.allclose(taps(counts, training=True)["noisy"], counts)


def test_a_teacher_for_other_heights_is_refused(teacher_run):
    _, served = teacher_run
    other = dataclasses.replace(CONTEXT, model=dataclasses.replace(CONTEXT.model, max_height=5))
    with pytest.raises(ModelError, match="same data"):
        load_teacher(served, other)


# --- training against the teacher -----------------------------------------------------------------
@pytest.mark.slow
def test_the_student_moves_towards_the_teacher_and_the_run_resumes(dataset, teacher_run,
                                                                    tmp_path):
    _, served = teacher_run
    config = dataclasses.replace(STUDENT, teacher=str(served), distill_weight=1.0, epochs=3,
                                 steps_per_epoch=4)
    run = tmp_path / "student"
    keras.utils.set_random_seed(5)  # another initialisation than the teacher's
    result = train(dataset, run, config, progress=False)
    kl = result["history"]["distill_kl"]
    assert kl[-1] < 0.7 * kl[0], f"λ = 1: the KL to the teacher must fall, got {kl}"
    assert all(np.isfinite(result["history"]["val_loss"]))
    record = json.loads((run / "dataset.json").read_text())
    assert record["teacher"]["path"] == str(served.resolve())
    assert json.loads((run / "config.json").read_text())["teacher"] == str(served)

    resumed = train(dataset, run, dataclasses.replace(config, epochs=4), resume=True,
                    progress=False)
    assert resumed["initial_epoch"] == 3 and resumed["epochs_completed"] == 4
    assert len(resumed["history"]["distill_kl"]) == 1
    assert json.loads((run / "dataset.json").read_text())["teacher"] == record["teacher"]

    with pytest.raises(ModelError, match="was trained with teacher"):
        train(dataset, run, dataclasses.replace(config, epochs=5, teacher=None), resume=True,
              progress=False)


@pytest.mark.slow
def test_a_partial_start_copies_the_layers_whose_shapes_agree(dataset, teacher_run, tmp_path):
    run, _ = teacher_run
    same = train(dataset, tmp_path / "same", dataclasses.replace(CONTEXT, epochs=1),
                 init_partial=run, progress=False)
    assert same["epochs_completed"] == 1
    full = json.loads((tmp_path / "same" / "dataset.json").read_text())["initialized_from"]
    assert full["layers_copied"] == full["layers"] and full["run_dir"] == str(run.resolve())

    added = dataclasses.replace(CONTEXT, model=dataclasses.replace(CONTEXT.model,
                                                                   skip_merge="add"))
    train(dataset, tmp_path / "add", added, init_partial=run, progress=False)
    part = json.loads((tmp_path / "add" / "dataset.json").read_text())["initialized_from"]
    merged = CONTEXT.model.depth - 1  # one first decoder convolution per merged skip
    assert part["layers_copied"] == part["layers"] - merged
    assert 0 < part["parameters_copied"] < part["parameters"]
    donor = load_checkpoint(run / "checkpoints" / "last.keras", compile=False, instead="-")
    student = load_checkpoint(tmp_path / "add" / "checkpoints" / "last.keras", compile=False,
                              instead="-")
    assert student.get_layer("logits").get_weights()[0].shape == \
        donor.get_layer("logits").get_weights()[0].shape

    with pytest.raises(ModelError, match="only one of"):
        train(dataset, tmp_path / "both", CONTEXT, init_partial=run, init_from=run,
              progress=False)
