"""The commands that make and ship a model: ``simulate``, ``train``, ``export``, ``calibrate``."""

from __future__ import annotations

import contextlib
import os
import sys

import click

from ..config import CALIBRATION_MAPS as CALIBRATION_MAP_CHOICES
from .startup import locked, one_line_errors, verbose_option


# --- simulate ----------------------------------------------------------------------------------
@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), metavar="tfrecords/NAME",
              help="Dataset folder (created). Rerunning the same command resumes an interrupted run.")
@click.option("--count", type=int, default=None, metavar="N",
              help="Number of images (ceil(N / optics-per-exit-wave) particles). Required unless --repair.")
@click.option("--shards", type=int, default=None, metavar="S",
              help="Number of train shards (default 16; validation and test get proportionally fewer).")
@click.option("--seed", type=int, default=None, metavar="INT", help="Seed of the whole dataset (default 0).")
@click.option("--workers", type=int, default=None, metavar="K",
              help="Local worker processes (dask LocalCluster, one thread each); default 1 = in this process.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Run on an existing dask.distributed cluster instead of local workers.")
@click.option("--config", "config_path", type=click.Path(path_type=str), default=None, metavar="FILE",
              help="SimulationConfig as JSON or TOML (nested [structure] and [optics] tables); default the converged settings of the training data (configs/ceria110_v3_data.toml). The old, cheap, unconverged settings only by name: configs/legacy_fast.toml.")
@click.option("--cell-size", "cell_size_A", type=float, default=None, metavar="Å",
              help="Side of the square simulation cell, Å (default 128; the image is cell / pixel size px).")
@click.option("--pixel-size", "pixel_size_A", type=float, default=None, metavar="Å",
              help="Pixel size of the stored images and labels, Å (default 0.2; a whole multiple of the config's multislice sampling_A, 0.04 Å by default).")
@click.option("--optics-per-exit-wave", type=int, default=None, metavar="N",
              help="Images with different optics from one multislice run (default 8).")
@click.option("--preview", type=int, default=0, show_default=True, metavar="K",
              help="Write K PNGs (image | noisy image at 200 e⁻/Å² | label) to OUT/preview/.")
@click.option("--save-structures", is_flag=True, help="Write each particle as OUT/structures/particle-NNNNNN.xyz.")
@click.option("--repair", is_flag=True,
              help="Re-simulate the missing or corrupt shards of a dataset (other options default to its manifest).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset made with other parameters in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@verbose_option
@one_line_errors
def simulate(out_dir, count, shards, seed, workers, scheduler, config_path, cell_size_A, pixel_size_A,
             optics_per_exit_wave, preview, save_structures, repair, overwrite, quiet):
    """Simulate CeO2 nanoparticle HRTEM images and labels into sharded TFRecords.

    Example: ceriakeras simulate --out tfrecords/demo --count 64 --shards 4 --workers 2
    """
    import shlex

    from ..config import ConfigError, SimulationConfig, load_config
    from ..data.writer import dataset_parameters, write_dataset

    if workers is not None and scheduler is not None:
        raise ConfigError("give either --workers or --scheduler, not both")
    if repair and overwrite:
        raise ConfigError("--repair keeps a dataset and --overwrite replaces it: give one of them")
    for name, value, lo in (("--count", count, 1), ("--shards", shards, 1), ("--workers", workers, 1),
                            ("--seed", seed, 0), ("--preview", preview, 0),
                            ("--optics-per-exit-wave", optics_per_exit_wave, 1)):
        if value is not None and value < lo:
            raise ConfigError(f"{name} {value} must be at least {lo}")
    for name, value in (("--cell-size", cell_size_A), ("--pixel-size", pixel_size_A)):
        if value is not None and not value > 0:
            raise ConfigError(f"{name} {value} Å must be a positive length in ångström")
    if scheduler is not None and not scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        raise ConfigError(f"--scheduler {scheduler!r} must be an address like tcp://HOST:8786")
    overrides = {"cell_size_A": cell_size_A, "pixel_size_A": pixel_size_A,
                 "optics_per_exit_wave": optics_per_exit_wave}
    command = "ceriakeras " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "ceriakeras simulate"
    if repair and count is None:
        count, old_shards, old_seed, config, old_command = dataset_parameters(out_dir)
        if config_path is not None or any(v is not None for v in overrides.values()):
            raise ConfigError("--repair without --count takes the settings from the dataset: "
                              "drop --config and the physics options, or give them all with --count")
        shards = old_shards if shards is None else shards
        seed = old_seed if seed is None else seed
        command = old_command or command
    elif count is None:
        raise ConfigError("--count N (number of images) is required, e.g. --count 1000")
    else:
        config = load_config(SimulationConfig, config_path, **overrides)
    with locked(out_dir):
        manifest = write_dataset(
            out_dir, count, 16 if shards is None else shards, 0 if seed is None else seed, config,
            workers=workers or 1, scheduler=scheduler, save_structures=save_structures,
            preview=preview, command=command, progress=not quiet, overwrite=overwrite,
            repair=repair)
    counts = manifest["counts"]
    n_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    def n(k, word):
        return f"{k} {word}{'' if k == 1 else 's'}"

    click.echo(f"{out_dir}: {n(sum(counts.values()), 'image')} of {n(manifest['particles'], 'particle')} "
               f"(train {counts['train']}, validation {counts['validation']}, test {counts['test']}) "
               f"in {n(n_shards, 'shard')}; manifest.json written")
    empty = [split for split in ("validation", "test") if not counts.get(split)]
    if empty:
        click.echo(f"warning: {out_dir} has no {' and no '.join(empty)} split (too few particles "
                   "or split_fractions): train needs a validation split, evaluate a test split; "
                   "simulate more images", err=True)


# --- train -------------------------------------------------------------------------------------
@click.command()
@click.option("--data", "data_dir", required=True, multiple=True, type=click.Path(path_type=str),
              metavar="tfrecords/NAME",
              help="Dataset folder written by `ceriakeras simulate`; repeat it to train on several "
                   "chunks together (same pixel size in Å, max height, label radius, image size). "
                   "With --resume, chunks may be added to those of the run.")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=str), metavar="runs/NAME",
              help="Run folder: checkpoints, logs, TensorBoard, the config used.")
