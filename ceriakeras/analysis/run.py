"""Frames → resample → model → columns → tables and pictures: the ``ceriakeras analyze`` command's library.

One call of :func:`analyze` streams every frame of every input (a few batches in memory at a
time), sums counts into the model's pixel size, runs the model in batches, finds the columns and
maps them back to the input pixel grid (:mod:`ceriakeras.inference.predict`), and appends them
to ``OUT/columns.csv``, flushed per batch and committed in ``OUT/progress.json``, so an
interrupted run resumes where it stopped (:mod:`ceriakeras.analysis.resume`).

Outputs in ``OUT``: ``columns.csv`` and ``frames.csv`` (:mod:`ceriakeras.analysis.tables`),
``overlays/<input>_<frame>.png`` (cropped to the particle; a sample of a series' frames, see
:func:`ceriakeras.analysis.pictures.overlay_frames`), for a series ``<input>_movie.mp4`` (every
frame, columns coloured by height, frame number and dose) and ``<input>_series.png`` (tracked
column heights and total Ce over time), with ``xyz=True`` ``xyz/<input>_<frame>.xyz`` (ASE
extxyz 3D models), ``progress.json`` and ``summary.json``. The pictures are drawn by
:mod:`ceriakeras.analysis.pictures`.

Detector gain: the dose (``frames.csv``'s ``dose_e_per_A2``) and the calibration of
``confidence`` need electrons, not the file's units; the gain of each input comes from
:func:`ceriakeras.inference.detector.input_gain`. Recognition: each frame is checked against what
the model knows (:func:`ceriakeras.inference.recognise.recognise_frame`: a particle, on a CeO2
[110] lattice, dose in the envelope, and for a vacuum-normalised model enough vacuum);
``recognised`` (1/0) marks its rows in ``columns.csv`` and its line in ``frames.csv``.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import CE_COLUMN_SPACING_A, AnalyzeConfig, InputError
from ..inference.cluster import cluster_model
from ..inference.columns import columns_to_atoms
from ..inference.detector import check_counts_per_electron, input_gain
from ..inference.predict import ColumnSettings, frame_columns, run_model
from ..inference.recognise import recognise_frame, required_vacuum_fraction, vacuum_fraction
from ..inference.resample import resample_counts
from ..inference.served import DihedralAveraged, load_model, model_settings, with_model_threshold
from ..io.files import write_text_atomic
from ..io.series import expand_inputs
from ..noise import estimate_dose
from .movies import write_movie
from .pictures import frame_caption, render_frame, write_png, write_xyz
from . import tracking
from .plan import plan_inputs
from .reading import Batch, read_batches, series_counts
from .stacking import StackSettings, model_reader
from .resume import (PROGRESS_VERSION, ProgressJson, earlier_frames, prepare_out_dir,
                     previous_optics)
from .tables import (CSV_HEADER, OPTICS_COLUMNS, column_rows, columns_header,  # noqa: F401
                     format_summary, frame_table_and_series_plots, reason_counts, series_doses)
from .threads import Worker, in_thread, share_cores
from .track_pictures import write_stretch_models, write_track_series_plots

STAGES = ("read", "resample", "model", "columns", "write", "pictures")
"""Stages timed in ``summary.json``'s ``seconds_by_stage`` (they overlap: see :func:`analyze`)."""
QUEUE_BATCHES = 2
"""Batches that may wait between two stages of the run."""


