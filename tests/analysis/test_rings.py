"""Change detection from a column's own pixels (analysis/rings.py): ring counts, their Poisson
statistic, and the tracker that adds them to the model's readings (synthetic frames, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ceriakeras.analysis.changepoints import change_statistic, ring_dispersion, ring_gain
from ceriakeras.analysis.rings import RINGS_A, DoseLevel, RingLevel, ring_counts
from ceriakeras.analysis.tracks import Tracker, TrackSettings
from test_tracks import events, lattice, probs, read_csv, write_run

PX = 0.1  # Å per pixel


def image(xy_A, amplitude, rng, background=2.0, sigma_A=0.4, side=300) -> np.ndarray:
    """A Poisson frame, electrons per pixel: ``background`` with a Gaussian bump of relative
    height ``amplitude`` per column."""
    yy, xx = np.mgrid[:side, :side] * PX
    mean = np.ones((side, side))
    for (x, y), a in zip(xy_A, amplitude):
        mean += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma_A**2))
    return rng.poisson(background * mean).astype(np.uint16)


def movie(seed=0, n=40, change_at=20, changed=4, gain=1):
    """Frames of 9 columns whose model readings barely move (+0.2 atoms on column ``changed``
    from ``change_at``) while its image changes clearly (bump 0.5 → 0.9)."""
    rng = np.random.default_rng(seed)
    xy = lattice(3)
    out = []
    for f in range(n):
        after = (np.arange(9) == changed) & (f >= change_at)
        amp = np.where(after, 0.9, 0.5)
        out.append((xy, probs(3.0 + 0.2 * after, rng), gain * image(xy, amp, rng)))
    return out


def run(frames, settings=None, with_images=True, gain=1.0):
    tracker = Tracker(settings or TrackSettings())
    ids = []
    for f, (xy, p, img) in enumerate(frames):
        i, _ = tracker.add_frame(f, xy, p, xy / PX, None, img if with_images else None, PX, gain)
        ids.append(i)
    tracker.finish()
    return ids, tracker.pop_stretches()


def brute_force(img, x, y, edges=RINGS_A):
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    d = np.hypot(xx - x, yy - y) * PX
    return np.array([img[(d >= a) & (d < b)].sum() for a, b in zip(edges[:-1], edges[1:])])


def test_ring_counts_are_the_electrons_in_each_ring():
    rng = np.random.default_rng(1)
    img = rng.poisson(5.0, (80, 80)).astype(np.uint16)
    xy = np.array([[40.0, 40.0], [33.37, 45.81], [47.5, 31.25]])
    got = ring_counts(img, xy, PX)
    want = np.array([brute_force(img, x, y) for x, y in xy])
    assert got.shape == (3, len(RINGS_A) - 1)
    # the centre is placed to 1/8 pixel: only pixels at a ring's edge may change ring
    assert np.all(np.abs(got - want) <= 0.03 * want + 15)
    assert np.array_equal(got[0], want[0])  # on a pixel centre: exact
    # a flat frame: each ring holds its pixels' electrons (close to its area); counts per
    # electron divide
    flat = ring_counts(np.full((80, 80), 6.0), xy[:1], PX, counts_per_electron=2.0)[0]
    assert np.array_equal(flat / 3.0, brute_force(np.ones((80, 80)), 40.0, 40.0))
    area = np.pi * np.diff(np.square(RINGS_A)) / PX**2
    assert np.allclose(flat / 3.0, area, rtol=0.12)


def test_ring_counts_leave_out_columns_whose_rings_leave_the_frame():
    img = np.ones((60, 60))
    got = ring_counts(img, np.array([[2.0, 30.0], [30.0, 58.5], [np.nan, 3.0], [30.0, 30.0]]), PX)
    assert np.isnan(got[:3]).all() and np.isfinite(got[3]).all()
    assert ring_counts(img, np.zeros((0, 2)), PX).shape == (0, len(RINGS_A) - 1)


def test_ring_statistic_is_the_poisson_likelihood_ratio_of_two_stretches():
    a, b = np.array([1000.0, 2000.0]), np.array([1200.0, 2000.0])
    both = a + b
    want = sum(s * np.log(s / 10) - s for s in (*a, *b)) - sum(s * np.log(s / 20) - s
                                                             for s in both)
    assert ring_gain(a, 10) + ring_gain(b, 10) - ring_gain(both, 20) == pytest.approx(want)
    assert want > 9  # 200 more electrons in ring 0 over 10 frames: ≈ 4.3 sd
    unit = {"sum": np.zeros(16), "s1": 30.0, "s2": 90.0, "n": 10}
    stat = change_statistic("mean_shift", {**unit, "rings": a, "ni": 10},
                            {**unit, "rings": b, "ni": 10}, temper=0.3, variance=0.1,
                            ring_weight=0.5)
    assert stat == pytest.approx(0.5 * want)
    same = change_statistic("mean_shift", {**unit, "rings": a, "ni": 10},
                            {**unit, "rings": a, "ni": 10}, temper=0.3, variance=0.1,
                            ring_weight=1.0)
    assert same == pytest.approx(0.0, abs=1e-9)
    assert ring_gain(np.zeros(3), 0) == 0.0  # a stretch never counted adds nothing


def test_ring_dispersion_is_one_for_poisson_counts_and_more_for_extra_scatter():
    rng = np.random.default_rng(2)
    poisson = rng.poisson(400.0, (200, 4))
    assert 1.0 <= ring_dispersion(poisson) < 1.15
    jitter = rng.poisson(400.0 * rng.gamma(25.0, 1 / 25.0, (200, 1)), (200, 4))  # ±20 %
    assert ring_dispersion(jitter) > 5
    assert ring_dispersion(poisson[:2]) == 1.0


def test_a_change_the_model_barely_sees_is_found_in_the_rings():
    frames = movie()
    ids, stretches = run(frames)
    assert events(stretches) == [(int(ids[0][4]), 20)]
    change = next(s for s in stretches if s["change_probability"] is not None)
    assert change["change_probability"] > 0.5
    before = [s for s in stretches if s["track"] == int(ids[0][4])]
    assert before[1]["height_index"] > before[0]["height_index"]  # the way the model moved
    _, without = run(frames, with_images=False)
    assert events(without) == []  # the model's readings alone: too weak


def test_a_change_of_the_model_readings_alone_is_not_kept():
    """The model reads column 4 one atom higher from frame 20 (as a neighbour's change can make
    it), but its pixels do not change: ``ring_confirm`` merges the change away; where the pixels
    change too, it stays."""
    rng = np.random.default_rng(5)
    xy = lattice(3)
    frames = []
    for f in range(40):
        after = (np.arange(9) == 4) & (f >= 20)
        frames.append((xy, probs(3.0 + after, rng), image(xy, np.full(9, 0.5), rng)))
    ids, stretches = run(frames, TrackSettings(ring_confirm=0.0))
    assert events(stretches) == [(int(ids[0][4]), 20)]  # the model's shift alone splits it
    ids, stretches = run(frames)
    assert events(stretches) == []
    mine = [s for s in stretches if s["track"] == int(ids[0][4])]
    assert [(s["first"], s["last"]) for s in mine] == [(0, 39)]
    real = [(xy, p, image(xy, np.where((np.arange(9) == 4) & (f >= 20), 0.9, 0.5), rng))
            for f, (xy, p, _) in enumerate(frames)]
    ids, stretches = run(real)
    assert events(stretches) == [(int(ids[0][4]), 20)]


def test_the_rings_after_a_column_is_lost_count_for_its_last_stretch():
    """Column 4's image changes at frame 30 (bump 0.5 → 0.8; the model's reading +0.2 atoms)
    and the model finds it in 6 frames more only: the 9 frames after those, until its track
    closes, carry most of the evidence (8 seeds; the same without their images)."""
    found, without = 0, 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        xy, frames = lattice(3), []
        for f in range(45):
            after = (np.arange(9) == 4) & (f >= 30)
            p, img = probs(3.0 + 0.2 * after, rng), image(xy, np.where(after, 0.8, 0.5), rng)
            lost = f >= 36  # the model no longer finds column 4
            frames.append((np.delete(xy, 4, 0), np.delete(p, 4, 0), img) if lost else (xy, p, img))
        ids, stretches = run(frames)
        assert [s["last"] for s in stretches if s["track"] == int(ids[0][4])][-1] == 44
        found += events(stretches) == [(int(ids[0][4]), 30)]
        blind = [(x, p, None if f >= 36 else img) for f, (x, p, img) in enumerate(frames)]
        _, stretches = run(blind)
        without += len(events(stretches)) > 0
    assert found >= 7 and without <= 4


def test_a_static_series_with_images_reports_no_event():
    for seed in (3, 4):
        _, stretches = run(movie(seed, change_at=10**6))
        assert events(stretches) == []


def test_counts_per_electron_converts_the_frames():
    one = movie(5)
    two = [(xy, p, 2 * img) for xy, p, img in one]
    assert run(one)[1] == run(two, gain=2.0)[1]


def test_a_lost_column_is_still_counted_where_its_track_is():
    frames = movie(6, change_at=10**6)
    tracker = Tracker(TrackSettings())
    for f, (xy, p, img) in enumerate(frames[:12]):
        keep = np.ones(9, bool)
        if 5 <= f < 8:
            keep[4] = False
        tracker.add_frame(f, xy[keep], p[keep], xy[keep] / PX, None, img, PX)
    track = next(t for t in tracker.tracks if abs(t["ref"][0] - 13.9) < 0.5
                 and abs(t["ref"][1] - 13.9) < 0.5)
    assert [u["ni"] for u in track["units"][:4]] == [0, 0, 0, 1]  # its centre settles first
    lost = [u for u in track["units"] if 5 <= u["first"] < 8]
    assert [u["n"] for u in lost] == [0, 0, 0] and [u["ni"] for u in lost] == [1, 1, 1]
    found = np.mean([u["rings"] for u in track["units"] if u["n"] and u["ni"]], axis=0)
    assert np.allclose(np.mean([u["rings"] for u in lost], axis=0), found, rtol=0.25)


def test_resume_with_ring_counts_gives_the_same_stretches():
    frames = movie(7, n=30, change_at=14)
    settings = TrackSettings(window=20)
    whole = Tracker(settings)
    for f, (xy, p, img) in enumerate(frames):
        whole.add_frame(f, xy, p, xy / PX, None, img, PX)
    whole.finish()
    first = Tracker(settings)
    for f, (xy, p, img) in enumerate(frames[:13]):
        first.add_frame(f, xy, p, xy / PX, None, img, PX)
    second = Tracker.from_state(json.loads(json.dumps(first.state())))
    for f, (xy, p, img) in enumerate(frames[13:], 13):
        second.add_frame(f, xy, p, xy / PX, None, img, PX)
    second.finish()
    assert first.pop_stretches() + second.pop_stretches() == whole.pop_stretches()


def test_write_tracks_reads_the_frames_for_the_rings(tmp_path):
    from ceriakeras.analysis.tracking import write_tracks

    frames = movie(8)
    plan = write_run(tmp_path / "out", {"movie.tif": [(xy, p) for xy, p, _ in frames]})
    plan = [{**item, "pixel_size_A": PX, "counts_per_electron": 2.0} for item in plan]
    read = []

    def frame_reader(item):
        read.append(item["source"])
        return ((f, 2 * img) for f, (_, _, img) in enumerate(frames))

    assert write_tracks(tmp_path / "out", plan, frame_reader=frame_reader)["events"] == 1
    assert read == ["movie.tif"] * 2  # the tracks' rings, then the sites' (no stacks to share)
    event = read_csv(tmp_path / "out" / "events.csv")[0]
    assert (event["frame"], event["height_before"], event["height_after"]) == ("20", "3", "4")
    assert write_tracks(tmp_path / "out", plan)["events"] == 0  # without the frames


def test_a_bright_series_whose_drift_wanders_reports_no_event():
    """At 2000 e⁻/Å² a frame the rings hold ~10⁴ electrons: the drift estimate's wander of a few
    thousandths of an Å moves them by more than their shot noise; the floor for errors that do
    not average out (``ring_systematic``) keeps that from reading as changes."""
    rng = np.random.default_rng(9)
    xy = lattice(3)
    wander = np.cumsum(rng.normal(0, 0.004, (60, 2)), axis=0)
    frames = []
    for f in range(60):
        truth = xy + wander[f]
        frames.append((truth + rng.normal(0, 0.01, xy.shape), probs(np.full(9, 3.0), rng),
                       image(truth, np.full(9, 0.5), rng, background=20.0)))
    _, stretches = run(frames)
    assert events(stretches) == []
    _, bare = run(frames, TrackSettings(ring_systematic=0.0))
    assert len(events(bare)) > 0  # without the floor, the wander reads as changes


@pytest.mark.parametrize("bad", [{"ring_weight": -1.0}, {"ring_systematic": -0.1},
                                 {"ring_after": -1}, {"ring_memory": 1.0},
                                 {"ring_confirm": -1.0}])
def test_ring_settings_are_checked(bad):
    from ceriakeras.config import ConfigError

    with pytest.raises(ConfigError, match="ring_"):
        Tracker(TrackSettings(**bad))


def test_a_series_that_cannot_be_read_again_keeps_the_models_readings(tmp_path):
    """The file moved between the frames' pass and the tracks stage: the tracks, heights and
    events come from the model's readings alone, and the result says why."""
    from ceriakeras.analysis.tables import format_summary
    from ceriakeras.analysis.tracking import write_tracks
    from ceriakeras.config import InputError

    frames = movie(10)
    plan = write_run(tmp_path / "out", {"movie.tif": [(xy, p) for xy, p, _ in frames]})
    plan = [{**item, "pixel_size_A": PX, "counts_per_electron": 1.0} for item in plan]

    def gone(*_):
        raise InputError("movie.tif does not exist")

    def frames_gone(item):
        yield from gone()

    done = write_tracks(tmp_path / "out", plan, frame_reader=frames_gone, stack_reader=gone)
    assert list(done["unread"]) == ["movie.tif"] and "does not exist" in done["unread"]["movie.tif"]
    alone = (tmp_path / "out" / "columns.csv").read_bytes()
    assert write_tracks(tmp_path / "out", plan)["unread"] == {}
    assert (tmp_path / "out" / "columns.csv").read_bytes() == alone  # as without the frames
    assert len(read_csv(tmp_path / "out" / "columns.csv")) == 9 * len(frames)
    summary = {"frames_analysed": 40, "frames_total": 40, "frames_skipped": 0,
               "resumed_at_frame": 0, "columns_per_frame": 9.0, "mean_height": 3.0,
               "frames_per_second": 1.0, "frames_analysed_now": 40, "out_dir": "out",
               "skipped": [], "inputs": [{"source": "movie.tif", "tracks_warning": "read alone"}]}
    assert "warning         movie.tif: read alone" in format_summary(summary)


