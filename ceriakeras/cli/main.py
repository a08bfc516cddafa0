"""The ``ceriakeras`` command line: thin click commands over the library, nothing else.

Every command turns a :class:`ceriakeras.config.CeriakerasError` into one line on stderr
(``error: …``) and exit status 2. Heavy libraries (TensorFlow, abTEM) are imported inside the
commands so that ``--help`` is instant, and only after the stages' plan functions (``analysis.plan``, ``nn.plan``, ``evaluation.plan``, ``data.plan``) have checked
the arguments, paths, file headers and the model's JSON, so bad input is refused before
TensorFlow loads. TensorFlow's, absl's and CUDA's own log lines are hidden unless ``--verbose``
is given (:func:`_quiet_libraries`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.abc
import logging
import os
import sys

import click

from ..config import CALIBRATION_MAPS as CALIBRATION_MAP_CHOICES
from ..config import CeriakerasError


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _one_line_errors(func):
    """Report user errors as one line and a non-zero exit instead of a traceback; library log
    lines stay off the terminal meanwhile (:func:`_quiet_libraries`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        finder = _quiet_libraries()
        try:
            return func(*args, **kwargs)
        except CeriakerasError as err:
            _end_progress_bars()
            click.echo(f"error: {_one_line(str(err))}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)
        except OSError as err:  # a full disk or a folder we may not write: one line, not a trace
            if err.errno not in _WRITE_ERRNOS:
                raise
            _end_progress_bars()
            where = f" ({_one_line(os.fsdecode(err.filename))})" if err.filename else ""
            click.echo(f"error: {err.strerror or errno.errorcode[err.errno]}{where}; free space or "
                       "choose a folder you may write to, then rerun the same command (finished "
                       "parts are kept)", err=True)
            sys.exit(2)
        finally:
            if finder in sys.meta_path:  # TensorFlow was not needed: leave the importer as it was
                sys.meta_path.remove(finder)

    return wrapper


def _escaped(text: str) -> str:
    """``text`` as valid UTF-8: undecodable file-name bytes (surrogate escapes) as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _one_line(text: str) -> str:
    """``text`` as one line of valid UTF-8 (:func:`_escaped`, line breaks as spaces)."""
    return " ".join(_escaped(text).splitlines())


def _end_progress_bars() -> None:
    """Close open tqdm bars, so that an error line starts on a line of its own (in a log file a
    bar ends in a carriage return, not a newline)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _locked(out_dir, fresh_names=()):
    """The ``--out`` lock of a command (:func:`ceriakeras.io.outlock.locked_out_dir`)."""
    from ..io.outlock import locked_out_dir

    return locked_out_dir(out_dir, fresh_names=fresh_names)


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 goes to ``/dev/null`` inside the block (C++ libraries write there
    directly, not through ``sys.stderr``)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to keep quiet
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.close(null)
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader, then lists its devices, with stderr sent to /dev/null;
    afterwards the ``tensorflow`` and ``absl`` Python loggers show errors only."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _stderr_to_devnull():
            self._loader.exec_module(module)
            # cuInit happens here, still in the window; should listing fail, the stage that
            # uses the devices reports it
            with contextlib.suppress(Exception):
                module.config.list_physical_devices()
        import absl.logging

        module.get_logger().setLevel(logging.ERROR)
        absl.logging.set_verbosity(absl.logging.ERROR)

    def __getattr__(self, name):  # resource readers etc. of the wrapped loader
        return getattr(self._loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do and gives it a :class:`_QuietLoader`; once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def _quiet_libraries() -> importlib.abc.MetaPathFinder | None:
    """Library log lines that are not errors stay off the terminal unless ``--verbose``.

    TensorFlow prints lines before its logging is set up (``All log messages before
    absl::InitializeLog()``, oneDNN, ``cudart_stub``, ``cpu_feature_guard``) and, on a machine
    without a GPU, ``E0000 … failed call to cuInit`` when its devices are first listed;
    ``TF_CPP_MIN_LOG_LEVEL`` silences only some of them. So, unless ``--verbose``, whenever
    TensorFlow is first imported (by whichever stage needs it, after the checks) the import and
    the device discovery run with file descriptor 2 sent to ``/dev/null``
    (:class:`_QuietTensorFlowFinder`); ``TF_CPP_MIN_LOG_LEVEL=3`` (unless already set) keeps
    TensorFlow's later C++ lines away, errors included (training prints ``E0000 … oneDNN
    supports DT_UINT8 only on platforms with AVX-512`` on its first step: a notice, not a
    failure), and the ``tensorflow`` and ``absl`` Python loggers show errors only. Errors that
    matter still reach the user as exceptions, reported by the command. With ``--verbose``
    nothing is changed.
    """
    if _verbose():
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # header damage is our one line
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietTensorFlowFinder)
                                          for f in sys.meta_path):
        return None
    finder = _QuietTensorFlowFinder()
    sys.meta_path.insert(0, finder)
    return finder


def _set_verbose(ctx, param, value):
    if value:
        ctx.find_root().params["verbose"] = True


def _verbose_option(func):
    """``--verbose`` after the command name too (``ceriakeras analyze --verbose …``)."""
    return click.option("--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
                        help="Show TensorFlow's, absl's and CUDA's own log lines.")(func)


class _OneLineGroup(click.Group):
    """Click's usage errors (an unknown option, ``--count 1e12`` for an integer) as one line
    ``error: …`` with exit status 2, like every other refusal, instead of the usage text."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `ceriakeras`: the help
                err.show()
                sys.exit(err.exit_code)
            where = f"{err.ctx.command_path}: " if err.ctx is not None else ""
            click.echo(f"error: {where}{_one_line(err.format_message())} (--help lists the "
                       "options)", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_OneLineGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ceriakeras")
@click.option("--verbose", is_flag=True,
              help="Show TensorFlow's, absl's and CUDA's own log lines (hidden by default).")
def main(verbose):
    """Atomic column heights of CeO2 nanoparticles from single low-dose HRTEM images.

    Units everywhere: Å (lengths, pixel sizes), nm (defocus, focal spread), µm (Cs), mm (C5),
    keV (beam energy), e⁻/Å² (dose per image), atoms (column heights).

    Arguments, paths, file headers and the model are checked before TensorFlow loads; give
    --verbose (before or after the command name) to see TensorFlow's log.
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
@_verbose_option
@_one_line_errors
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
    with _locked(out_dir):
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
# (section owned by the train work)
@main.command()
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
@_verbose_option
@_one_line_errors
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
            else _locked(run_dir, fresh_names=("config.json", "dataset.json", "log.csv",
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
# (section owned by the export work)
@main.command()
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
@_verbose_option
@_one_line_errors
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

    with _locked(out_dir):
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
    _echo_calibration(info)


FEWEST_CALIBRATION_IMAGES = 8
"""Below this many calibration images (count) the ECE printed is not to be trusted: a warning."""


def _echo_calibration(info: dict) -> None:
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


@main.command()
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
@_verbose_option
@_one_line_errors
def calibrate(model_path, datasets, out_dir, version, method, max_images, no_tta, quiet):
    """Copy an exported model with its column `confidence` re-calibrated on other data.

    The graph is copied unchanged; the source model is never modified.

    Example: ceriakeras calibrate --model saved_models/ceria110/6 --data tfrecords/mine
    --out saved_models/ceria110-mine
    """
    from ..inference.served import model_settings, read_info
    from ..evaluation.plan import check_calibration_data
    from ..evaluation.recalibrate import target_version

    from ..modelcheck import check_model_files
    from ..io.files import check_out_dir

    check_out_dir(out_dir)
    source, _ = target_version(model_path, out_dir, version)
    check_calibration_data(list(datasets), model_settings(read_info(source))[0])
    check_model_files(source, read_info(source))
    from ..evaluation.recalibrate import recalibrate

    with _locked(out_dir):
        path = recalibrate(source, out_dir, list(datasets), version=version, method=method,
                           max_images=max_images, tta=not no_tta, progress=not quiet)
    click.echo(f"{path}: copy of {source} with a new confidence calibration in "
               "assets/ceriakeras.json")
    _echo_calibration(read_info(path))


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
              help="Overlay PNG for every K-th frame (frames; default: 10 evenly spaced frames "
                   "of a series, the first and last included).")
@click.option("--movie/--no-movie", default=None,
              help="Annotated MP4 of every series (frame, dose, columns coloured by height; "
                   "default: on).")
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
@click.option("--tracks/--no-tracks", "tracks", default=None,  # tracks (issue 22)
              help="Follow every column through a series: track, track_height (Ce atoms) and "
                   "track_confidence in columns.csv, OUT/events.csv, drift in frames.csv "
                   "(default on).")
@click.option("--min-stretch", type=click.IntRange(min=1), default=None, metavar="FRAMES",
              help="Fewest frames in a stretch of constant height (default 3).")
@click.option("--server", default=None, metavar="URL",
              help="Run the network on a TF Serving server: http://HOST:8501 (REST) or "
                   "grpc://HOST:8500; --model is then its local copy (assets and version).")
@click.option("--model-name", default=None, metavar="NAME",
              help="Name the --server serves the model under (default: the --model folder's name).")
@click.option("--server-timeout", "server_timeout_s", type=float, default=120.0, metavar="SECONDS",
              help="Seconds to wait for each --server answer (s; default 120).")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Run the network on the workers of this dask scheduler (the model folder at "
                   "the same path on each); the rest here, with the same tables.")
@_verbose_option
@_one_line_errors
def analyze(inputs, model, pixel_size_A, out_dir, overwrite, xyz, overlay_every, movie,
            batch_size, tta, details, config_path, quiet, counts_per_electron, tracks,
            min_stretch, server, model_name, server_timeout_s, scheduler):
    """Find Ce columns and their heights (Ce atoms) in images or series: INPUT... are TIFF
    (single, multi-page, ImageJ, OME), .npy, DM3/DM4, EMD or SER files, or folders of them.

    Writes OUT/columns.csv (source,frame,x_px,y_px,x_A,y_A,height,confidence), overlays cropped
    to the particle and, for a series, an annotated movie and heights and total Ce over time.
    An interrupted run resumes when rerun with the same arguments.
    """
    from ..analysis.plan import check_analyze
    from ..config import AnalyzeConfig, ConfigError, load_config
    from ..inference.detector import check_counts_per_electron

    config = load_config(AnalyzeConfig, config_path, overlay_every=overlay_every,
                         batch_size=batch_size, test_time_augmentation=tta or None, movie=movie,
                         tracks=tracks, min_stretch=min_stretch)
    check_counts_per_electron(counts_per_electron)
    if model_name is not None and server is None:
        raise ConfigError("--model-name goes with --server URL: give both, or neither")
    check_analyze(list(inputs), out_dir, model=model, pixel_size_A=pixel_size_A, config=config,
                  overwrite=overwrite)
    from ..io.inputpaths import duplicate_note, find_inputs
    from ..io.series import SUPPORTED_SUFFIXES

    note = duplicate_note(find_inputs(list(inputs), SUPPORTED_SUFFIXES))
    if note:
        click.echo(_one_line(note), err=True)
    if server is not None:  # the network runs on the server; the rest here, as with --model
        from ..inference.remote import remote_model

        model = remote_model(server, model, model_name=model_name, timeout_s=server_timeout_s)
    from ..analysis.outguard import remove_stale_temporaries
    from ..analysis.run import analyze as run_analyze
    from ..analysis.tables import format_summary

    with _locked(out_dir):
        remove_stale_temporaries(out_dir)
        summary = run_analyze(list(inputs), out_dir, model=model, pixel_size_A=pixel_size_A,
                              config=config, overwrite=overwrite, xyz=xyz, details=details,
                              progress=not quiet, counts_per_electron=counts_per_electron,
                              scheduler=scheduler)
    click.echo(_escaped(format_summary(summary)))



# --- evaluate ----------------------------------------------------------------------------------
def _parse_doses(ctx, param, value: str) -> tuple[float, ...]:
    from ..evaluation.scoring import check_doses

    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers (e-/Å²)") from None
    try:
        return check_doses(numbers)
    except CeriakerasError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.option("--model", "model_path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Exported model: saved_models/NAME (newest version) or saved_models/NAME/VERSION; "
                   "default: the shipped model.")
@click.option("--data", "data_dir", default=None, type=click.Path(exists=True, file_okay=False),
              metavar="tfrecords/NAME",
              help="Dataset folder made by `ceriakeras simulate` (its pixel size must be the model's). "
                   "Or give --images and --truth.")
@click.option("--doses", default="20,50,200,1000,5000", show_default=True, callback=_parse_doses,
              help="Comma-separated doses per image, in e-/Å² (each positive).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder for metrics.json, report.md and plots [default: results/evaluate-NAME, with --images results/evaluate-NAME-images].")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["test", "validation", "train"]), help="Dataset split to evaluate.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N images of the split (count of images).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the Poisson noise.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation, as `analyze --tta` (8 flips and rotations averaged).")
