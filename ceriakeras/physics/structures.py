"""CeO2 nanoparticles (ASE): faceted fluorite shapes, surface defects, vacancies, orientation, and the Ce column table.

A particle is cut from the fluorite lattice (a = :data:`~ceriakeras.config.CEO2_LATTICE_A`) by
{111}, {100} and {110} planes, each at its own distance from an off-centre origin, so shapes
range from octahedra through truncated octahedra and cuboctahedra (Wulff-like) to irregular
ones. Surface steps, missing surface Ce, Ce adatoms on empty lattice sites next to the surface,
bulk Ce vacancies and O vacancies follow. Oxygen is kept on a tetrahedral site only if it has at
least two Ce neighbours (no dangling O). The crystal is then turned so that [110] lies along z
(the beam), rotated in-plane by a random angle and tilted by at most ``max_tilt_deg`` about a
random in-plane axis.

Lengths are in Å throughout.
"""

from __future__ import annotations

import math

import numpy as np
from ase import Atoms
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial import ConvexHull, QhullError, cKDTree
from scipy.spatial.distance import pdist

from ceriakeras.config import CEO2_LATTICE_A, ConfigError, StructureConfig

__all__ = ["build_particle", "column_table", "zone_axis_rotation", "MAX_ATTEMPTS"]

MAX_ATTEMPTS = 40
"""Redraws allowed before giving up on a particle whose columns are too tall."""

_CE_CE_A = CEO2_LATTICE_A / math.sqrt(2.0)  # nearest Ce–Ce distance (3.83 Å)
_CE_O_A = CEO2_LATTICE_A * math.sqrt(3.0) / 4.0  # nearest Ce–O distance (2.34 Å)
_NEIGHBOUR_TOL_A = 0.3

_FAMILY_NORMALS = {
    "111": [(i, j, k) for i in (1, -1) for j in (1, -1) for k in (1, -1)],
    "100": [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)],
    "110": [v for a in (1, -1) for b in (1, -1)
            for v in ((a, b, 0), (a, 0, b), (0, a, b))],
}
# Spacing between neighbouring atomic planes of each family (Ce sub-lattice), Å.
_LAYER_SPACING_A = {
    "111": CEO2_LATTICE_A / math.sqrt(3.0),
    "100": CEO2_LATTICE_A / 2.0,
    "110": CEO2_LATTICE_A / (2.0 * math.sqrt(2.0)),
}
# Ranges of the distance of each family's planes relative to the {111} distance. An octahedron
# has d100/d111 ≥ √3 and d110/d111 ≥ √(3/2); a cuboctahedron d100/d111 = 2/√3.
_RELATIVE_DISTANCE = {"111": (1.0, 1.0), "100": (1.0, 1.8), "110": (1.05, 1.5)}


def zone_axis_rotation() -> np.ndarray:
    """Rotation matrix (3, 3) taking the cubic crystal frame to the lab frame with [110] ‖ z.

    Rows are the lab axes in crystal coordinates: x = [001], y = [1-10]/√2, z = [110]/√2.
    """
    s = 1.0 / math.sqrt(2.0)
    return np.array([[0.0, 0.0, 1.0], [s, -s, 0.0], [s, s, 0.0]])


