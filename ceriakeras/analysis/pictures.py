"""Pictures of analysed frames: overlays cropped to the particle, a plot per series, 3D models.

Everything is drawn with NumPy and Pillow (no matplotlib figure per frame), so a picture costs a
few milliseconds: :func:`render_frame` crops a frame to the particle (:func:`particle_box`),
smooths it lightly for display, marks each Ce column with a ring coloured by its height, and adds
a colour legend (Ce atoms), a scale bar and a caption (source, frame, dose); changes of height
can be marked too. :func:`write_png` saves one picture; :mod:`.movies` streams them into a
series' movie.

Which frames get an overlay is :func:`overlay_frames`: by default an evenly spaced sample of a
series (the first and last included), or every K-th frame. :func:`write_series_plot` draws a
series' column heights over time, :func:`write_xyz` a frame's 3D model (ASE extxyz).

Coordinates are those of :mod:`ceriakeras.inference.columns` and ``columns.csv``: ``x_px`` is the column
index, ``y_px`` the row index, pixel centres at integers, in the input image's grid.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from ..config import CEO2_LATTICE_A
from ..io.files import atomic_path
from ..io.inputpaths import shown

PROJECTED_COLUMN_SPACING_A = CEO2_LATTICE_A * math.sqrt(3.0 / 8.0)
"""Nearest Ce–Ce column distance in the [110] projection, Å (≈ 3.31 Å)."""
MARKER_RADIUS_A = 0.3 * PROJECTED_COLUMN_SPACING_A
"""Radius of a column's ring, Å: neighbouring rings never touch."""
BOX_MARGIN_A = 4.0
"""Margin around the detected columns of a crop, Å."""
DISPLAY_SMOOTHING_A = 0.25
"""Gaussian σ of the display smoothing, Å (only for the eye: the analysis uses the raw counts)."""
DISPLAY_SIZE_PX = 560
"""Longer side of the image part of a picture, display pixels."""
OVERLAY_SAMPLES = 10
"""Default number of overlays per series (evenly spaced, first and last included)."""
HEIGHT_COLORMAP = "turbo"
"""Matplotlib colormap of the column heights (its ends cut off: rings stay visible on grey)."""

_LEGEND_W = 74
_CAPTION_H = 24


# --- which frames, which part of a frame -------------------------------------------------------
def overlay_frames(n_frames: int, every: int | None = None,
                   samples: int = OVERLAY_SAMPLES) -> frozenset[int]:
    """Indices of the frames of a series that get an overlay.

    Parameters
    ----------
    n_frames : int
        Frames in the series.
    every : int, optional
        Every ``every``-th frame (0, K, 2K, …). None: an evenly spaced sample of ``samples``
        frames, the first and the last included (all frames of a short series).
    samples : int
        Size of the default sample (≥ 1; 0 gives none).
    """
    if n_frames <= 0:
        return frozenset()
    if every is not None:
        return frozenset(range(0, n_frames, int(every)))
    if samples <= 0:
        return frozenset()
    k = min(n_frames, max(int(samples), 2 if n_frames > 1 else 1))
    return frozenset(int(i) for i in np.round(np.linspace(0, n_frames - 1, k)))


def particle_box(x_px, y_px, shape: tuple[int, int], pixel_size_A: float,
                 margin_A: float = BOX_MARGIN_A) -> tuple[int, int, int, int]:
    """Bounding box of the particle's columns plus a margin, in input pixels.

    Columns with no other column within 2 column spacings (a stray detection in the vacuum) are
    left out, unless that leaves none.

    Parameters
    ----------
    x_px, y_px : (N,) float
        Column positions, input pixels.
    shape : (H, W)
        The frame's shape, px.
    pixel_size_A : float
        Input pixel size, Å.
    margin_A : float
        Margin on each side, Å.

    Returns
    -------
    (y0, y1, x0, x1) : int
        Half-open pixel ranges inside the frame; the whole frame when there are no columns.
    """
    h, w = int(shape[0]), int(shape[1])
    x, y = np.asarray(x_px, np.float64), np.asarray(y_px, np.float64)
    if len(x) == 0:
        return 0, h, 0, w
    if len(x) > 1:
        from scipy.spatial import cKDTree

        pts = np.column_stack([x, y]) * pixel_size_A
        near = cKDTree(pts).query(pts, k=2)[0][:, 1] <= 2 * PROJECTED_COLUMN_SPACING_A
        if near.any():
            x, y = x[near], y[near]
    m = margin_A / pixel_size_A
    y0, y1 = max(0, int(math.floor(y.min() - m))), min(h, int(math.ceil(y.max() + m)) + 1)
    x0, x1 = max(0, int(math.floor(x.min() - m))), min(w, int(math.ceil(x.max() + m)) + 1)
    return y0, y1, x0, x1