@click.option("--no-baseline", is_flag=True, help="Skip the classical baseline.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier evaluation in --out.")
@click.option("--images", "images", multiple=True, type=click.Path(exists=True), metavar="FILE_OR_DIR",
              help="Labelled image files or folders of them, scored against --truth instead of "
                   "--data (repeat for several); e.g. a cross-check set from another simulator.")
@click.option("--truth", "truth_path", default=None, type=click.Path(exists=True, dir_okay=False),
              metavar="truth.csv",
              help="With --images: CSV file,x_px,y_px,height (one row per Ce column; pixels of the "
                   "image, height in Ce atoms). An images.csv beside it (file,dose,pixel_size_A; "
                   "e-/Å², Å) gives each image's dose and pixel size.")
@click.option("--pixel-size", "pixel_size_A", type=float, default=None, metavar="Å",
              help="With --images: pixel size in Å of images that images.csv gives none for "
                   "(overrides their calibration).")
@click.pass_context
@_verbose_option
@_one_line_errors
def evaluate(ctx, model_path, data_dir, doses, out_dir, split, max_images, seed, tta, no_baseline,
             overwrite, images, truth_path, pixel_size_A):
    """Measure column detection and height accuracy of a model at fixed doses.

    Poisson noise at each dose (e⁻/Å² per image, fixed seeds) on the split's noise-free images,
    columns extracted as `analyze` does, matched to the true columns within 1 Å. Writes
    metrics.json, report.md (network against a classical baseline) and PNG plots; prints a table.

    With --images FILES_OR_DIRS --truth truth.csv instead of --data: labelled image files (e.g.
    from another simulator, or hand-labelled frames) analysed as `analyze` does and scored per
    dose as the cross-check set's score.py scores them; also writes columns.csv.
    """
    from pathlib import Path

    from ..config import AnalyzeConfig, ConfigError
    from ..evaluation.plan import check_evaluate

    if model_path is None:
        from ..inference.served import default_model_path

        model_path = str(default_model_path())
    if out_dir is None:
        name = Path(model_path).resolve()
        name = name.parent.name if name.name.isdigit() else name.name
        out_dir = Path("results") / f"evaluate-{name}{'-images' if images else ''}"
    if images or truth_path is not None:
        return _evaluate_images(ctx, model_path, data_dir, images, truth_path, pixel_size_A, out_dir,
                                tta, overwrite)
    if data_dir is None:
        raise ConfigError("give --data tfrecords/NAME, or --images FILES_OR_DIRS with --truth truth.csv")
    if pixel_size_A is not None:
        raise ConfigError("--pixel-size goes with --images; a dataset has its own pixel size")
    check_evaluate(model_path, data_dir, out_dir, split=split, overwrite=overwrite)
    from ..evaluation.evaluate import evaluate as run_evaluation
    from ..evaluation.evaluate import format_table
    from ..inference.served import load_served_model

    model = load_served_model(model_path)
    result = run_evaluation(
        model, data_dir, out_dir, doses=doses, split=split, seed=seed, max_images=max_images,
        baseline=not no_baseline, overwrite=overwrite,
        config=AnalyzeConfig(test_time_augmentation=tta), command=" ".join(["ceriakeras"] + sys.argv[1:]),
    )
    click.echo(format_table(result))
    click.echo(f"wrote {out_dir}/metrics.json, report.md and plots")


