"""Frames → resample → model → columns → tables and pictures: the ``ceriakeras analyze`` command's library.

One call of :func:`analyze` streams every frame of every input (a few batches in memory at a
time), sums counts into the model's pixel size, runs the model in batches, finds the columns
(:func:`ceriakeras.inference.columns.find_columns`), maps them back to the input pixel grid and appends
them to ``OUT/columns.csv``, flushed per batch. ``OUT/progress.json`` records, after each batch,
how many frames (in input order) are done and how long the CSV is at that point, so an
interrupted run resumes where it stopped: each frame ends up in the CSV exactly once.

Outputs in ``OUT``: ``columns.csv`` (the column table of the design, plus ``recognised``),
``frames.csv`` (per frame: columns found, total Ce, mean height, dose in e⁻/Å², recognised, and
for a model that estimates them (version 3 on) the frame's defocus ``defocus_nm`` and
``cs_um``; for a model normalised to the vacuum level (version 3 on) the frame's share of vacuum
``vacuum_area_fraction``), ``overlays/<input>_<frame>.png`` (cropped to the particle; a sample of a series'
frames, see :func:`ceriakeras.analysis.pictures.overlay_frames`), for a series ``<input>_movie.mp4``
(every frame, columns coloured by height, frame number and dose) and ``<input>_series.png``
(tracked column heights and total Ce over time), with ``xyz=True`` ``xyz/<input>_<frame>.xyz``
(ASE extxyz 3D models), ``progress.json``. The pictures are drawn by :mod:`ceriakeras.analysis.pictures`.

Detector gain: the dose (``frames.csv``'s ``dose_e_per_A2``) and the calibration of
``confidence`` need electrons, not the file's units. Per input, the gain in counts per electron
is ``counts_per_electron`` if given, else the file's own (:func:`ceriakeras.io.series.file_counts_per_electron`),
else estimated from the noise of the frames (:mod:`ceriakeras.inference.detector`), else assumed 1 with a
warning. Recognition: each frame is checked against what the model knows
(:func:`ceriakeras.inference.recognise.recognise_frame`: a particle, on a CeO2 [110] lattice, dose in the
envelope, and for a vacuum-normalised model enough vacuum); ``recognised`` (1/0) marks its rows
in ``columns.csv`` and its line in ``frames.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import io as _stdio
import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..inference.columns import columns_to_atoms, estimate_dose, find_columns
from ..config import CE_COLUMN_SPACING_A, AnalyzeConfig, InputError, ModelError
from ..inference.detector import check_counts_per_electron
from ..io.files import atomic_path, write_bytes_atomic, write_text_atomic
from ..io.inputpaths import shown
from ..io.series import expand_inputs, file_counts_per_electron, open_series
from ..inference.resample import model_to_input_px, resample_counts, resample_factor
from ..inference.modelinfo import model_settings, with_model_threshold
from .pictures import (MovieWriter, check_movie_writer, height_colors, overlay_frames,
                       particle_box, render_frame, union_box, write_png)
from ..inference.recognise import recognise_frame, required_vacuum_fraction, vacuum_fraction
from . import tracking  # --- hook: tracks (issue 22) ---
from .track_pictures import (write_stretch_models,  # --- hook: tracks (issue 22) ---
                             write_track_series_plots)

DEFAULT_MODEL = "saved_models/ceria110"
"""The shipped model, relative to the repository (or the current folder); newest version used."""
CSV_HEADER = ("source", "frame", "x_px", "y_px", "x_A", "y_A", "height", "confidence")
"""Columns of ``columns.csv``, in this order (the design's column table)."""
MARK_COLUMNS = ("recognised",)
"""Appended to the design's columns: 1 if the column's frame is recognised (CeO2 [110] as the
model knows it, :func:`ceriakeras.inference.recognise.recognise_frame`), 0 if not."""
DETAIL_COLUMNS = ("expected_height_atoms", "height_std_atoms")
"""Extra columns appended with ``details=True``."""
PROGRESS_VERSION = 1
TRACK_RADIUS_A = 1.0
"""A column in a later frame belongs to a first-frame column within this distance, Å."""
STAGES = ("read", "resample", "model", "columns", "write", "pictures")
"""Stages timed in ``summary.json``'s ``seconds_by_stage`` (they overlap: see :func:`analyze`)."""
QUEUE_BATCHES = 2
"""Batches that may wait between two stages of the run."""
_OUTPUT_NAMES = ("columns.csv", "frames.csv", "progress.json", "summary.json",
                 "events.csv")  # events.csv: hook, tracks (issue 22)
_OUTPUT_DIRS = ("overlays", "xyz", "tracking")  # tracking: hook, tracks (issue 22)


# --- the model ---------------------------------------------------------------------------------
def default_model_path() -> Path:
    """The shipped model's base folder (its newest version is the one loaded).

    Raises
    ------
    ModelError
        If ``saved_models/ceria110`` is neither in the repository nor the current folder.
    """
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = base / DEFAULT_MODEL
        if candidate.is_dir():
            return candidate
    raise ModelError(f"no --model given and the shipped model {DEFAULT_MODEL} is missing: pass "
                     "--model saved_models/NAME or run `make demo`'s setup")


def load_model(model) -> tuple[object, dict]:
    """The model to use and a JSON-able identity of it (for resuming).

    ``model`` may be None (the shipped model), a path (``saved_models/NAME`` or a version
    folder, loaded with :func:`ceriakeras.nn.export.load_served_model`), or any object with
    ``.info`` (dict with ``pixel_size_A``, ``max_height``, ``label_radius_A``) and
    ``.predict(images (B, H, W) float32) -> (probabilities (B, H, W, C), height (B, H, W))``.
    """
    if model is None or isinstance(model, (str, os.PathLike)):
        path = default_model_path() if model is None else Path(model)
        if not path.exists():
            raise ModelError(f"model {path} does not exist: pass --model saved_models/NAME")
        from ..nn.export import find_version, load_served_model

        path = find_version(path)
        served = load_served_model(path)
        identity = {"path": str(path.resolve()), "info_sha256": _sha(served.info)}
        return served, identity
    if not (hasattr(model, "info") and callable(getattr(model, "predict", None))):
        raise ModelError("model must be a path or an object with .info and .predict")
    return model, {"path": None, "object": type(model).__name__, "info_sha256": _sha(model.info)}


def share_cores(workers: int) -> bool:
    """Give each of ``workers`` model calls running at once an equal share of the cores.

    TensorFlow runs one call on all cores by default, and on a few cores a U-Net keeps them only
    about two-thirds busy; ``workers`` calls of one core each (on 2 cores) keep both busy.
    Sets TensorFlow's intra-op threads to ``cores // workers`` and its inter-op threads to
    ``workers``; this works only before TensorFlow has started in this process.

    Returns
    -------
    bool
        Whether the setting took (False: TensorFlow was already running, or ``workers`` ≤ 1).
    """
    if workers <= 1:
        return False
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, (cores or 1) // workers))
        tf.config.threading.set_inter_op_parallelism_threads(workers)
    except RuntimeError:  # TensorFlow already started here: its settings stay
        return False
    return True


def _sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# --- the run -----------------------------------------------------------------------------------
def analyze(inputs, out_dir, *, model=None, pixel_size_A: float | None = None,
            config: AnalyzeConfig | None = None, overwrite: bool = False, xyz: bool = False,
            details: bool = False, progress: bool = True,
            counts_per_electron: float | None = None) -> dict:
    """Find the Ce columns and their heights in every frame of ``inputs``; write tables and pictures.

    Parameters
    ----------
    inputs : path or list of paths
        Images, series (multi-page TIFF, ImageJ hyperstack, ``.npy`` (N, H, W), DM/EMD/SER) or
        folders of them.
    out_dir : path
        Output folder (created). Holds ``columns.csv`` and the pictures; see the module doc.
    model : None, path or model object
        See :func:`load_model`; None = the shipped model.
    pixel_size_A : float, optional
        Input pixel size, Å, for every input (overrides the files' calibration).
    config : AnalyzeConfig
        Peak distance and threshold, batch size, which overlays, the movie.
    overwrite : bool
        Replace earlier results in ``out_dir``. Without it a finished run is refused and an
        unfinished one with the same inputs, model and settings is resumed.
    xyz, details, progress : bool
        Write a 3D model per frame; add ``expected_height_atoms, height_std_atoms`` to the CSV; show a
        progress bar.
    counts_per_electron : float, optional
        Detector gain, counts (the files' units) per electron, for every input; default: the
        file's own, else estimated from the frames' noise (:func:`input_gain`).

    Returns
    -------
    dict
        Summary: frames (total, analysed now, skipped with reasons), columns, mean height,
        frames per second, seconds per stage (stages overlap in time: they run in threads),
        output paths.

    Raises
    ------
    InputError, ModelError
        Bad input (before anything is written where possible), a missing model, or results
        already in ``out_dir``.

    Notes
    -----
    Three stages run at once, joined by short queues (at most two batches wait between two
    stages, so memory stays flat): a reader thread reads and resamples frames into batches, the
    calling thread runs the model, and a writer thread finds the columns, appends their rows to
    ``columns.csv`` (flushed), draws the pictures of the batch and then commits it in
    ``progress.json``, batch after batch in input order. The movie and the series plot are drawn
    at the end from ``columns.csv``, so a resumed run gets them whole.
    """
    config = config or AnalyzeConfig()
    config.validate()
    check_counts_per_electron(counts_per_electron)
    out_dir = Path(out_dir)
    paths = expand_inputs(inputs)
    if model is None or isinstance(model, (str, os.PathLike)):
        share_cores(config.model_workers)
    served, model_id = load_model(model)
    if config.test_time_augmentation:
        from ..nn.export import DihedralAveraged

        served = DihedralAveraged(served)
    model_px, max_height, label_radius_A = model_settings(served.info)
    config = with_model_threshold(config, served.info)

    # every header first: a bad file or pixel size stops the run before any work
    plan = []
    for path in paths:
        with open_series(path, pixel_size_A) as series:
            factor = resample_factor(series.pixel_size_A, model_px,
                                     min_pixel_A=config.min_pixel_size_A,
                                     max_pixel_A=config.max_pixel_size_A)
            plan.append({"path": path, "source": series.source, "n_frames": series.n_frames,
                         "shape": list(series.shape), "pixel_size_A": series.pixel_size_A,
                         "pixel_size_from": series.pixel_size_from, "factor": factor})
    frames_total = sum(item["n_frames"] for item in plan)
    labels = _unique_labels([item["path"] for item in plan])
    if config.movie and any(item["n_frames"] >= 2 for item in plan):
        check_movie_writer()
    for item, label in zip(plan, labels):
        item["label"] = label
        item["overlays"] = overlay_frames(item["n_frames"], config.overlay_every,
                                          config.overlay_samples)
    identity = {
        "inputs": [{"source": it["source"], "bytes": it["path"].stat().st_size,
                    "n_frames": it["n_frames"], "shape": it["shape"],
                    "pixel_size_A": it["pixel_size_A"]} for it in plan],
        "model": model_id,
        "settings": {"min_distance_A": config.min_distance_A, "threshold": config.threshold,
                     "details": bool(details), "counts_per_electron": counts_per_electron,
                     "test_time_augmentation": bool(config.test_time_augmentation)},
    }

    header = ",".join(CSV_HEADER + MARK_COLUMNS + (DETAIL_COLUMNS if details else ())
                      + (tracking.TRACK_COLUMNS if config.tracks else ())) + "\n"  # hook: tracks
    csv_path, progress_path = out_dir / "columns.csv", out_dir / "progress.json"
    earlier = {} if overwrite else _frame_info(progress_path)
    start, skipped = _prepare_out_dir(out_dir, header.encode(), identity, overwrite, plan)
    for item in plan:  # detector gain per input: option, file, estimate from the noise, or 1
        item["gain"] = input_gain(item["path"], pixel_size_A, counts_per_electron)

    state = {"version": PROGRESS_VERSION, "identity": identity, "frames_total": frames_total,
             "frames_done": start, "csv_bytes": csv_path.stat().st_size, "skipped": skipped,
             "complete": False, "optics": _previous_optics(progress_path) if start else {},
             "frames": {k: v for k, v in earlier.items() if int(k) < start}}
    write_text_atomic(progress_path, json.dumps(state, indent=1))
    # --- hook: tracks (issue 22): each column's class probabilities, logged per frame ---
    probability_log = tracking.ProbabilityLog(out_dir, start) if config.tracks else None

    timings = dict.fromkeys(STAGES, 0.0)
    counts = {"analysed": 0, "columns": 0}
    run = _Run(served=served, config=config, out_dir=out_dir, state=state,
               progress_path=progress_path, timings=timings, counts=counts, xyz=xyz,
               details=details, model_px=model_px, max_height=max_height,
               label_radius_A=label_radius_A, probability_log=probability_log)
    bar = _progress_bar(frames_total, start, progress)
    t_start = time.perf_counter()
    with open(csv_path, "a", newline="", encoding="utf-8",
              errors="surrogateescape") as csv_file:  # file names as the OS gives them
        run.csv_file = csv_file
        writer = _Worker(lambda job: (run.write_batch(*job), bar.update(len(job[0].frames))),
                         maxsize=QUEUE_BATCHES)
        pool = (ThreadPoolExecutor(config.model_workers, thread_name_prefix="analyze-model")
                if config.model_workers > 1 else None)
        pending: deque = deque()  # (batch, future) in input order
        try:
            for batch in _in_thread(lambda: _read_batches(plan, start, pixel_size_A, config,
                                                          frames_total == 1, timings),
                                    maxsize=QUEUE_BATCHES):
                if pool is None:
                    writer.submit((batch, run.predict(batch)))
                    continue
                pending.append((batch, pool.submit(run.predict, batch)))
                while len(pending) > config.model_workers:
                    done, future = pending.popleft()
                    writer.submit((done, future.result()))
            while pending:
                done, future = pending.popleft()
                writer.submit((done, future.result()))
        except BaseException:
            for _, future in pending:
                future.cancel()
            writer.close(raise_error=False)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        writer.close()
    bar.close()
    elapsed = time.perf_counter() - t_start
    if probability_log is not None:  # --- hook: tracks (issue 22) ---
        probability_log.close()
        t0 = time.perf_counter()

        def commit_size(size):  # the tracked columns.csv's size is committed before it lands
            state["csv_bytes"] = size
            write_text_atomic(progress_path, json.dumps(state, indent=1))

        tracking.write_tracks(out_dir, plan, tracking.TrackSettings(min_stretch=config.min_stretch),
                              before_replace=commit_size)
        timings["tracks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_frame = _frame_table_and_series_plots(csv_path, out_dir, plan, labels, max_height,
                                              movie=config.movie)
    if config.tracks:  # --- hook: tracks (issue 22): drift in frames.csv, tracks' series plot ---
        tracking.add_drift_columns(out_dir)
        write_track_series_plots(out_dir, plan, labels, max_height)
        per_frame["positions"] = tracking.movie_track_heights(out_dir, per_frame["positions"])
        if xyz:
            write_stretch_models(out_dir, plan, labels, max_height)
    if config.movie:
        offset = 0
        for item in plan:
            if item["n_frames"] >= 2:
                def dose_of(index, image, item=item, offset=offset):  # the dose the analysis used
                    dose = state["frames"].get(str(offset + index), {}).get("dose_e_per_A2")
                    return dose if dose is not None else frame_dose(
                        resample_counts(image, item["factor"]), model_px) / item["gain"][
                            "counts_per_electron"]

                def recognised_of(index, offset=offset):
                    return state["frames"].get(str(offset + index), {}).get("recognised")

                write_movie(out_dir / f"{item['label']}_movie.mp4", item, pixel_size_A,
                            per_frame["positions"].get(item["source"], {}), max_height,
                            dose_of=dose_of, recognised_of=recognised_of,
                            note_of=tracking.event_notes(out_dir, item["source"]).get
                            if config.tracks else None)  # hook: tracks (issue 22)
            offset += item["n_frames"]
    timings["pictures"] += time.perf_counter() - t0
    state["complete"] = True
    write_text_atomic(progress_path, json.dumps(state, indent=1))

    analysed_total = len(per_frame["columns"])
    n_recognised = sum(1 for v in state["frames"].values() if v.get("recognised"))
    if analysed_total == 0 and state["skipped"]:
        raise InputError(f"no frame could be analysed; first problem: {state['skipped'][0]['reason']}")
    analysed_now = counts["analysed"]
    summary = {
        "frames_total": frames_total,
        "frames_analysed": analysed_total,
        "frames_analysed_now": analysed_now,
        "resumed_at_frame": start,
        "frames_skipped": len(state["skipped"]),
        "skipped": state["skipped"],
        "columns_total": int(np.sum(per_frame["columns"])) if analysed_total else 0,
        "columns_per_frame": float(np.mean(per_frame["columns"])) if analysed_total else 0.0,
        "mean_height": (float(np.sum(per_frame["total_ce"]) / max(1, np.sum(per_frame["columns"])))
                        if analysed_total else float("nan")),
        "frames_per_second": analysed_now / elapsed if elapsed > 0 else float("nan"),
        "seconds_analysing": round(elapsed, 4),
        "seconds_by_stage": {k: round(v, 4) for k, v in timings.items()},
        "frames_recognised": n_recognised,
        "frames_not_recognised": analysed_total - n_recognised,
        "not_recognised_reasons": _reason_counts(state["frames"]),
        "model_pixel_size_A": model_px,
        "inputs": [{"source": it["source"], "frames": it["n_frames"],
                    "pixel_size_A": it["pixel_size_A"], "pixel_size_from": it["pixel_size_from"],
                    **it["gain"]}
                   for it in plan],
        "out_dir": str(out_dir),
        "columns_csv": str(csv_path),
    }
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1, default=float))
    return summary


