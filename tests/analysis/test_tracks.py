"""Tracks, stretches and events on synthetic per-frame column tables (no model, fast); the
stretches read again from drift-free sums of their frames (analysis/stacking.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ceriakeras.analysis.changepoints import segment, settle_parts
from ceriakeras.analysis.linking import link_with_drift
from ceriakeras.analysis.stacking import (StackSettings, aligned_sums, epochs, restack,
                                          shift_back, stack_readings)
from ceriakeras.analysis.tracks import EVIDENCE, Tracker, TrackSettings

K = 16  # heights 1 … 16


def lattice(n: int = 5, spacing: float = 3.9) -> np.ndarray:
    """(n², 2) column positions, Å (a square grid wider than the column spacing of [110])."""
    g = np.arange(n) * spacing + 10.0
    return np.array([(x, y) for y in g for x in g], np.float64)


def probs(heights, rng, noise: float = 0.3, width: float = 0.6) -> np.ndarray:
    """Class probabilities like the model's for one low-dose frame: a bump of ``width`` atoms
    around each column's height, its centre off by Gaussian noise of ``noise`` atoms."""
    centre = np.asarray(heights, np.float64) + rng.normal(0, noise, len(heights))
    p = np.exp(-((np.arange(1, K + 1)[None, :] - centre[:, None]) ** 2) / (2 * width**2)) + 1e-4
    return p / p.sum(axis=1, keepdims=True)


def run(frames, settings=None):
    """Feed ``frames`` (list of (xy, probs)) to a tracker; return ids per frame, drifts and the
    stretches."""
    tracker = Tracker(settings or TrackSettings())
    ids, drifts = [], []
    for f, (xy, p) in enumerate(frames):
        i, d = tracker.add_frame(f, xy, p)
        ids.append(i)
        drifts.append(d)
    tracker.finish()
    return ids, np.array(drifts), tracker.pop_stretches()


def events(stretches):
    return sorted((s["track"], s["first"]) for s in stretches if s["change_probability"] is not None)


def test_link_with_drift_recovers_a_common_shift():
    xy = lattice()
    shifted = xy + [0.9, -0.6]
    i, j, shift = link_with_drift(xy, shifted[::-1], 1.0, 1.5)
    assert np.allclose(shift, [0.9, -0.6])
    assert len(i) == len(xy) and np.all(len(xy) - 1 - j == i)


def test_drift_keeps_track_ids_and_is_measured():
    rng = np.random.default_rng(0)
    xy, heights = lattice(), rng.integers(1, 8, 25)
    path = np.cumsum(np.tile([[0.25, 0.15]], (30, 1)), axis=0) - [0.25, 0.15]  # 0 … 7.2 Å
    frames = [(xy + d + rng.normal(0, 0.1, xy.shape), probs(heights, rng)) for d in path]
    ids, drifts, _ = run(frames)
    assert all(np.array_equal(i, ids[0]) for i in ids)
    assert np.abs(drifts - path).max() < 0.15


def test_a_lost_column_is_found_again_on_its_track():
    rng = np.random.default_rng(1)
    xy, heights = lattice(), rng.integers(1, 8, 25)
    frames = []
    for f in range(20):
        keep = np.ones(25, bool)
        if 5 <= f < 9:
            keep[7] = False  # lost for 4 frames
        frames.append((xy[keep], probs(heights[keep], rng)))
    ids, _, stretches = run(frames)
    assert ids[12][7] == ids[0][7]
    assert len({s["track"] for s in stretches}) == 25
    assert events(stretches) == []


def test_a_column_that_appears_gets_a_new_track_and_no_event():
    rng = np.random.default_rng(2)
    xy, heights = lattice(), rng.integers(1, 8, 25)
    new = np.array([[30.0, 30.0]])
    frames = [(xy if f < 10 else np.vstack([xy, new]),
               probs(heights if f < 10 else np.append(heights, 3), rng)) for f in range(20)]
    ids, _, stretches = run(frames)
    assert ids[10][-1] not in ids[0] and ids[19][-1] == ids[10][-1]
    appeared = [s for s in stretches if s["track"] == ids[10][-1]]
    assert len(appeared) == 1 and appeared[0]["first"] == 10 and appeared[0]["height_index"] == 2
    # an appearance is a new track, not a change (false alarms: the static-series test)
    assert not [e for e in events(stretches) if e[0] == ids[10][-1]]


