"""SavedModel export: signature names, equality with the Keras model, any size, assets, refusals."""

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from ceriakeras.config import ModelConfig, ModelError, TrainConfig, to_dict  # noqa: E402
from ceriakeras.inference.served import load_served_model  # noqa: E402
from ceriakeras.nn.export import export_run  # noqa: E402
from ceriakeras.nn.model import build_unet  # noqa: E402
from ceriakeras.nn.train import compile_model  # noqa: E402

CONFIG = TrainConfig(model=ModelConfig(depth=2, base_filters=4, max_height=5, pixel_size_A=0.1))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as ``train`` leaves it, with a model trained one step (so BN stats move)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    model = compile_model(build_unet(CONFIG.model, noise_seed=0), CONFIG)
    rng = np.random.default_rng(0)
    image = rng.uniform(10, 30, (2, 32, 32, 1)).astype(np.float32)
    label = rng.integers(0, 6, (2, 32, 32)).astype(np.int32)
    model.train_on_batch(image, label)
    model.save(run / "checkpoints" / "best.keras")
    (run / "config.json").write_text(json.dumps(to_dict(CONFIG)))
    (run / "dataset.json").write_text(json.dumps(
        {"data_dir": "tfrecords/tiny", "manifest_sha256": "ab" * 32, "label_radius_A": 0.4}))
    (run / "metrics.json").write_text(json.dumps(
        {"epoch": 1, "validation": {"val_loss": 1.5, "val_column_height_accuracy": 0.25}}))
    return run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    base = tmp_path_factory.mktemp("saved_models") / "tiny"
    return base, export_run(run, base)


def test_signature_has_the_contract_names_types_and_dynamic_shapes(exported):
    base, version = exported
    assert version == base / "1"
    sig = tf.saved_model.load(str(version)).signatures["serving_default"]
    args, kwargs = sig.structured_input_signature
    assert args == () and list(kwargs) == ["image"]
    assert kwargs["image"].dtype == tf.float32
    assert kwargs["image"].shape.as_list() == [None, None, None, 1]
    out = sig.structured_outputs
    assert set(out) == {"probabilities", "height"}
    assert out["probabilities"].dtype == tf.float32 and out["height"].dtype == tf.int32
    assert out["probabilities"].shape.as_list() == [None, None, None, 6]
    assert out["height"].shape.as_list() == [None, None, None]


@pytest.mark.parametrize("shape", [(97, 131), (32, 48), (5, 3)])
def test_saved_model_gives_the_keras_model_outputs_at_any_size(run, exported, shape):
    served = load_served_model(exported[0])
    keras_model = keras.saving.load_model(run / "checkpoints" / "best.keras")
    image = np.random.default_rng(1).poisson(15.0, (2, *shape)).astype(np.float32)
    prob, height = served.predict(image)
    expected = np.asarray(keras_model(image[..., None], training=False))
    assert prob.shape == (2, *shape, 6) and height.shape == (2, *shape)
    assert height.dtype == np.int32
    np.testing.assert_allclose(prob, expected, atol=1e-6)
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(height, expected.argmax(-1))


def test_assets_name_what_consumers_need(exported):
    served = load_served_model(exported[1])
    info = served.info
    assert info == json.loads((exported[1] / "assets" / "ceriakeras.json").read_text())
    assert info["pixel_size_A"] == 0.1 and info["max_height"] == 5
    assert info["label_radius_A"] == 0.4
    assert info["manifest_sha256"] == "ab" * 32
    assert info["metrics"]["validation"]["val_column_height_accuracy"] == 0.25
    assert {"tensorflow", "keras", "ceriakeras"} <= set(info["versions"])
    assert info["training_config"]["model"]["depth"] == 2


def test_versions_count_up_and_are_never_overwritten(run, exported):
    base, _ = exported
    second = export_run(run, base)
    assert second == base / "2"
    assert load_served_model(base).path == second, "the base folder serves the newest version"
    before = (second / "saved_model.pb").read_bytes()
    with pytest.raises(ModelError, match="already exists"):
        export_run(run, base, version=2)
    assert (second / "saved_model.pb").read_bytes() == before
    assert not [p for p in base.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_a_column_threshold_is_recorded_for_analyze_and_a_bad_one_refused(run, tmp_path):
    from ceriakeras.config import AnalyzeConfig
    from ceriakeras.inference.served import with_model_threshold

    version = export_run(run, tmp_path / "models", column_threshold=0.45)
    info = load_served_model(version).info
    assert info["column_threshold"] == 0.45
    assert with_model_threshold(AnalyzeConfig(), info).threshold == 0.45
    assert with_model_threshold(AnalyzeConfig(threshold=0.2), info).threshold == 0.2
    plain = load_served_model(export_run(run, tmp_path / "models")).info
    assert "column_threshold" not in plain
    assert with_model_threshold(AnalyzeConfig(), plain).threshold == 0.3
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ModelError, match="column_threshold"):
            export_run(run, tmp_path / "models", column_threshold=bad)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["1", "2"]


