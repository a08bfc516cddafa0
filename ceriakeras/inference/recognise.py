"""Is a frame what the model knows? A lattice check of the detected columns against CeO2 [110] (NumPy/SciPy).

The shipped model was trained on CeO2 particles along [110] only; on anything else (another
material, another zone axis, vacuum) it still reports "columns", wherever its output has blobs.
Along [110] the Ce columns of CeO2 project onto a centred rectangular lattice, ``a/√2 × a``
(a = 5.411 Å): every column has 4 neighbours at 3.31 Å, 2 at 3.83 Å and 2 at 5.41 Å, at fixed
angles, and none closer. fcc metals along [110] (Pt, Au: 2.4–2.9 Å), CeO2 along [100] (a square
lattice of 2.7 Å) and hexagonal layers (MoS2: 3.16 Å at 60°) do not fit it.

:func:`lattice_columns` checks each detected column on its own, at whichever in-plane rotation
fits it best (particles may turn, and a frame may hold several; the rotations tried put one of
its 3 nearest neighbours on a 3.83 or 3.31 Å site): it fits when at least
:data:`MIN_MATCHED_SITES` of the 8 template sites around it hold a column, among them at least
:data:`MIN_SHORT_SITES` of the four at 3.31 Å, and no column within :data:`NEIGHBOUR_REACH_A`
of it is off the template. :func:`recognise_frame` calls a frame
*recognised* when it has at least :data:`MIN_COLUMNS` columns, at least
:data:`MIN_LATTICE_FRACTION` of them fit, and its dose lies in the model's envelope. How well this
separates frames is measured in docs/model.md ("Frames the model does not know").

Positions must be in Å at the true scale: a pixel size off by more than ~8 % moves the
3.83 Å neighbours out of the tolerance and the frame is no longer recognised.
"""

from __future__ import annotations

import numpy as np

from ..config import CEO2_LATTICE_A

CEO2_110_SITES_A = np.array([
    [CEO2_LATTICE_A / np.sqrt(2), 0.0], [-CEO2_LATTICE_A / np.sqrt(2), 0.0],
    [CEO2_LATTICE_A / np.sqrt(8), CEO2_LATTICE_A / 2], [-CEO2_LATTICE_A / np.sqrt(8), CEO2_LATTICE_A / 2],
    [CEO2_LATTICE_A / np.sqrt(8), -CEO2_LATTICE_A / 2], [-CEO2_LATTICE_A / np.sqrt(8), -CEO2_LATTICE_A / 2],
    [0.0, CEO2_LATTICE_A], [0.0, -CEO2_LATTICE_A],
])
"""(8, 2) Å: a Ce column's neighbours in CeO2 along [110] (3.83, 4 × 3.31, 5.41 Å), x along [1-10]."""
TOLERANCE_A = 0.5
"""A template site holds a column when one lies within this distance, Å."""
NEIGHBOUR_REACH_A = 4.3
"""Columns this close must all sit on template sites (3.83 Å + tolerance), Å."""
MIN_MATCHED_SITES = 3
"""Template sites (of 8) that must hold a column for a column to fit the lattice."""
MIN_SHORT_SITES = 2
"""Of them, the 3.31 Å sites (of 4) that must hold a column: the lattice's own signature
(a rectangle of 3.9 × 5.5 Å, half of Pt [110], would fill the 3.83 and 5.41 Å sites alone)."""
MIN_COLUMNS = 8
"""Fewest columns in a recognised frame (a 1.5 nm particle has more)."""
MIN_LATTICE_FRACTION = 0.3
"""Smallest fraction of a recognised frame's columns that fit the lattice."""
DOSE_RANGE_E_PER_A2 = (20.0, 20000.0)
"""Doses the shipped model was trained and calibrated for, e⁻/Å² (docs/design.md envelope)."""
CANDIDATE_NEIGHBOURS = 3
"""Rotations tried per column: its nearest neighbours put on the template's 3.83 and 3.31 Å sites."""
VACUUM_REACH_A = 5.0
"""A point of the frame is vacuum when no detected column lies within this distance, Å: the
particle's own contrast reaches ~2 Å beyond its outer columns, and the 4 Å windows that
:class:`ceriakeras.nn.model.NormalizeToVacuum` averages reach 2–2.8 Å from their centre."""


VACUUM_MARGIN = 1.25
"""The least vacuum share a vacuum-normalised model needs, in units of its bare minimum
``1 − vacuum_quantile`` (:func:`required_vacuum_fraction`): 12.5 % for q = 0.9. Was 2 (20 %)
before the own-data study of docs/model.md, "Version 4"."""