@pytest.mark.parametrize("change_at", [1, 19])
def test_an_event_at_the_first_and_at_the_last_frame(change_at):
    rng = np.random.default_rng(3)
    xy, heights = lattice(), rng.integers(2, 8, 25)
    frames = []
    for f in range(20):
        h = heights.copy()
        if f >= change_at:
            h[12] += 1
        frames.append((xy, probs(h, rng, noise=0.1)))
    # one frame alone must carry the change: stretches of 1 frame, its evidence weighed fully
    settings = TrackSettings(min_stretch=1, temper=1.0)
    ids, _, stretches = run(frames, settings)
    assert events(stretches) == [(int(ids[0][12]), change_at)]
    (event,) = [s for s in stretches if s["change_probability"] is not None]
    assert event["height_index"] + 1 == heights[12] + 1 and event["change_probability"] > 0.5


def test_a_change_is_found_through_noise_and_reads_both_heights():
    rng = np.random.default_rng(4)
    xy, heights = lattice(), np.full(25, 4)
    frames = [(xy, probs(np.where(np.arange(25) == 3, 4 if f < 15 else 5, heights), rng))
              for f in range(30)]
    ids, _, stretches = run(frames)
    ((track, frame),) = events(stretches)
    assert track == ids[0][3] and abs(frame - 15) <= 1
    track = sorted((s for s in stretches if s["track"] == ids[0][3]), key=lambda s: s["first"])
    assert [s["height_index"] + 1 for s in track] == [4, 5]


def test_a_static_series_reports_no_event():
    rng = np.random.default_rng(5)
    xy, heights = lattice(), rng.integers(1, 10, 25)
    frames = [(xy + rng.normal(0, 0.1, xy.shape), probs(heights, rng)) for _ in range(200)]
    _, _, stretches = run(frames, TrackSettings(window=32))
    assert events(stretches) == []
    assert sum(s["height_index"] + 1 == heights[s["track"]] for s in stretches) == 25


def test_confidence_follows_the_evidence_and_its_fitted_map():
    """A long, clean stretch is more certain than a short, noisy one; the logistic map of the
    evidence (``confidence_weights``) replaces the Platt map and a wrong length is refused."""
    rng = np.random.default_rng(8)
    xy, heights = lattice(), np.full(25, 4)
    frames = [(xy, probs(heights, rng, noise=0.05 if f < 40 else 0.8)) for f in range(44)]
    settings = TrackSettings(max_gap=0)
    tracker = Tracker(settings)
    for f, (x, p) in enumerate(frames):
        tracker.add_frame(f, x if f < 40 or f % 2 else x[:1], p if f < 40 or f % 2 else p[:1])
    tracker.finish()
    stretches = tracker.pop_stretches()
    assert all(len(s["evidence"]) == len(EVIDENCE) for s in stretches)
    long = [s for s in stretches if s["frames"] >= 40]
    short = [s for s in stretches if s["frames"] <= 4]
    assert long and short
    assert min(s["confidence"] for s in long) > max(s["confidence"] for s in short)
    assert all(s["evidence"][EVIDENCE.index("coverage")] == 1.0 for s in long)
    # a map that ignores all but the intercept gives σ(b) everywhere
    flat = Tracker(TrackSettings(confidence_weights=(0.0,) * len(EVIDENCE) + (1.0,)))
    for f, (x, p) in enumerate(frames[:10]):
        flat.add_frame(f, x, p)
    flat.finish()
    assert all(np.isclose(s["confidence"], 1 / (1 + np.exp(-1.0))) for s in flat.pop_stretches())
    with pytest.raises(Exception, match="confidence weights need 8"):
        TrackSettings(confidence_weights=(1.0, 0.0)).validate()


def test_event_probability_offset_shifts_the_logistic():
    from ceriakeras.analysis.changepoints import change_probability

    assert np.isclose(change_probability(6.0, 6.0), 0.5)
    assert np.isclose(change_probability(6.0, 6.0, 2.0, 1.0), 1 / (1 + np.exp(-1.0)))
    assert change_probability(8.0, 6.0, 0.5, -1.0) == pytest.approx(0.5)


