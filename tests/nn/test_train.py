"""Training: class weights, column metrics, overfitting a tiny set, resume, refusals, MirroredStrategy."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from ceriakeras.config import (  # noqa: E402
    ConfigError, DataError, ModelError, SimulationConfig,
)
from ceriakeras.nn.model import build_unet  # noqa: E402
from helpers import (  # noqa: E402
    CONTEXT, MAX_HEIGHT, TINY, empty_particle, make_synthetic_dataset, synthetic_particle,
)
from ceriakeras.data.records import manifest_sha256  # noqa: E402
from ceriakeras.nn.train import (  # noqa: E402
    class_weights_from_histogram, column_height_accuracy, compile_model, train,
)


# --- a tiny synthetic dataset, written by the project's own record writer -------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny")


# --- class weights --------------------------------------------------------------------------------
def test_median_frequency_weights_from_a_known_histogram():
    # column classes 1..4 with 100, 200, 400, 50 pixels: median frequency is that of 150 px
    w = class_weights_from_histogram([10_000, 100, 200, 400, 50, 0], max_weight=10,
                                     background_weight=0.1)
    median = np.median([100, 200, 400, 50])
    np.testing.assert_allclose(w[1:5], median / np.array([100, 200, 400, 50]), rtol=1e-6)
    assert w[0] == pytest.approx(0.1)
    assert w[5] == 10, "a height absent from the data gets the cap"


def test_weights_are_capped_and_accept_a_mapping():
    w = class_weights_from_histogram({"0": 1e6, "1": 1, "2": 1000, "3": 1000}, max_weight=5,
                                     background_weight=0.2, num_classes=5)
    assert w.shape == (5,)
    assert w[1] == 5 and w[2] == pytest.approx(1.0) and w[4] == 5 and w[0] == pytest.approx(0.2)
    assert np.all(class_weights_from_histogram([5, 1, 2], scheme="none") == 1)


# --- metrics --------------------------------------------------------------------------------------
def test_column_height_accuracy_uses_probability_mass_in_each_disk():
    label = np.zeros((1, 10, 10), int)
    label[0, 1:3, 1:3] = 2          # column of height 2
    label[0, 6:9, 6:9] = 3          # column of height 3
    prob = np.zeros((1, 10, 10, 4))
    prob[..., 0] = 1
    prob[0, 1:3, 1:3] = [0, 0.1, 0.9, 0]       # right
    prob[0, 6:9, 6:9] = [0, 0, 0.6, 0.4]       # mostly 2: wrong
    prob[0, 8, 8] = [0, 0, 0, 1]
    assert column_height_accuracy(label, prob) == (1, 2)


# --- learning -------------------------------------------------------------------------------------
def test_a_tiny_set_is_overfitted():
    rng = np.random.default_rng(0)
    config = SimulationConfig.legacy(cell_size_A=16.0, optics_per_exit_wave=4, max_height=MAX_HEIGHT)
    examples = synthetic_particle(0, 0, config)
    image = np.stack([e.image[:32, :32] for e in examples])[..., None] * 500.0  # expected counts
    label = np.stack([e.label[:32, :32] for e in examples]).astype(np.int32)
    weights = class_weights_from_histogram(np.bincount(label.ravel(), minlength=MAX_HEIGHT + 1))
    config = dataclasses.replace(
        TINY, learning_rate=1e-2, warmup_steps=0, epochs=1, steps_per_epoch=60,
        model=dataclasses.replace(TINY.model, base_filters=16, dropout=0.0))
    model = compile_model(build_unet(config.model, noise_seed=int(rng.integers(100))), config)
    loss = []
    for _ in range(config.steps_per_epoch):
        model.reset_metrics()  # so that each step reports its own loss
        loss.append(model.train_on_batch(image, label, weights[label], return_dict=True)["loss"])
    assert loss[-1] < loss[0] / 5, f"loss fell only from {loss[0]:.3f} to {loss[-1]:.3f}"


# --- the run folder -------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_writes_a_run_then_resumes_and_refuses_to_overwrite(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    first = train(dataset, run, TINY, progress=False)
    assert first["epochs_completed"] == 1 and not first["resumed"]
    for name in ("config.json", "dataset.json", "state.json", "metrics.json", "log.csv",
                 "checkpoints/last.keras", "checkpoints/best.keras"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((run / "tensorboard" / "panels").glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["model"]["max_height"] == MAX_HEIGHT
    assert json.loads((run / "dataset.json").read_text())["manifest_sha256"] == \
        manifest_sha256(dataset)
    metrics = json.loads((run / "metrics.json").read_text())["validation"]
    assert {"val_loss", "val_column_accuracy", "val_mean_iou",
            "val_column_height_accuracy"} <= set(metrics)

    steps_before = keras.saving.load_model(run / "checkpoints/last.keras").optimizer.iterations
    assert int(steps_before.numpy()) == TINY.steps_per_epoch

    second = train(dataset, run, dataclasses.replace(TINY, epochs=2), resume=True,
                   progress=False)
    assert "resumed" in capsys.readouterr().out
    assert second["resumed"] and second["initial_epoch"] == 1
    assert second["epochs_completed"] == 2
    assert json.loads((run / "state.json").read_text())["epoch"] == 2
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"], "the CSV log continues"
    resumed = keras.saving.load_model(run / "checkpoints/last.keras")
    assert int(resumed.optimizer.iterations.numpy()) == 2 * TINY.steps_per_epoch

    with pytest.raises(ModelError, match="already exists.*--resume.*--overwrite"):
        train(dataset, run, TINY, progress=False)


def test_optics_loss_ignores_unknown_targets_and_metrics_are_in_physical_units():
    from ceriakeras.nn.train import OpticsAbsoluteError, OpticsLoss

    truth = np.array([[6.0, 25.0, 7.0], [np.nan, np.nan, 3.0]], np.float32)
    guess = np.array([[0.0, 0.0, 7.0], [5.0, 5.0, 3.0]], np.float32)
    per_frame = np.asarray(OpticsLoss(reduction=None)(truth, guess))
    np.testing.assert_allclose(per_frame, [((6 / 12) ** 2 + 1.0) / 3, 0.0], rtol=1e-6)
    mae = OpticsAbsoluteError(0, "defocus_mae_nm")
    mae.update_state(truth, guess)
    assert float(mae.result()) == pytest.approx(6.0)      # the unknown frame is left out


@pytest.mark.slow
def test_context_unet_trains_with_the_optics_loss_and_resumes(dataset, tmp_path):
    run = tmp_path / "run"
    first = train(dataset, run, CONTEXT, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())["validation"]
    assert {"val_optics_defocus_mae_nm", "val_optics_cs_mae_um",
            "val_optics_max_column_height_mae_atoms", "val_column_height_accuracy"} <= set(metrics)
    assert 0 < metrics["val_optics_defocus_mae_nm"] < 30
    assert set(first["history"]) >= {"optics_loss", "probabilities_loss"}
    second = train(dataset, run, dataclasses.replace(CONTEXT, epochs=2), resume=True,
                   progress=False)
    assert second["epochs_completed"] == 2
    model = keras.saving.load_model(run / "checkpoints/last.keras", safe_mode=True)
    assert int(model.optimizer.iterations.numpy()) == 2 * CONTEXT.steps_per_epoch


@pytest.mark.slow
def test_a_warm_restart_starts_from_another_runs_weights_with_a_new_optimizer(dataset, tmp_path):
    first = tmp_path / "first"
    train(dataset, first, TINY, progress=False)
    donor = keras.saving.load_model(first / "checkpoints/last.keras")
    # a learning rate of ~0 keeps the weights where the restart put them
    still = dataclasses.replace(TINY, learning_rate=1e-12, pipeline=dataclasses.replace(
        TINY.pipeline, seed=TINY.pipeline.seed + 1))
    second = tmp_path / "second"
    result = train(dataset, second, still, progress=False, init_from=first)
    assert not result["resumed"] and result["epochs_completed"] == 1
    restarted = keras.saving.load_model(second / "checkpoints/last.keras")
    assert int(restarted.optimizer.iterations.numpy()) == TINY.steps_per_epoch, "a new optimizer"
    # (trainable ones: batch-norm statistics move with any learning rate)
    def trainable(model):
        return [np.asarray(w) for w in model.trainable_weights]

    for a, b in zip(trainable(donor), trainable(restarted), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    fresh = build_unet(TINY.model)
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(trainable(fresh), trainable(restarted)))
    record = json.loads((second / "dataset.json").read_text())
    donor_record = json.loads((first / "dataset.json").read_text())
    assert record["class_weights"] == donor_record["class_weights"]
    assert record["initialized_from"] == {
        "run_dir": str(first.resolve()), "epoch": 1,
        "checkpoint": json.loads((first / "state.json").read_text())["checkpoint"]}
    train(dataset, second, dataclasses.replace(still, epochs=2), resume=True, progress=False)
    assert json.loads((second / "dataset.json").read_text())["initialized_from"] == \
        record["initialized_from"], "a resume keeps where the run started"

    with pytest.raises(ModelError, match="--resume or --init-from"):
        train(dataset, second, still, resume=True, init_from=first, progress=False)
    wider = dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, base_filters=8))
    with pytest.raises(ModelError, match="model settings of --init-from"):
        train(dataset, tmp_path / "third", wider, init_from=first, progress=False)
    with pytest.raises(ModelError, match="no checkpoints/last.keras"):
        train(dataset, tmp_path / "fourth", TINY, init_from=tmp_path / "thesis", progress=False)
    with pytest.raises(ModelError, match="is --out itself"):
        train(dataset, first, TINY, overwrite=True, init_from=first, progress=False)
    assert (first / "checkpoints" / "last.keras").is_file(), "the run to start from is kept"
    # a broken file in the run to start from: name another run (--overwrite would not mend it)
    (first / "state.json").write_text("{truncated")
    with pytest.raises(ModelError, match="another --init-from run") as err:
        train(dataset, tmp_path / "fifth", TINY, init_from=first, progress=False)
    assert "--overwrite" not in str(err.value) and "state.json" in str(err.value)
    assert not (tmp_path / "fifth" / "checkpoints").exists()


def test_resume_without_a_run_and_missing_data_are_one_line_errors(dataset, tmp_path):
    with pytest.raises(ModelError, match="nothing to resume"):
        train(dataset, tmp_path / "new", TINY, resume=True, progress=False)
    with pytest.raises(DataError) as err:
        train(tmp_path / "no-such-data", tmp_path / "run", TINY, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="crop"):
        train(dataset, tmp_path / "run2",
              dataclasses.replace(TINY, pipeline=dataclasses.replace(TINY.pipeline, crop_px=96)),
              progress=False)


def test_overwrite_refuses_a_folder_that_is_not_a_run(dataset, tmp_path):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    with pytest.raises(ModelError, match="does not look like a training run"):
        train(dataset, other, TINY, overwrite=True, progress=False)
    assert (other / "chapter1.tex").exists()


# --- distribution ---------------------------------------------------------------------------------
MIRRORED = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from ceriakeras.config import ModelConfig, TrainConfig
    from ceriakeras.nn.model import build_unet
    from ceriakeras.nn.train import compile_model
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    config = TrainConfig(model=ModelConfig(depth=2, base_filters=4, max_height=3),
                         epochs=1, steps_per_epoch=1, warmup_steps=0)
    with strategy.scope():
        model = compile_model(build_unet(config.model, noise_seed=0), config)
    before = [w.numpy().copy() for w in model.trainable_weights]
    rng = np.random.default_rng(0)
    image = rng.uniform(50, 100, (4, 32, 32, 1)).astype("float32")   # global batch 4
    label = rng.integers(0, 4, (4, 32, 32)).astype("int32")
    data = tf.data.Dataset.from_tensors((image, label, np.ones((4, 32, 32), "float32")))
    loss = model.fit(data, epochs=1, verbose=0, shuffle=False).history["loss"][0]
    changed = any(not np.allclose(a, w.numpy()) for a, w in zip(before, model.trainable_weights))
    print("REPLICAS", strategy.num_replicas_in_sync, "LOSS", loss, "CHANGED", changed)
""")