def _evaluate_images(ctx, model_path, data_dir, images, truth_path, pixel_size_A, out_dir, tta,
                     overwrite):
    """``evaluate --images … --truth …``: labelled image files instead of a dataset."""
    from click.core import ParameterSource

    from ..config import AnalyzeConfig, ConfigError
    from ..evaluation.evaluate import evaluate_images, format_images_table

    if data_dir is not None:
        raise ConfigError("give either --data or --images, not both")
    if not images or truth_path is None:
        raise ConfigError("--images FILES_OR_DIRS and --truth truth.csv go together: give both")
    for option in ("doses", "split", "max_images", "seed"):
        if ctx.get_parameter_source(option) is ParameterSource.COMMANDLINE:
            raise ConfigError(f"--{option.replace('_', '-')} goes with --data: with --images the "
                              "doses come from images.csv or the counts, and every image is scored")
    result = evaluate_images(model_path, list(images), truth_path, out_dir, pixel_size_A=pixel_size_A,
                             config=AnalyzeConfig(test_time_augmentation=tta), overwrite=overwrite,
                             command=" ".join(["ceriakeras"] + sys.argv[1:]))
    click.echo(format_images_table(result))
    if result["truth_entries_ignored"]:
        click.echo(f"note: the truth table lists {len(result['truth_entries_ignored'])} file(s) not "
                   "among --images; they were not scored")
    click.echo(f"wrote {out_dir}/metrics.json, report.md, columns.csv and plots")


if __name__ == "__main__":  # pragma: no cover
    main()
