"""The commands that use a model: ``analyze`` (image files → columns) and ``evaluate`` (scores
against known columns)."""

from __future__ import annotations

import sys

import click

from ..config import CeriakerasError
from .startup import escaped, locked, one_line, one_line_errors, verbose_option


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--model", default=None, metavar="saved_models/NAME",
              help="SavedModel folder (newest version) or a version folder; default: the shipped model.")
@click.option("--pixel-size", "pixel_size_A", type=float, default=None, metavar="Å",
              help="Input pixel size in Å (0.05–0.2 Å); overrides the files' calibration.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str),
              help="Output folder for columns.csv, overlays and plots.")
@click.option("--overwrite", is_flag=True, help="Replace earlier results in --out.")
@click.option("--xyz", is_flag=True,
              help="Also write 3D models (extxyz, Å): one per image, or for a tracked series "
                   "one per stretch between events, named by the frames it covers.")
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
              help="Fewest frames in a stretch of constant height (default 5).")
@click.option("--stack-frames", type=click.IntRange(min=0), default=None, metavar="FRAMES",
              help="Read the tracks' heights from sums of up to this many frames, drift "
                   "removed (one more model call per sum; default 64; 0: from single frames).")
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
@verbose_option
@one_line_errors
def analyze(inputs, model, pixel_size_A, out_dir, overwrite, xyz, overlay_every, movie,
            batch_size, tta, details, config_path, quiet, counts_per_electron, tracks,
            min_stretch, stack_frames, server, model_name, server_timeout_s, scheduler):
    """Find Ce columns and their heights (Ce atoms) in images or series: INPUT... are TIFF
    (single, multi-page, ImageJ, OME), .npy, DM3/DM4, EMD or SER files, or folders of them.

    Writes OUT/columns.csv (one row per Ce column: position in px and Å, height in Ce atoms,
    confidence; for a series also its track, the track's height and confidence), frames.csv,
    overlays cropped to the particle and, for a series, events.csv (changes of height), an
    annotated movie and the tracks' heights over time. An interrupted run resumes when rerun
    with the same arguments.
    """
    from ..analysis.plan import check_analyze
    from ..config import AnalyzeConfig, ConfigError, load_config
    from ..inference.detector import check_counts_per_electron

    config = load_config(AnalyzeConfig, config_path, overlay_every=overlay_every,
                         batch_size=batch_size, test_time_augmentation=tta or None, movie=movie,
                         tracks=tracks, min_stretch=min_stretch, stack_frames=stack_frames)
    check_counts_per_electron(counts_per_electron)
    if model_name is not None and server is None:
        raise ConfigError("--model-name goes with --server URL: give both, or neither")
    if server is not None and scheduler is not None:
        raise ConfigError("give --server URL (TF Serving) or --scheduler ADDRESS (dask), not both")
    check_analyze(list(inputs), out_dir, model=model, pixel_size_A=pixel_size_A, config=config,
                  overwrite=overwrite, model_files=server is None)
    from ..io.inputpaths import duplicate_note, find_inputs
    from ..io.series import SUPPORTED_SUFFIXES

    note = duplicate_note(find_inputs(list(inputs), SUPPORTED_SUFFIXES))
    if note:
        click.echo(one_line(note), err=True)
    if server is not None:  # the network runs on the server; the rest here, as with --model
        from ..inference.remote import remote_model

        model = remote_model(server, model, model_name=model_name, timeout_s=server_timeout_s)
    from ..analysis.outguard import remove_stale_temporaries
    from ..analysis.run import analyze as run_analyze
    from ..analysis.tables import format_summary

    with locked(out_dir):
        remove_stale_temporaries(out_dir)
        summary = run_analyze(list(inputs), out_dir, model=model, pixel_size_A=pixel_size_A,
                              config=config, overwrite=overwrite, xyz=xyz, details=details,
                              progress=not quiet, counts_per_electron=counts_per_electron,
                              scheduler=scheduler)
    click.echo(escaped(format_summary(summary)))


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


@click.command()
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
@verbose_option
@one_line_errors
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