@pytest.mark.slow
def test_one_training_step_under_mirrored_strategy_on_two_cpus():
    # logical devices must be configured before TensorFlow starts: a fresh interpreter
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True,
                         env=env, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("REPLICAS")][-1].split()
    assert line[1] == "2"
    assert np.isfinite(float(line[3]))
    assert line[5] == "True"


def test_a_run_of_versions_1_2_without_the_new_model_fields_still_resumes(tmp_path):
    from ceriakeras.config import to_dict
    from ceriakeras.nn.rundir import saved_model_config as _saved_model_config

    old = to_dict(TINY.model)
    for key in ("architecture", "max_filters", "full_resolution_filters", "dilations",
                "global_branch", "global_units", "detector_correlation_max"):
        old.pop(key)
    (tmp_path / "config.json").write_text(json.dumps({"model": old}))
    assert _saved_model_config(tmp_path) == to_dict(TINY.model)


# --- several datasets (chunks) --------------------------------------------------------------------
def test_two_datasets_are_read_together(dataset, tmp_path):
    from ceriakeras.data.pipeline import make_dataset
    from ceriakeras.data.records import read_manifest

    vacuum = make_synthetic_dataset(tmp_path / "vacuum", count=8, seed=1, simulator=empty_particle)
    both, pipeline = [dataset, vacuum], TINY.pipeline
    n_a, n_b = (read_manifest(d)["counts"]["validation"] for d in both)
    alone = [lab.numpy() for _, lab, _ in make_dataset(dataset, "validation", pipeline)]
    together = list(make_dataset(both, "validation", pipeline))
    images = np.concatenate([im.numpy() for im, _, _ in together])
    labels = np.concatenate([lab.numpy() for _, lab, _ in together])
    assert len(labels) == n_a + n_b, "validation covers both datasets"
    np.testing.assert_array_equal(labels[:n_a], np.concatenate(alone))  # the first one as alone
    assert labels[:n_a].reshape(n_a, -1).max(1).min() > 0 and not labels[n_a:].any()
    assert len({im.tobytes() for im in images[n_a:]}) == n_b, "each position has its own noise"

    training = make_dataset(both, "train", dataclasses.replace(pipeline, batch_size=8),
                            class_weights=np.ones(MAX_HEIGHT + 1))
    crops = np.concatenate([lab.numpy() for _, lab, _ in training.take(6)])
    has_columns = crops.reshape(len(crops), -1).max(1) > 0
    assert has_columns.any() and not has_columns.all(), "training crops come from both"


