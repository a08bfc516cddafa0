"""What ``analyze`` will do, checked before any work and without TensorFlow: inputs, pixel sizes, outputs.

:func:`plan_inputs` reads every input's header once, resolves its pixel size (Å) and the
resampling factor to the model's pixel size, and names its outputs; :func:`analyze`
(:mod:`ceriakeras.analysis.run`) and :func:`check_analyze` (called by the command line before the
model loads) both use it, so a bad file or pixel size is refused the same way before any work.
"""

from __future__ import annotations

from pathlib import Path

from ..config import AnalyzeConfig, InputError
from ..inference.resample import resample_factor
from ..inference.served import model_settings, model_version
from ..io.files import check_out_dir
from ..io.series import expand_inputs, open_series
from ..modelcheck import check_model_files
from .outguard import check_no_earlier_results
from .movies import check_movie_writer
from .pictures import overlay_frames
from .resume import unfinished_progress


def plan_inputs(paths: list[Path], pixel_size_A: float | None, model_pixel_A: float,
                config: AnalyzeConfig) -> list[dict]:
    """One entry per input, from its header: what the run needs to know before reading frames.

    Parameters
    ----------
    paths : list of Path
        The input files (:func:`ceriakeras.io.series.expand_inputs`).
    pixel_size_A : float or None
        The ``--pixel-size`` override, Å (None: each file's calibration).
    model_pixel_A : float
        The model's pixel size, Å.
    config : AnalyzeConfig
        The pixel-size limits, the overlays, the movie.

    Returns
    -------
    list of dict
        ``path``, ``source``, ``n_frames``, ``shape`` (H, W), ``pixel_size_A``,
        ``pixel_size_from``, ``factor`` (model pixel / input pixel), ``counts_per_electron_file``
        (the gain its header states, counts per electron, or None), ``label`` (its name in the
        outputs) and ``overlays`` (the frames that get an overlay).

    Raises
    ------
    InputError
        An unreadable header, or a pixel size the model cannot use; ``ConfigError`` if a series'
        movie is asked for without a movie writer.
    """
    plan = []
    for path in paths:
        with open_series(path, pixel_size_A) as series:
            factor = resample_factor(series.pixel_size_A, model_pixel_A,
                                     min_pixel_A=config.min_pixel_size_A,
                                     max_pixel_A=config.max_pixel_size_A)
            plan.append({"path": path, "source": series.source, "n_frames": series.n_frames,
                         "shape": list(series.shape), "pixel_size_A": series.pixel_size_A,
                         "pixel_size_from": series.pixel_size_from, "factor": factor,
                         "counts_per_electron_file": series.counts_per_electron})
    if config.movie and any(item["n_frames"] >= 2 for item in plan):
        check_movie_writer()
    for item, label in zip(plan, unique_labels([item["path"] for item in plan])):
        item["label"] = label
        item["overlays"] = overlay_frames(item["n_frames"], config.overlay_every,
                                          config.overlay_samples)
    return plan


def unique_labels(paths: list[Path]) -> list[str]:
    """File-name stems for output names, numbered where two inputs share a stem."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{i:03d}_{s}" for i, s in enumerate(stems)]


def check_analyze(inputs, out_dir, *, model=None, pixel_size_A: float | None = None,
                  config: AnalyzeConfig | None = None, overwrite: bool = False,
                  model_files: bool = True) -> list[Path]:
    """What ``ceriakeras analyze`` checks before the model loads (the CLI calls it before TensorFlow).

    Every input exists and has a readable header and a pixel size (Å, ``pixel_size_A`` if
    given) the model can use (:func:`ceriakeras.inference.resample.resample_factor` against the model's
    ``pixel_size_A`` and the config's limits); the model exists and its files are whole
    (:func:`ceriakeras.modelcheck.check_model_files`); ``out_dir`` is not under a file and holds
    none of ``analyze``'s outputs (:mod:`ceriakeras.analysis.outguard`; unless ``overwrite``);
    the pixels are usable (:func:`check_pixels`). With ``model_files=False`` (``--server``: the
    network runs elsewhere, the local copy needs only its assets) the weights are not checked.
    An unfinished run is left to
    :func:`ceriakeras.analysis.run.analyze` to resume or refuse.

    Returns
    -------
    list of Path
        The input files (folders expanded).

    Raises
    ------
    InputError, ModelError, ConfigError
    """
    config = config or AnalyzeConfig()
    config.validate()
    if pixel_size_A is not None and not 0 < pixel_size_A < float("inf"):
        raise InputError(f"--pixel-size {pixel_size_A} must be a positive pixel size in Å "
                         f"({config.min_pixel_size_A:g}–{config.max_pixel_size_A:g} Å)")
    paths = expand_inputs(inputs)
    version, info = model_version(model)
    model_px, _, _ = model_settings(info)
    plan_inputs(paths, pixel_size_A, model_px, config)
    out_dir = check_out_dir(out_dir)
    if not overwrite:
        check_no_earlier_results(out_dir, resumable=unfinished_progress(out_dir) is not None)
    if model_files:  # integrity last: the argument checks speak first
        check_model_files(version, info)
    check_pixels(paths, pixel_size_A)
    return paths


def check_pixels(paths, pixel_size_A: float | None = None) -> None:
    """Refuse inputs whose pixels ``analyze`` would refuse after creating ``--out``: a single
    frame with NaN, infinite or negative counts (or all zero), or inputs none of whose frames is
    usable. Frames are read until the first usable one (usually one frame in all).

    Raises
    ------
    InputError
        The single frame's problem, or the first frame's problem when none is usable.
    """
    first_error = None
    single = len(paths) == 1
    for path in paths:
        with open_series(path, pixel_size_A) as series:
            single = single and series.n_frames == 1
            for frame in series.frames():
                if frame.error is None:
                    return
                first_error = first_error or frame.error
                if single:
                    raise InputError(frame.error)
    if first_error is not None:
        raise InputError(f"no frame could be analysed; first problem: {first_error}")