def test_an_unreadable_series_is_named_and_the_next_one_still_read(tmp_path):
    from ceriakeras.analysis.tracking import write_tracks
    from ceriakeras.config import InputError

    frames = movie(11)
    tables = [(xy, p) for xy, p, _ in frames]
    plan = write_run(tmp_path / "out", {"gone.tif": tables, "here.tif": tables})
    plan = [{**item, "pixel_size_A": PX, "counts_per_electron": 1.0} for item in plan]

    def frame_reader(item):
        if item["source"] == "gone.tif":
            raise InputError("gone.tif does not exist")
        yield from ((f, img) for f, (_, _, img) in enumerate(frames))

    done = write_tracks(tmp_path / "out", plan, frame_reader=frame_reader)
    assert list(done["unread"]) == ["gone.tif"]
    assert done["events"] == 1  # here.tif's change, found in its rings


def test_ring_counts_at_coarse_pixels_leave_an_empty_ring_empty():
    """At 1 Å per pixel the 0.4 Å disk holds a pixel or none, as the centre falls: a ring
    without pixels counts 0 electrons (not its neighbour's)."""
    rng = np.random.default_rng(2)
    img = rng.poisson(50.0, (40, 40)).astype(np.uint16)
    xy = np.array([[20.0, 20.0], [20.5, 20.5], [19.6, 20.3], [21.25, 18.75]])
    got = ring_counts(img, xy, 1.0)
    yy, xx = np.mgrid[:40, :40]
    for (x, y), row in zip(xy, got):
        # where the table puts the centre (to 1/8 pixel), as brute force counts it
        cx, cy = (np.rint(v) + np.rint((v - np.rint(v)) * 8) / 8 for v in (x, y))
        d = np.hypot(xx - cx, yy - cy) * 1.0
        want = [img[(d >= a) & (d < b)].sum() for a, b in zip(RINGS_A[:-1], RINGS_A[1:])]
        assert np.array_equal(row, want)
    assert (got[:, 0] == 0).any() and (got[:, 0] > 0).any()  # empty disks and full ones