def test_datasets_that_differ_are_refused_by_name(dataset, tmp_path):
    from ceriakeras.data.pipeline import make_dataset
    from ceriakeras.data.records import read_manifests

    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((dataset / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "pixel_size_A": 0.1}))
    with pytest.raises(DataError, match=f"dataset {other} has pixel size 0.1 Å.*same config"):
        read_manifests([dataset, other])
    with pytest.raises(DataError, match="pixel size"):
        make_dataset([dataset, other], "train", TINY.pipeline)
    with pytest.raises(ConfigError, match="twice"):
        read_manifests([dataset, dataset])


def _run_of_versions_1_2(run: Path) -> Path:
    """A run folder's records as versions 1–2 wrote them (the fields of run-2, which left the
    tree with issue 23: ``git checkout ceria110-v2 -- saved_models/ceria110/run-2``): one
    ``data_dir`` and ``manifest_sha256``, no ``datasets``, a 'unet' without ``architecture``."""
    run.mkdir()
    (run / "dataset.json").write_text(json.dumps({
        "data_dir": "tfrecords/ceria110", "manifest_sha256": "1e07" + "ab" * 30,
        "pixel_size_A": 0.2, "max_height": 16, "label_radius_A": 0.5,
        "counts": {"test": 296, "train": 2400, "validation": 304},
        "class_weights": [0.1] + [1.0] * 16}))
    (run / "config.json").write_text(json.dumps({
        "model": {"depth": 3, "base_filters": 16, "max_height": 16, "pixel_size_A": 0.2},
        "epochs": 50, "steps_per_epoch": 150}))
    (run / "metrics.json").write_text(json.dumps({"best_epoch": 38, "val_loss": 0.4}))
    return run