@click.option("--config", "config_path", type=click.Path(path_type=str), default=None, metavar="FILE",
              help="TrainConfig as JSON or TOML (nested [pipeline] and [model] tables); with --resume "
                   "the default is the run's own config.json.")
@click.option("--epochs", type=int, default=None, metavar="E",
              help="Total number of epochs (with --resume: including those done).")
@click.option("--steps-per-epoch", type=int, default=None, metavar="N", help="Training batches per epoch.")
@click.option("--batch-size", type=int, default=None, metavar="B",
              help="Global batch size, crops per step (split across replicas).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete the run in --out and start again.")
@click.option("--init-from", type=click.Path(path_type=str), default=None, metavar="runs/NAME",
              help="Start the new run in --out from the weights of this run's last finished "
                   "epoch (a warm restart: new optimizer, learning-rate schedule from its warm-up, "
                   "--config's seed); same [model] settings, same class weights. Without "
                   "--config, that run's config.json.")
@click.option("--allow-data-change", is_flag=True,
              help="With --resume: continue although --data leaves out or replaces datasets the "
                   "run was trained on (recorded in the run's dataset.json).")
@click.option("--init-partial", type=click.Path(path_type=str), default=None, metavar="runs/NAME",
              help="Start the new run from this run's last weights where the layer shapes agree "
                   "(a student narrower in places); the other layers start fresh.")
@click.option("--teacher", type=click.Path(path_type=str), default=None,
              metavar="saved_models/NAME/V",
              help="Distil from this served model: its probabilities on the same noisy crops "
                   "are soft targets next to the true labels (recorded in the run).")
@click.option("--distill-weight", type=float, default=None, metavar="λ",
              help="With --teacher: loss = (1 − λ) · cross-entropy + λ · T² · KL (default 0.5).")
