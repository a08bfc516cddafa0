"""The network's cost on this CPU: GFLOP per 512² model frame, ms per frame, share of the peak.

    python scripts/benchmarks/bench_model.py                       # versions 1–2 vs 3–4 (configs)
    python scripts/benchmarks/bench_model.py --model saved_models/ceria110/6
    python scripts/benchmarks/bench_model.py --config configs/ceria110_v7_student_train.toml
    python scripts/benchmarks/bench_model.py --config configs/ceria110_v3_train.toml --train-step
    python scripts/benchmarks/bench_model.py --config configs/ceria110_v7_student_train.toml \
        --train-step --teacher saved_models/ceria110/6 --no-profiler --batches 1

A 512² frame at the model's 0.2 Å is what a 1024² frame at 0.1 Å becomes. For each network:

- GFLOP per frame counted from its layers (:func:`ceriakeras.nn.flops.forward_flops`: 2 FLOP per
  multiply-add of the convolutions and dense layers), and by TensorFlow's profiler on the frozen
  graph (also counts biases, normalization and merges; ``--no-profiler`` skips it). A ``--config``
  is an untrained architecture; a served ``--model`` is counted from its SavedModel graph and,
  from the layers, as the sum of its members' ``training_config`` (an ensemble runs them all).
- The forward time of a batch, as a ``tf.function`` (as in a SavedModel), warmed up once per shape;
  the median of ``--repeats`` calls. Run it with the cores otherwise quiet.
- The achieved GFLOP/s as a share of this CPU's float32 matmul peak, measured here first with
  ``tf.matmul`` of two N × N matrices (``--peak-size``, the fastest of ``--repeats``) on the
  same threads. On busy cores both rates are a busy machine's (the load is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ceriakeras.cli.startup import quiet_libraries  # noqa: E402

quiet_libraries()  # TensorFlow's, absl's and CUDA's start-up lines off the terminal, as in the CLI

import numpy as np


def median_seconds(call, repeats: int) -> tuple[float, float]:
    """Median wall and CPU (all threads) seconds of ``call()`` over ``repeats`` calls, after one
    warm-up call."""
    call()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's float32 matmul rate, GFLOP/s: ``2 n³`` FLOP per ``tf.matmul`` of two n × n."""
    import tensorflow as tf

    a = tf.constant(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    matmul = tf.function(lambda x: tf.matmul(x, x))
    matmul(a).numpy()
    best = np.inf
    for _ in range(repeats):  # the fastest call: the peak, whatever else the cores do
        start = time.perf_counter()
        matmul(a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def profiler_flops(forward, size: int) -> int:
    """FLOP of ``forward`` on one (1, size, size, 1) frame by TensorFlow's profiler, on the graph
    with its variables frozen to constants and its function calls inlined."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    tf.get_logger().setLevel("ERROR")  # the v1 profiler's deprecation notice
    concrete = tf.function(forward).get_concrete_function(
        tf.TensorSpec([1, size, size, 1], tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(frozen.graph.as_graph_def(), name="")
        builder = tf.compat.v1.profiler.ProfileOptionBuilder
        options = builder(builder.float_operation()).with_empty_output().build()
        return int(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)


def member_counts(model_configs, size: int) -> list[dict]:
    """:func:`ceriakeras.nn.flops.forward_flops` of each untrained network ``model_configs`` name."""
    import keras

    from ceriakeras.nn.flops import forward_flops
    from ceriakeras.nn.model import build_model

    counts = []
    for config in model_configs:
        counts.append(forward_flops(build_model(config), size, size))
        keras.backend.clear_session()
    return counts


def layer_gflops_text(counts: list[dict], pixel_size_A: float) -> str:
    """The summed layer count of one or more networks, with the grids where the work happens."""
    total, grids = 0, {}
    for counted in counts:
        total += counted["flops"]
        for scale, flops in counted["by_resolution"].items():
            grids[scale] = grids.get(scale, 0) + flops
    where = ", ".join(f"{pixel_size_A * s:g} Å {f / 1e9:.2f}" if s else f"dense {f / 1e9:.3f}"
                      for s, f in grids.items())
    members = f" ({len(counts)} networks)" if len(counts) > 1 else ""
    return f"{total / 1e9:.2f} counted from the layers{members} (by grid: {where})"


def time_forward(forward, size: int, batches, repeats: int, gflop: float, peak: float) -> None:
    """Print ms per frame of ``forward`` at each batch size and the share of ``peak`` GFLOP/s."""
    import tensorflow as tf

    for batch in batches:
        x = tf.constant(np.random.default_rng(0).poisson(
            5.0, (batch, size, size, 1)).astype(np.float32))
        wall, cpu = median_seconds(
            lambda x=x: tf.nest.map_structure(lambda t: t.numpy(), forward(x)), repeats)
        rate = gflop * batch / wall
        print(f"  forward ({batch}, {size}, {size}, 1): {wall / batch * 1000:.0f} ms per frame "
              f"(CPU time {cpu / batch * 1000:.0f} ms, all threads); {rate:.1f} GFLOP/s = "
              f"{100 * rate / peak:.0f} % of the matmul peak", flush=True)


def bench_config(path, args, peak: float) -> None:
    """One untrained architecture from a TrainConfig file."""
    from dataclasses import replace

    import keras
    import tensorflow as tf

    from ceriakeras.config import TrainConfig, load_config
    from ceriakeras.nn.flops import forward_flops
    from ceriakeras.nn.model import build_model, receptive_field_px

    config = load_config(TrainConfig, path, mixed_precision="off")
    model = build_model(config.model, noise_seed=0)
    rf = receptive_field_px(model)
    if rf == float("inf"):
        local = receptive_field_px(build_model(replace(config.model, global_branch=False)))
        rf_text = f"whole frame (global branch); convolutions alone {local:.0f} px"
    else:
        rf_text = f"{rf:.0f} px"
    print(f"{path}: {config.model.architecture}, {model.count_params()} parameters, "
          f"receptive field {rf_text} at {config.model.pixel_size_A} Å/px", flush=True)
    counted = forward_flops(model, args.size, args.size)
    gflop = counted["flops"] / 1e9
    text = layer_gflops_text([counted], config.model.pixel_size_A)
    forward = tf.function(lambda x: model(x, training=False))
    if not args.no_profiler:
        text += f"; {profiler_flops(forward, args.size) / 1e9:.2f} by TF's profiler"
    print(f"  GFLOP per {args.size}² frame: {text}", flush=True)
    time_forward(forward, args.size, args.batches, args.repeats, gflop, peak)
    if args.train_step:
        time_train_step(model, config, args.repeats)
        if args.teacher:
            time_train_step(build_model(config.model, noise_seed=0), config, args.repeats,
                            teacher=args.teacher)
    keras.backend.clear_session()


def bench_served(path, args, peak: float) -> None:
    """A served model (a version folder or a model base folder: its newest version)."""
    from ceriakeras.config import ModelConfig, from_dict
    from ceriakeras.inference.served import load_served_model

    served = load_served_model(path)
    info = served.info
    members = [m["training_config"] for m in info.get("ensemble", [])] or [info["training_config"]]
    configs = [from_dict(ModelConfig, m.get("model", m)) for m in members]
    print(f"{served.path}: {len(configs)} network(s), "
          f"{', '.join(c.architecture for c in configs)}", flush=True)
    counts = member_counts(configs, args.size)
    text = layer_gflops_text(counts, configs[0].pixel_size_A)

    def forward(x):
        return served.signature(image=x)["probabilities"]

    gflop = sum(c["flops"] for c in counts) / 1e9
    if not args.no_profiler:
        gflop = profiler_flops(forward, args.size) / 1e9
        text += f"; {gflop:.2f} by TF's profiler"
    print(f"  GFLOP per {args.size}² frame: {text}", flush=True)
    time_forward(forward, args.size, args.batches, args.repeats, gflop, peak)


def time_train_step(model, config, repeats: int, teacher=None) -> None:
    """Seconds per training step at the config's crop and batch size (with ``teacher``, a served
    model's folder: a distillation step, :mod:`ceriakeras.nn.distill`)."""
    import tensorflow as tf

    from ceriakeras.nn.train import compile_model, training_targets_spec

    compile_model(model, config)
    what = "training step"
    if teacher is not None:
        from ceriakeras.nn.distill import attach_teacher, load_teacher

        served = load_teacher(teacher, config)
        attach_teacher(model, served, np.ones(config.model.max_height + 1), config)
        what = f"distillation step from {served.path}"
    crop, batch = config.pipeline.crop_px, config.pipeline.batch_size
    rng = np.random.default_rng(0)
    image = rng.uniform(50, 100, (batch, crop, crop, 1)).astype(np.float32)
    label = rng.integers(0, config.model.max_height + 1, (batch, crop, crop)).astype(np.int32)
    weight = np.ones((batch, crop, crop), np.float32)
    y, w = training_targets_spec(model, label, weight, np.zeros((batch, 3), np.float32))
    data = tf.data.Dataset.from_tensors((image, y, w)).repeat()
    model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # compile and warm up
    steps = max(repeats, 3)
    start, start_cpu = time.perf_counter(), time.process_time()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    per_step = (time.perf_counter() - start) / steps
    cpu_step = (time.process_time() - start_cpu) / steps
    epoch_min = per_step * config.steps_per_epoch / 60
    print(f"  {what} (batch {batch} of {crop}² crops): {per_step:.2f} s (CPU time "
          f"{cpu_step:.2f} s, all threads); one epoch of {config.steps_per_epoch} steps ≈ "
          f"{epoch_min:.1f} min, {config.epochs} epochs ≈ {epoch_min * config.epochs / 60:.1f} h "
          "(+ validation)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="TrainConfig TOML/JSON: an untrained architecture (repeatable)")
    parser.add_argument("--model", action="append", default=[], metavar="DIR",
                        help="served model: saved_models/NAME or a version folder (repeatable)")
    parser.add_argument("--size", type=int, default=512, metavar="PX",
                        help="frame side at the model's pixel size, px")
    parser.add_argument("--batches", default="1,4", help="batch sizes, comma separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-size", type=int, default=2048, metavar="N",
                        help="side of the matrices that measure the matmul peak")
    parser.add_argument("--no-profiler", action="store_true",
                        help="skip TensorFlow's profiler count (the layer count stays)")
    parser.add_argument("--train-step", action="store_true",
                        help="also time a training step at a --config's crop and batch size")
    parser.add_argument("--teacher", metavar="DIR",
                        help="with --train-step: also time a distillation step from this served "
                             "model")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    import tensorflow as tf

    root = Path(__file__).resolve().parents[2]
    if not args.config and not args.model:
        args.config = [root / "configs/ceria110_train.toml", root / "configs/ceria110_v3_train.toml"]
    peak = matmul_peak_gflops(args.peak_size, args.repeats)
    print(f"threads: intra {tf.config.threading.get_intra_op_parallelism_threads()}, cpu count "
          f"{os.cpu_count()}, load {os.getloadavg()[0]:.1f}; float32 matmul peak "
          f"{peak:.1f} GFLOP/s ({args.peak_size}²)", flush=True)
    for path in args.config:
        bench_config(path, args, peak)
    for path in args.model:
        bench_served(path, args, peak)


if __name__ == "__main__":
    main()
