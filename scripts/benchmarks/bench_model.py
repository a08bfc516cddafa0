"""Forward time of the network on CPU: seconds per batch of 512² frames (the 0.2 Å grid that a
1024² frame at 0.1 Å becomes), and seconds per training step at a given crop.

    python scripts/benchmarks/bench_model.py                                  # U-Net v1–2 vs context U-Net
    python scripts/benchmarks/bench_model.py --config configs/ceria110_v3_train.toml --train-step

The model runs as a ``tf.function`` (as in a SavedModel), warmed up once per shape; the time is
the median of ``--repeats`` calls. Run it with the cores otherwise quiet.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[],
                        help="TrainConfig TOML/JSON (repeatable); default: configs/ceria110_train.toml "
                             "and configs/ceria110_v3_train.toml")
    parser.add_argument("--size", type=int, default=512, metavar="PX",
                        help="frame side at the model's pixel size, px")
    parser.add_argument("--batches", default="1,4", help="batch sizes, comma separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-step", action="store_true",
                        help="also time a training step at the config's crop and batch size")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from ceriakeras.config import TrainConfig, load_config
    from ceriakeras.nn.model import build_model, receptive_field_px
    from ceriakeras.nn.train import compile_model, training_targets_spec

    root = Path(__file__).resolve().parents[2]
    paths = args.config or [root / "configs/ceria110_train.toml",
                            root / "configs/ceria110_v3_train.toml"]
    print(f"threads: intra {tf.config.threading.get_intra_op_parallelism_threads()}, "
          f"cpu count {os.cpu_count()}")
    for path in paths:
        config = load_config(TrainConfig, path, mixed_precision="off")
        model = build_model(config.model, noise_seed=0)
        rf = receptive_field_px(model)
        if rf == float("inf"):
            from dataclasses import replace
            rf_local = receptive_field_px(build_model(replace(config.model, global_branch=False)))
            rf_text = f"whole frame (global branch); convolutions alone {rf_local:.0f} px"
        else:
            rf_text = f"{rf:.0f} px"
        print(f"{path}: {config.model.architecture}, {model.count_params()} parameters, "
              f"receptive field {rf_text} at {config.model.pixel_size_A} Å/px")
        forward = tf.function(lambda x: model(x, training=False))
        for batch in (int(b) for b in args.batches.split(",")):
            x = tf.constant(np.random.default_rng(0).poisson(
                5.0, (batch, args.size, args.size, 1)).astype(np.float32))
            forward(x)
            times, cpu = [], []
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                out = forward(x)
                tf.nest.map_structure(lambda t: t.numpy(), out)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            t, c = float(np.median(times)), float(np.median(cpu))
            print(f"  forward ({batch}, {args.size}, {args.size}, 1): {t * 1000:.0f} ms per batch, "
                  f"{t / batch * 1000:.0f} ms per frame (CPU time {c / batch * 1000:.0f} ms per "
                  f"frame, all threads)")
        if args.train_step:
            compile_model(model, config)
            crop, batch = config.pipeline.crop_px, config.pipeline.batch_size
            rng = np.random.default_rng(0)
            image = rng.uniform(50, 100, (batch, crop, crop, 1)).astype(np.float32)
            label = rng.integers(0, config.model.max_height + 1, (batch, crop, crop)).astype(np.int32)
            weight = np.ones((batch, crop, crop), np.float32)
            y, w = training_targets_spec(model, label, weight,
                                         np.zeros((batch, 3), np.float32))
            data = tf.data.Dataset.from_tensors((image, y, w)).repeat()
            model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # compile and warm up
            steps = max(args.repeats, 3)
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
            per_step = (time.perf_counter() - start) / steps
            cpu_step = (time.process_time() - start_cpu) / steps
            print(f"  training step (batch {batch} of {crop}² crops): {per_step:.2f} s "
                  f"(CPU time {cpu_step:.2f} s, all threads); "
                  f"one epoch of {config.steps_per_epoch} steps ≈ "
                  f"{per_step * config.steps_per_epoch / 60:.1f} min, {config.epochs} epochs ≈ "
                  f"{per_step * config.steps_per_epoch * config.epochs / 3600:.1f} h (+ validation)")
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