def lattice_columns(x_A, y_A, *, tolerance_A: float = TOLERANCE_A,
                    min_matched: int = MIN_MATCHED_SITES) -> np.ndarray:
    """Which columns sit on a CeO2 [110] lattice with their neighbours.

    Parameters
    ----------
    x_A, y_A : (N,) float
        Column positions, Å.
    tolerance_A : float
        Distance within which a neighbour counts as on a template site, Å.
    min_matched : int
        Template sites (of :data:`CEO2_110_SITES_A`'s 8) that must hold a column.

    Returns
    -------
    (N,) bool
        True for a column that, at some rotation, has ≥ ``min_matched`` template sites filled,
        ≥ :data:`MIN_SHORT_SITES` of them at 3.31 Å, and no neighbour within
        :data:`NEIGHBOUR_REACH_A` off the template.
    """
    from scipy.spatial import cKDTree

    points = np.column_stack([np.asarray(x_A, np.float64).ravel(),
                              np.asarray(y_A, np.float64).ravel()])
    n = len(points)
    if n < 2:
        return np.zeros(n, bool)
    reach = float(np.max(np.hypot(*CEO2_110_SITES_A.T))) + tolerance_A
    k = min(n, 13)
    dist, idx = cKDTree(points).query(points, k=k, distance_upper_bound=reach)
    dist, idx = dist[:, 1:], idx[:, 1:]                             # drop the column itself
    present = np.isfinite(dist)                                     # (N, K-1)
    vectors = points[np.where(present, idx, 0)] - points[:, None, :]  # (N, K-1, 2)
    # candidate rotations: one of the 3 nearest neighbours sits on a 3.83 Å or a 3.31 Å site
    # (the template's other sites follow by symmetry), so the template is turned to put it there
    nearest = vectors[:, :CANDIDATE_NEIGHBOURS]                       # (N, M, 2)
    phi = np.arctan2(nearest[..., 1], nearest[..., 0])                # (N, M)
    site_phi = np.arctan2(CEO2_110_SITES_A[[0, 2, 3], 1], CEO2_110_SITES_A[[0, 2, 3], 0])
    angles = (phi[:, :, None] - site_phi[None, None, :]).reshape(n, -1)   # (N, C)
    sx, sy = CEO2_110_SITES_A[:, 0], CEO2_110_SITES_A[:, 1]
    vx, vy = vectors[:, None, :, None, 0], vectors[:, None, :, None, 1]   # (N, 1, K-1, 1)
    for refine in (True, False):
        c, s = np.cos(angles)[..., None, None], np.sin(angles)[..., None, None]
        tx, ty = c * sx - s * sy, s * sx + c * sy                     # (N, C, 1, 8)
        near = ((vx - tx) ** 2 + (vy - ty) ** 2 <= tolerance_A**2) & present[:, None, :, None]
        if refine:  # turn by the mean angle between the matched neighbours and their sites
            residual = np.arctan2(tx * vy - ty * vx, tx * vx + ty * vy)   # (N, C, K-1, 8)
            count = near.sum(axis=(2, 3))
            angles = angles + np.where(near, residual, 0.0).sum(axis=(2, 3)) / np.maximum(count, 1)
    filled = near.any(axis=2)                                        # (N, C, 8)
    matched = filled.sum(axis=-1)                                    # (N, C)
    short = filled[..., 2:6].sum(axis=-1)                            # the four 3.31 Å sites
    close = present & (dist <= NEIGHBOUR_REACH_A)                    # (N, K-1)
    off_template = (close[:, None, :] & ~near.any(axis=-1)).sum(axis=-1)  # (N, C)
    return np.any((matched >= min_matched) & (short >= MIN_SHORT_SITES) & (off_template == 0),
                  axis=1)


def vacuum_fraction(x_A, y_A, width_A: float, height_A: float, *,
                    reach_A: float = VACUUM_REACH_A, grid_A: float = 0.5) -> float:
    """The share of a frame's area that is vacuum: farther than ``reach_A`` from every column.

    Parameters
    ----------
    x_A, y_A : (N,) float
        The frame's detected columns, Å (x along the width).
    width_A, height_A : float
        The frame's field of view, Å.
    reach_A : float
        See :data:`VACUUM_REACH_A`, Å.
    grid_A : float
        Spacing of the grid the distances are measured on, Å (distances are good to about
        half of it).

    Returns
    -------
    float
        Fraction of the frame's area, 0–1; 1 for a frame without columns.
    """
    from scipy.ndimage import distance_transform_edt

    nx, ny = max(1, int(np.ceil(width_A / grid_A))), max(1, int(np.ceil(height_A / grid_A)))
    x = np.asarray(x_A, np.float64).ravel()
    y = np.asarray(y_A, np.float64).ravel()
    if not len(x):
        return 1.0
    occupied = np.zeros((ny, nx), bool)
    occupied[np.clip((y / grid_A).astype(int), 0, ny - 1),
             np.clip((x / grid_A).astype(int), 0, nx - 1)] = True
    return float(np.mean(distance_transform_edt(~occupied, sampling=grid_A) > reach_A))