def flickering(seed, n=40, fall=0.10, flicker=0.03):
    """A static lattice whose beam current falls by ``fall`` over the series and flickers by
    ``flicker`` from frame to frame (relative)."""
    rng = np.random.default_rng(seed)
    xy = lattice(3)
    level = (1 - fall * np.arange(n) / (n - 1)) * (1 + flicker * rng.standard_normal(n))
    return [(xy, probs(np.full(9, 3.0), rng),
             image(xy, np.full(9, 0.5), rng, background=2.0 * level[f])) for f in range(n)]


def test_dose_level_is_each_frames_dose_against_the_first():
    dose = DoseLevel()
    assert dose(np.full((8, 8), 4.0)) == 1.0 and dose(np.full((8, 8), 3.0)) == 0.75
    assert dose(np.zeros((8, 8))) == 1.0  # a frame without counts is left as it is
    assert DoseLevel(2.0)(np.full((8, 8), 3.0)) == 1.5  # resumed with the first frame's level
    assert DoseLevel()(np.zeros((8, 8))) == 1.0 and DoseLevel().first is None


def test_a_beam_that_fades_and_flickers_reports_no_event(monkeypatch):
    """The ring counts are taken against each frame's dose: a beam whose current falls by 10 %
    and flickers by 3 % moves every column's electrons at once, which is not a change."""
    import ceriakeras.analysis.tracks as tracks_module

    for seed in (1, 2):
        _, stretches = run(flickering(seed))
        assert events(stretches) == []

    class Fixed(DoseLevel):  # the counts taken as they come
        def __call__(self, image):
            return 1.0

    monkeypatch.setattr(tracks_module, "DoseLevel", Fixed)
    assert len(events(run(flickering(1))[1])) > 0