@click.option("--distill-temperature", type=float, default=None, metavar="T",
              help="With --teacher: softmax temperature of the KL term (default 1).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@verbose_option
@one_line_errors
def train(data_dir, run_dir, config_path, epochs, steps_per_epoch, batch_size, resume, overwrite,
          init_from, allow_data_change, init_partial, teacher, distill_weight,
          distill_temperature, quiet):
    """Train the U-Net on a simulated dataset.

    Example: ceriakeras train --data tfrecords/demo --out runs/demo --epochs 20

    Chunks: ceriakeras train --data tfrecords/v3-a --data tfrecords/v3-b --out runs/v3 --resume

    Warm restart: ceriakeras train --data tfrecords/demo --out runs/demo-2 --init-from runs/demo
    --epochs 10

    Distillation: ceriakeras train --config student.toml --data tfrecords/demo --out runs/student
    --teacher saved_models/ceria110/6 --distill-weight 0.5 --init-partial runs/demo
    """
    import dataclasses
    from pathlib import Path

    from ..config import ConfigError, TrainConfig, load_config
    from ..nn.plan import check_train

    for name, value in (("--epochs", epochs), ("--steps-per-epoch", steps_per_epoch),
                        ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value} must be at least 1")
    if config_path is None and resume and (Path(run_dir) / "config.json").is_file():
        config_path = str(Path(run_dir) / "config.json")
    elif config_path is None and init_from and (Path(init_from) / "config.json").is_file():
        config_path = str(Path(init_from) / "config.json")
    config = load_config(TrainConfig, config_path, epochs=epochs, steps_per_epoch=steps_per_epoch,
                         teacher=teacher, distill_weight=distill_weight,
                         distill_temperature=distill_temperature)
    if batch_size is not None:
        config = dataclasses.replace(
            config, pipeline=dataclasses.replace(config.pipeline, batch_size=batch_size))
        config.validate()
    data_dirs = list(data_dir)
    check_train(data_dirs, run_dir, resume=resume, overwrite=overwrite,
                allow_data_change=allow_data_change, init_from=init_from)
    if config.teacher is not None:  # a served model must be there (JSON only, no TensorFlow)
        from ..inference.served import find_version, read_info

        read_info(find_version(config.teacher))
    if init_partial is not None and not (Path(init_partial) / "checkpoints" / "last.keras").is_file():
        from ..config import ModelError

        raise ModelError(f"--init-partial {init_partial} has no checkpoints/last.keras; name a "
                         "training run folder")
    lock = (contextlib.nullcontext() if "TF_CONFIG" in os.environ  # workers share the folder
            else locked(run_dir, fresh_names=("config.json", "dataset.json", "log.csv",
                                               "tensorboard")))
    with lock:
        from ..nn.train import train as train_run

        result = train_run(data_dirs, run_dir, config, resume=resume, overwrite=overwrite,
                           progress=not quiet, allow_data_change=allow_data_change,
                           init_from=init_from, init_partial=init_partial)
    resumed = f" (resumed after epoch {result['initial_epoch']})" if result["resumed"] else ""
    click.echo(f"{run_dir}: {result['epochs_completed']} epoch(s){resumed}; best validation loss "
               f"{result['best_val_loss']:.4f} at epoch {result['best_epoch']}; "
               f"checkpoints in {run_dir}/checkpoints")


# --- export ------------------------------------------------------------------------------------
@click.command()
@click.option("--run", "run_dir", required=True, multiple=True, type=click.Path(path_type=str),
              metavar="runs/NAME",
              help="Training run folder (its best checkpoint is exported, see --checkpoint). "
                   "Repeat for an ensemble: one model that averages the runs' probabilities "
                   "(each run's time per frame adds up; docs/model.md, \"Version 5\").")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), metavar="saved_models/NAME",
              help="Model base folder for TF Serving; the version goes in OUT/<version>/.")
@click.option("--version", type=int, default=None, metavar="N",
              help="Version number (default: the next free integer); an existing one is never overwritten.")
@click.option("--calibrate", "calibrate_on", type=click.Path(exists=True, file_okay=False),
              multiple=True, metavar="tfrecords/NAME",
              help="Calibrate the column `confidence` on this dataset's validation split (a map "
                   "per dose, 20–20000 e-/Å²; recorded in assets/ceriakeras.json). Repeat to pool "
                   "several datasets, e.g. ones simulated with other settings than the training "
                   "data (docs/model.md).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=48, show_default=True,
              metavar="N", help="Validation images used by --calibrate, per dataset (count of images).")
@click.option("--calibration-map", type=click.Choice(CALIBRATION_MAP_CHOICES), default=None,
              help="Confidence map fitted by --calibrate (default: the project's default, "
                   "docs/model.md).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), multiple=True,
              help="best (default): the epoch with the lowest validation loss; last: the last "
                   "finished epoch (take it when datasets were added during the run, whose "
                   "validation losses are then measured on different data). With several --run: "
                   "once for all, or once per --run in the same order.")
