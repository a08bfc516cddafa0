"""Pictures (ceriakeras.analysis.pictures): which frames, the crop, the rings' colours and places, the MP4."""

import numpy as np
import pytest

from ceriakeras.analysis.movies import MovieWriter
from ceriakeras.analysis.pictures import (MARKER_RADIUS_A, height_colors, display_scale,
                                 overlay_frames, particle_box, render_frame, union_box)

PX_A = 0.1


def test_default_overlays_are_a_sample_with_first_and_last():
    chosen = sorted(overlay_frames(120))
    assert len(chosen) == 10 and chosen[0] == 0 and chosen[-1] == 119
    assert np.ptp(np.diff(chosen)) <= 1  # evenly spaced
    assert sorted(overlay_frames(4)) == [0, 1, 2, 3]
    assert sorted(overlay_frames(1)) == [0]
    assert sorted(overlay_frames(7, every=3)) == [0, 3, 6]  # --overlay-every K overrides
    assert overlay_frames(50, samples=0) == frozenset()


def lattice(n=5, spacing_A=3.4, origin_A=(20.0, 30.0)):
    g = np.arange(n) * spacing_A
    xx, yy = np.meshgrid(g + origin_A[0], g + origin_A[1])
    return xx.ravel() / PX_A, yy.ravel() / PX_A


def test_box_holds_the_particle_plus_margin_and_ignores_a_stray_column():
    x, y = lattice()
    y0, y1, x0, x1 = particle_box(x, y, (800, 900), PX_A, margin_A=4.0)
    assert x0 <= x.min() - 40 and x1 >= x.max() + 40 and y0 <= y.min() - 40 and y1 >= y.max() + 40
    assert x1 - x0 <= (x.max() - x.min()) + 2 * 40 + 3       # not much more than that
    stray = particle_box(np.r_[x, 850.0], np.r_[y, 780.0], (800, 900), PX_A, margin_A=4.0)
    assert stray == (y0, y1, x0, x1)
    assert particle_box([], [], (800, 900), PX_A) == (0, 800, 0, 900)   # nothing: whole frame
    assert particle_box([5.0], [5.0], (800, 900), PX_A, margin_A=4.0)[::2] == (0, 0)  # clipped
    assert union_box([(1, 5, 2, 6), (0, 3, 4, 9)]) == (0, 5, 2, 9)


def test_rings_sit_on_the_columns_in_their_height_colour():
    x, y = lattice(3)
    heights = np.array([1, 4, 9, 2, 7, 12, 3, 5, 16])
    rng = np.random.default_rng(0)
    image = rng.poisson(50.0, (700, 700)).astype(np.float32)
    box = particle_box(x, y, image.shape, PX_A)
    picture = render_frame(image, x, y, heights, pixel_size_A=PX_A, max_height=16, box=box,
                           caption="frame 3  500 e⁻/Å²")
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.shape[0] % 2 == 0 and picture.shape[1] % 2 == 0
    s = display_scale(box)
    gray_h = int(round((box[1] - box[0]) * s)) // 2 * 2
    assert picture.shape[0] > gray_h  # caption strip above the image
    top = picture.shape[0] - gray_h
    colors = height_colors(16)
    r = MARKER_RADIUS_A / PX_A * s
    for xi, yi, h in zip(x, y, heights):
        cx = (xi - box[2] + 0.5) * s - 0.5
        cy = (yi - box[0] + 0.5) * s - 0.5 + top
        # on the ring, left and right of the centre: the height's colour (not grey, not another)
        for dx in (-r + 1, r - 1):
            pix = picture[int(round(cy)), int(round(cx + dx))].astype(int)
            assert np.abs(pix - colors[h]).max() <= 2, (h, pix, colors[h])
    assert len({tuple(c) for c in colors[1:]}) == 16  # every height its own colour


def test_movie_streams_frames_and_decodes(tmp_path):
    av = pytest.importorskip("av")
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(5)]
    with MovieWriter(tmp_path / "m.mp4", fps=10) as movie:
        for p in pictures:
            movie.add(p)
    assert movie.frames == 5
    with av.open(str(tmp_path / "m.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (64, 96, 3)
    assert not list(tmp_path.glob("*.tmp"))
    with MovieWriter(tmp_path / "none.mp4"):
        pass
    assert not (tmp_path / "none.mp4").exists() and not list(tmp_path.glob("*.tmp"))


def test_both_series_plots_keep_their_panels_on_one_frame_axis(tmp_path):
    """The heights above and the totals below have one width, the colour bar beside the upper
    panel only: a frame (an event's triangle) stands at the same x in both."""
    from ceriakeras.analysis.pictures import write_series_plot
    from ceriakeras.analysis.track_pictures import draw

    grid = np.array([[2, 2, 0, 3, 3], [1, 1, 1, 1, 1]], np.uint16)
    drawn = [draw(tmp_path / "tracks.png", grid, np.array([3.0, 3, 1, 4, 4]), [(3, 0)], 8),
             write_series_plot(tmp_path / "first.png", np.arange(5), grid.T.astype(float),
                               np.array([3, 3, 1, 4, 4]), 8)]
    for fig in drawn:
        above, below, bar = fig.axes[:3]
        a, b = above.get_position(), below.get_position()
        assert (a.x0, a.x1) == pytest.approx((b.x0, b.x1))
        assert bar.get_position().x0 > a.x1 and bar.get_position().y0 >= b.y1
        assert above.get_xlim() == below.get_xlim()
    assert (tmp_path / "tracks.png").stat().st_size > 5000


def test_a_change_is_marked_by_a_white_square_around_its_column():
    x, y = lattice(3)
    heights = np.full(9, 4)
    image = np.random.default_rng(3).poisson(50.0, (700, 700)).astype(np.float32)
    box = particle_box(x, y, image.shape, PX_A)
    plain = render_frame(image, x, y, heights, pixel_size_A=PX_A, max_height=16, box=box)
    marked = render_frame(image, x, y, heights, pixel_size_A=PX_A, max_height=16, box=box,
                          marks=[(x[4], y[4], "4→5")])
    s = display_scale(box)
    top = plain.shape[0] - int(round((box[1] - box[0]) * s)) // 2 * 2
    cx = (x[4] - box[2] + 0.5) * s - 0.5
    cy = (y[4] - box[0] + 0.5) * s - 0.5 + top
    side = 1.45 * MARKER_RADIUS_A / PX_A * s
    edge = marked[int(round(cy)), int(round(cx - side + 2))]  # the square's left side
    assert edge.min() >= 250 and not np.array_equal(edge, plain[int(round(cy)),
                                                                int(round(cx - side + 2))])
    differs = np.argwhere((marked != plain).any(axis=2))
    assert differs[:, 1].min() >= cx - side - 3 and differs[:, 0].min() >= cy - side - 3
    assert differs[:, 1].max() > cx + side + 10  # the label beside it
