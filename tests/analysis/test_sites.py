"""Changes read at sites (analysis/sites.py): where a series' columns stand, the electrons around
each counted in every frame, found by the model or not (synthetic frames, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from ceriakeras.analysis.rings import DoseLevel
from ceriakeras.analysis.sites import (SiteChanges, Sightings, new_changes, sites_of,
                                      split_stretches)
from ceriakeras.analysis.tracks import TrackSettings
from test_rings import PX, image
from test_tracks import lattice, probs, read_csv, write_run

HEIGHTS = np.array([1, 2, 3, 4, 1, 2, 3, 4, 3])
"""Column heights, Ce atoms, of a 3 × 3 lattice; column 4 is the one that changes."""


def grows(seed=0, n=40, change_at=20, drift_A=0.03, grown=True):
    """Frames of the 3 × 3 lattice drifting by ``drift_A`` per frame; each column's bump grows
    with its height. Column 4 holds one atom, which the model never finds, until
    ``change_at``, when it grows to two (``grown``) and the model finds it from then on."""
    rng = np.random.default_rng(seed)
    out = []
    for f in range(n):
        h = HEIGHTS.copy()
        if grown and f >= change_at:
            h[4] = 2
        xy = lattice(3) + [drift_A * f, 0.5 * drift_A * f]
        keep = np.arange(9) != 4 if h[4] == 1 else np.ones(9, bool)
        out.append((xy[keep], probs(h[keep], rng), image(xy, 0.4 * h, rng)))
    return out


def analyse(tmp_path, frames, settings=None, reads=None, **more):
    """``write_tracks`` on ``frames`` (``more``: its other arguments); each read of the frames
    for the tracks is noted in ``reads``."""
    from ceriakeras.analysis.tracking import write_tracks

    plan = write_run(tmp_path / "out", {"movie.tif": [(xy, p) for xy, p, _ in frames]})
    plan = [{**item, "pixel_size_A": PX, "counts_per_electron": 1.0} for item in plan]

    def frame_reader(item):
        if reads is not None:
            reads.append("frames")
        return enumerate(img for *_, img in frames)

    done = write_tracks(tmp_path / "out", plan, settings, frame_reader=frame_reader, **more)
    return done, read_csv(tmp_path / "out" / "events.csv")


def test_sightings_are_mean_positions_without_drift():
    seen = Sightings()
    seen.add(np.array([0, 5]), np.array([[1.0, 2.0], [7.0, 7.0]]), np.zeros(2))
    seen.add(np.array([5, 0]), np.array([[8.0, 8.5], [2.0, 3.0]]), np.array([1.0, 1.0]))
    seen.add(np.array([5]), np.array([[9.0, 9.0]]), np.array([2.0, 2.0]))
    ids, xy, n = seen.centres(1)
    assert ids.tolist() == [0, 5] and n.tolist() == [2, 3]
    assert np.allclose(xy, [[1.0, 2.0], [7.0, 7.1666667]])
    assert seen.centres(3)[0].tolist() == [5]


def test_sites_merge_tracks_that_stand_at_one_place():
    centres = np.array([[10.0, 10.0], [10.3, 10.0], [12.0, 10.0], [10.0, 10.7]])
    xy, site = sites_of(centres, np.array([30.0, 10.0, 5.0, 1.0]), 0.6)
    assert site.tolist() == [0, 0, 1, 2]  # the best seen takes its neighbours within 0.6 Å
    assert np.allclose(xy[0], [10.075, 10.0]) and np.allclose(xy[1:], centres[2:])
    assert sites_of(np.zeros((0, 2)), np.zeros(0), 0.6)[0].shape == (0, 2)


def test_a_column_found_only_after_it_grew_is_a_change(tmp_path):
    done, rows = analyse(tmp_path, grows())
    assert done["events"] == len(rows) == 1
    event = rows[0]
    assert abs(int(event["frame"]) - 20) <= 2
    assert (event["height_before"], event["height_after"]) == ("1", "2")  # the way it grew
    x, y = lattice(3)[4] + np.array([0.03, 0.015]) * int(event["frame"])
    assert np.hypot(float(event["x_A"]) - x, float(event["y_A"]) - y) < 0.3  # where it is then
    assert 0.5 < float(event["probability"]) <= 1.0
    # the tracks alone cannot see it: the column's track starts at the change
    (tmp_path / "off").mkdir()
    _, alone = analyse(tmp_path / "off", grows(), TrackSettings(site_penalty=0))
    assert alone == []


def test_a_column_that_never_changes_gives_no_site_change(tmp_path):
    for seed in range(3):
        (tmp_path / str(seed)).mkdir()
        done, rows = analyse(tmp_path / str(seed), grows(seed, grown=False))
        assert rows == [] and done["events"] == 0


def test_a_long_series_gives_the_change_through_a_short_window():
    frames = grows(1, n=90, change_at=57)
    sites = lattice(3)
    drift = {f: np.array([0.03, 0.015]) * f for f in range(90)}
    found = []
    for window in (24, 128):
        changes = SiteChanges(sites, drift, PX, 1.0, TrackSettings(window=window, min_stretch=4))
        for f, (*_, img) in enumerate(frames):
            changes.add(f, img)
        if window == 24:  # folded as it went: each site keeps a bounded window of frames
            assert max(len(u) for u in changes.units) <= 24
        changes._settle(final=True)
        found.append([[d["first"] for d in done] for done in changes.done])
    for firsts in found:
        assert [k for k, f in enumerate(firsts) if len(f) > 1] == [4]  # only the one that grew
        assert len(firsts[4]) == 2 and abs(firsts[4][1] - 57) <= 2


def test_a_site_change_that_a_track_reported_is_not_reported_again():
    settings = TrackSettings()
    known = [("m.tif", 3, 20, "100.0", "100.0", "10.0000", "10.0000", 3, 4, "0.99")]

    def change(frame, x, stat):
        return (frame, 7, stat, ("m.tif", 7, frame, "0", "0", f"{x:.4f}", "10.0000", 1, 2, "0.9"))

    new = new_changes([change(22, 10.5, 30.0), change(30, 10.0, 20.0), change(31, 11.0, 25.0),
                       change(20, 13.0, 15.0)], known, settings)
    assert [(f, row[5]) for f, _, row in new] == [(31, "11.0000"), (20, "13.0000")]


def test_site_settings_are_checked():
    from ceriakeras.config import ConfigError

    for bad in ({"site_penalty": -1}, {"site_sightings": 0}, {"site_merge_A": 0.0},
                {"site_same_frames": -1}, {"site_coverage": 0.0}):
        with pytest.raises(ConfigError, match="site_"):
            TrackSettings(**bad).validate()


def test_the_sites_count_the_frames_the_stacks_read(tmp_path):
    """With summed frames, the sites count the frames of that read (no read of their own)."""
    from ceriakeras.analysis.stacking import StackSettings, stack_readings

    frames = grows(2)
    reads = []

    def stack_reader(item, spans, drift_A, on_frame=None):
        reads.append("stacks")

        def shown():
            for f, (*_, img) in enumerate(frames):
                on_frame(f, img)
                yield f, img
        return stack_readings(shown(), spans, drift_A, PX, lambda image: {
            "x_px": np.zeros(0), "y_px": np.zeros(0), "class_probabilities": np.zeros((0, 16))})

    done, rows = analyse(tmp_path, frames, reads=reads, stack_reader=stack_reader,
                         stack=StackSettings(max_frames=16))
    assert reads == ["frames", "stacks"] and done["events"] == 1
    event, = rows
    assert abs(int(event["frame"]) - 20) <= 2 and event["height_after"] == "2"


def test_a_site_change_whose_direction_nothing_tells_is_not_reported():
    """Two sites, one of which grows: where its track reads one height on both sides and too
    few sites make a contrast map, no event; where the track reads two, its direction."""
    frames = grows(0)
    drift = {f: np.array([0.03, 0.015]) * f for f in range(len(frames))}
    found = []
    for by_track in ({7: [{"first": 0, "last": 39, "height_index": 0}]},
                     {7: [{"first": 0, "last": 19, "height_index": 0},
                              {"first": 20, "last": 39, "height_index": 1}]}):
        changes = SiteChanges(lattice(3)[[4, 0]], drift, PX, 1.0, TrackSettings())
        for f, (*_, img) in enumerate(frames):
            changes.add(f, img)
        found.append(changes.events([[7], [8]], by_track, "movie.tif"))
    assert found[0] == []
    (frame, track, stat, row), = found[1]
    assert track == 7 and abs(frame - 20) <= 2 and row[7:9] == (1, 2) and stat > 12


def _run(first, last, h, confidence=0.8, p=None):
    return {"track": 7, "first": first, "last": last, "frames": last - first + 1,
            "height_index": h - 1, "confidence": confidence, "change_probability": p,
            "x_px": 1.0, "y_px": 1.0, "x_A": 0.1, "y_A": 0.1}


def _site_row(frame, before, after, p="0.7000"):
    return (frame, 7, ("m.tif", 7, frame, "50.000", "60.000", "5.0000", "6.0000", before, after, p))


def test_a_site_change_splits_the_stretch_of_its_track():
    by_track = {7: [_run(0, 29, 3), _run(30, 47, 4, p=0.9)]}
    rest = split_stretches(by_track, [_site_row(10, 2, 3), _site_row(40, 4, 5),
                                      _site_row(60, 4, 3)])
    assert [c[0] for c in rest] == [60]  # after the track's last stretch: left as it is
    runs = by_track[7]
    assert [(r["first"], r["last"], r["height_index"] + 1) for r in runs] == [
        (0, 9, 2), (10, 29, 3), (30, 39, 4), (40, 47, 5)]
    assert runs[0]["confidence"] == pytest.approx(0.8 * 0.7)  # right only if the change is real
    assert runs[1]["confidence"] == 0.8 and runs[1]["change_probability"] == 0.7
    assert runs[2]["change_probability"] == 0.9  # the track's own change stays
    assert (runs[3]["x_px"], runs[3]["y_A"]) == (50.0, 6.0)  # where the column is then
    assert sum(r["frames"] for r in runs) == 48


def test_a_site_change_that_would_turn_its_neighbours_is_not_split():
    for change in (_site_row(10, 3, 4), _site_row(10, 1, 2)):  # 4 → 4, or a 2 → 4 jump after
        by_track = {7: [_run(0, 29, 3), _run(30, 47, 4, p=0.9)]}
        assert len(split_stretches(by_track, [(20, *change[1:])])) == 1
        assert len(by_track[7]) == 2


def test_track_height_changes_where_a_site_change_is(tmp_path):
    """The model reads column 4 at one height throughout while its pixels grow at frame 20: the
    change comes from the site, and the track's height changes with it in columns.csv."""
    rng = np.random.default_rng(3)
    frames = []
    for f in range(40):
        h = HEIGHTS.copy()
        h[4] = 2 if f >= 20 else 1
        xy = lattice(3) + [0.03 * f, 0.015 * f]
        frames.append((xy, probs(HEIGHTS, rng), image(xy, 0.4 * h, rng)))
    settings = TrackSettings(ring_confirm=1e3, site_coverage=2.0)  # no change of the tracks
    done, rows = analyse(tmp_path, frames, settings)
    event, = rows
    frame = int(event["frame"])
    assert abs(frame - 20) <= 2 and int(event["height_after"]) > int(event["height_before"]) >= 1
    columns = [r for r in read_csv(tmp_path / "out" / "columns.csv") if r["track"] == event["track"]]
    by_frame = {int(r["frame"]): r["track_height"] for r in columns}
    assert {by_frame[f] for f in by_frame if f < frame} == {event["height_before"]}
    assert {by_frame[f] for f in by_frame if f >= frame} == {event["height_after"]}
    assert len(columns) == 40