@click.option("--column-threshold", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              default=None, metavar="P",
              help="The model's column threshold: smallest column probability (1 − p(background), "
                   "in (0, 1)) at a column centre, used by analyze, evaluate and --calibrate. "
                   "Choose it on validation data with scripts/studies/threshold_study.py (default: "
                   "none recorded; 0.3 applies).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@verbose_option
@one_line_errors
def export(run_dir, out_dir, version, calibrate_on, calibration_images, calibration_map,
           checkpoint, column_threshold, quiet):
    """Export a trained run as a versioned SavedModel for TF Serving.

    Example: ceriakeras export --run runs/demo --out saved_models/demo --calibrate tfrecords/demo
    """
    from ..nn.plan import check_export

    calibrate_on = list(calibrate_on) or None
    run_dir, checkpoint = list(run_dir), list(checkpoint) or ["best"]
    check_export(run_dir, out_dir, version, calibrate_on=calibrate_on, checkpoint=checkpoint)
    from ..inference.served import read_info
    from ..nn.export import export_run

    with locked(out_dir):
        path = export_run(run_dir, out_dir, version, calibrate_on=calibrate_on,
                          calibration_images=calibration_images, calibration_map=calibration_map,
                          progress=not quiet, checkpoint=checkpoint,
                          column_threshold=column_threshold)
    info = read_info(path)
    outputs = ", ".join(info.get("signature", {}).get("outputs") or ("probabilities", "height"))
    click.echo(f"{path}: SavedModel, signature serving_default "
               f"(image -> {outputs}); assets/ceriakeras.json written")
    if "column_threshold" in info:
        click.echo(f"column threshold {info['column_threshold']:g} (column probability), recorded")
    echo_calibration(info)


FEWEST_CALIBRATION_IMAGES = 8
"""Below this many calibration images (count) the ECE printed is not to be trusted: a warning."""


def echo_calibration(info: dict) -> None:
    """Print a model's calibration tables: what they were fitted on, ECE before and after."""
    for key, what in (("confidence_calibration", ""), ("confidence_calibration_tta", ", --tta")):
        fit = info.get(key)
        if fit and int(fit.get("n_images", 0)) < FEWEST_CALIBRATION_IMAGES:
            click.echo(f"warning: the confidence calibration{what} was fitted on "
                       f"{fit.get('n_images')} image(s): too few for the map or its ECE to mean "
                       f"much; calibrate on at least {FEWEST_CALIBRATION_IMAGES} (--images, "
                       "--calibration-images)", err=True)
        if fit:
            click.echo(f"confidence calibration ({fit.get('map', 'platt')} map, {fit['split']} "
                       f"split, {fit['n_images']} images of {fit['data_dir']}{what}):")
            click.echo("  dose e-/Å²   slope  intercept  ECE before  ECE after")
            for row in zip(fit["dose_e_per_A2"], fit["slope"], fit["intercept"], fit["ece_before"],
                           fit["ece_after"]):
                click.echo("  {:>10g}  {:>6.3f}  {:>9.3f}  {:>10.3f}  {:>9.3f}".format(*row))


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False),
              metavar="saved_models/NAME[/VERSION]",
              help="Exported model to recalibrate (newest version unless a version folder).")
@click.option("--data", "datasets", required=True, multiple=True, metavar="tfrecords/NAME[:SPLIT]",
              help="Calibration dataset at the model's pixel size (validation split unless "
                   ":train/:validation/:test is appended); repeat to pool several.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), metavar="saved_models/NAME2",
              help="Model base folder of the recalibrated copy; it goes in OUT/<version>/.")
@click.option("--version", type=int, default=None, metavar="N",
              help="Version number of the copy (default: the next free integer in OUT); an "
                   "existing one is never overwritten.")
@click.option("--map", "method", type=click.Choice(CALIBRATION_MAP_CHOICES), default=None,
              help="Confidence map (default: the project's default, docs/model.md).")
@click.option("--images", "max_images", type=click.IntRange(min=1), default=48, show_default=True,
              metavar="N", help="Images per dataset (count of images).")
@click.option("--no-tta", is_flag=True,
              help="Skip the test-time augmentation table (8x faster; the copy then has none).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@verbose_option
@one_line_errors
def calibrate(model_path, datasets, out_dir, version, method, max_images, no_tta, quiet):
    """Copy an exported model with its column `confidence` re-calibrated on other data.

    The graph is copied unchanged; the source model is never modified.

    Example: ceriakeras calibrate --model saved_models/ceria110/6 --data tfrecords/mine
    --out saved_models/ceria110-mine
    """
    from ..evaluation.plan import check_calibration_data
    from ..evaluation.recalibrate import target_version
    from ..inference.served import model_settings, read_info
    from ..io.files import check_out_dir
    from ..modelcheck import check_model_files

    check_out_dir(out_dir)
    source, _ = target_version(model_path, out_dir, version)
    check_calibration_data(list(datasets), model_settings(read_info(source))[0])
    check_model_files(source, read_info(source))
    from ..evaluation.recalibrate import recalibrate

    with locked(out_dir):
        path = recalibrate(source, out_dir, list(datasets), version=version, method=method,
                           max_images=max_images, tta=not no_tta, progress=not quiet)
    click.echo(f"{path}: copy of {source} with a new confidence calibration in "
               "assets/ceriakeras.json")
    echo_calibration(read_info(path))