def test_the_tracker_takes_every_frames_dose_against_its_first_frame():
    """The dose is measured in every frame with an image, from the first on (the reference the
    sites take too, through :class:`.sites.Sightings`), before any track has settled."""
    rng = np.random.default_rng(0)
    xy = lattice(3)
    tracker = Tracker(TrackSettings())
    seen = []
    for f, scale in enumerate((1.0, 0.5, 2.0)):
        img = image(xy, np.full(9, 0.5), rng, background=200.0 * scale)
        tracker.add_frame(f, xy, probs(np.full(9, 3.0), rng), xy / PX, None, img, PX, 1.0)
        seen.append(tracker.frame_dose)
    assert seen[0] == 1.0 and seen[1] == pytest.approx(0.5, rel=0.02)
    assert seen[2] == pytest.approx(2.0, rel=0.02)
    tracker.add_frame(3, xy, probs(np.full(9, 3.0), rng), xy / PX, None, None, PX, 1.0)
    assert tracker.frame_dose == 1.0  # no image: no measurement


def focus_drift(seed, n=40, change_at=None):
    """16 columns whose bumps widen together (0.3 → 0.6 Å, as a drifting focus moves electrons
    between the rings of every column); column 5's bump grows from ``change_at``."""
    rng = np.random.default_rng(seed)
    xy = lattice(4)
    out = []
    for f in range(n):
        amp = np.full(16, 0.5)
        if change_at is not None and f >= change_at:
            amp[5] = 0.9
        out.append((xy, probs(np.full(16, 3.0), rng),
                    image(xy, amp, rng, background=8.0, sigma_A=0.3 + 0.3 * f / (n - 1))))
    return out