def test_a_run_without_checkpoint_and_a_missing_model_are_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ModelError, match="no checkpoints.*train it first"):
        export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(ModelError, match="ceriakeras export"):
        load_served_model(tmp_path / "nothing-here")


def _trained_on(run, dest, seed):
    """A copy of ``run`` trained one more step: its ``checkpoints/epoch-0002.keras``, named by
    ``state.json`` as the last epoch (best.keras stays the first). Returns (run, Keras model)."""
    import shutil

    shutil.copytree(run, dest)
    model = keras.saving.load_model(dest / "checkpoints" / "best.keras")
    rng = np.random.default_rng(seed)
    model.train_on_batch(rng.uniform(10, 30, (2, 32, 32, 1)).astype(np.float32),
                         rng.integers(0, 6, (2, 32, 32)).astype(np.int32))
    model.save(dest / "checkpoints" / "epoch-0002.keras")
    (dest / "state.json").write_text(json.dumps({"epoch": 2, "checkpoint": "epoch-0002.keras",
                                                 "best_epoch": 1}))
    return dest, model


def test_the_last_epoch_can_be_exported_instead_of_the_best(run, tmp_path):
    """--checkpoint last: the checkpoint state.json names (the last finished epoch), not best.keras."""
    from ceriakeras.nn.export import run_checkpoint

    later, model = _trained_on(run, tmp_path / "later", seed=3)
    rng = np.random.default_rng(3)
    last = load_served_model(export_run(later, tmp_path / "models", checkpoint="last"))
    best = load_served_model(export_run(later, tmp_path / "models"))
    assert (last.info["checkpoint"], best.info["checkpoint"]) == ("epoch-0002.keras", "best.keras")
    image = rng.poisson(15.0, (1, 24, 40)).astype(np.float32)
    raw = np.asarray(model(image[..., None], training=False))
    np.testing.assert_allclose(last.predict(image)[0], raw / raw.sum(-1, keepdims=True),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(best.predict(image)[0], last.predict(image)[0], atol=1e-4)
    # without state.json, 'last' is last.keras; a run with neither is refused; a typo too
    (later / "state.json").unlink()
    with pytest.raises(ModelError, match="no checkpoints/last.keras"):
        run_checkpoint(later, "last")
    with pytest.raises(ModelError, match="best, last"):
        run_checkpoint(later, "newest")


def test_class_weight_prior_is_undone_in_the_serving_graph(run, tmp_path):
    """A run trained with class weights w serves softmax / w, renormalized (calibrated)."""
    weighted_run = tmp_path / "weighted"
    import shutil

    shutil.copytree(run, weighted_run)
    weights = np.array([0.1, 1.0, 2.0, 4.0, 0.5, 10.0])
    dataset = json.loads((weighted_run / "dataset.json").read_text())
    dataset["class_weights"] = weights.tolist()
    (weighted_run / "dataset.json").write_text(json.dumps(dataset))
    served = load_served_model(export_run(weighted_run, tmp_path / "models"))
    assert served.info["class_weights"] == weights.tolist()
    keras_model = keras.saving.load_model(run / "checkpoints" / "best.keras")
    image = np.random.default_rng(2).poisson(15.0, (1, 24, 40)).astype(np.float32)
    prob, height = served.predict(image)
    raw = np.asarray(keras_model(image[..., None], training=False))
    expected = raw / weights
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(prob, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(height, expected.argmax(-1))
    assert not np.allclose(prob, raw, atol=1e-3), "the correction must change the probabilities"


def test_exported_version_folder_is_readable_by_other_users(exported):
    """TF Serving often runs as another user: the version folder must not stay mkdtemp's 0700."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(exported[0].stat().st_mode)
    assert mode == 0o777 & ~umask


# --- test-time augmentation --------------------------------------------------------------------
def _pointwise(images):
    """An equivariant stand-in: class probabilities that depend on each pixel's value only."""
    x = np.asarray(images, np.float32)
    p1 = 1.0 / (1.0 + np.exp(-(x - x.mean())))
    probs = np.stack([1 - p1, 0.7 * p1, 0.3 * p1], axis=-1)
    return probs, probs.argmax(-1)


def _biased(images):
    """A stand-in that is not equivariant: it favours class 1 towards the right and bottom."""
    x = np.asarray(images, np.float32)
    b, h, w = x.shape
    yy, xx = np.mgrid[0:h, 0:w]
    bias = np.broadcast_to((2 * xx + yy) / (2 * w + h), (b, h, w))
    p = np.stack([1 - bias, bias * 1.0, np.zeros_like(bias)], -1) * 0.5 + 0.5 * _pointwise(x)[0]
    return p.astype(np.float32), p.argmax(-1)


def test_dihedral_average_of_an_equivariant_model_is_the_model():
    from ceriakeras.inference.served import dihedral_average

    images = np.random.default_rng(1).uniform(0, 50, (2, 24, 40)).astype(np.float32)  # H ≠ W
    probs, height = dihedral_average(_pointwise, images)
    expected, _ = _pointwise(images)
    assert probs.shape == (2, 24, 40, 3) and height.shape == (2, 24, 40)
    np.testing.assert_allclose(probs, expected, atol=1e-6)  # each copy was mapped back in place
    np.testing.assert_array_equal(height, expected.argmax(-1))


def test_dihedral_average_makes_any_model_equivariant():
    from ceriakeras.inference.served import dihedral_average

    image = np.random.default_rng(2).uniform(0, 50, (32, 32)).astype(np.float32)
    assert not np.allclose(_biased(np.rot90(image)[None])[0][0], np.rot90(_biased(image[None])[0][0]))
    probs, _ = dihedral_average(_biased, image)
    for transform in (np.rot90, np.fliplr, np.transpose, lambda a: np.rot90(a, 3)):
        turned, _ = dihedral_average(_biased, np.ascontiguousarray(transform(image)))
        expected = np.stack([transform(probs[0][..., c]) for c in range(3)], -1)
        np.testing.assert_allclose(turned[0], expected, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_dihedral_average_of_the_served_model(exported):
    from ceriakeras.inference.served import DihedralAveraged

    served = load_served_model(exported[1])
    wrapped = DihedralAveraged(served)
    assert wrapped.info["pixel_size_A"] == served.info["pixel_size_A"]
    assert "test_time_augmentation" in wrapped.info
    image = np.random.default_rng(3).uniform(10, 30, (1, 24, 36)).astype(np.float32)
    probs, height = wrapped.predict(image)
    assert probs.shape == (1, 24, 36, 6) and height.shape == (1, 24, 36)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # the average of the 8 copies equals averaging by hand the first and the rotated ones
    copies = [served.predict(image)[0]]
    rotated, _ = served.predict(np.ascontiguousarray(np.rot90(image, 1, axes=(1, 2))))
    copies.append(np.rot90(rotated, -1, axes=(1, 2)))
    assert not np.allclose(copies[0], copies[1], atol=1e-4)  # the network is not equivariant…
    assert np.abs(probs - copies[0]).max() > 1e-4             # …so the average differs from it


# --- a model with the optics outputs (context U-Net, version 3 on) ---------------------------------
CONTEXT = TrainConfig(model=ModelConfig(
    architecture="context_unet", depth=3, base_filters=4, max_filters=8, full_resolution_filters=2,
    global_units=4, max_height=5, pixel_size_A=0.1))


def test_optics_outputs_are_additive_and_old_callers_still_get_two_values(tmp_path, exported):
    from ceriakeras.inference.served import DihedralAveraged
    from ceriakeras.nn.model import build_model

    run = tmp_path / "runs" / "context"
    (run / "checkpoints").mkdir(parents=True)
    model = build_model(CONTEXT.model, noise_seed=0)
    model.save(run / "checkpoints" / "best.keras")
    (run / "config.json").write_text(json.dumps(to_dict(CONTEXT)))
    version = export_run(run, tmp_path / "saved_models" / "context")
    out = tf.saved_model.load(str(version)).signatures["serving_default"].structured_outputs
    assert set(out) == {"probabilities", "height", "defocus_nm", "cs_um", "max_column_height_atoms"}
    assert out["defocus_nm"].shape.as_list() == [None] and out["cs_um"].dtype == tf.float32

    served = load_served_model(version)
    assert served.optics_names == ("defocus_nm", "cs_um", "max_column_height_atoms")
    frames = np.random.default_rng(7).poisson(9.0, (3, 40, 56)).astype(np.float32)
    probabilities, height = served.predict(frames)                  # existing callers
    assert probabilities.shape == (3, 40, 56, 6) and height.shape == (3, 40, 56)
    p2, h2, optics = served.predict(frames, optics=True)
    np.testing.assert_array_equal(p2, probabilities)
    keras_optics = np.asarray(model(frames[..., None], training=False)["optics"])
    for i, name in enumerate(served.optics_names):
        assert optics[name].shape == (3,)
        np.testing.assert_allclose(optics[name], keras_optics[:, i], rtol=1e-4, atol=1e-4)
    # TTA: probabilities averaged as before, the per-frame scalars averaged over the 8 copies
    tta = DihedralAveraged(served)
    assert tta.has_optics
    tp, _, tta_optics = tta.predict(frames, optics=True)
    np.testing.assert_allclose(tp, tta.predict(frames)[0], atol=1e-6)
    copies = [served.predict_optics(np.flip(frames.transpose(0, 2, 1) if t else frames, f)
                                    if f else (frames.transpose(0, 2, 1) if t else frames))
              for t in (False, True) for f in ((), (1,), (2,), (1, 2))]
    np.testing.assert_allclose(tta_optics["cs_um"], np.mean([c["cs_um"] for c in copies], axis=0),
                               rtol=1e-5, atol=1e-5)

    # a model without them (versions 1–2) answers an empty dict, and TTA copes
    _, old = exported
    old_model = load_served_model(old)
    assert old_model.optics_names == () and not DihedralAveraged(old_model).has_optics
    assert old_model.predict_optics(frames) == {}
    assert DihedralAveraged(old_model).predict(frames, optics=True)[2] == {}


def test_an_ensemble_serves_the_mean_of_its_members(run, tmp_path):
    """Several --run: one SavedModel whose probabilities are the mean of the members' (each with
    its own prior correction), height their argmax; the info lists the members."""
    other, _ = _trained_on(run, tmp_path / "other", seed=5)
    rng = np.random.default_rng(5)
    dataset = json.loads((other / "dataset.json").read_text())
    dataset.update(class_weights=[0.1, 1.0, 2.0, 4.0, 0.5, 10.0], data_dir="tfrecords/more",
                   manifest_sha256="cd" * 32)
    (other / "dataset.json").write_text(json.dumps(dataset))

    a = load_served_model(export_run(run, tmp_path / "a"))
    b = load_served_model(export_run(other, tmp_path / "b", checkpoint="last"))
    both = load_served_model(export_run([run, other], tmp_path / "both",
                                        checkpoint=["best", "last"], column_threshold=0.35))
    image = rng.poisson(15.0, (2, 24, 40)).astype(np.float32)
    pa, pb = a.predict(image)[0], b.predict(image)[0]
    assert not np.allclose(pa, pb, atol=1e-3), "the members must differ for the test to mean much"
    prob, height = both.predict(image)
    np.testing.assert_allclose(prob, (pa + pb) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(height, prob.argmax(-1))
    info = both.info
    assert [(m["run"], m["checkpoint"]) for m in info["ensemble"]] == [
        (str(run), "best.keras"), (str(other), "epoch-0002.keras")]
    assert info["ensemble"][1]["class_weights"] == dataset["class_weights"]
    assert info["data_dirs"] == ["tfrecords/tiny", "tfrecords/more"]
    assert info["column_threshold"] == 0.35 and info["max_height"] == 5
    assert "ensemble" not in a.info
    sig = tf.saved_model.load(str(both.path)).signatures["serving_default"]
    assert set(sig.structured_outputs) == {"probabilities", "height"}


def test_an_ensemble_of_unlike_runs_or_unmatched_checkpoints_is_refused(run, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["pixel_size_A"] = 0.2
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="differ in pixel_size_A"):
        export_run([run, other], tmp_path / "models")
    from ceriakeras.nn.plan import check_export

    with pytest.raises(ModelError, match="differ in pixel_size_A"):   # before Keras loads
        check_export([run, other], tmp_path / "models")
    check_export([run, run], tmp_path / "models")                     # like runs pass
    with pytest.raises(ModelError, match="3 checkpoints for 2 runs"):
        export_run([run, run], tmp_path / "models", checkpoint=["best", "best", "last"])
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