def test_resume_in_the_middle_gives_the_same_tracks():
    rng = np.random.default_rng(6)
    xy, heights = lattice(), rng.integers(2, 8, 25)
    frames = [(xy + [0.1 * f, 0], probs(np.where(np.arange(25) == 9, heights + (f >= 12), heights),
                                        rng)) for f in range(24)]
    whole = Tracker(TrackSettings(window=20))
    ids_whole = [whole.add_frame(f, *fr)[0] for f, fr in enumerate(frames)]
    whole.finish()
    first = Tracker(TrackSettings(window=20))
    ids_resumed = [first.add_frame(f, *fr)[0] for f, fr in enumerate(frames[:13])]
    second = Tracker.from_state(json.loads(json.dumps(first.state())))
    ids_resumed += [second.add_frame(f, *fr)[0] for f, fr in enumerate(frames[13:], 13)]
    second.finish()
    assert all(np.array_equal(a, b) for a, b in zip(ids_whole, ids_resumed))
    assert first.pop_stretches() + second.pop_stretches() == whole.pop_stretches()


def test_memory_stays_bounded_over_a_long_series():
    rng = np.random.default_rng(7)
    xy, heights = lattice(3), rng.integers(1, 8, 9)
    tracker = Tracker(TrackSettings(window=20))
    for f in range(400):
        tracker.add_frame(f, xy, probs(heights, rng))
    assert max(len(t["units"]) for t in tracker.tracks) <= 20


def test_segment_respects_min_stretch():
    sums = np.tile([0.0, -5.0, -5.0], (10, 1))  # every frame says height 1 …
    sums[5] = [-5.0, 0.0, -5.0]                 # … but one in the middle says 2
    units = {"sum": sums, "s1": np.where(np.arange(10) == 5, 2.0, 1.0), "n": np.ones(10)}
    units["s2"] = units["s1"] ** 2
    for kind, penalty in (("classes", 1.0), ("mean_shift", 3.0)):
        kw = {"kind": kind, "temper": 1.0, "penalty": penalty, "variance": 0.05}
        assert segment(units, min_stretch=3, **kw) == [(0, 10)]
        assert segment(units, min_stretch=1, **kw) == [(0, 5), (5, 6), (6, 10)]


def test_heights_are_read_together_in_the_direction_of_the_change():
    from ceriakeras.analysis.changepoints import assign_heights

    # both stretches prefer height 4 (index 3), but the mean went up: 3 then 4 fits best
    a = np.log([0.01, 0.04, 0.35, 0.55, 0.05])
    b = np.log([0.01, 0.01, 0.03, 0.60, 0.35])
    assert assign_heights(np.array([a, b]), np.array([1])).tolist() == [2, 3]
    assert assign_heights(np.array([a, b]), np.array([0])).tolist() == [3, 3]


# --- the wiring into analyze: columns.csv, events.csv, frames.csv --------------------------------
def write_run(out, movies, header_extra=()):
    """A finished run's columns.csv and probability log: ``movies`` maps a source to a list of
    frames (xy_A (N, 2), probabilities (N, K)); pixel size 0.1 Å."""
    from ceriakeras.analysis.tracking import ProbabilityLog

    out.mkdir()
    lines = ["source,frame,x_px,y_px,x_A,y_A,height,confidence,recognised"]
    log = ProbabilityLog(out, 0)
    g = 0
    for source, frames in movies.items():
        name = ('"' + source.replace('"', '""') + '"' if any(c in source for c in ',"\n')
                else source)  # as csv.writer writes it
        for f, (xy, p) in enumerate(frames):
            for (x, y), row in zip(xy, p):
                lines.append(f"{name},{f},{x * 10:.3f},{y * 10:.3f},{x:.4f},{y:.4f},"
                             f"{int(np.argmax(row)) + 1},{row.max():.4f},1")
            log.add(g + f, p)
        g += len(frames)
    log.close()
    (out / "columns.csv").write_text("\n".join(lines) + "\n")
    (out / "frames.csv").write_text("source,frame,columns\n" + "".join(
        f"{s},{f},{len(fr[0])}\n" for s, frames in movies.items() for f, fr in enumerate(frames)))
    return [{"source": s, "n_frames": len(frames)} for s, frames in movies.items()]