def union_box(boxes) -> tuple[int, int, int, int] | None:
    """The smallest box holding all ``boxes`` ((y0, y1, x0, x1) each); None for none."""
    boxes = list(boxes)
    if not boxes:
        return None
    b = np.asarray(boxes)
    return int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max())


# --- drawing ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def height_colors(max_height: int) -> np.ndarray:
    """(max_height + 1, 3) uint8: the colour of each height (row 0 unused)."""
    from matplotlib import colormaps

    cmap = colormaps[HEIGHT_COLORMAP]
    t = np.linspace(0.08, 0.92, max(max_height, 2))[:max_height]
    rgb = np.zeros((max_height + 1, 3), np.uint8)
    rgb[1:] = np.round(np.asarray(cmap(t))[:, :3] * 255).astype(np.uint8)
    return rgb


@functools.lru_cache(maxsize=8)
def _font(size: int):
    import matplotlib
    from PIL import ImageFont

    try:  # DejaVu Sans has ⁻ and ² (for e⁻/Å²); matplotlib ships it
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf"
                                      / "DejaVuSans.ttf"), size)
    except OSError:
        return ImageFont.load_default(size)


def display_scale(box: tuple[int, int, int, int], size_px: int = DISPLAY_SIZE_PX) -> float:
    """Display pixels per input pixel for a crop ``box`` drawn ``size_px`` on its longer side."""
    y0, y1, x0, x1 = box
    return size_px / max(1, y1 - y0, x1 - x0)