# --- the run -----------------------------------------------------------------------------------
def analyze(inputs, out_dir, *, model=None, pixel_size_A: float | None = None,
            config: AnalyzeConfig | None = None, overwrite: bool = False, xyz: bool = False,
            details: bool = False, progress: bool = True,
            counts_per_electron: float | None = None, scheduler: str | None = None) -> dict:
    """Find the Ce columns and their heights in every frame of ``inputs``; write tables and pictures.

    Parameters
    ----------
    inputs : path or list of paths
        Images, series (multi-page TIFF, ImageJ hyperstack, ``.npy`` (N, H, W), DM/EMD/SER) or
        folders of them.
    out_dir : path
        Output folder (created). Holds ``columns.csv`` and the pictures; see the module doc.
    model : None, path or model object
        See :func:`ceriakeras.inference.served.load_model`; None = the shipped model.
    pixel_size_A : float, optional
        Input pixel size, Å, for every input (overrides the files' calibration).
    config : AnalyzeConfig
        Peak distance and threshold, batch size, which overlays, the movie.
    overwrite : bool
        Replace earlier results in ``out_dir``. Without it a finished run is refused and an
        unfinished one with the same inputs, model and settings is resumed.
    xyz, details, progress : bool
        Write a 3D model per frame; add ``expected_height_atoms, height_std_atoms`` to the CSV;
        show a progress bar.
    counts_per_electron : float, optional
        Detector gain, counts (the files' units) per electron, for every input; default: the
        file's own, else estimated from the frames' noise (:func:`input_gain`).
    scheduler : str, optional
        ``tcp://HOST:PORT`` of a dask scheduler: the model (a folder) runs on its workers
        (:mod:`ceriakeras.inference.cluster`), the rest here; the same tables as a local run.

    Returns
    -------
    dict
        Summary: frames (total, analysed now, skipped with reasons), columns, mean height,
        frames per second, seconds per stage (stages overlap in time), output paths.

    Raises
    ------
    InputError, ModelError
        Bad input (before anything is written where possible), a missing model, or results
        already in ``out_dir``.

    Notes
    -----
    Three stages run at once, joined by short queues (at most two batches wait between two
    stages, so memory stays flat): a reader thread reads and resamples frames into batches, the
    calling thread runs the model, and a writer thread (:meth:`_Run.write_batch`) finds the
    columns, appends their rows to ``columns.csv``, draws the batch's pictures and commits it in
    ``progress.json``, in input order. The tables, movie and series plot are made at the end
    from ``columns.csv`` (:func:`_finish_run`), so a resumed run gets them whole.
    """
    config = config or AnalyzeConfig()
    config.validate()
    check_counts_per_electron(counts_per_electron)
    if scheduler is not None:  # connected before TensorFlow loads; closed at the end
        with cluster_model(scheduler, model) as remote:
            return analyze(inputs, out_dir, model=remote, pixel_size_A=pixel_size_A, config=config,
                           overwrite=overwrite, xyz=xyz, details=details, progress=progress,
                           counts_per_electron=counts_per_electron)
    if model is None or isinstance(model, (str, os.PathLike)):
        share_cores(config.model_workers)
    served, model_id = load_model(model)
    model_calls = getattr(served, "concurrent_calls", config.model_workers)
    if config.test_time_augmentation:
        served = DihedralAveraged(served)
    run = _start_run(expand_inputs(inputs), Path(out_dir), served, model_id,
                     with_model_threshold(config, served.info), pixel_size_A=pixel_size_A,
                     overwrite=overwrite, xyz=xyz, details=details,
                     counts_per_electron=counts_per_electron)
    run.model_calls = model_calls  # model calls at once (a cluster's: two per worker)
    bar = _progress_bar(run.frames_total, run.start, progress)
    t_start = time.perf_counter()
    _run_batches(run, bar)
    bar.close()
    return _finish_run(run, time.perf_counter() - t_start)