def read_csv(path):
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_tracks_adds_columns_events_and_drift(tmp_path):

    from ceriakeras.analysis.tracking import (
        EVENT_COLUMNS,
        add_drift_columns,
        write_tracks,
    )

    rng = np.random.default_rng(8)
    xy, heights = lattice(), rng.integers(2, 8, 25)
    movie = [(xy + [0.05 * f, 0.0], probs(np.where(np.arange(25) == 4, heights + (f >= 10),
                                                   heights), rng)) for f in range(20)]
    single = [(xy[:3], probs(heights[:3], rng))]
    plan = write_run(tmp_path / "out", {"movie.tif": movie, "image.tif": single})
    assert write_tracks(tmp_path / "out", plan)["events"] == 1
    import gc

    assert gc.isenabled()  # paused for the stage only
    add_drift_columns(tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "columns.csv")
    image = [r for r in rows if r["source"] == "image.tif"]
    assert [r["track"] for r in image] == ["0", "1", "2"]
    assert all(r["track_height"] == r["height"] for r in image)
    movie_rows = [r for r in rows if r["source"] == "movie.tif"]
    assert sum(r["track_height"] == str(heights[i % 25] + (i % 25 == 4 and i // 25 >= 10))
               for i, r in enumerate(movie_rows)) == len(movie_rows)
    events = read_csv(tmp_path / "out" / "events.csv")
    assert list(events[0]) == list(EVENT_COLUMNS)
    assert (events[0]["frame"], events[0]["height_before"], events[0]["height_after"]) == (
        "10", str(heights[4]), str(heights[4] + 1))
    assert abs(float(events[0]["x_A"]) - (xy[4, 0] + 0.5)) < 1e-3
    frames = read_csv(tmp_path / "out" / "frames.csv")
    assert abs(float(frames[19]["drift_x_A"]) - 0.95) < 0.05
    assert frames[20]["drift_x_A"] == ""  # the single image has no drift
    before = (tmp_path / "out" / "columns.csv").read_bytes()
    seen: dict = {}
    write_tracks(tmp_path / "out", plan, on_stretches=seen.update)  # again: the same table
    assert (tmp_path / "out" / "columns.csv").read_bytes() == before
    runs = [s for by_track in seen["movie.tif"].values() for s in by_track]
    assert sum(s["frames"] for s in runs) == len(movie_rows)
    assert all(len(s["evidence"]) == len(EVIDENCE) for s in runs)
    confidence = {(r["track"], r["track_confidence"]) for r in movie_rows if r["frame"] == "0"}
    assert len(confidence) == 25 and all(0 < float(c) < 1 for _, c in confidence)


def test_write_tracks_keeps_a_source_name_the_csv_quotes(tmp_path):
    from ceriakeras.analysis.tracking import write_tracks

    rng = np.random.default_rng(9)
    xy, heights = lattice(3), rng.integers(2, 8, 9)
    movie = [(xy + [0.05 * f, 0.0], probs(np.where(np.arange(9) == 4, heights + (f >= 8),
                                                   heights), rng)) for f in range(16)]
    single = [(xy[:3], probs(heights[:3], rng))]
    odd = 'a, "b"\nc.tif'
    tables = {}
    for name in ("plain.tif", odd):
        plan = write_run(tmp_path / str(len(tables)), {name: movie, name + ".png": single})
        write_tracks(tmp_path / str(len(tables)), plan)
        tables[name] = read_csv(tmp_path / str(len(tables)) / "columns.csv")
    assert [r["source"] for r in tables[odd]] == [odd] * 144 + [odd + ".png"] * 3
    assert [list(r.values())[1:] for r in tables[odd]] == [
        list(r.values())[1:] for r in tables["plain.tif"]]
    assert {r["track_height"] for r in tables[odd][:144]} >= {str(heights[4] + 1)}


def test_probability_log_is_cut_back_on_resume(tmp_path):
    from ceriakeras.analysis.tracking import LOG_NAME, ProbabilityLog

    log = ProbabilityLog(tmp_path, 0)
    for g in range(5):
        log.add(g, np.full((g + 1, 16), g, np.float32))
    log.file.write(b"\x01\x02")  # half a block: a run killed while writing
    log.close()
    resumed = ProbabilityLog(tmp_path, 3)
    resumed.add(3, np.full((2, 16), 9, np.float32))
    resumed.close()
    from ceriakeras.analysis.tracking import read_probability_log

    blocks = list(read_probability_log(tmp_path / LOG_NAME))
    assert [g for g, _ in blocks] == [0, 1, 2, 3]
    assert blocks[3][1].shape == (2, 16) and blocks[3][1][0, 0] == 9


def test_the_series_plot_shows_tracks_and_events(tmp_path):
    from ceriakeras.analysis.track_pictures import write_track_series_plots
    from ceriakeras.analysis.tracking import write_tracks

    rng = np.random.default_rng(9)
    xy, heights = lattice(3), rng.integers(2, 8, 9)
    movie = [(xy, probs(np.where(np.arange(9) == 4, heights + (f >= 6), heights), rng))
             for f in range(12)]
    plan = write_run(tmp_path / "out", {"movie.tif": movie})
    write_tracks(tmp_path / "out", plan)
    assert write_track_series_plots(tmp_path / "out", plan, ["movie"], 16) == 1
    assert (tmp_path / "out" / "movie_series.png").stat().st_size > 5000


def test_the_movie_labels_columns_with_their_track_height(tmp_path):
    from ceriakeras.analysis.tracking import movie_track_heights, write_tracks

    rng = np.random.default_rng(10)
    xy, heights = lattice(3), rng.integers(2, 8, 9)
    movie = [(xy, probs(heights, rng, noise=0.6)) for _ in range(12)]
    plan = write_run(tmp_path / "out", {"movie.tif": movie})
    write_tracks(tmp_path / "out", plan)
    rows = read_csv(tmp_path / "out" / "columns.csv")
    positions = {"movie.tif": {f: (np.zeros(9), np.zeros(9), np.array(
        [int(r["height"]) for r in rows if r["frame"] == str(f)])) for f in range(12)}}
    labelled = movie_track_heights(tmp_path / "out", positions)
    assert [h.tolist() for *_, h in labelled["movie.tif"].values()] == [heights.tolist()] * 12


def test_xyz_gives_one_model_per_stretch_of_the_particle(tmp_path):
    import ase.io

    from ceriakeras.analysis.track_pictures import write_stretch_models
    from ceriakeras.analysis.tracking import write_tracks

    rng = np.random.default_rng(11)
    xy, heights = lattice(3), rng.integers(2, 8, 9)
    movie = [(xy, probs(np.where(np.arange(9) == 4, heights + (f >= 8), heights), rng))
             for f in range(16)]
    plan = write_run(tmp_path / "out", {"movie.tif": movie})
    plan[0].update(shape=[300, 300], pixel_size_A=0.1)
    write_tracks(tmp_path / "out", plan)
    assert write_stretch_models(tmp_path / "out", plan, ["movie"], 16) == 2
    before = ase.io.read(tmp_path / "out" / "xyz" / "movie_frames_00000-00007.xyz")
    after = ase.io.read(tmp_path / "out" / "xyz" / "movie_frames_00008-00015.xyz")
    assert (len(before), len(after)) == (heights.sum(), heights.sum() + 1)
    assert (after.info["first_frame"], after.info["last_frame"]) == (8, 15)


def test_cli_options_for_tracks():
    from click.testing import CliRunner

    from ceriakeras.cli.main import main

    help_text = CliRunner().invoke(main, ["analyze", "--help"]).output
    assert "--no-tracks" in help_text and "--min-stretch" in help_text
    assert "--stack-frames" in help_text
    bad = CliRunner().invoke(main, ["analyze", "x.tif", "--out", "o", "--min-stretch", "0"])
    assert bad.exit_code == 2 and "--min-stretch" in bad.output
    bad = CliRunner().invoke(main, ["analyze", "x.tif", "--out", "o", "--stack-frames", "-1"])
    assert bad.exit_code == 2 and "--stack-frames" in bad.output


def test_the_movie_points_out_each_change_where_and_when_it_happens(tmp_path):
    from ceriakeras.analysis.tracking import EVENT_NOTE_FRAMES, event_marks, write_tracks

    rng = np.random.default_rng(12)
    xy, heights = lattice(3), rng.integers(2, 8, 9)
    movie = [(xy, probs(np.where(np.arange(9) == 4, heights + (f >= 8), heights), rng))
             for f in range(16)]
    plan = write_run(tmp_path / "out", {"movie.tif": movie})
    write_tracks(tmp_path / "out", plan)
    marks = event_marks(tmp_path / "out", "movie.tif")
    assert sorted(marks) == list(range(8, 8 + EVENT_NOTE_FRAMES))
    (x, y, text), = marks[8]
    assert text == f"{heights[4]}→{heights[4] + 1}"
    assert np.hypot(x - xy[4, 0] * 10, y - xy[4, 1] * 10) < 1.0  # input pixels (0.1 Å)
    assert event_marks(tmp_path / "out", "other.tif") == {}
    # with the pixel size, a mark follows the drift from the change's frame on
    rows = [["source", "frame", "drift_x_A", "drift_y_A"]] + [
        ["movie.tif", f, 0.25 * f, -0.1 * f] for f in range(16)]
    (tmp_path / "out" / "tracking" / "drift.csv").write_text(
        "".join(",".join(map(str, r)) + "\n" for r in rows))
    moving = event_marks(tmp_path / "out", "movie.tif", 0.1)
    for f in range(8, 8 + EVENT_NOTE_FRAMES):
        (mx, my, _), = moving[f]
        assert (mx - x, my - y) == pytest.approx((2.5 * (f - 8), -1.0 * (f - 8)))


def test_bench_tracks_redoes_the_stage_offline_and_finds_the_same_bytes(tmp_path, capsys):
    import sys
    from pathlib import Path

    from ceriakeras.analysis.tracking import add_drift_columns, write_tracks

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "benchmarks"))
    import bench_tracks

    rng = np.random.default_rng(10)
    xy, heights = lattice(3), rng.integers(2, 8, 9)
    movie = [(xy + [0.05 * f, 0.0], probs(np.where(np.arange(9) == 4, heights + (f >= 8),
                                                   heights), rng)) for f in range(16)]
    plan = write_run(tmp_path / "out", {"movie.tif": movie})
    write_tracks(tmp_path / "out", plan)
    add_drift_columns(tmp_path / "out")
    (tmp_path / "out" / "summary.json").write_text(json.dumps(
        {"inputs": [{"source": "movie.tif", "frames": 16}]}))
    assert bench_tracks.main([str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                              "--compare", "--no-rings"]) == 0
    assert "16 frames" in capsys.readouterr().out
    (tmp_path / "out" / "events.csv").write_text("changed\n")
    assert bench_tracks.main([str(tmp_path / "out"), "--work", str(tmp_path / "w"),
                              "--compare", "--no-rings"]) == 1