def _gray(image: np.ndarray, box, pixel_size_A: float, scale: float) -> np.ndarray:
    """The crop, lightly smoothed, contrast-stretched (0.5–99.5 %), resized: (h, w) uint8."""
    from PIL import Image
    from scipy import ndimage

    y0, y1, x0, x1 = box
    crop = np.asarray(image[y0:y1, x0:x1], np.float32)
    # bin to about the display's pixel first when the crop is larger (cheap, nothing lost)
    step = max(1, int(round(1.0 / scale)))
    if step > 1:
        hh, ww = (crop.shape[0] // step) * step, (crop.shape[1] // step) * step
        binned = np.zeros((hh // step, ww // step), np.float32)
        for dy in range(step):
            for dx in range(step):
                binned += crop[dy:hh:step, dx:ww:step]
        crop = binned
    sigma = DISPLAY_SMOOTHING_A / (pixel_size_A * step)
    if sigma > 0.3:
        crop = ndimage.gaussian_filter(crop, sigma, mode="nearest", truncate=3.0)
    sub = crop[::max(1, crop.shape[0] // 256), ::max(1, crop.shape[1] // 256)]
    lo, hi = np.percentile(sub, (0.5, 99.5))
    gray = np.clip((crop - lo) * (255.0 / max(float(hi - lo), 1e-12)), 0, 255).astype(np.uint8)
    out_w = max(2, int(round((x1 - x0) * scale)) // 2 * 2)  # even sizes (H.264 wants them)
    out_h = max(2, int(round((y1 - y0) * scale)) // 2 * 2)
    return np.asarray(Image.fromarray(gray).resize((out_w, out_h), Image.BILINEAR))


def render_frame(image: np.ndarray, x_px, y_px, height, *, pixel_size_A: float, max_height: int,
                 box: tuple[int, int, int, int] | None = None, caption: str = "",
                 size_px: int = DISPLAY_SIZE_PX, marks=()) -> np.ndarray:
    """A picture of one frame: the particle, its columns as rings coloured by height, a legend.

    Parameters
    ----------
    image : (H, W) float
        The frame (counts), input pixels.
    x_px, y_px : (N,) float
        Column positions, input pixels (``columns.csv``).
    height : (N,) int
        Column heights, Ce atoms.
    pixel_size_A : float
        Input pixel size, Å.
    max_height : int
        Largest height the model knows (the legend's range), Ce atoms.
    box : (y0, y1, x0, x1), optional
        Crop, input pixels; default :func:`particle_box` of these columns.
    caption : str
        Text above the image (source, frame, dose).
    size_px : int
        Longer side of the image part, display pixels.
    marks : sequence of (x_px, y_px, text)
        Places to point out (input pixels) with a label: changes of height, a white square
        around the column with ``text`` ("3→4") beside it.

    Returns
    -------
    (h, w, 3) uint8
        RGB picture; ``h`` and ``w`` are even.
    """
    from PIL import Image, ImageDraw

    image = np.asarray(image)
    x, y = np.asarray(x_px, np.float64), np.asarray(y_px, np.float64)
    hts = np.clip(np.asarray(height, np.int64), 1, max_height)
    if box is None:
        box = particle_box(x, y, image.shape, pixel_size_A)
    y0, y1, x0, x1 = box
    scale = display_scale(box, size_px)
    gray = _gray(image, box, pixel_size_A, scale)
    gh, gw = gray.shape
    sy, sx = gh / (y1 - y0), gw / (x1 - x0)

    canvas = Image.new("RGB", (gw + _LEGEND_W, gh + _CAPTION_H), (255, 255, 255))
    canvas.paste(Image.fromarray(gray).convert("RGB"), (0, _CAPTION_H))
    draw = ImageDraw.Draw(canvas)
    colors = height_colors(max_height)

    # rings: a dark outline under a coloured ring, so every colour reads on dark and light grey
    r = MARKER_RADIUS_A / pixel_size_A * sx
    width = max(2, int(round(0.12 * r)))
    inside = (x >= x0 - 0.5) & (x < x1 - 0.5) & (y >= y0 - 0.5) & (y < y1 - 0.5)
    cx = (x[inside] - x0 + 0.5) * sx - 0.5
    cy = (y[inside] - y0 + 0.5) * sy - 0.5 + _CAPTION_H
    for px, py, h in zip(cx, cy, hts[inside]):
        draw.ellipse((px - r - 1, py - r - 1, px + r + 1, py + r + 1), outline=(0, 0, 0),
                     width=width + 2)
        draw.ellipse((px - r, py - r, px + r, py + r), outline=tuple(int(c) for c in colors[h]),
                     width=width)

    for mx, my, text in marks:  # a white square with a dark edge, its label beside it
        px, py = (mx - x0 + 0.5) * sx - 0.5, (my - y0 + 0.5) * sy - 0.5 + _CAPTION_H
        side = 1.45 * r
        draw.rectangle((px - side, py - side, px + side, py + side), outline=(0, 0, 0),
                       width=width + 2)
        draw.rectangle((px - side + 1, py - side + 1, px + side - 1, py + side - 1),
                       outline=(255, 255, 255), width=width)
        draw.text((px + side + 3, py - side), text, fill=(255, 255, 255), font=_font(13),
                  stroke_width=2, stroke_fill=(0, 0, 0))
    _scale_bar(draw, gw, gh, sx / pixel_size_A)
    canvas.paste(Image.fromarray(_legend(gh, max_height)), (gw, 0))
    if caption:
        draw.text((4, _CAPTION_H // 2), caption, fill=(0, 0, 0), font=_font(13), anchor="lm")
    return np.asarray(canvas)


def _scale_bar(draw, gw: int, gh: int, px_per_A: float) -> None:
    """A white bar of a round length (5 Å, 1 nm, 2 nm, 5 nm) at the lower left of the image."""
    length_A = next((v for v in (5.0, 10.0, 20.0, 50.0, 100.0) if v * px_per_A >= 0.15 * gw),
                    100.0)
    n = length_A * px_per_A
    x0, y0 = 10, _CAPTION_H + gh - 14
    draw.rectangle((x0 - 1, y0 - 1, x0 + n + 1, y0 + 6), fill=(0, 0, 0))
    draw.rectangle((x0, y0, x0 + n, y0 + 5), fill=(255, 255, 255))
    label = f"{length_A:g} Å" if length_A < 10 else f"{length_A / 10:g} nm"
    draw.text((x0, y0 - 3), label, fill=(255, 255, 255), font=_font(13), anchor="ld",
              stroke_width=2, stroke_fill=(0, 0, 0))


@functools.lru_cache(maxsize=8)
def _legend(gh: int, max_height: int) -> np.ndarray:
    """The colour legend beside an image ``gh`` px high: one box per height, the tallest on top.

    Returns (gh + caption, legend width, 3) uint8 (the same for every frame: drawn once).
    """
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (_LEGEND_W, gh + _CAPTION_H), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    colors = height_colors(max_height)
    top = _CAPTION_H + 18
    draw.text((_LEGEND_W // 2, _CAPTION_H + 2), "Ce atoms", fill=(0, 0, 0), font=_font(11),
              anchor="mt")
    step = max(6.0, min(22.0, (gh - 24) / max_height))
    label_every = 1 if step >= 12 else 2
    for h in range(max_height, 0, -1):
        yy = top + (max_height - h) * step
        draw.rectangle((8, yy, 30, yy + step - 1), fill=tuple(int(c) for c in colors[h]),
                       outline=(0, 0, 0))
        if h % label_every == 0 or h == 1:
            draw.text((36, yy + step / 2), str(h), fill=(0, 0, 0), font=_font(11), anchor="lm")
    return np.asarray(strip)


# --- files --------------------------------------------------------------------------------------
def write_png(path, picture: np.ndarray) -> None:
    """Save an (h, w, 3) uint8 picture as PNG, atomically (folders created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG", compress_level=1)


# --- captions, series plots, 3D models -------------------------------------------------
def frame_caption(item: dict, index: int, dose_e_per_A2: float, n_columns: int,
             recognised: bool | None = None) -> str:
    """The text above a picture: source, frame, dose, columns, and a frame not recognised."""
    where = f"frame {index}/{item['n_frames'] - 1}" if item["n_frames"] > 1 else "image"
    return (f"{shown(Path(item['source']).name)}   {where}   {dose_e_per_A2:.0f} e⁻/Å²   "
            f"{n_columns} columns" + ("   NOT RECOGNISED" if recognised is False else ""))


def write_series_plot(path: Path, frames: np.ndarray, heights: np.ndarray, total_ce: np.ndarray,
                      max_height: int, title: str = ""):
    """Column heights over time (tracked columns × frames) and the total Ce count per frame.

    Parameters
    ----------
    frames : (T,) int
    heights : (T, M) float, NaN where a tracked column was not found
    total_ce : (T,) int, Ce atoms in all columns of each frame

    Returns
    -------
    matplotlib.figure.Figure
        The figure written (:func:`series_axes`' panels).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, cax = series_axes(fig)
    if heights.size:
        extent = (frames[0] - 0.5, frames[-1] + 0.5, heights.shape[1] - 0.5, -0.5)
        cmap = ListedColormap(height_colors(max_height)[1:] / 255.0)  # the overlays' colours
        im = ax1.imshow(np.ma.masked_invalid(heights.T), aspect="auto", interpolation="nearest",
                        cmap=cmap, vmin=0.5, vmax=max_height + 0.5, extent=extent)
        fig.colorbar(im, cax=cax, label="height (Ce atoms)")
    else:
        cax.set_axis_off()
    ax1.set_ylabel("column (tracked from first frame)")
    ax1.set_title(title, fontsize=8)
    ax2.plot(frames, total_ce, "-", lw=1)
    ax2.set_xlabel("frame")
    ax2.set_ylabel("total Ce atoms")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return fig


def series_axes(fig):
    """A series plot's panels: heights over time (above) and a number per frame (below) on one
    frame axis, and the colour bar's axes beside the upper one. Both panels keep one width, so
    a frame stands at the same place in both (a colour bar taken from the upper panel alone
    would narrow it, and its frames would no longer sit above the same frames below)."""
    grid = fig.add_gridspec(2, 2, height_ratios=[2, 1], width_ratios=[1, 0.025], wspace=0.04)
    ax1 = fig.add_subplot(grid[0, 0])
    ax2 = fig.add_subplot(grid[1, 0], sharex=ax1)
    ax1.tick_params(labelbottom=False)
    return ax1, ax2, fig.add_subplot(grid[0, 1])


def write_xyz(path: Path, atoms) -> None:
    """Write ``atoms`` (a frame's 3D model) as ASE extxyz, atomically."""
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ase.io.write(tmp, atoms, format="extxyz")