def test_a_beam_that_fades_and_flickers_splits_no_site(monkeypatch):
    """At the sites too, the electrons are taken against each frame's dose: measured there
    when the site stands alone, the tracks' own where they give it (one reference frame)."""
    import ceriakeras.analysis.sites as sites_module
    from test_rings import flickering

    frames = flickering(1)
    tracked = DoseLevel()
    doses = [tracked(img) for *_, img in frames]

    def splits(**dose):
        changes = SiteChanges(lattice(3), {f: (0.0, 0.0) for f in range(40)}, PX, 1.0,
                              TrackSettings(), **dose)
        for f, (*_, img) in enumerate(frames):
            changes.add(f, img)
        changes._settle(final=True)
        return sum(len(done) - 1 for done in changes.done)

    assert splits() == 0
    assert splits(dose=lambda f: doses[f]) == 0
    assert splits(dose=lambda f: 1.0) > 0  # counts as they come

    class Fixed(sites_module.DoseLevel):
        def __call__(self, image):
            return 1.0

    monkeypatch.setattr(sites_module, "DoseLevel", Fixed)
    assert splits() > 0
    assert splits(dose=lambda f: doses[f]) == 0  # the given dose, not a measurement here


def test_sightings_keep_each_frames_dose_and_level():
    seen = Sightings()
    seen.add(np.array([0]), np.array([[1.0, 2.0]]), np.zeros(2), 0, np.full(4, 0.9), 1.0)
    seen.add(np.array([0]), np.array([[1.0, 2.0]]), np.zeros(2), 5, np.full(4, 1.1), 0.8)
    assert seen.dose(5) == 0.8 and seen.dose(0) == 1.0
    assert seen.dose(3) == 1.0 and seen.dose(99) == 1.0  # frames not given: 1
    assert np.allclose(seen.level(5), 1.1) and np.allclose(seen.level(99), 1.0)