def test_the_series_plot_grid_is_aggregated_in_arrays_as_the_rows_say(tmp_path):
    """track_grid (arrays, no row kept) gives the grid the plot drew from per-row dicts: tracks
    seen in ≥ 3 frames by first frame then first row, heights per frame (0: not seen), total Ce
    per frame (those tracks carried through the frames they were missed in)."""
    from collections import defaultdict

    from ceriakeras.analysis.track_pictures import MIN_TRACK_FRAMES, track_grid

    rng = np.random.default_rng(11)
    n = 40
    rows = [(int(t), f, int(rng.integers(1, 9))) for f in range(n) if f % 7 != 3
            for t in rng.choice(30, size=rng.integers(0, 12), replace=False)]
    rows += [(99, 5, 2), (99, 9, 3)]  # a short track: in the total, not in the grid
    heights, total = defaultdict(dict), defaultdict(int)  # the dicts it replaces
    for t, f, h in rows:
        heights[t][f] = h
        total[f] += h
    tracks = sorted((t for t, fs in heights.items() if len(fs) >= MIN_TRACK_FRAMES),
                    key=lambda t: min(heights[t]))
    for t in tracks:  # a track missed between two sightings counts at its last height
        seen = sorted(heights[t])
        for a, b in zip(seen[:-1], seen[1:]):
            for f in range(a + 1, b):
                total[f] += heights[t][a]
    expected = np.zeros((len(tracks), n), np.uint16)
    for k, t in enumerate(tracks):
        for f, h in heights[t].items():
            expected[k, f] = h
    got_tracks, grid, ce = track_grid(*np.array(rows).T, n)
    assert got_tracks.tolist() == tracks and 0 < len(tracks) < len(heights)
    np.testing.assert_array_equal(grid, expected)
    np.testing.assert_array_equal(ce, [total.get(f, np.nan) for f in range(n)])
    empty_tracks, empty_grid, empty_ce = track_grid([], [], [], 5)
    assert empty_tracks.size == 0 and empty_grid.shape == (0, 5) and np.isnan(empty_ce).all()


