"""FLOP counted from the layers: hand-counted small graphs, the shipped architectures against the
profiler's figures of issue 23, and the version 7 candidate within its budget."""

import dataclasses
from pathlib import Path

import pytest

keras = pytest.importorskip("keras")

from ceriakeras.config import TrainConfig, load_config
from ceriakeras.nn.flops import forward_flops
from ceriakeras.nn.model import PadToMultiple, build_model, receptive_field_px

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_a_small_graph_is_counted_by_hand():
    image = keras.Input((None, None, 1))
    x = PadToMultiple(4)(image)                                                # 10×10 → 12×12
    x = keras.layers.Conv2D(4, 3, padding="same")(x)                           # 12·12·9·1·4
    skip = x
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)                # 6·6·9·4·8
    x = keras.layers.Conv2DTranspose(4, 2, strides=2, padding="same")(x)       # 6·6·4·8·4
    x = keras.layers.Concatenate()([x, skip])
    x = keras.layers.Conv2D(2, 1)(x)                                           # 12·12·1·8·2
    g = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))        # 2·3
    counted = forward_flops(keras.Model(image, [x, g]), 10, 10)
    macs = 12 * 12 * 9 * 4 + 6 * 6 * 9 * 4 * 8 + 6 * 6 * 4 * 8 * 4 + 12 * 12 * 8 * 2 + 2 * 3
    assert counted["flops"] == 2 * macs
    full = 12 * 12 * 9 * 4 + 6 * 6 * 4 * 8 * 4 + 12 * 12 * 8 * 2  # outputs on the 12×12 grid
    assert counted["by_resolution"] == {0: 12, 1: 2 * full, 2: 2 * 6 * 6 * 9 * 4 * 8}


def test_the_count_grows_with_the_frame_area():
    model = build_model(load_config(TrainConfig, CONFIGS / "ceria110_train.toml").model)
    small, large = (forward_flops(model, n, n)["flops"] for n in (256, 512))
    assert large == 4 * small


@pytest.mark.parametrize("name, issue_gflop", [("ceria110_train.toml", 18.7),      # version 2
                                               ("ceria110_v3_train.toml", 7.0)])   # version 4
def test_shipped_networks_agree_with_the_profiler_figures(name, issue_gflop):
    """The profiler also counts biases, normalisation and merges: within 2 % of the layers'."""
    model = build_model(load_config(TrainConfig, CONFIGS / name).model)
    gflop = forward_flops(model, 512, 512)["flops"] / 1e9
    assert 0.98 * issue_gflop < gflop <= issue_gflop


def test_the_version_7_candidate_is_within_budget_and_sees_as_far_as_version_4():
    student = load_config(TrainConfig, CONFIGS / "ceria110_v7_student_train.toml").model
    version4 = load_config(TrainConfig, CONFIGS / "ceria110_v3_train.toml").model
    assert forward_flops(build_model(student), 512, 512)["flops"] <= 6e9 * 0.98
    local = [receptive_field_px(build_model(dataclasses.replace(m, global_branch=False)))
             for m in (student, version4)]
    assert local[0] == local[1] > 500