def test_the_dataset_json_of_a_run_of_versions_1_2_still_reads(tmp_path):
    from ceriakeras.nn.export import model_info
    from ceriakeras.data.records import compare_run_datasets, run_datasets

    run = _run_of_versions_1_2(tmp_path / "run-2")
    record = json.loads((run / "dataset.json").read_text())
    assert "datasets" not in record
    assert run_datasets(record) == [{"data_dir": record["data_dir"],
                                     "manifest_sha256": record["manifest_sha256"]}]
    assert compare_run_datasets(record, [record["manifest_sha256"], "cd" * 32]) == (["cd" * 32], [])
    assert compare_run_datasets(record, ["cd" * 32]) == (["cd" * 32], [record["manifest_sha256"]])
    info = model_info(run, run / "checkpoints" / "best.keras")
    assert info["manifest_sha256s"] == [info["manifest_sha256"]] == [record["manifest_sha256"]]
    assert info["data_dirs"] == ["tfrecords/ceria110"] and info["pixel_size_A"] == 0.2


def test_a_manifest_that_differs_only_in_provenance_is_the_same_dataset():
    from ceriakeras.data.records import compare_run_datasets, manifest_data_sha256

    manifest = {"seed": 311, "count": 3000, "label_histogram": [9, 3, 2],
                "command": "ceriakeras simulate --seed 311", "versions": {"numpy": "2.4.6"}}
    again = {**manifest, "command": "ceriakeras simulate --seed 311 --workers 2",
             "versions": {"numpy": "2.5.0"}}
    other = {**manifest, "seed": 312}
    assert manifest_data_sha256(again) == manifest_data_sha256(manifest)
    assert manifest_data_sha256(other) != manifest_data_sha256(manifest)
    record = {"datasets": [{"data_dir": "a", "manifest_sha256": "aa" * 32,
                            "data_sha256": manifest_data_sha256(manifest)}]}
    # simulated again elsewhere: another file hash, the same data
    assert compare_run_datasets(record, ["bb" * 32], [again]) == ([], [])
    # other data under the same name: added and removed
    assert compare_run_datasets(record, ["cc" * 32], [other]) == (
        ["cc" * 32], ["aa" * 32])
    # without the manifests (or for a run that did not record data_sha256) the file hash decides
    assert compare_run_datasets(record, ["bb" * 32]) == (["bb" * 32], ["aa" * 32])