def test_a_focus_that_drifts_splits_no_site(tmp_path):
    """The sites take the tracks' ring level out too (every site watched here)."""
    from test_rings import focus_drift

    for name, columns, none in (("level", 12, True), ("bare", 0, False)):
        (tmp_path / name).mkdir()
        settings = TrackSettings(site_coverage=2.0, ring_level_columns=columns,
                                 ring_confirm=1e3)  # the tracks' own changes left out
        done, rows = analyse(tmp_path / name, focus_drift(1), settings)
        assert (rows == []) is none


def test_the_penalties_follow_the_series_dose():
    from ceriakeras.config import ConfigError

    s = TrackSettings(ring_penalty=12.0, site_penalty=10.0,
                      penalty_dose_scale=((50.0, 1.0), (200.0, 0.8)))
    for dose, scale in ((None, 1.0), (0.0, 1.0), (20.0, 1.0), (50.0, 1.0), (100.0, 0.9),
                        (200.0, 0.8), (5000.0, 0.8)):  # log-linear between, the ends beyond
        at = s.at_dose(dose)
        assert (at.ring_penalty, at.site_penalty) == pytest.approx((12 * scale, 10 * scale))
        assert at.penalty == s.penalty and at.min_stretch == s.min_stretch
    once = s.at_dose(200.0)
    assert once.penalty_dose_scale == () and once.at_dose(200.0) == once  # applied once
    assert TrackSettings(penalty_dose_scale=()).at_dose(200.0) == TrackSettings(
        penalty_dose_scale=())
    TrackSettings().validate()
    for bad in (((200.0, 1.0), (50.0, 0.9)), ((50.0, 0.0),), ((50.0, 1.0, 2.0),),
                (("fifty", 1.0),), ((50.0, 1.0), (100.0,))):
        with pytest.raises(ConfigError, match="penalty_dose_scale"):
            TrackSettings(penalty_dose_scale=bad).validate()