def test_untracked_copy_leaves_what_the_tracks_stage_finds(tmp_path):
    from ceriakeras.analysis.offline import untracked_copy
    from ceriakeras.analysis.tracking import (DRIFT_COLUMNS, TRACK_COLUMNS, add_drift_columns,
                                              write_tracks)

    rng = np.random.default_rng(11)
    xy, heights = lattice(3), rng.integers(2, 8, 9)
    plan = write_run(tmp_path / "out", {"movie.tif": [(xy, probs(heights, rng)) for _ in range(6)]})
    write_tracks(tmp_path / "out", plan)
    add_drift_columns(tmp_path / "out")
    (tmp_path / "out" / "summary.json").write_text(json.dumps(
        {"inputs": [{"source": "movie.tif", "frames": 6, "pixel_size_A": 0.1,
                     "counts_per_electron": 2.0}]}))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "stale.csv").write_text("old\n")
    assert untracked_copy(tmp_path / "out", tmp_path / "w") == [
        {"source": "movie.tif", "n_frames": 6, "path": "movie.tif", "pixel_size_A": 0.1,
         "counts_per_electron": 2.0, "dose_e_per_A2": None}]  # frames.csv without doses
    assert not (tmp_path / "w" / "stale.csv").exists()
    with pytest.raises(ValueError, match="another folder"):
        untracked_copy(tmp_path / "out", tmp_path / "out" / "copy")
    assert (tmp_path / "out" / "columns.csv").is_file()
    rows, tracked = read_csv(tmp_path / "w" / "columns.csv"), read_csv(tmp_path / "out" / "columns.csv")
    assert list(rows[0]) == list(tracked[0]) and len(rows) == len(tracked) == 54
    assert all(r[c] == "" for r in rows for c in TRACK_COLUMNS)
    assert all(r[c] != "" for r in tracked for c in TRACK_COLUMNS)
    assert not set(DRIFT_COLUMNS) & set(read_csv(tmp_path / "w" / "frames.csv")[0])
    assert set(DRIFT_COLUMNS) <= set(read_csv(tmp_path / "out" / "frames.csv")[0])