# --- detector gain -----------------------------------------------------------------------------
GAIN_FRAMES_PIXELS = 8_000_000
"""Pixels of the input read for a series' gain estimate (at least 2 frames, at most 32)."""


def input_gain(path, pixel_size_A: float | None = None,
               counts_per_electron: float | None = None) -> dict:
    """The detector gain of one input, counts per electron, and where it came from.

    In this order: ``counts_per_electron`` (``'option'``); the file's own
    (:func:`ceriakeras.io.series.file_counts_per_electron`, ``'file'``); estimated from the noise,
    from the differences of the first frames of a series (``'series estimate'``) or else from
    the vacuum of its first frame (``'vacuum estimate'``, :mod:`ceriakeras.inference.detector`); failing
    all, 1 (``'assumed'``: the frames are taken to be in electrons, as before this estimate
    existed) with ``gain_warning`` saying why.

    Returns
    -------
    dict
        ``counts_per_electron`` (float), ``counts_per_electron_from`` (str),
        ``counts_per_electron_standard_error`` (float or None), ``gain_estimate`` (dict of
        :class:`ceriakeras.inference.detector.GainEstimate` or None), ``gain_warning`` (str, '' if none).
    """
    from ..inference.detector import MAX_SERIES_FRAMES, estimate_gain_series, estimate_gain_vacuum

    def result(value, origin, se=None, estimate=None, warning=""):
        return {"counts_per_electron": float(value), "counts_per_electron_from": origin,
                "counts_per_electron_standard_error": se, "gain_estimate": estimate,
                "gain_warning": warning}

    if counts_per_electron is not None:
        return result(counts_per_electron, "option")
    from_file = file_counts_per_electron(path)
    if from_file is not None:
        return result(from_file, "file")
    with open_series(path, pixel_size_A) as series:
        h, w = series.shape
        limit = int(np.clip(GAIN_FRAMES_PIXELS // max(1, h * w), 2, MAX_SERIES_FRAMES))
        frames = []
        for frame in series.frames():
            if frame.image is not None:
                frames.append(frame.image)
            if len(frames) >= limit:
                break
    problems = []
    estimators = ([("series", lambda: estimate_gain_series(frames))] if len(frames) >= 2 else [])
    estimators += [("vacuum", lambda: estimate_gain_vacuum(frames[0]))] if frames else []
    for name, estimator in estimators:
        try:
            est = estimator()
        except ValueError as err:
            problems.append(f"{name}: {err}")
            continue
        return result(est.counts_per_electron, est.method, round(est.standard_error, 6),
                      est.to_dict())
    reason = "; ".join(problems) or "no readable frame"
    return result(1.0, "assumed", warning=f"gain not measurable ({reason}); counts are taken "
                  "as electrons: give --counts-per-electron for a right dose and confidence")


def _frame_info(progress_path: Path) -> dict:
    """Per-frame dose and recognition of an earlier run (``progress.json``'s ``frames``), or {}."""
    try:
        frames = json.loads(progress_path.read_text(encoding="utf-8")).get("frames", {})
        return dict(frames) if isinstance(frames, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _reason_counts(frames: dict) -> dict:
    """How many frames were not recognised, by the kind of reason."""
    out: dict[str, int] = {}
    for info in frames.values():
        if not info.get("recognised"):
            reason = info.get("reason") or "unknown"
            kind = ("too few columns" if "columns (a particle" in reason
                    else "not a CeO2 [110] lattice" if "lattice" in reason
                    else "dose outside the model's range" if "dose" in reason
                    else "too little vacuum in the field of view" if "vacuum" in reason
                    else reason)
            out[kind] = out.get(kind, 0) + 1
    return out


def frame_dose(image: np.ndarray, pixel_size_A: float) -> float:
    """Dose of a frame, e⁻/Å², as the calibration of ``confidence`` and the pictures use it.

    Parameters
    ----------
    image : (H, W) float
        Counts, at any pixel size (the frame as read, or resampled to the model's).
    pixel_size_A : float
        Its pixel size, Å.
    """
    return estimate_dose(image, pixel_size_A)


@dataclass
class _Batch:
    """Consecutive frames of one input: ``frames`` is a list of ``(Frame, small)``, ``small`` the
    frame resampled to the model's pixel size (None for a bad frame)."""

    item: dict
    offset: int
    frames: list


def _read_batches(plan: list, start: int, pixel_size_A, config: AnalyzeConfig, single: bool,
                  timings: dict) -> Iterator[_Batch]:
    """Read and resample the frames from global frame ``start`` on, in batches (one input each)."""
    offset = 0
    for item in plan:
        n = item["n_frames"]
        if offset + n <= start:
            offset += n
            continue
        batch: list = []
        with open_series(item["path"], pixel_size_A) as series:
            frames = series.frames(max(0, start - offset))
            while True:
                t0 = time.perf_counter()
                frame = next(frames, None)
                timings["read"] += time.perf_counter() - t0
                if frame is not None:
                    if frame.error is not None and single:
                        raise InputError(frame.error)
                    t0 = time.perf_counter()
                    small = (None if frame.image is None
                             else resample_counts(frame.image, item["factor"]))
                    timings["resample"] += time.perf_counter() - t0
                    batch.append((frame, small))
                ready = sum(small is not None for _, small in batch)
                if batch and (frame is None or ready >= config.batch_size):
                    yield _Batch(item, offset, batch)
                    batch = []
                if frame is None:
                    break
        offset += n


@dataclass
class _Run:
    """What the stages of one run share: the model, settings, outputs and the progress state."""

    served: object
    config: AnalyzeConfig
    out_dir: Path
    state: dict
    progress_path: Path
    timings: dict
    counts: dict
    xyz: bool
    details: bool
    model_px: float
    max_height: int
    label_radius_A: float
    csv_file: object = None
    probability_log: object = None  # --- hook: tracks (issue 22) ---

    def __post_init__(self):
        self._busy = threading.Lock()
        self._running, self._since = 0, 0.0
        # a model normalised to the vacuum level needs vacuum in the frame (version 3 on)
        self.min_vacuum = required_vacuum_fraction(self.served.info)

    def predict(self, batch: _Batch) -> tuple[np.ndarray, dict | None] | None:
        """The model's answer for the good frames of ``batch`` (None if there are none).

        Returns ``(probabilities (B, h, w, C), optics)``: ``optics`` is the model's per-frame
        estimates (``{name: (B,)}``, :data:`OPTICS_COLUMNS`) for a model that has them
        (version 3 on), else None. Thread-safe (it changes no shared state but the timing);
        ``timings['model']`` counts the wall time during which at least one call was running
        (not the sum over calls running at once).
        """
        good = [small for _, small in batch.frames if small is not None]
        if not good:
            return None
        with self._busy:
            if self._running == 0:
                self._since = time.perf_counter()
            self._running += 1
        try:
            stack = np.stack(good).astype(np.float32, copy=False)
            if getattr(self.served, "has_optics", False):
                probabilities, _, optics = self.served.predict(stack, optics=True)
                return np.asarray(probabilities), optics
            probabilities, _ = self.served.predict(stack)
            return np.asarray(probabilities), None
        finally:
            with self._busy:
                self._running -= 1
                if self._running == 0:
                    self.timings["model"] += time.perf_counter() - self._since

    def write_batch(self, batch: _Batch, prediction) -> None:
        """Columns, CSV rows, pictures of one batch (``prediction`` from :meth:`predict`); then
        commit it in progress.json."""
        timings, config, item = self.timings, self.config, batch.item
        t0 = time.perf_counter()
        probabilities, optics = prediction if prediction is not None else (None, None)
        if optics is not None:  # per-frame defocus and Cs (model version 3 on)
            good = [frame for frame, small in batch.frames if small is not None]
            for k, frame in enumerate(good):
                self.state["optics"].setdefault(frame.source, {})[str(frame.index)] = {
                    name: float(optics[name][k]) for name in OPTICS_COLUMNS if name in optics}
        calibration = self.served.info.get("confidence_calibration")
        gain = item["gain"]["counts_per_electron"]
        results, doses, k = {}, {}, 0
        for frame, small in batch.frames:
            if small is None:
                continue
            # electrons, not the file's units
            doses[frame.index] = dose = frame_dose(small, self.model_px) / gain
            table = find_columns(
                probabilities[k], self.model_px, min_distance_A=config.min_distance_A,
                threshold=config.threshold, label_radius_A=self.label_radius_A,
                calibration=calibration, dose_e_per_A2=dose)
            x_A, y_A = table["x_px"] * self.model_px, table["y_px"] * self.model_px
            vacuum = None if self.min_vacuum is None else vacuum_fraction(
                x_A, y_A, small.shape[1] * self.model_px, small.shape[0] * self.model_px)
            mark = recognise_frame(x_A, y_A, dose, vacuum=vacuum, min_vacuum=self.min_vacuum)
            self.state["frames"][str(batch.offset + frame.index)] = {
                "dose_e_per_A2": round(dose, 4), "recognised": bool(mark["recognised"]),
                "lattice_fraction": round(mark["lattice_fraction"], 4)
                if np.isfinite(mark["lattice_fraction"]) else None, "reason": mark["reason"],
                **({} if vacuum is None else {"vacuum_fraction": round(vacuum, 4)})}
            results[frame.index] = table
            if self.probability_log is not None:  # --- hook: tracks (issue 22) ---
                self.probability_log.add(batch.offset + frame.index,
                                         table["class_probabilities"])
            k += 1
        timings["columns"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        px, factor = item["pixel_size_A"], item["factor"]
        buffer = _stdio.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        mapped = {}
        for frame, small in batch.frames:
            if small is None:
                self.state["skipped"].append({"source": frame.source, "frame": frame.index,
                                              "reason": frame.error})
                continue
            table = results[frame.index]
            recognised = int(self.state["frames"][str(batch.offset + frame.index)]["recognised"])
            x = model_to_input_px(table["x_px"], factor)
            y = model_to_input_px(table["y_px"], factor)
            mapped[frame.index] = (x, y, table["height"])
            self.counts["columns"] += len(x)
            self.counts["analysed"] += 1
            for j in range(len(x)):
                row = [frame.source, frame.index, f"{x[j]:.3f}", f"{y[j]:.3f}",
                       f"{x[j] * px:.4f}", f"{y[j] * px:.4f}", int(table["height"][j]),
                       f"{table['confidence'][j]:.4f}", recognised]
                if self.details:
                    row += [f"{table['expected_height'][j]:.3f}", f"{table['height_std'][j]:.3f}"]
                if self.probability_log is not None:  # hook: tracks, filled in at the end
                    row += ["", "", ""]
                writer.writerow(row)
        self.csv_file.write(buffer.getvalue())
        self.csv_file.flush()
        os.fsync(self.csv_file.fileno())
        timings["write"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        for frame, small in batch.frames:
            if small is None:
                continue
            x, y, height = mapped[frame.index]
            if frame.index in item["overlays"]:
                mark = self.state["frames"][str(batch.offset + frame.index)]
                caption = _caption(item, frame.index, doses[frame.index], len(x),
                                   mark["recognised"])
                write_png(self.out_dir / "overlays" / f"{item['label']}_{frame.index:05d}.png",
                          render_frame(frame.image, x, y, height, pixel_size_A=px,
                                       max_height=self.max_height, caption=caption))
            if self.xyz and not (self.probability_log is not None and item["n_frames"] >= 2):
                # (hook: tracks, issue 22: a tracked series gets one model per stretch instead)
                h, w = frame.image.shape
                atoms = columns_to_atoms(x * px, y * px, height,
                                         cell=[w * px, h * px,
                                               (self.max_height + 2) * CE_COLUMN_SPACING_A])
                atoms.info.update(source=frame.source, frame=frame.index, pixel_size_A=px)
                _write_xyz(self.out_dir / "xyz" / f"{item['label']}_{frame.index:05d}.xyz", atoms)
        timings["pictures"] += time.perf_counter() - t0

        self.state["frames_done"] = batch.offset + batch.frames[-1][0].index + 1
        self.state["csv_bytes"] = self.csv_file.tell()
        if self.probability_log is not None:  # --- hook: tracks (issue 22) ---
            self.probability_log.flush()
        write_text_atomic(self.progress_path, json.dumps(self.state, indent=1))


_END = object()


def _in_thread(make_iterator, maxsize: int) -> Iterator:
    """Run the iterator ``make_iterator()`` in a thread; yield its items here, in order.

    At most ``maxsize`` items wait; an exception in the thread is raised here. Leaving the
    loop early stops the thread at its next item.
    """
    q: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for entry in make_iterator():
                if not put((None, entry)):
                    return
            put((None, _END))
        except BaseException as err:  # handed to the consumer
            put((err, None))

    thread = threading.Thread(target=produce, name="analyze-reader", daemon=True)
    thread.start()
    try:
        while True:
            err, entry = q.get()
            if err is not None:
                raise err
            if entry is _END:
                return
            yield entry
    finally:
        stop.set()
        thread.join()


class _Worker:
    """A thread that calls ``fn(job)`` for each submitted job, in order.

    ``submit`` blocks while ``maxsize`` jobs wait and raises the worker's error, if it had
    one; ``close`` waits for the queued jobs to be done (and raises that error).
    """

    def __init__(self, fn, maxsize: int):
        self.fn, self.error = fn, None
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.thread = threading.Thread(target=self._work, name="analyze-writer", daemon=True)
        self.thread.start()

    def _work(self):
        while True:
            job = self.queue.get()
            if job is _END:
                return
            if self.error is None:
                try:
                    self.fn(job)
                except BaseException as err:  # handed to the submitter
                    self.error = err

    def submit(self, job) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(job, timeout=0.1)
                return
            except queue.Full:
                pass

    def close(self, raise_error: bool = True) -> None:
        self.queue.put(_END)
        self.thread.join()
        if raise_error and self.error is not None:
            raise self.error


def _caption(item: dict, index: int, dose_e_per_A2: float, n_columns: int,
             recognised: bool | None = None) -> str:
    """The text above a picture: source, frame, dose, columns, and a frame not recognised."""
    where = f"frame {index}/{item['n_frames'] - 1}" if item["n_frames"] > 1 else "image"
    return (f"{shown(Path(item['source']).name)}   {where}   {dose_e_per_A2:.0f} e⁻/Å²   "
            f"{n_columns} columns" + ("   NOT RECOGNISED" if recognised is False else ""))


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="frame", disable=not enabled,
                desc="analyze", dynamic_ncols=True)


def _unique_labels(paths: list[Path]) -> list[str]:
    """File-name stems for output names, numbered where two inputs share a stem."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{i:03d}_{s}" for i, s in enumerate(stems)]


# --- resuming ----------------------------------------------------------------------------------
def unfinished_progress(out_dir) -> dict | None:
    """The ``progress.json`` of an unfinished analysis in ``out_dir`` (None if there is none),
    with ``frames_done``, ``csv_bytes``, ``complete`` and ``skipped`` checked.

    Raises
    ------
    InputError
        ``columns.csv`` without ``progress.json`` (another run), an unreadable ``progress.json``,
        or a finished analysis: results are not overwritten without ``--overwrite``.
    """
    out_dir = Path(out_dir)
    csv_path, progress_path = out_dir / "columns.csv", out_dir / "progress.json"
    if not (progress_path.exists() or csv_path.exists()):
        return None
    if not progress_path.exists():
        raise InputError(f"{out_dir} already holds columns.csv from another run: use "
                         "--overwrite or another --out")
    unreadable = InputError(f"{progress_path} is unreadable: use --overwrite or another --out")
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
        complete = bool(progress["complete"])
    except (OSError, ValueError, KeyError, TypeError):
        raise unreadable from None
    if complete:
        raise InputError(f"{out_dir} already holds a finished analysis: use --overwrite "
                         "or another --out")
    try:
        int(progress["frames_done"]), int(progress["csv_bytes"]), list(progress["skipped"])
    except (ValueError, KeyError, TypeError):
        raise unreadable from None
    return progress


def _prepare_out_dir(out_dir: Path, header: bytes, identity: dict, overwrite: bool,
                     plan: list) -> tuple[int, list]:
    """Clear, check or recover ``out_dir``; return (first global frame to do, skipped so far)."""
    csv_path = out_dir / "columns.csv"
    if overwrite:
        _remove_outputs(out_dir)
    elif (progress := unfinished_progress(out_dir)) is not None:
        done, committed = int(progress["frames_done"]), int(progress["csv_bytes"])
        skipped = list(progress["skipped"])
        if progress.get("identity") != json.loads(json.dumps(identity)):
            raise InputError(f"{out_dir} holds an unfinished run with other inputs, model or "
                             "settings: rerun it the same way, or use --overwrite or another --out")
        if csv_path.exists():
            start = _recover_csv(csv_path, header, done, committed, plan)
            return start, [s for s in skipped if _global_index(plan, s) < start]
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(csv_path) as tmp:
        tmp.write_bytes(header)
    return 0, []


def _global_index(plan: list, entry: dict) -> int:
    offset = 0
    for item in plan:
        if item["source"] == entry["source"]:
            return offset + int(entry["frame"])
        offset += item["n_frames"]
    return -1


def _recover_csv(csv_path: Path, header: bytes, done: int, committed: int, plan: list) -> int:
    """Cut ``columns.csv`` back to whole, committed frames; return the first frame to redo.

    Normally the CSV is at least as long as the last committed length: rows written after it
    (an unfinished batch, a half-written last line) are dropped. If the CSV is shorter (rows
    lost), the last frame it holds may be incomplete: its rows are dropped and the run restarts
    at that frame (earlier frames are whole, as rows are written in frame order).
    """
    size = csv_path.stat().st_size
    with open(csv_path, "rb") as fh:
        head = fh.read(len(header))
    if head != header:
        with atomic_path(csv_path) as tmp:
            tmp.write_bytes(header)
        return 0
    if size >= committed >= len(header):
        os.truncate(csv_path, committed)
        return done
    offsets, g = {}, 0
    for item in plan:
        offsets[item["source"]] = g
        g += item["n_frames"]
    data = csv_path.read_bytes()
    end = data.rfind(b"\n") + 1
    pos, last_g, last_start = len(header), None, len(header)
    for line in data[len(header):end].splitlines(keepends=True):
        try:
            source, frame = next(csv.reader([line.decode("utf-8", "surrogateescape")]))[:2]
            gi = offsets[source] + int(frame)
        except (ValueError, KeyError, StopIteration, UnicodeDecodeError):
            break
        if gi != last_g:
            last_g, last_start = gi, pos
        pos += len(line)
    os.truncate(csv_path, last_start)
    return 0 if last_g is None else min(last_g, done)


def _remove_outputs(out_dir: Path) -> None:
    """Delete what an earlier analyze wrote in ``out_dir`` (only its own files)."""
    import shutil

    for name in _OUTPUT_NAMES:
        (out_dir / name).unlink(missing_ok=True)
    for name in _OUTPUT_DIRS:
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
    for png in out_dir.glob("*_series.png"):
        png.unlink()
    for movie in out_dir.glob("*_movie.mp4"):
        movie.unlink()


# --- pictures and per-frame table --------------------------------------------------------------
def _write_xyz(path: Path, atoms) -> None:
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ase.io.write(tmp, atoms, format="extxyz")


def _frame_table_and_series_plots(csv_path: Path, out_dir: Path, plan: list, labels: list[str],
                                  max_height: int, movie: bool = False) -> dict:
    """Stream ``columns.csv`` once: per-frame counts to ``frames.csv``, tracks to series plots.

    Columns are tracked by position: each column of a later frame is given to the nearest
    column of the series' first analysed frame within :data:`TRACK_RADIUS_A`. With ``movie``,
    ``positions[source][frame]`` holds each series frame's ``(x_px, y_px, height)`` arrays.
    """
    from scipy.spatial import cKDTree

    by_source = {it["source"]: (it, lab) for it, lab in zip(plan, labels)}
    per_frame = {"columns": [], "total_ce": [], "positions": {}}
    rows_out = [("source", "frame", "columns", "total_ce_atoms", "mean_height_atoms",
                 "dose_e_per_A2", "recognised")]
    progress = json.loads((out_dir / "progress.json").read_text(encoding="utf-8"))
    offsets = dict(zip([it["source"] for it in plan],
                       np.cumsum([0] + [it["n_frames"] for it in plan[:-1]]).tolist()))

    def marks(source, frame):
        info = progress.get("frames", {}).get(str(offsets[source] + frame), {})
        dose = info.get("dose_e_per_A2")
        return ("" if dose is None else f"{dose:.4g}",
                "" if "recognised" not in info else int(info["recognised"]))

    tracks: dict[str, dict] = {}

    def close_frame(source, frame, xs, ys, hs, px=(), py=()):
        n, total = len(hs), int(np.sum(hs)) if hs else 0
        per_frame["columns"].append(n)
        per_frame["total_ce"].append(total)
        rows_out.append((source, frame, n, total, f"{total / n:.3f}" if n else "",
                         *marks(source, frame)))
        item, _ = by_source[source]
        if item["n_frames"] < 2:
            return
        if movie:
            per_frame["positions"].setdefault(source, {})[frame] = (
                np.asarray(px, np.float64), np.asarray(py, np.float64), np.asarray(hs, np.int32))
        t = tracks.setdefault(source, {"ref": None, "frames": [], "heights": [], "total": []})
        pts = np.column_stack([xs, ys]) if n else np.zeros((0, 2))
        if t["ref"] is None:
            t["ref"] = cKDTree(pts) if n else None
            t["n_ref"] = n
        row = np.full(t["n_ref"], np.nan, np.float32)
        if t["ref"] is not None and n:
            dist, idx = t["ref"].query(pts, distance_upper_bound=TRACK_RADIUS_A)
            ok = np.isfinite(dist)
            row[idx[ok]] = np.asarray(hs, np.float32)[ok]
        t["frames"].append(frame)
        t["heights"].append(row)
        t["total"].append(total)

    seen = set()
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        current, xs, ys, hs, px, py = None, [], [], [], [], []
        for rec in reader:
            key = (rec[0], int(rec[1]))
            if key != current:
                if current is not None:
                    close_frame(*current, xs, ys, hs, px, py)
                    seen.add(current)
                current, xs, ys, hs, px, py = key, [], [], [], [], []
            px.append(float(rec[2]))
            py.append(float(rec[3]))
            xs.append(float(rec[4]))
            ys.append(float(rec[5]))
            hs.append(int(rec[6]))
        if current is not None:
            close_frame(*current, xs, ys, hs, px, py)
            seen.add(current)
    # frames analysed but without any column have no rows: account for them from progress
    bad = {(s["source"], int(s["frame"])) for s in progress["skipped"]}
    empties = [(it["source"], i) for it in plan for i in range(it["n_frames"])
               if (it["source"], i) not in seen and (it["source"], i) not in bad]
    for source, frame in empties:
        close_frame(source, frame, [], [], [])
    rows_out[1:] = sorted(rows_out[1:], key=lambda r: (_order(plan, r[0]), r[1]))
    optics = progress.get("optics") or {}
    if optics:  # a model with a global branch: its estimates of each frame's optics
        rows_out[0] = rows_out[0] + OPTICS_COLUMNS
        rows_out[1:] = [row + tuple(
            f"{v:.3f}" if (v := optics.get(row[0], {}).get(str(row[1]), {}).get(name)) is not None
            else "" for name in OPTICS_COLUMNS) for row in rows_out[1:]]
    frames_info = progress.get("frames", {})
    if any("vacuum_fraction" in info for info in frames_info.values()):
        # a model normalised to the vacuum level: how much of each frame was vacuum
        rows_out[0] = rows_out[0] + VACUUM_COLUMNS
        rows_out[1:] = [row + (
            f"{v:.3f}" if (v := frames_info.get(str(offsets[row[0]] + row[1]), {})
                           .get("vacuum_fraction")) is not None else "",)
            for row in rows_out[1:]]

    text = _stdio.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows_out)
    write_bytes_atomic(out_dir / "frames.csv", text.getvalue().encode("utf-8", "surrogateescape"))
    for source, t in tracks.items():
        _, label = by_source[source]
        order = np.argsort(t["frames"], kind="stable")
        write_series_plot(out_dir / f"{label}_series.png", np.asarray(t["frames"])[order],
                          np.asarray(t["heights"])[order], np.asarray(t["total"])[order],
                          max_height, title=shown(source))
    return per_frame


def write_movie(path: Path, item: dict, pixel_size_A, positions: dict, max_height: int,
                dose_of=None, recognised_of=None, note_of=None) -> int:
    """The annotated movie of one series: every analysed frame, read again from its file.

    Each frame is cropped to the same box (the union of the frames' particle boxes), its columns
    drawn as rings coloured by height, captioned with the frame number, the dose and the number
    of columns (:func:`ceriakeras.analysis.pictures.render_frame`), and streamed into an MP4.

    Parameters
    ----------
    path : Path
        The ``.mp4`` file.
    item : dict
        The input (``path``, ``source``, ``n_frames``, ``shape``, ``pixel_size_A``).
    pixel_size_A : float or None
        The ``--pixel-size`` override, as the run was given it.
    positions : dict
        ``{frame: (x_px (N,), y_px (N,), height (N,))}`` of the analysed frames that have
        columns (frames.csv's frames without columns are drawn without rings).
    max_height : int
        The model's largest height, Ce atoms (the legend).
    dose_of : callable, optional
        ``dose_of(frame_index, image (H, W) counts) -> e⁻/Å²``, the dose in the caption;
        default :func:`frame_dose` of the image at the input's pixel size.
    recognised_of : callable, optional
        ``recognised_of(frame_index) -> bool or None``; False adds "NOT RECOGNISED" to the
        caption (:func:`ceriakeras.inference.recognise.recognise_frame`).
    note_of : callable, optional
        ``note_of(frame_index) -> str or None``, added to the caption (tracks: the changes of
        height happening then, :func:`ceriakeras.analysis.tracking.event_notes`).

    Returns
    -------
    int
        Frames in the movie.
    """
    px = item["pixel_size_A"]
    if dose_of is None:
        def dose_of(index, image):
            return frame_dose(image, px)
    shape = tuple(item["shape"])
    box = union_box(particle_box(x, y, shape, px) for x, y, _ in positions.values())
    empty = (np.zeros(0), np.zeros(0), np.zeros(0, np.int32))
    with MovieWriter(path) as movie, open_series(item["path"], pixel_size_A) as series:
        for frame in series.frames():
            if frame.image is None:
                continue
            x, y, h = positions.get(frame.index, empty)
            caption = _caption(item, frame.index, dose_of(frame.index, frame.image), len(x),
                               recognised_of(frame.index) if recognised_of else None)
            if note_of is not None and note_of(frame.index):  # hook: tracks (issue 22)
                caption += "   " + note_of(frame.index)
            movie.add(render_frame(frame.image, x, y, h, pixel_size_A=px, max_height=max_height,
                                   box=box or (0, shape[0], 0, shape[1]), caption=caption))
    return movie.frames


VACUUM_COLUMNS = ("vacuum_area_fraction",)
"""Appended to ``frames.csv`` for a model normalised to the vacuum level (version 3 on): the
share of the frame's area farther than 5 Å from every column
(:func:`ceriakeras.inference.recognise.vacuum_fraction`), 0–1."""
OPTICS_COLUMNS = ("defocus_nm", "cs_um")
"""Columns of ``frames.csv`` for a model that estimates each frame's optics (version 3 on):
its defocus (nm, abTEM sign) and Cs (µm) estimates (:meth:`ceriakeras.nn.export.ServedModel.predict`)."""


def _previous_optics(progress_path: Path) -> dict:
    """The per-frame optics estimates a resumed run had committed (``{source: {frame: {…}}}``)."""
    try:
        return dict(json.loads(progress_path.read_text(encoding="utf-8")).get("optics") or {})
    except (OSError, ValueError):
        return {}


def _order(plan: list, source: str) -> int:
    return next(i for i, it in enumerate(plan) if it["source"] == source)


def write_series_plot(path: Path, frames: np.ndarray, heights: np.ndarray, total_ce: np.ndarray,
                      max_height: int, title: str = "") -> None:
    """Column heights over time (tracked columns × frames) and the total Ce count per frame.

    Parameters
    ----------
    frames : (T,) int
    heights : (T, M) float, NaN where a tracked column was not found
    total_ce : (T,) int, Ce atoms in all columns of each frame
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if heights.size:
        extent = (frames[0] - 0.5, frames[-1] + 0.5, heights.shape[1] - 0.5, -0.5)
        cmap = ListedColormap(height_colors(max_height)[1:] / 255.0)  # the overlays' colours
        im = ax1.imshow(np.ma.masked_invalid(heights.T), aspect="auto", interpolation="nearest",
                        cmap=cmap, vmin=0.5, vmax=max_height + 0.5, extent=extent)
        fig.colorbar(im, ax=[ax1], label="height (Ce atoms)")
    ax1.set_ylabel("column (tracked from first frame)")
    ax1.set_title(title, fontsize=8)
    ax2.plot(frames, total_ce, "-", lw=1)
    ax2.set_xlabel("frame")
    ax2.set_ylabel("total Ce atoms")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def format_summary(summary: dict) -> str:
    """A short table for the terminal."""
    lines = [
        f"frames          {summary['frames_analysed']} analysed of {summary['frames_total']}"
        + (f", {summary['frames_skipped']} skipped" if summary["frames_skipped"] else "")
        + (f" (resumed at frame {summary['resumed_at_frame']})" if summary["resumed_at_frame"] else ""),
        f"columns/frame   {summary['columns_per_frame']:.1f}",
        f"mean height     {summary['mean_height']:.2f} Ce atoms",
        (f"speed           {summary['frames_per_second']:.2f} frames/s"
         if summary["frames_analysed_now"] else
         "speed           - (every frame was analysed before; this run drew the pictures)"),
        *[_gain_line(it) for it in summary["inputs"]],
        f"results         {summary['out_dir']}",
    ]
    for s in summary["skipped"][:10]:
        lines.append(f"skipped         {s['reason']}")
    for it in summary["inputs"]:
        if it.get("gain_warning"):
            lines.append(f"warning         {it['source']}: {it['gain_warning']}")
    if summary.get("frames_not_recognised"):
        why = ", ".join(f"{k}: {n}" for k, n in summary.get("not_recognised_reasons", {}).items())
        lines.append(f"warning         {summary['frames_not_recognised']} of "
                     f"{summary['frames_analysed']} frames do not look like CeO2 [110] as the "
                     f"model knows it ({why}); their columns are marked recognised=0 in "
                     "columns.csv: do not trust them")
    return "\n".join(lines)


def _gain_line(item: dict) -> str:
    """One terminal line: an input's detector gain and where it came from."""
    g, se = item.get("counts_per_electron"), item.get("counts_per_electron_standard_error")
    if g is None:
        return ""
    value = f"{g:.3g} ± {se:.2g}" if se else f"{g:.4g}"
    return (f"gain            {value} counts/e⁻ ({item.get('counts_per_electron_from')}) "
            f"{item['source']}")