def test_each_series_is_split_at_the_penalty_of_its_own_dose(tmp_path, monkeypatch):
    """The tracker and the sites of a series take their penalties at the series' dose (its
    plan entry's ``dose_e_per_A2``, as ``analyze`` gives it); a series without keeps the
    settings' own."""
    from ceriakeras.analysis import tracking

    seen = {}

    class Spy(tracking.Tracker):
        def __init__(self, settings=None):
            seen.setdefault("tracker", []).append(settings.ring_penalty)
            super().__init__(settings)

    def sites(sightings, item, drift_A, settings):
        seen.setdefault("sites", []).append((item["source"], settings.site_penalty))
        return real(sightings, item, drift_A, settings)

    real = tracking.site_changes
    monkeypatch.setattr(tracking, "Tracker", Spy)
    monkeypatch.setattr(tracking, "site_changes", sites)
    frames = grows()
    movies = {"high.tif": [(xy, p) for xy, p, _ in frames],
              "none.tif": [(xy, p) for xy, p, _ in frames]}
    plan = write_run(tmp_path / "out", movies)
    plan = [{**item, "pixel_size_A": PX, "counts_per_electron": 1.0,
             "dose_e_per_A2": 200.0 if item["source"] == "high.tif" else None} for item in plan]
    settings = TrackSettings(penalty_dose_scale=((50.0, 1.0), (200.0, 0.5)))
    done = tracking.write_tracks(tmp_path / "out", plan, settings,
                                 frame_reader=lambda item: enumerate(f[2] for f in frames))
    assert done["tracks"] > 0
    assert seen["tracker"] == [6.0, 12.0]
    assert seen["sites"] == [("high.tif", 6.0), ("none.tif", 12.0)]


def test_a_series_dose_is_the_median_of_its_frames(tmp_path):
    """What ``analyze`` (its per-frame state) and the offline copies (``frames.csv``) give the
    tracks stage as each series' dose."""
    import json

    from ceriakeras.analysis.offline import untracked_copy
    from ceriakeras.analysis.tables import series_doses

    plan = [{"source": "a.tif", "n_frames": 3}, {"source": "b.tif", "n_frames": 2},
            {"source": "c.tif", "n_frames": 1}]
    frames = {"0": {"dose_e_per_A2": 210.0}, "1": {"dose_e_per_A2": 190.0},
              "2": {"dose_e_per_A2": 205.0}, "3": {"dose_e_per_A2": 49.0}, "4": {}}
    assert series_doses(plan, frames) == [205.0, 49.0, None]
    run = tmp_path / "run"
    run.mkdir()
    (run / "tracking").mkdir()
    (run / "tracking" / "probabilities.bin").write_bytes(b"")
    (run / "columns.csv").write_text("source,frame,x_px\n")
    (run / "frames.csv").write_text("source,frame,dose_e_per_A2,drift_x_A\na.tif,0,210,0\n"
                                    "a.tif,1,190,0\na.tif,2,205,0\nb.tif,0,49,0\nb.tif,1,,0\n")
    (run / "summary.json").write_text(json.dumps({"inputs": [
        {"source": s, "frames": n} for s, n in (("a.tif", 3), ("b.tif", 2), ("c.tif", 1))]}))
    copy = untracked_copy(run, tmp_path / "work")
    assert [item["dose_e_per_A2"] for item in copy] == [205.0, 49.0, None]