def test_ring_level_takes_out_what_all_columns_share():
    rng = np.random.default_rng(0)
    base = rng.uniform(50, 200, (20, 4))
    level = RingLevel(min_columns=12, settle=4, memory=0.0)
    for t in range(30):
        common = np.array([1 + 0.01 * t, 1 - 0.01 * t, 1.0, 1 + 0.005 * t])
        counts = base * common
        counts[3] *= 1.1 if t >= 15 else 1.0  # one column changes
        out, shared = level(np.arange(20), counts)
        if t >= 4:
            assert np.allclose(shared, common / [1.015, 0.985, 1.0, 1.0075], rtol=0.01)
    assert abs(out[3] / out[4] / (base[3] / base[4]) - 1.1).max() < 0.01  # its change stays
    assert np.allclose(out[4], base[4] * [1.015, 0.985, 1.0, 1.0075], rtol=0.01)
    level.forget([3])
    assert level.frames[3] == 0 and level.frames[4] == 30
    again = RingLevel().restore(level.state())
    assert np.array_equal(again.frames[:20], level.frames[:20]) and not again.frames[20:].any()
    assert np.allclose(again.sums[:20], level.sums[:20]) and np.array_equal(again.last, level.last)
    few = RingLevel(min_columns=12)
    assert np.array_equal(few(np.arange(5), base[:5])[1], np.ones(4))  # too few columns
    kept = level(np.arange(20, 25), base[:5] * 2)[1]  # too few now: the last level stays
    assert np.array_equal(kept, level.last) and not np.allclose(kept, 1.0)


def test_a_focus_that_drifts_reports_no_event_and_a_change_still_one():
    for seed in (1, 2):
        assert events(run(focus_drift(seed))[1]) == []
    assert len(events(run(focus_drift(1), TrackSettings(ring_level_columns=0))[1])) > 0
    found = events(run(focus_drift(3, change_at=20))[1])
    assert len(found) == 1 and abs(found[0][1] - 20) <= 2
