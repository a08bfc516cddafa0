"""scripts/studies/event_ceiling.py: the changes a movie's pixels show, from the true columns
(a synthetic movie set in the layout of ``../shared/crossmovie``, fast)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import tifffile

from test_rings import PX, image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "studies"))
import event_ceiling  # noqa: E402

XY = [(x, y) for y in (6.0, 10.0, 14.0, 18.0, 22.0) for x in (6.0, 10.0, 14.0, 18.0, 22.0)]
"""25 columns, Å, 4 Å apart (their rings do not overlap)."""


def write_set(folder: Path, *, clear: float, faint: float) -> None:
    """One 48-frame movie and its tables: column 0 changes at frame 16 (bump 0.5 → 0.5 +
    ``clear``); column 1 at frame 32 in the truth, its bump by ``faint`` (0: the pixels do not
    show it); the others never."""
    rng = np.random.default_rng(3)
    frames = []
    for f in range(48):
        amp = np.full(len(XY), 0.5)
        amp[0] += clear * (f >= 16)
        amp[1] += faint * (f >= 32)
        frames.append(image(XY, amp, rng, background=2.0, side=280))
    tifffile.imwrite(folder / "m_d50.tif", np.array(frames))
    rows = [("file", "particle", "dose", "pixel_size_A", "frames", "t1", "t2")]
    rows.append(("m_d50.tif", 0, 50.0, PX, 48, 16, 32))
    _write(folder / "movies.csv", rows)
    truth = [("file", "frame", "column", "x_px", "y_px", "height")]
    for f in range(48):
        for c, (x, y) in enumerate(XY):
            h = 3 + (c == 0 and f >= 16) + (c == 1 and f >= 32)
            truth.append(("m_d50.tif", f, c, x / PX, y / PX, h))
    _write(folder / "truth.csv", truth)
    events = [("file", "column", "frame", "x_px", "y_px", "height_before", "height_after"),
              ("m_d50.tif", 0, 16, XY[0][0] / PX, XY[0][1] / PX, 3, 4),
              ("m_d50.tif", 1, 32, XY[1][0] / PX, XY[1][1] / PX, 3, 4)]
    _write(folder / "events.csv", events)


def _write(path: Path, rows) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_a_clear_change_is_shown_and_a_faint_one_is_not(tmp_path, capsys):
    write_set(tmp_path, clear=0.8, faint=0.0)
    assert event_ceiling.main([str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("50 e-/A2:")
    assert "shown by the pixels 1 / 2 = 0.500" in line


def test_the_scan_finds_the_change_frame_and_unchanged_windows_stay_low(tmp_path):
    write_set(tmp_path, clear=0.8, faint=0.0)
    info = {"file": "m_d50.tif", "pixel_size_A": str(PX), "frames": "48"}
    truth = {c: {f: (x / PX, y / PX, 3 + (c == 0 and f >= 16) + (c == 1 and f >= 32))
                 for f in range(48)} for c, (x, y) in enumerate(XY)}
    events = list(csv.DictReader(open(tmp_path / "events.csv")))
    changed, quiet = event_ceiling.movie_scans(tmp_path, info, truth, events,
                                               event_ceiling.TrackSettings(), 16)
    clear = next(c for c in changed if c[0]["column"] == "0")
    assert abs(clear[2] - 16) <= 1 and clear[1] > 30
    # the other 23 columns at both change frames, and columns 0 / 1 about the other one's
    assert len(quiet) == 2 * 23 + 2
    assert np.quantile(quiet, 0.9) < clear[1] / 3


def test_the_analysis_found_events_are_counted_as_score_py_counts_them(tmp_path, capsys):
    write_set(tmp_path, clear=0.8, faint=0.0)
    results = tmp_path / "res"
    results.mkdir()
    rows = [("source", "track", "frame", "x_px", "y_px", "x_A", "y_A", "height_before",
             "height_after", "probability"),
            (str(tmp_path / "m_d50.tif"), 0, 18, XY[0][0] / PX + 3, XY[0][1] / PX, 0, 0, 3, 4,
             0.9),   # within 3 frames and 1.5 Å, the right sign: found
            (str(tmp_path / "m_d50.tif"), 1, 32, XY[1][0] / PX, XY[1][1] / PX, 0, 0, 4, 3,
             0.9)]   # the wrong sign: not found
    _write(results / "events.csv", rows)
    assert event_ceiling.main([f"{tmp_path}:{results}"]) == 0
    line = capsys.readouterr().out
    assert "found: 1 of those shown, 0 of the 1 not shown (recall of the scanned 0.500)" in line


def test_windows_stop_at_the_column_s_other_changes():
    heights = {f: 3 + (f >= 10) + (f >= 20) for f in range(48)}
    assert event_ceiling.windows(heights, 48, [10, 20], 16) == [(10, 0, 20), (20, 10, 36)]
    far = {f: 3 + (f >= 10) + (f >= 30) for f in range(48)}
    assert event_ceiling.windows(far, 48, [10, 30], 16) == [(10, 0, 26), (30, 14, 46)]
    assert event_ceiling.windows({f: 3 for f in range(20, 48)}, 48, [16], 16) == []


def test_sets_are_pooled_per_dose(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_set(tmp_path / name, clear=0.8, faint=0.0)
    assert event_ceiling.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "of 96 unchanged windows" in lines[0]
    assert "shown by the pixels 2 / 4 = 0.500" in lines[0]


def test_a_change_whose_rings_leave_the_frame_is_counted_as_not_scanned(tmp_path, capsys):
    write_set(tmp_path, clear=0.8, faint=0.0)
    rows = list(csv.reader(open(tmp_path / "truth.csv")))
    for r in rows[1:]:
        if r[2] == "1":
            r[3] = "2.0"  # column 1 at the frame's edge: its outer ring leaves the image
    _write(tmp_path / "truth.csv", rows)
    assert event_ceiling.main([str(tmp_path)]) == 0
    assert "shown by the pixels 1 / 1 = 1.000 (1 not scanned)" in capsys.readouterr().out