def required_vacuum_fraction(info: dict) -> float | None:
    """The least share of vacuum a model needs in a frame (:func:`vacuum_fraction`), or None.

    A model that normalises its input to the vacuum level (``intensity_reference = 'vacuum'``,
    model version 3 on) takes that level as the ``vacuum_quantile`` q of the frame's local
    means: it falls on the particle unless more than ``1 − q`` of the frame is vacuum. The
    minimum asked is :data:`VACUUM_MARGIN` × (1 − q): on our own data (version 4,
    ``scripts/studies/vacuum_study.py``; docs/model.md, "Version 4") frames below 1 − q read 0.5–0.9
    atoms low and frames from 1 − q up read as well as frames with ample vacuum; the margin
    covers the spread of the measured share around that cliff. A model that normalises to the
    frame mean (versions 1–2) needs no vacuum: None.

    Parameters
    ----------
    info : dict
        The model's ``assets/ceriakeras.json`` (``training_config.model``).
    """
    model = (info.get("training_config") or {}).get("model") or {}
    if model.get("intensity_reference", "frame_mean") != "vacuum":
        return None
    return VACUUM_MARGIN * (1.0 - float(model.get("vacuum_quantile", 0.9)))


def recognise_frame(x_A, y_A, dose_e_per_A2: float | None = None, *,
                    vacuum: float | None = None, min_vacuum: float | None = None,
                    min_columns: int = MIN_COLUMNS,
                    min_lattice_fraction: float = MIN_LATTICE_FRACTION,
                    dose_range_e_per_A2: tuple[float, float] = DOSE_RANGE_E_PER_A2) -> dict:
    """Does a frame look like what the model was trained for (CeO2 along [110], a particle, in the envelope)?

    Parameters
    ----------
    x_A, y_A : (N,) float
        The frame's detected columns, Å.
    dose_e_per_A2 : float, optional
        The frame's dose in electrons, e⁻/Å²; checked against ``dose_range_e_per_A2`` if given.
    vacuum, min_vacuum : float, optional
        The frame's share of vacuum (:func:`vacuum_fraction`) and the least the model needs
        (:func:`required_vacuum_fraction`); checked when both are given.
    min_columns, min_lattice_fraction : int, float
        See :data:`MIN_COLUMNS`, :data:`MIN_LATTICE_FRACTION`.
    dose_range_e_per_A2 : (2,) float
        Doses the model knows, e⁻/Å².

    Returns
    -------
    dict
        ``recognised`` (bool), ``lattice_fraction`` (fraction of columns on a CeO2 [110]
        lattice, NaN without columns), ``n_columns``, ``reason`` ('' when recognised, else one
        short phrase: why not — too few columns, not the lattice, the dose, or too little
        vacuum, checked in that order).
    """
    n = len(np.asarray(x_A).ravel())
    fraction = float(lattice_columns(x_A, y_A).mean()) if n else float("nan")
    reason = ""
    if n < min_columns:
        reason = f"{n} columns (a particle has ≥ {min_columns})"
    elif fraction < min_lattice_fraction:
        reason = f"{fraction:.0%} of columns on a CeO2 [110] lattice"
    elif dose_e_per_A2 is not None and not (
            dose_range_e_per_A2[0] <= dose_e_per_A2 <= dose_range_e_per_A2[1]):
        reason = (f"dose {dose_e_per_A2:.3g} e⁻/Å² outside {dose_range_e_per_A2[0]:g}–"
                  f"{dose_range_e_per_A2[1]:g}")
    elif vacuum is not None and min_vacuum is not None and vacuum < min_vacuum:
        reason = (f"{vacuum:.0%} of the frame is vacuum, this model needs ≥ {min_vacuum:.1%} "
                  "(a wider field of view)")
    return {"recognised": not reason, "lattice_fraction": fraction, "n_columns": n,
            "reason": reason}
