"""The ``ceriakeras`` command line: thin click commands over the library, nothing else.

Every command turns a :class:`ceriakeras.config.CeriakerasError` into one line on stderr
(``error: …``) and exit status 2. Heavy libraries (TensorFlow, abTEM) are imported inside the
commands so that ``--help`` is instant.
"""

from __future__ import annotations

import errno
import functools
import sys

import click

from .config import CeriakerasError


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _one_line_errors(func):
    """Report user errors as one line and a non-zero exit instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CeriakerasError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)
        except OSError as err:  # a full disk or a folder we may not write: one line, not a trace
            if err.errno not in _WRITE_ERRNOS:
                raise
            where = f" ({err.filename})" if err.filename else ""
            click.echo(f"error: {err.strerror or errno.errorcode[err.errno]}{where}; free space or "
                       "choose a folder you may write to, then rerun the same command (finished "
                       "parts are kept)", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ceriakeras")
def main():
    """Atomic column heights of CeO2 nanoparticles from single low-dose HRTEM images.

    Units everywhere: Å (lengths, pixel sizes), nm (defocus, focal spread), µm (Cs), mm (C5),
    keV (beam energy), e⁻/Å² (dose per image), atoms (column heights).
    """


# --- simulate ----------------------------------------------------------------------------------
# (section owned by the records/simulate work)
@main.command()
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
              help="SimulationConfig as JSON or TOML (nested [structure] and [optics] tables).")
@click.option("--cell-size", "cell_size_A", type=float, default=None, metavar="Å",
              help="Side of the square simulation cell, Å (default 64; the image is cell / pixel size px).")
@click.option("--pixel-size", "pixel_size_A", type=float, default=None, metavar="Å",
              help="Pixel size of the stored images and labels, Å (default 0.2; a multiple of the 0.1 Å sampling).")
@click.option("--optics-per-exit-wave", type=int, default=None, metavar="N",
              help="Images with different optics from one multislice run (default 8).")
@click.option("--preview", type=int, default=0, show_default=True, metavar="K",
              help="Write K PNGs (image | noisy image at 200 e⁻/Å² | label) to OUT/preview/.")
@click.option("--save-structures", is_flag=True, help="Write each particle as OUT/structures/particle-NNNNNN.xyz.")
@click.option("--repair", is_flag=True,
              help="Re-simulate the missing or corrupt shards of a dataset (other options default to its manifest).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset made with other parameters in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_one_line_errors
def simulate(out_dir, count, shards, seed, workers, scheduler, config_path, cell_size_A, pixel_size_A,
             optics_per_exit_wave, preview, save_structures, repair, overwrite, quiet):
    """Simulate CeO2 nanoparticle HRTEM images and labels into sharded TFRecords.

    Example: ceriakeras simulate --out tfrecords/demo --count 64 --shards 4 --workers 2
    """
    import shlex

    from .config import ConfigError, SimulationConfig, load_config
    from .records import dataset_parameters, write_dataset

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
    manifest = write_dataset(
        out_dir, count, 16 if shards is None else shards, 0 if seed is None else seed, config,
        workers=workers or 1, scheduler=scheduler, save_structures=save_structures, preview=preview,
        command=command, progress=not quiet, overwrite=overwrite, repair=repair)
    counts = manifest["counts"]
    n_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    def n(k, word):
        return f"{k} {word}{'' if k == 1 else 's'}"

    click.echo(f"{out_dir}: {n(sum(counts.values()), 'image')} of {n(manifest['particles'], 'particle')} "
               f"(train {counts['train']}, validation {counts['validation']}, test {counts['test']}) "
               f"in {n(n_shards, 'shard')}; manifest.json written")


# --- train -------------------------------------------------------------------------------------
# (section owned by the train work)
@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str),
              metavar="tfrecords/NAME", help="Dataset folder written by `ceriakeras simulate`.")
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
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_one_line_errors
def train(data_dir, run_dir, config_path, epochs, steps_per_epoch, batch_size, resume, overwrite, quiet):
    """Train the U-Net on a simulated dataset.

    Example: ceriakeras train --data tfrecords/demo --out runs/demo --epochs 20
    """
    import dataclasses
    from pathlib import Path

    from .config import ConfigError, TrainConfig, load_config
    from .train import train as train_run

    for name, value in (("--epochs", epochs), ("--steps-per-epoch", steps_per_epoch),
                        ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value} must be at least 1")
    if config_path is None and resume and (Path(run_dir) / "config.json").is_file():
        config_path = str(Path(run_dir) / "config.json")
    config = load_config(TrainConfig, config_path, epochs=epochs, steps_per_epoch=steps_per_epoch)
    if batch_size is not None:
        config = dataclasses.replace(
            config, pipeline=dataclasses.replace(config.pipeline, batch_size=batch_size))
        config.validate()
    result = train_run(data_dir, run_dir, config, resume=resume, overwrite=overwrite,
                       progress=not quiet)
    resumed = f" (resumed after epoch {result['initial_epoch']})" if result["resumed"] else ""
    click.echo(f"{run_dir}: {result['epochs_completed']} epoch(s){resumed}; best validation loss "
               f"{result['best_val_loss']:.4f} at epoch {result['best_epoch']}; "
               f"checkpoints in {run_dir}/checkpoints")


# --- export ------------------------------------------------------------------------------------
# (section owned by the export work)
@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=str), metavar="runs/NAME",
              help="Training run folder (its best checkpoint is exported).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), metavar="saved_models/NAME",
              help="Model base folder for TF Serving; the version goes in OUT/<version>/.")
@click.option("--version", type=int, default=None, metavar="N",
              help="Version number (default: the next free integer); an existing one is never overwritten.")
@click.option("--calibrate", "calibrate_on", type=click.Path(exists=True, file_okay=False),
              default=None, metavar="tfrecords/NAME",
              help="Calibrate the column `confidence` on this dataset's validation split (Platt "
                   "scaling per dose, 20–20000 e-/Å²; recorded in assets/ceriakeras.json).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=48, show_default=True,
              metavar="N", help="Validation images used by --calibrate (count of images).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_one_line_errors
def export(run_dir, out_dir, version, calibrate_on, calibration_images, quiet):
    """Export a trained run as a versioned SavedModel for TF Serving.

    Example: ceriakeras export --run runs/demo --out saved_models/demo --calibrate tfrecords/demo
    """
    from .export import export_run, read_info

    path = export_run(run_dir, out_dir, version, calibrate_on=calibrate_on,
                      calibration_images=calibration_images, progress=not quiet)
    click.echo(f"{path}: SavedModel, signature serving_default "
               "(image -> probabilities, height); assets/ceriakeras.json written")
    info = read_info(path)
    for key, what in (("confidence_calibration", ""), ("confidence_calibration_tta", ", --tta")):
        fit = info.get(key)
        if fit:
            click.echo(f"confidence calibration ({fit['split']} split, {fit['n_images']} images{what}):")
            click.echo("  dose e-/Å²   slope  intercept  ECE before  ECE after")
            for row in zip(fit["dose_e_per_A2"], fit["slope"], fit["intercept"], fit["ece_before"],
                           fit["ece_after"]):
                click.echo("  {:>10g}  {:>6.3f}  {:>9.3f}  {:>10.3f}  {:>9.3f}".format(*row))


# --- analyze -----------------------------------------------------------------------------------
# (section owned by the analyze work)
@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--model", default=None, metavar="saved_models/NAME",
              help="SavedModel folder (newest version) or a version folder; default: the shipped model.")
@click.option("--pixel-size", "pixel_size_A", type=float, default=None, metavar="Å",
              help="Input pixel size in Å (0.05–0.2 Å); overrides the files' calibration.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str),
              help="Output folder for columns.csv, overlays and plots.")
@click.option("--overwrite", is_flag=True, help="Replace earlier results in --out.")
@click.option("--xyz", is_flag=True, help="Also write a 3D model (extxyz) per frame.")
@click.option("--overlay-every", type=int, default=None, metavar="K",
              help="Overlay PNG for every K-th frame (frames; default 1).")
@click.option("--batch-size", type=int, default=None, metavar="N",
              help="Frames per inference batch (frames; default 4).")
@click.option("--tta", "tta", is_flag=True, default=None,
              help="Test-time augmentation: average the model over the 8 flips and 90° rotations "
                   "of each frame (slightly better heights, 8× the model time).")
@click.option("--details", is_flag=True,
              help="Add expected_height_atoms and height_std_atoms (Ce atoms) columns to columns.csv.")
@click.option("--config", "config_path", type=click.Path(path_type=str), default=None,
              help="JSON/TOML file with AnalyzeConfig fields (min_distance_A in Å, threshold, …).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--counts-per-electron", "counts_per_electron", type=float, default=None,
              metavar="COUNTS/e⁻",
              help="Detector gain: counts (the file's units) per electron, for the dose and the "
                   "confidence calibration; default: the file's, else estimated from the frames' "
                   "noise (series: frame differences; single frame: its vacuum), else 1.")
@_one_line_errors
def analyze(inputs, model, pixel_size_A, out_dir, overwrite, xyz, overlay_every, batch_size,
            tta, details, config_path, quiet, counts_per_electron):
    """Find Ce columns and their heights (Ce atoms) in images or series: INPUT... are TIFF
    (single, multi-page, ImageJ, OME), .npy, DM3/DM4, EMD or SER files, or folders of them.

    Writes OUT/columns.csv (source,frame,x_px,y_px,x_A,y_A,height,confidence), an overlay per
    frame and, for a series, heights and total Ce over time. An interrupted run resumes when
    rerun with the same arguments.
    """
    from .analyze import analyze as run_analyze, format_summary
    from .config import AnalyzeConfig, InputError, load_config

    if pixel_size_A is not None and not 0 < pixel_size_A < float("inf"):
        raise InputError(f"--pixel-size {pixel_size_A} must be a positive pixel size in Å "
                         "(0.05–0.2 Å)")
    config = load_config(AnalyzeConfig, config_path, overlay_every=overlay_every,
                         batch_size=batch_size, test_time_augmentation=tta or None)
    summary = run_analyze(list(inputs), out_dir, model=model, pixel_size_A=pixel_size_A,
                          config=config, overwrite=overwrite, xyz=xyz, details=details,
                          progress=not quiet, counts_per_electron=counts_per_electron)
    click.echo(format_summary(summary))



# --- evaluate ----------------------------------------------------------------------------------
def _parse_doses(ctx, param, value: str) -> tuple[float, ...]:
    from .evaluate import check_doses

    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers (e-/Å²)") from None
    try:
        return check_doses(numbers)
    except CeriakerasError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="Exported model: saved_models/NAME (newest version) or saved_models/NAME/VERSION.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset folder made by `ceriakeras simulate` (its pixel size must be the model's).")
@click.option("--doses", default="20,50,200,1000,5000", show_default=True, callback=_parse_doses,
              help="Comma-separated doses per image, in e-/Å² (each positive).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder for metrics.json, report.md and plots [default: results/evaluate-NAME].")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["test", "validation", "train"]), help="Dataset split to evaluate.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N images of the split (count of images).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the Poisson noise.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation, as `analyze --tta` (8 flips and rotations averaged).")
@click.option("--no-baseline", is_flag=True, help="Skip the classical baseline.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier evaluation in --out.")
@_one_line_errors
def evaluate(model_path, data_dir, doses, out_dir, split, max_images, seed, tta, no_baseline,
             overwrite):
    """Measure column detection and height accuracy of a model at fixed doses.

    Poisson noise at each dose (e⁻/Å² per image, fixed seeds) on the split's noise-free images,
    columns extracted as `analyze` does, matched to the true columns within 1 Å. Writes
    metrics.json, report.md (network against a classical baseline) and PNG plots; prints a table.
    """
    from pathlib import Path

    from .config import AnalyzeConfig
    from .evaluate import evaluate as run_evaluation
    from .evaluate import format_table
    from .export import load_served_model

    if out_dir is None:
        name = Path(model_path).resolve()
        name = name.parent.name if name.name.isdigit() else name.name
        out_dir = Path("results") / f"evaluate-{name}"
    model = load_served_model(model_path)
    result = run_evaluation(
        model, data_dir, out_dir, doses=doses, split=split, seed=seed, max_images=max_images,
        baseline=not no_baseline, overwrite=overwrite,
        config=AnalyzeConfig(test_time_augmentation=tta), command=" ".join(["ceriakeras"] + sys.argv[1:]),
    )
    click.echo(format_table(result))
    click.echo(f"wrote {out_dir}/metrics.json, report.md and plots")


if __name__ == "__main__":  # pragma: no cover
    main()