def test_epochs_are_cut_where_stretches_start_and_split_evenly():
    s = StackSettings(max_frames=10, min_frames=3)
    assert epochs(48, [16, 32], s) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 48)]
    assert epochs(20, [2, 0, 20, 99], s) == [(2, 11), (11, 20)]  # [0, 2) too short to read
    assert epochs(5, [], s) == [(0, 5)]
    assert epochs(48, [16], StackSettings(max_frames=0)) == []


def test_shift_back_moves_the_content_and_fills_with_the_mean():
    image = np.ones((6, 7))
    image[2, 3] = 43.0  # mean 2
    moved = shift_back(image, 2, -1)  # content at x − 2, y + 1
    assert moved[3, 1] == 43.0 and moved[0, 0] == 2.0 and moved[3, 6] == 2.0  # strips in: mean
    assert np.array_equal(moved[1:, :5], image[:5, 2:])  # the rest: moved, not changed
    assert np.array_equal(shift_back(image, 0, 0), image)
    assert np.array_equal(shift_back(image, 7, 0), np.full((6, 7), 2.0))  # out of the field


def test_aligned_sums_take_the_drift_out_in_whole_pixels():
    frames, drift = [], {}
    for t in range(8):
        image = np.zeros((20, 20))
        image[5 + t // 2, 4 + t] = 1.0  # a spot drifting 1 px a frame in x, ½ in y
        frames.append((t, image))
        drift[t] = (float(t), t / 2)
    drift.pop(6)  # a frame without a drift (no columns found): left out
    frames[7] = (7, None)  # a frame that could not be read: left out
    out = list(aligned_sums(iter(frames), [(0, 4), (4, 8)], drift))
    assert [(span, n) for span, _, n in out] == [((0, 4), 4), ((4, 8), 2)]
    first, second = out[0][1], out[1][1]
    assert first[5, 4] >= 3 and first[4:7, 4].sum() == 4  # round(½), round(1½): y 5 or 6
    assert second[4:7, 4].sum() == 2  # frames 4 and 5 only


def test_restack_reads_heights_from_the_sums_in_the_direction_of_the_change():
    settings = TrackSettings()
    lp = np.log(np.full(K, 1e-3) + np.eye(K)[2])  # the frames say 3 atoms
    runs = {7: [{"first": 0, "last": 15, "frames": 16, "x_A": 5.0, "y_A": 5.0,
                 "sum": (16 * lp).tolist(), "mean": 3.0, "height_index": 2,
                 "evidence": [0.0] * 7, "confidence": 0.5},
                {"first": 16, "last": 31, "frames": 16, "x_A": 5.3, "y_A": 5.0,
                 "sum": (16 * np.log(np.full(K, 1e-3) + np.eye(K)[3])).tolist(), "mean": 3.6,
                 "height_index": 3, "evidence": [0.0] * 7, "confidence": 0.5}]}
    spans = [(0, 16), (16, 32)]
    hot = lambda h: np.full((1, K), 1e-3) + np.eye(K)[h - 1]  # noqa: E731
    far = np.array([[20.0, 20.0]])
    # the sums say 4 then 5 atoms; the second stretch's column drifted by 0.3 Å
    readings = [(np.array([[5.0, 5.0]]), hot(4)),
                (np.concatenate([[[5.0, 5.0]], far]), np.concatenate([hot(5), hot(1)]))]
    assert restack(runs, spans, readings, {0: (0.0, 0.0), 16: (0.3, 0.0)}, StackSettings(),
                   settings) == 2
    first, second = runs[7]
    assert (first["height_index"], second["height_index"]) == (3, 4)
    assert first["stacked"] == second["stacked"] == 16
    assert first["confidence"] > 0.9 and first["evidence"][6] > 3  # the sums agree: sure
    # a sum that reads the same height on both sides cannot undo the frames' change upwards
    runs[7][1]["height_index"] = 3
    same = [readings[0], (np.array([[5.0, 5.0]]), hot(4))]
    restack(runs, spans, same, {0: (0.0, 0.0), 16: (0.3, 0.0)}, StackSettings(), settings)
    assert runs[7][1]["height_index"] > runs[7][0]["height_index"]
    # nothing within max_distance_A: the frames' heights stay, not read
    lone = {1: [dict(runs[7][0], x_A=50.0, height_index=2)]}
    assert restack(lone, spans, readings, {0: (0.0, 0.0)}, StackSettings(), settings) == 0
    assert lone[1][0]["height_index"] == 2


def test_write_tracks_with_a_stack_reader_reads_the_misread_column_right(tmp_path):
    """Every frame misreads column 4 one atom low (as the model does at low dose); the sums of
    frames read it right: its track height follows the sums, the others stay."""
    from ceriakeras.analysis.tracking import write_tracks

    rng = np.random.default_rng(3)
    xy, heights = lattice(), rng.integers(2, 8, 25)
    seen = heights - (np.arange(25) == 4)
    movie = [(xy + [0.1 * f, 0.0], probs(seen, rng)) for f in range(20)]
    plan = write_run(tmp_path / "out", {"movie.tif": movie})
    calls = []

    def reader(item, spans, drift_A):
        calls.append((item["source"], spans, drift_A))
        frames = ((t, np.zeros((40, 40))) for t in range(20))
        return stack_readings(frames, spans, drift_A, 0.1, lambda image: {
            "x_px": xy[:, 0] / 0.1, "y_px": xy[:, 1] / 0.1,
            "class_probabilities": np.full((25, K), 1e-3) + np.eye(K)[heights - 1]})

    counts = write_tracks(tmp_path / "out", plan, stack_reader=reader,
                          stack=StackSettings(max_frames=8))
    assert counts["stacked"] == 25 and counts["events"] == 0
    (source, spans, drift_A), = calls
    assert source == "movie.tif" and spans == [(0, 7), (7, 13), (13, 20)]
    assert abs(drift_A[19][0] - 1.9) < 0.05
    rows = read_csv(tmp_path / "out" / "columns.csv")
    assert all(r["track_height"] == str(heights[i % 25]) for i, r in enumerate(rows))
    frames_say = [r["height"] for i, r in enumerate(rows) if i % 25 == 4]
    assert max(set(frames_say), key=frames_say.count) == str(seen[4])  # the frames: one low


def test_settle_parts_keeps_the_last_stretch_open_and_folds_its_old_frames():
    units = list(range(30))

    def fold(a, b):
        return ("folded", a, b)

    done, rest = settle_parts(units, [(0, 5), (5, 30)], False, 16, fold)
    assert done == [("folded", 0, 5)]
    assert rest == [("folded", 5, 22)] + list(range(22, 30))  # the last 8 (window // 2) stay
    assert settle_parts(units, [(0, 5), (5, 12)], False, 16, fold)[1] == list(range(5, 12))
    assert settle_parts(units, [(0, 5), (5, 30)], True, 16, fold) == (
        [("folded", 0, 5), ("folded", 5, 30)], [])