@dataclass
class _Run:
    """What the stages of one run share: the model, settings, inputs, outputs and progress."""

    served: object
    config: AnalyzeConfig
    plan: list
    out_dir: Path
    pixel_size_A: float | None
    state: dict
    start: int
    xyz: bool
    details: bool
    timings: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    counts: dict = field(default_factory=lambda: {"analysed": 0, "columns": 0})
    csv_file: object = None
    probability_log: object = None  # tracks: each column's class probabilities per frame
    model_calls: int = 1  # batches given to the model at once, answers taken in input order
    progress_json: ProgressJson = field(default_factory=ProgressJson)  # each frame dumped once

    def __post_init__(self):
        self._busy = threading.Lock()
        self._running, self._since = 0, 0.0
        self.model_px, self.max_height, _ = model_settings(self.served.info)
        self.settings = ColumnSettings.for_model(self.served.info, self.config)
        # a model normalised to the vacuum level needs vacuum in the frame (version 3 on)
        self.min_vacuum = required_vacuum_fraction(self.served.info)

    @property
    def frames_total(self) -> int:
        return sum(item["n_frames"] for item in self.plan)

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "columns.csv"

    @property
    def progress_path(self) -> Path:
        return self.out_dir / "progress.json"

    def predict(self, batch: Batch) -> tuple[np.ndarray, dict | None] | None:
        """The model's answer for the good frames of ``batch`` (None if there are none).

        Returns ``(probabilities (B, h, w, C), optics)``: ``optics`` is the model's per-frame
        estimates (``{name: (B,)}``, :data:`ceriakeras.analysis.tables.OPTICS_COLUMNS`) for a
        model that has them (version 3 on), else None. Thread-safe (it changes no shared state
        but the timing); ``timings['model']`` counts the wall time during which at least one
        call was running (not the sum over calls running at once).
        """
        good = [small for _, small in batch.frames if small is not None]
        if not good:
            return None
        with self._busy:
            if self._running == 0:
                self._since = time.perf_counter()
            self._running += 1
        try:
            return run_model(self.served, good, optics=True)
        finally:
            with self._busy:
                self._running -= 1
                if self._running == 0:
                    self.timings["model"] += time.perf_counter() - self._since

    def write_batch(self, batch: Batch, prediction) -> None:
        """The batch writer: columns, CSV rows, pictures of one batch (``prediction`` from
        :meth:`predict`); then commit it in progress.json."""
        t0 = time.perf_counter()
        results, doses = self._batch_columns(batch, prediction)
        self.timings["columns"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        self._write_rows(batch, results)
        self.timings["write"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        self._draw_batch(batch, results, doses)
        self.timings["pictures"] += time.perf_counter() - t0
        self.state["frames_done"] = batch.offset + batch.frames[-1][0].index + 1
        self.state["csv_bytes"] = self.csv_file.tell()
        if self.probability_log is not None:
            self.probability_log.flush()
        write_text_atomic(self.progress_path, self.progress_json.dumps(self.state))

    def _batch_columns(self, batch: Batch, prediction) -> tuple[dict, dict]:
        """Each good frame's columns (on the input grid) and dose; its recognition in the state."""
        item = batch.item
        probabilities, optics = prediction if prediction is not None else (None, None)
        if optics is not None:  # per-frame defocus and Cs (model version 3 on)
            good = [frame for frame, small in batch.frames if small is not None]
            for k, frame in enumerate(good):
                self.state["optics"].setdefault(frame.source, {})[str(frame.index)] = {
                    name: float(optics[name][k]) for name in OPTICS_COLUMNS if name in optics}
        gain = item["gain"]["counts_per_electron"]
        results, doses, k = {}, {}, 0
        for frame, small in batch.frames:
            if small is None:
                continue
            # electrons, not the file's units
            doses[frame.index] = dose = estimate_dose(small, self.model_px, gain)
            table = frame_columns(probabilities[k], item["factor"], self.settings,
                                  dose_e_per_A2=dose)
            x_A, y_A = table["model_x_px"] * self.model_px, table["model_y_px"] * self.model_px
            vacuum = None if self.min_vacuum is None else vacuum_fraction(
                x_A, y_A, small.shape[1] * self.model_px, small.shape[0] * self.model_px)
            mark = recognise_frame(x_A, y_A, dose, vacuum=vacuum, min_vacuum=self.min_vacuum)
            self.state["frames"][str(batch.offset + frame.index)] = {
                "dose_e_per_A2": round(dose, 4), "recognised": bool(mark["recognised"]),
                "lattice_fraction": round(mark["lattice_fraction"], 4)
                if np.isfinite(mark["lattice_fraction"]) else None, "reason": mark["reason"],
                **({} if vacuum is None else {"vacuum_fraction": round(vacuum, 4)})}
            results[frame.index] = table
            if self.probability_log is not None:
                self.probability_log.add(batch.offset + frame.index, table["class_probabilities"])
            k += 1
        return results, doses

    def _write_rows(self, batch: Batch, results: dict) -> None:
        """Append the batch's rows to ``columns.csv`` (flushed and synced); note skipped frames."""
        buffer = _stdio.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for frame, small in batch.frames:
            if small is None:
                self.state["skipped"].append({"source": frame.source, "frame": frame.index,
                                              "reason": frame.error})
                continue
            table = results[frame.index]
            recognised = int(self.state["frames"][str(batch.offset + frame.index)]["recognised"])
            self.counts["columns"] += len(table["x_px"])
            self.counts["analysed"] += 1
            rows = column_rows(frame.source, frame.index, table, batch.item["pixel_size_A"],
                               recognised, self.details)
            if self.probability_log is not None:  # track columns: filled in at the end
                rows = (row + [""] * len(tracking.TRACK_COLUMNS) for row in rows)
            writer.writerows(rows)
        self.csv_file.write(buffer.getvalue())
        self.csv_file.flush()
        os.fsync(self.csv_file.fileno())

    def _draw_batch(self, batch: Batch, results: dict, doses: dict) -> None:
        """The batch's overlays (the sampled frames) and, with ``xyz``, its 3D models."""
        item, px = batch.item, batch.item["pixel_size_A"]
        for frame, small in batch.frames:
            if small is None:
                continue
            table = results[frame.index]
            x, y, height = table["x_px"], table["y_px"], table["height"]
            if frame.index in item["overlays"]:
                mark = self.state["frames"][str(batch.offset + frame.index)]
                caption = frame_caption(item, frame.index, doses[frame.index], len(x),
                                        mark["recognised"])
                write_png(self.out_dir / "overlays" / f"{item['label']}_{frame.index:05d}.png",
                          render_frame(frame.image, x, y, height, pixel_size_A=px,
                                       max_height=self.max_height, caption=caption))
            if self.xyz and not (self.probability_log is not None and item["n_frames"] >= 2):
                # (a tracked series gets one model per stretch instead, at the end)
                h, w = frame.image.shape
                atoms = columns_to_atoms(x * px, y * px, height,
                                         cell=[w * px, h * px,
                                               (self.max_height + 2) * CE_COLUMN_SPACING_A])
                atoms.info.update(source=frame.source, frame=frame.index, pixel_size_A=px)
                write_xyz(self.out_dir / "xyz" / f"{item['label']}_{frame.index:05d}.xyz", atoms)


def _start_run(paths: list[Path], out_dir: Path, served, model_id: dict, config: AnalyzeConfig,
               *, pixel_size_A, overwrite: bool, xyz: bool, details: bool,
               counts_per_electron) -> _Run:
    """Plan the inputs (every header first: a bad file or pixel size stops the run before any
    work), prepare ``out_dir`` (cleared, or recovered to resume), measure each input's gain and
    write the first ``progress.json``."""
    model_px = model_settings(served.info)[0]
    plan = plan_inputs(paths, pixel_size_A, model_px, config)
    identity = {
        "inputs": [{"source": it["source"], "bytes": it["path"].stat().st_size,
                    "n_frames": it["n_frames"], "shape": it["shape"],
                    "pixel_size_A": it["pixel_size_A"]} for it in plan],
        "model": model_id,
        "settings": {"min_distance_A": config.min_distance_A, "threshold": config.threshold,
                     "details": bool(details), "counts_per_electron": counts_per_electron,
                     "test_time_augmentation": bool(config.test_time_augmentation)},
    }
    csv_path, progress_path = out_dir / "columns.csv", out_dir / "progress.json"
    earlier = {} if overwrite else earlier_frames(progress_path)
    track_columns = tracking.TRACK_COLUMNS if config.tracks else ()
    start, skipped = prepare_out_dir(out_dir, columns_header(details, track_columns).encode(),
                                     identity, overwrite, plan)
    for item in plan:  # detector gain per input: option, file, estimate from the noise, or 1
        item["gain"] = input_gain(item["path"], pixel_size_A, counts_per_electron,
                                  file_gain=item["counts_per_electron_file"])
    state = {"version": PROGRESS_VERSION, "identity": identity,
             "frames_total": sum(item["n_frames"] for item in plan),
             "frames_done": start, "csv_bytes": csv_path.stat().st_size, "skipped": skipped,
             "complete": False, "optics": previous_optics(progress_path) if start else {},
             "frames": {k: v for k, v in earlier.items() if int(k) < start}}
    write_text_atomic(progress_path, json.dumps(state, indent=1))
    probability_log = tracking.ProbabilityLog(out_dir, start) if config.tracks else None
    return _Run(served=served, config=config, plan=plan, out_dir=out_dir,
                pixel_size_A=pixel_size_A, state=state, start=start, xyz=xyz, details=details,
                probability_log=probability_log)


def _run_batches(run: _Run, bar) -> None:
    """Read, predict and write every batch from ``run.start`` on: the reader in a thread, the
    model here (or in ``run.model_calls`` threads), the batch writer in a thread."""
    config, calls = run.config, run.model_calls
    with open(run.csv_path, "a", newline="", encoding="utf-8",
              errors="surrogateescape") as csv_file:  # file names as the OS gives them
        run.csv_file = csv_file
        writer = Worker(lambda job: (run.write_batch(*job), bar.update(len(job[0].frames))),
                        maxsize=QUEUE_BATCHES)
        pool = (ThreadPoolExecutor(calls, thread_name_prefix="analyze-model")
                if calls > 1 else None)
        pending: deque = deque()  # (batch, future) in input order
        try:
            for batch in in_thread(lambda: read_batches(run.plan, run.start, run.pixel_size_A,
                                                         config, run.frames_total == 1,
                                                         run.timings),
                                   maxsize=QUEUE_BATCHES):
                if pool is None:
                    writer.submit((batch, run.predict(batch)))
                    continue
                pending.append((batch, pool.submit(run.predict, batch)))
                while len(pending) > calls:
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


def _finish_run(run: _Run, elapsed: float) -> dict:
    """The final stage: ``frames.csv``, the series plots and movies, the run marked complete,
    ``summary.json``."""
    if run.probability_log is not None:
        _write_tracks(run)
    t0 = time.perf_counter()
    labels = [item["label"] for item in run.plan]
    per_frame = frame_table_and_series_plots(run.csv_path, run.out_dir, run.plan, labels,
                                             run.max_height, movie=run.config.movie,
                                             series_plots=not run.config.tracks)
    if run.config.tracks:  # drift in frames.csv, the tracks' series plot, track heights
        tracking.add_drift_columns(run.out_dir)
        write_track_series_plots(run.out_dir, run.plan, labels, run.max_height)
        per_frame["positions"] = tracking.movie_track_heights(run.out_dir, per_frame["positions"])
        if run.xyz:
            write_stretch_models(run.out_dir, run.plan, labels, run.max_height)
    if run.config.movie:
        _write_movies(run, per_frame["positions"])
    run.timings["pictures"] += time.perf_counter() - t0
    run.state["complete"] = True
    write_text_atomic(run.progress_path, run.progress_json.dumps(run.state))
    summary = _summary(run, per_frame, elapsed)
    write_text_atomic(run.out_dir / "summary.json", json.dumps(summary, indent=1, default=float))
    return summary


def _write_tracks(run: _Run) -> None:
    """Tracks, stretches and events (:mod:`.tracking`): ``columns.csv``'s track columns, whose new
    table's size is committed in ``progress.json`` before it replaces the old, ``events.csv``."""
    run.probability_log.close()
    t0 = time.perf_counter()

    def commit_size(size):
        run.state["csv_bytes"] = size
        write_text_atomic(run.progress_path, run.progress_json.dumps(run.state))

    run.timings["stacks"] = 0.0
    doses = series_doses(run.plan, run.state["frames"])  # counts_per_electron at the top
    plan = [{**item, **item["gain"], "dose_e_per_A2": d} for item, d in zip(run.plan, doses)]
    done = tracking.write_tracks(
        run.out_dir, plan, tracking.TrackSettings(min_stretch=run.config.min_stretch),
        before_replace=commit_size, stack=StackSettings(max_frames=run.config.stack_frames),
        stack_reader=model_reader(run.served, run.settings, run.timings),
        frame_reader=series_counts)
    for item in (i for i in run.plan if i["source"] in done["unread"]):  # moved mid-run
        item["tracks_warning"] = done["unread"][item["source"]]
    run.timings["tracks"] = time.perf_counter() - t0 - run.timings["stacks"]


def _write_movies(run: _Run, positions: dict) -> None:
    """``<label>_movie.mp4`` of each series, captioned with the dose the analysis used."""
    frames, offset = run.state["frames"], 0
    for item in run.plan:
        if item["n_frames"] >= 2:
            def dose_of(index, image, item=item, offset=offset):  # the dose the analysis used
                dose = frames.get(str(offset + index), {}).get("dose_e_per_A2")
                return dose if dose is not None else estimate_dose(
                    resample_counts(image, item["factor"]), run.model_px,
                    item["gain"]["counts_per_electron"])

            def recognised_of(index, offset=offset):
                return frames.get(str(offset + index), {}).get("recognised")

            marks = tracking.event_marks(run.out_dir, item["source"], item["pixel_size_A"]) if (
                run.config.tracks) else {}
            write_movie(run.out_dir / f"{item['label']}_movie.mp4", item, run.pixel_size_A,
                        positions.get(item["source"], {}), run.max_height,
                        dose_of=dose_of, recognised_of=recognised_of, marks_of=marks.get)
        offset += item["n_frames"]


def _summary(run: _Run, per_frame: dict, elapsed: float) -> dict:
    """What ``summary.json`` holds (see :func:`analyze`'s Returns)."""
    state, plan = run.state, run.plan
    analysed_total = len(per_frame["columns"])
    n_recognised = sum(1 for v in state["frames"].values() if v.get("recognised"))
    if analysed_total == 0 and state["skipped"]:
        raise InputError(f"no frame could be analysed; first problem: {state['skipped'][0]['reason']}")
    analysed_now = run.counts["analysed"]
    return {
        "frames_total": run.frames_total,
        "frames_analysed": analysed_total,
        "frames_analysed_now": analysed_now,
        "resumed_at_frame": run.start,
        "frames_skipped": len(state["skipped"]),
        "skipped": state["skipped"],
        "columns_total": int(np.sum(per_frame["columns"])) if analysed_total else 0,
        "columns_per_frame": float(np.mean(per_frame["columns"])) if analysed_total else 0.0,
        "mean_height": (float(np.sum(per_frame["total_ce"]) / max(1, np.sum(per_frame["columns"])))
                        if analysed_total else float("nan")),
        "frames_per_second": analysed_now / elapsed if elapsed > 0 else float("nan"),
        "seconds_analysing": round(elapsed, 4),
        "seconds_by_stage": {k: round(v, 4) for k, v in run.timings.items()},
        "frames_recognised": n_recognised,
        "frames_not_recognised": analysed_total - n_recognised,
        "not_recognised_reasons": reason_counts(state["frames"]),
        "model_pixel_size_A": run.model_px,
        "inputs": [{"source": it["source"], "frames": it["n_frames"],
                    "pixel_size_A": it["pixel_size_A"], "pixel_size_from": it["pixel_size_from"],
                    **it["gain"], **{k: it[k] for k in ("tracks_warning",) if k in it}}
                   for it in plan],
        "out_dir": str(run.out_dir),
        "columns_csv": str(run.csv_path),
    }


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="frame", disable=not enabled,
                desc="analyze", dynamic_ncols=True)


__all__ = ["analyze", "format_summary", "CSV_HEADER", "STAGES"]
