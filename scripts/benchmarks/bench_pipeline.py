"""Is the input pipeline fast enough? Examples per second of the tf.data pipeline alone and of the
training step alone (on batches already in memory), and their ratio.

The pipeline must deliver at least 5× what training consumes, so it is never the bottleneck.

    python scripts/benchmarks/bench_pipeline.py --data tfrecords/NAME [--batch-size 8] [--crop 128] [--steps 20]

Without ``--data`` it first simulates a small dataset (16 images) into a temporary folder.
Exit status 1 if the ratio is below 5.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from ceriakeras.cli.startup import quiet_libraries  # noqa: E402

quiet_libraries()  # TensorFlow's, absl's and CUDA's start-up lines off the terminal, as in the CLI

import tensorflow as tf  # noqa: E402

from ceriakeras.config import PipelineConfig, SimulationConfig, TrainConfig, load_config  # noqa: E402
from ceriakeras.nn.model import build_model  # noqa: E402
from ceriakeras.data.pipeline import make_dataset  # noqa: E402
from ceriakeras.nn.train import class_weights_from_histogram, compile_model  # noqa: E402

REQUIRED_RATIO = 5.0


def pipeline_rate(dataset: tf.data.Dataset, batches: int, batch_size: int) -> float:
    """Examples per second drawn from ``dataset`` (after one warm-up batch)."""
    it = iter(dataset)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def training_rate(config: TrainConfig, batch, steps: int) -> float:
    """Examples per second of ``fit`` on one batch held in memory (after two warm-up steps)."""
    model = compile_model(build_model(config.model, noise_seed=0), config)
    data = tf.data.Dataset.from_tensors(batch).repeat()
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return steps * config.pipeline.batch_size / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset folder (default: simulate 16 images to a temp dir)")
    parser.add_argument("--batch-size", type=int, default=8, help="crops per batch")
    parser.add_argument("--crop", type=int, default=128, help="crop side, px")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--batches", type=int, default=50, help="timed pipeline batches")
    parser.add_argument("--config", help="TrainConfig TOML/JSON (its model, crop and batch size "
                                         "replace --crop and --batch-size), e.g. "
                                         "configs/ceria110_v3_train.toml")
    args = parser.parse_args()

    from ceriakeras.data.records import read_manifest
    from ceriakeras.data.writer import write_dataset

    data = args.data
    if data is None:
        data = os.path.join(tempfile.mkdtemp(prefix="bench-"), "data")
        print(f"simulating 16 images into {data} …", flush=True)
        # the old, cheap settings (320² images): quick, and what the figures here were measured on
        write_dataset(data, 16, 2, 0, SimulationConfig.legacy(), progress=False)
    manifest = read_manifest(data)
    if args.config:
        config = load_config(TrainConfig, args.config, mixed_precision="off")
        args.crop, args.batch_size = config.pipeline.crop_px, config.pipeline.batch_size
    else:
        config = TrainConfig(pipeline=PipelineConfig(crop_px=args.crop, batch_size=args.batch_size))
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, max_height=int(manifest.get("max_height", config.model.max_height))))
    weights = class_weights_from_histogram(manifest["label_histogram"],
                                           num_classes=config.model.max_height + 1)
    optics = config.model.architecture == "context_unet" and config.model.global_branch
    dataset = make_dataset(data, "train", config.pipeline, class_weights=weights, training=True,
                           optics=optics)

    pipe = pipeline_rate(dataset, args.batches, args.batch_size)
    step = training_rate(config, next(iter(dataset)), args.steps)
    ratio = pipe / step
    print(f"pipeline  {pipe:9.1f} examples/s ({args.batch_size} crops of {args.crop}² px per batch)")
    print(f"training  {step:9.1f} examples/s ({args.batch_size / step:.3f} s per step, "
          f"depth {config.model.depth}, base filters {config.model.base_filters})")
    print(f"ratio     {ratio:9.1f}× (required ≥ {REQUIRED_RATIO:g}×): "
          f"{'OK' if ratio >= REQUIRED_RATIO else 'the pipeline is the bottleneck'}")
    return 0 if ratio >= REQUIRED_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