@pytest.mark.slow
def test_a_resume_accepts_its_data_simulated_again_in_another_environment(dataset, tmp_path,
                                                                          capsys):
    import shutil

    from ceriakeras.nn.plan import check_train

    data = tmp_path / "chunk-a"
    shutil.copytree(dataset, data)
    run = tmp_path / "run"
    train(data, run, TINY, progress=False)
    first = json.loads((run / "dataset.json").read_text())
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "versions": {"numpy": "0.0.1"},
                                         "command": "ceriakeras simulate (again)"}))
    assert manifest_sha256(data) != first["datasets"][0]["manifest_sha256"]

    check_train([data], run, resume=True)                # no --allow-data-change needed
    result = train(data, run, dataclasses.replace(TINY, epochs=2), resume=True, progress=False)
    assert result["epochs_completed"] == 2
    assert "dataset(s) added" not in capsys.readouterr().out
    record = json.loads((run / "dataset.json").read_text())
    assert "changes" not in record
    assert record["datasets"][0]["manifest_sha256"] == manifest_sha256(data)
    assert record["datasets"][0]["data_sha256"] == first["datasets"][0]["data_sha256"]

    manifest_path.write_text(json.dumps({**manifest, "seed": manifest.get("seed", 0) + 1}))
    with pytest.raises(ModelError, match="--allow-data-change"):   # other data: refused
        check_train([data], run, resume=True)


@pytest.mark.slow
def test_a_run_grows_its_data_on_resume_and_records_it(dataset, tmp_path, capsys):
    from ceriakeras.nn.export import model_info
    from ceriakeras.nn.plan import check_train
    from ceriakeras.data.records import read_manifest

    other = make_synthetic_dataset(tmp_path / "chunk-b", seed=7)
    run = tmp_path / "run"
    train(dataset, run, TINY, progress=False)
    first = json.loads((run / "dataset.json").read_text())
    assert [d["manifest_sha256"] for d in first["datasets"]] == [manifest_sha256(dataset)]
    assert "changes" not in first

    check_train([dataset, other], run, resume=True)     # more datasets: accepted
    result = train([dataset, other], run, dataclasses.replace(TINY, epochs=2), resume=True,
                   progress=False)
    assert result["epochs_completed"] == 2
    assert "1 dataset(s) added" in capsys.readouterr().out
    record = json.loads((run / "dataset.json").read_text())
    digests = [manifest_sha256(dataset), manifest_sha256(other)]
    assert [d["manifest_sha256"] for d in record["datasets"]] == digests
    assert record["manifest_sha256"] == digests[0]
    assert record["changes"] == [{"after_epoch": 1, "removed": [], "added": [
        {"data_dir": str(other.resolve()), "manifest_sha256": digests[1]}]}]
    assert record["class_weights"] == first["class_weights"], "the loss keeps its weights"
    assert record["class_weights_from"] == digests[:1]
    assert record["counts"]["train"] == sum(read_manifest(d)["counts"]["train"]
                                            for d in (dataset, other))
    info = model_info(run, run / "checkpoints" / "best.keras")
    assert info["manifest_sha256s"] == digests and info["manifest_sha256"] == digests[0]

    for given in ([other], [dataset]):                  # fewer or other datasets: refused
        with pytest.raises(ModelError, match="--allow-data-change"):
            check_train(given, run, resume=True)
        with pytest.raises(ModelError, match="--allow-data-change"):
            train(given, run, dataclasses.replace(TINY, epochs=3), resume=True, progress=False)
    check_train([other], run, resume=True, allow_data_change=True)