def _rotation_about(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    C = 1.0 - c
    return np.array([
        [c + x * x * C, x * y * C - z * s, x * z * C + y * s],
        [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
        [z * x * C - y * s, z * y * C + x * s, c + z * z * C],
    ])


def _fluorite_sites(half_width_A: float, with_oxygen: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Ce (fcc) and O (tetrahedral) sites of fluorite within a cube of ±half_width_A, Å."""
    a = CEO2_LATTICE_A
    n = int(math.ceil(half_width_A / a)) + 1
    g = np.arange(-n, n + 1)
    cells = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3).astype(float)
    ce_basis = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    o_basis = np.array([[x, y, z] for x in (0.25, 0.75) for y in (0.25, 0.75) for z in (0.25, 0.75)])
    ce = ((cells[:, None, :] + ce_basis[None]) * a).reshape(-1, 3)
    lim = half_width_A
    ce = ce[np.all(np.abs(ce) <= lim, axis=1)]
    if not with_oxygen:
        return ce, np.empty((0, 3))
    o = ((cells[:, None, :] + o_basis[None]) * a).reshape(-1, 3)
    o = o[np.all(np.abs(o) <= lim, axis=1)]
    return ce, o


def _neighbour_counts(points: np.ndarray, others: np.ndarray, distance_A: float) -> np.ndarray:
    """Number of ``others`` within ``distance_A`` (+ tolerance) of each point (excluding itself)."""
    if len(points) == 0 or len(others) == 0:
        return np.zeros(len(points), int)
    tree = cKDTree(others)
    hits = tree.query_ball_point(points, distance_A + _NEIGHBOUR_TOL_A, return_length=True)
    return np.asarray(hits, int)


def _draw_shape(rng: np.random.Generator, config: StructureConfig, scale: float) -> dict:
    """Draw size, origin and every facet plane's distance."""
    lo, hi = config.diameter_range_A
    diameter = max(rng.uniform(lo, hi) * scale, lo)
    d111 = diameter / 2.0
    origin = rng.normal(size=3)
    origin *= rng.uniform(0.0, config.origin_offset_A) / max(np.linalg.norm(origin), 1e-12)
    normals, distances, families = [], [], []
    family_ratio = {}
    for fam in ("111", "100", "110"):
        lo, hi = _RELATIVE_DISTANCE[fam]
        ratio = rng.uniform(lo, hi)
        family_ratio[fam] = ratio
        for v in _FAMILY_NORMALS[fam]:
            jitter = rng.uniform(-1.0, 1.0) * config.facet_jitter
            if fam not in config.facet_families:
                continue
            n = np.asarray(v, float)
            normals.append(n / np.linalg.norm(n))
            distances.append(d111 * ratio * (1.0 + jitter))
            families.append(fam)
    if not normals:
        raise ConfigError("facet_families is empty; give at least one of 111, 100, 110")
    return {
        "nominal_diameter_A": diameter,
        "origin": origin,
        "normals": np.array(normals),
        "distances": np.array(distances),
        "families": families,
        "family_ratio": family_ratio,
    }


def _cut(shape: dict) -> np.ndarray:
    """Ce sites inside the facet planes, without defects (crystal frame), Å."""
    normals, distances, origin = shape["normals"], shape["distances"], shape["origin"]
    families = np.asarray(shape["families"])
    bound = {"111": math.sqrt(3.0), "100": 1.0, "110": math.sqrt(2.0)}
    reach = min(bound[f] * float(distances[families == f].max()) for f in set(shape["families"]))
    reach += float(np.abs(origin).max()) + CEO2_LATTICE_A
    ce_sites, _ = _fluorite_sites(reach, with_oxygen=False)
    return ce_sites[np.all((ce_sites - origin) @ normals.T <= distances, axis=1)]


def _caliper(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` (N, 3), Å."""
    if len(points) > 8:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:
            pass
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def _carve(rng: np.random.Generator, config: StructureConfig, shape: dict):
    """Cut the lattice, add surface defects and vacancies. Returns (ce, o, defect counts)."""
    normals, distances, origin = shape["normals"], shape["distances"], shape["origin"]
    families = np.asarray(shape["families"])
    bound = {"111": math.sqrt(3.0), "100": 1.0, "110": math.sqrt(2.0)}
    reach = min(bound[f] * float(distances[families == f].max()) for f in set(shape["families"]))
    reach += float(np.abs(origin).max()) + CEO2_LATTICE_A
    ce_sites, o_sites = _fluorite_sites(reach)

    inside = np.all((ce_sites - origin) @ normals.T <= distances, axis=1)
    ce = ce_sites[inside]
    defects = {"step_atoms_removed": 0, "surface_ce_removed": 0, "ce_adatoms": 0,
               "ce_vacancies": 0, "o_vacancies": 0, "dangling_o_dropped": 0}

    # Surface step: remove the outer atomic layer of one facet on one side of a random line.
    if rng.random() < 0.6 and len(ce) > 20:
        i = int(rng.integers(len(normals)))
        layer = _LAYER_SPACING_A[shape["families"][i]]
        u = np.cross(normals[i], rng.normal(size=3))
        u /= np.linalg.norm(u)
        offset = rng.uniform(-0.5, 0.5) * distances[i]
        height = (ce - origin) @ normals[i]
        side = (ce - origin) @ u
        step = (height > distances[i] - layer * rng.integers(1, 3)) & (side > offset)
        defects["step_atoms_removed"] = int(step.sum())
        ce = ce[~step]

    # Surface Ce: fewer than the 12 Ce nearest neighbours of the bulk.
    n_ce_nb = _neighbour_counts(ce, ce, _CE_CE_A) - 1
    surface = np.flatnonzero(n_ce_nb < 12)
    bulk = np.flatnonzero(n_ce_nb >= 12)
    n_remove = rng.binomial(len(surface), config.surface_ce_removal_rate)
    removed = rng.choice(surface, size=n_remove, replace=False) if n_remove else np.empty(0, int)
    n_vac = rng.binomial(len(bulk), config.ce_vacancy_rate)
    vacancies = rng.choice(bulk, size=n_vac, replace=False) if n_vac else np.empty(0, int)
    defects["surface_ce_removed"] = int(n_remove)
    defects["ce_vacancies"] = int(n_vac)

    # Adatoms: empty Ce sites touching at least three particle Ce.
    n_add = rng.binomial(len(surface), config.surface_ce_addition_rate)
    if n_add:
        occupied = cKDTree(ce)
        empty = ce_sites[occupied.query(ce_sites)[0] > 0.5]
        touching = _neighbour_counts(empty, ce, _CE_CE_A) >= 3
        candidates = empty[touching]
        n_add = min(n_add, len(candidates))
        adatoms = candidates[rng.choice(len(candidates), size=n_add, replace=False)]
    else:
        adatoms = np.empty((0, 3))
    defects["ce_adatoms"] = int(n_add)

    keep = np.ones(len(ce), bool)
    keep[removed] = False
    keep[vacancies] = False
    ce = np.concatenate([ce[keep], adatoms])

    # Oxygen: tetrahedral sites with at least two Ce neighbours (each has four in the bulk).
    o = o_sites[np.all((o_sites - origin) @ normals.T <= distances + _CE_CE_A, axis=1)]
    n_o_nb = _neighbour_counts(o, ce, _CE_O_A)
    touched = n_o_nb >= 1
    kept = n_o_nb >= 2
    defects["dangling_o_dropped"] = int((touched & ~kept).sum())
    o = o[kept]
    n_ovac = rng.binomial(len(o), config.o_vacancy_rate)
    if n_ovac:
        drop = rng.choice(len(o), size=n_ovac, replace=False)
        o = np.delete(o, drop, axis=0)
        # Removing O never leaves another O with fewer Ce neighbours: O count only on Ce.
    defects["o_vacancies"] = int(n_ovac)
    return ce, o, defects


def _orient(rng: np.random.Generator, config: StructureConfig) -> tuple[np.ndarray, dict]:
    """Crystal → lab rotation: [110] ‖ z, in-plane rotation, then a small tilt."""
    rotation_deg = float(rng.uniform(0.0, 360.0))
    tilt_deg = float(rng.uniform(0.0, config.max_tilt_deg))
    azimuth_deg = float(rng.uniform(0.0, 360.0))
    in_plane = _rotation_about([0, 0, 1], math.radians(rotation_deg))
    az = math.radians(azimuth_deg)
    tilt = _rotation_about([math.cos(az), math.sin(az), 0.0], math.radians(tilt_deg))
    matrix = tilt @ in_plane @ zone_axis_rotation()
    beam_axis = matrix @ (np.array([1.0, 1.0, 0.0]) / math.sqrt(2.0))
    info = {"rotation_deg": rotation_deg, "tilt_deg": tilt_deg, "tilt_azimuth_deg": azimuth_deg,
            "zone_axis_lab": [float(v) for v in beam_axis]}
    return matrix, info


def _scale_to_nominal(shape: dict) -> bool:
    """Scale the facet distances of ``shape`` so its clean cut is ``nominal_diameter_A`` across
    (caliper); False if the clean cut holds fewer than 2 Ce atoms."""
    clean = _cut(shape)
    if len(clean) < 2:
        return False
    for _ in range(4):
        across = _caliper(clean)
        if abs(across - shape["nominal_diameter_A"]) < 1.0 or across == 0.0:
            break
        shape["distances"] = shape["distances"] * shape["nominal_diameter_A"] / across
        clean = _cut(shape)
    return True


def _facet_info(shape: dict) -> dict:
    """``facet_distances_A`` (per family), ``family_ratio`` and ``origin_offset_A`` of a shape."""
    by_family: dict[str, list[float]] = {}
    for fam, d in zip(shape["families"], shape["distances"]):
        by_family.setdefault(fam, []).append(round(float(d), 4))
    return {"facet_distances_A": by_family,
            "family_ratio": {k: float(v) for k, v in shape["family_ratio"].items()},
            "origin_offset_A": [float(v) for v in shape["origin"]]}


def build_particle(seed: int, config: StructureConfig | None = None) -> Atoms:
    """Build one CeO2 nanoparticle with [110] along z, centred at the origin.

    Parameters
    ----------
    seed : int
        Seed of everything random in the particle (same seed → identical particle).
    config : StructureConfig, optional
        Size range, facets, defect rates, tilt; defaults if None.

    Returns
    -------
    ase.Atoms
        Ce and O atoms, positions in Å, the bounding box centred at (0, 0, 0), no cell.
        ``atoms.info`` holds JSON-able shape metadata: ``diameter_A`` (largest Ce–Ce distance,
        the size "across", never above ``diameter_range_A[1]``), ``nominal_diameter_A`` (the
        size drawn, to which the clean cut is scaled), ``equivalent_diameter_A`` (sphere of the
        same Ce volume), ``extent_A`` (x, y, z size), ``facet_distances_A`` (per family, list of
        plane distances), ``family_ratio`` (family distance / {111} distance),
        ``origin_offset_A``, ``defects`` (counts), ``rotation_deg``, ``tilt_deg``,
        ``tilt_azimuth_deg``, ``zone_axis_lab``, ``n_ce``, ``n_o``, ``max_height``, ``attempts``,
        ``o_rule``.

    Raises
    ------
    ConfigError
        No particle with columns of at most ``config.max_height`` Ce in :data:`MAX_ATTEMPTS`.

    Notes
    -----
    The size drawn from ``diameter_range_A`` is the caliper (largest Ce–Ce distance) of the
    clean cut; the facet distances are scaled to reach it before surface defects are made. A
    particle whose tallest column exceeds ``config.max_height``, or which ends up wider than
    ``diameter_range_A[1]`` (adatoms), is redrawn from the same random stream with its size
    scaled by 0.95 per attempt (never below ``diameter_range_A[0]``), so the result stays a
    deterministic function of ``seed``.
    """
    config = config or StructureConfig()
    config.validate()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 110]))
    d_max = config.diameter_range_A[1]
    for attempt in range(MAX_ATTEMPTS):
        shape = _draw_shape(rng, config, scale=0.95**attempt)
        if not _scale_to_nominal(shape):
            continue
        ce, o, defects = _carve(rng, config, shape)
        matrix, orient = _orient(rng, config)
        if len(ce) < 2:
            continue
        positions = np.concatenate([ce, o]) @ matrix.T
        symbols = ["Ce"] * len(ce) + ["O"] * len(o)
        atoms = Atoms(symbols=symbols, positions=positions)
        lo, hi = positions.min(0), positions.max(0)
        atoms.positions -= (lo + hi) / 2.0
        table = column_table(atoms)
        max_h = int(table[:, 2].max())
        across = _caliper(ce)
        if max_h > config.max_height or across > d_max:
            continue
        volume = len(ce) * CEO2_LATTICE_A**3 / 4.0
        atoms.info.update({
            "diameter_A": float(across),
            "nominal_diameter_A": float(shape["nominal_diameter_A"]),
            "equivalent_diameter_A": float((6.0 * volume / math.pi) ** (1.0 / 3.0)),
            "extent_A": [float(v) for v in hi - lo],
            **_facet_info(shape),
            "defects": defects,
            **orient,
            "n_ce": int(len(ce)),
            "n_o": int(len(o)),
            "n_columns": int(len(table)),
            "max_height": max_h,
            "attempts": attempt + 1,
            "o_rule": "O kept on tetrahedral sites with >= 2 Ce neighbours",
        })
        return atoms
    raise ConfigError(
        f"no particle with columns of at most max_height={config.max_height} Ce atoms in "
        f"{MAX_ATTEMPTS} draws; lower diameter_range_A={list(config.diameter_range_A)} or raise max_height"
    )


def column_table(atoms: Atoms, tolerance_A: float = 1.0) -> np.ndarray:
    """The Ce columns seen along z: projected position and number of Ce atoms.

    Projected Ce positions are grouped by single-linkage clustering with a distance cut of
    ``tolerance_A`` (Ce columns along [110] are ≥ 3.3 Å apart, atoms inside one column project
    within a few 0.01 Å of each other for tilts ≤ 0.5°).

    Parameters
    ----------
    atoms : ase.Atoms
        The particle (any cell); only Ce atoms count.
    tolerance_A : float
        Largest projected distance, Å, between atoms linked into one column.

    Returns
    -------
    (N, 3) float64
        ``x_A, y_A, height`` per column: mean projected position (Å, same frame as
        ``atoms.positions``) and the number of Ce atoms, sorted by y then x.
    """
    if tolerance_A <= 0:
        raise ConfigError(f"tolerance_A={tolerance_A} must be positive")
    xy = atoms.positions[np.asarray(atoms.get_chemical_symbols()) == "Ce"][:, :2]
    if len(xy) == 0:
        return np.zeros((0, 3))
    if len(xy) == 1:
        return np.array([[xy[0, 0], xy[0, 1], 1.0]])
    labels = fcluster(linkage(xy, method="single"), t=tolerance_A, criterion="distance")
    n = labels.max()
    counts = np.bincount(labels, minlength=n + 1)[1:]
    sx = np.bincount(labels, weights=xy[:, 0], minlength=n + 1)[1:]
    sy = np.bincount(labels, weights=xy[:, 1], minlength=n + 1)[1:]
    table = np.stack([sx / counts, sy / counts, counts.astype(float)], axis=1)
    order = np.lexsort((table[:, 0], table[:, 1]))
    return table[order]


# --- other materials and zone axes (for testing what the model does not know) -----------------
OTHER_LATTICES_A = {"Pt": 3.924, "Au": 4.078, "CeO2": CEO2_LATTICE_A}
"""Cubic lattice constants, Å, of the materials :func:`build_other_particle` can make."""


def build_other_particle(material: str, zone_axis: tuple[int, int, int], diameter_A: float,
                         rotation_deg: float = 0.0) -> Atoms:
    """A round particle of an fcc metal or fluorite CeO2 with any low-index zone axis along z.

    Not training data: these are the frames the model was not made for (another material, or
    CeO2 along another axis), to test that :mod:`ceriakeras.inference.recognise` tells them apart. The
    particle is a sphere cut from the bulk crystal, centred at the origin.

    Parameters
    ----------
    material : {'Pt', 'Au', 'CeO2'}
        fcc Pt or Au, or fluorite CeO2 (Ce and O).
    zone_axis : (3,) int
        Crystal direction put along the beam (z), e.g. ``(1, 1, 0)`` or ``(1, 0, 0)``.
    diameter_A : float
        Sphere diameter, Å.
    rotation_deg : float
        In-plane rotation about the beam, degrees.

    Returns
    -------
    ase.Atoms
        Positions in Å, no cell; ``atoms.info`` holds material, zone_axis, diameter_A,
        rotation_deg.
    """
    if material not in OTHER_LATTICES_A:
        raise ConfigError(f"material {material!r} is not one of {sorted(OTHER_LATTICES_A)}")
    a = OTHER_LATTICES_A[material]
    radius = diameter_A / 2.0
    if material == "CeO2":
        ce, o = _fluorite_sites(radius + a)
        positions = np.concatenate([ce, o])
        symbols = ["Ce"] * len(ce) + ["O"] * len(o)
    else:
        n = int(math.ceil(radius / a)) + 2
        g = np.arange(-n, n + 1)
        cells = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3).astype(float)
        basis = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
        positions = ((cells[:, None, :] + basis[None]) * a).reshape(-1, 3)
        symbols = [material] * len(positions)
    z = np.asarray(zone_axis, float)
    z /= np.linalg.norm(z)
    helper = np.array([0.0, 0.0, 1.0]) if abs(z[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    matrix = _rotation_about([0, 0, 1], math.radians(rotation_deg)) @ np.stack([x, np.cross(z, x), z])
    lab = positions @ matrix.T
    keep = np.linalg.norm(lab, axis=1) <= radius
    atoms = Atoms(symbols=[s for s, k in zip(symbols, keep) if k], positions=lab[keep])
    atoms.info.update(material=material, zone_axis=[int(v) for v in zone_axis],
                      diameter_A=float(diameter_A), rotation_deg=float(rotation_deg))
    return atoms
