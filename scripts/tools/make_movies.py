"""Make a set of movies in the layout of ``../shared/crossmovie`` with the project's simulator.

usage: python scripts/tools/make_movies.py --out /work/scratch/h2/tune --particles 4 --seed 100

Each particle gives one movie per dose (same states, drift and optics): ``pPP_dDOSE.tif``
(multi-page uint16 counts; give ``--pixel-size`` to analyze), ``movies.csv``, ``truth.csv`` and
``events.csv`` (:mod:`ceriakeras.physics.movie`), and ``faults.json`` when any of what a
microscope adds is asked for (``--dose-fall``, ``--focus-drift-nm``, …: the same seed's movies
otherwise). Score an analysis of it with ``python ../shared/crossmovie/score.py OUT RESULTS``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ceriakeras.config import SimulationConfig, StructureConfig
from ceriakeras.physics.movie import MovieFaults, simulate_movie


def movie_config(pixel_size_A: float, cell_A: float, diameter_A: tuple[float, float]
                 ) -> SimulationConfig:
    """A cheap simulation: the converged 0.04 Å / 1 Å multislice in the particle + 8 Å only."""
    return SimulationConfig(structure=StructureConfig(diameter_range_A=diameter_A),
                            cell_size_A=cell_A, pixel_size_A=pixel_size_A, sampling_A=0.04,
                            slice_thickness_A=1.0, multislice_margin_A=8.0,
                            optics_per_exit_wave=1)


FAULT_OPTIONS = {
    "dose_fall": "relative fall of the dose over the movie (0.1: −10 %%)",
    "dose_flicker": "relative standard deviation of each frame's dose",
    "state_scale": "relative standard deviation of each state's image scale",
    "focus_drift_nm": "change of defocus over the movie, nm",
    "drift_jump_A": "a step of the drift in the middle of the movie, Å (at 45°)",
    "psf_px": "detector point spread (Gaussian standard deviation), pixels",
    "gain": "detector counts per electron",
    "read_noise": "detector Gaussian read noise, counts",
}
"""The :class:`MovieFaults` fields given as options (``--dose-fall`` …), and their help."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for the movies (TIFF), movies.csv, truth.csv and events.csv")
    ap.add_argument("--particles", type=int, default=3, help="particles, one movie each per dose")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the whole set")
    ap.add_argument("--doses", type=float, nargs="+", default=[50.0, 200.0],
                    help="e⁻/Å² per frame")
    ap.add_argument("--frames", type=int, default=48, help="frames per movie")
    ap.add_argument("--change-frames", type=int, nargs="+", default=[16, 32],
                    help="frames (from 0) that are the first at a new state")
    ap.add_argument("--changes", type=int, default=3, help="columns changing at each change frame")
    ap.add_argument("--max-drift-A", type=float, default=3.0, help="largest drift over the movie, Å")
    ap.add_argument("--pixel-size-A", type=float, default=0.1, help="pixel size, Å")
    ap.add_argument("--cell-A", type=float, default=56.0, help="field of view, Å")
    ap.add_argument("--diameter-A", type=float, nargs=2, default=[20.0, 34.0],
                    help="smallest and largest particle diameter, Å")
    group = ap.add_argument_group("what a microscope adds (robustness studies; all off by "
                                  "default, the same seed's movie otherwise)")
    for name, text in FAULT_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=float,
                           default=getattr(MovieFaults(), name), help=text)
    a = ap.parse_args(argv)
    import tifffile

    a.out.mkdir(parents=True, exist_ok=True)
    config = movie_config(a.pixel_size_A, a.cell_A, tuple(a.diameter_A))
    faults = MovieFaults(**{name: getattr(a, name) for name in FAULT_OPTIONS})
    if faults != MovieFaults():
        (a.out / "faults.json").write_text(json.dumps(asdict(faults), indent=1) + "\n")
    rng = np.random.default_rng(a.seed)
    movies, truth, events = [], [], []
    for k in range(a.particles):
        t0 = time.perf_counter()
        drift = float(rng.uniform(0.3, 1.0) * a.max_drift_A)
        m = simulate_movie(a.seed * 1000 + k, config, doses=tuple(a.doses), n_frames=a.frames,
                           change_frames=tuple(a.change_frames), changes_per_step=a.changes,
                           max_drift_A=drift, faults=faults)
        o = m["optics"]
        for dose, frames in m["movies"].items():
            name = f"p{k:02d}_d{dose:g}.tif"
            tifffile.imwrite(a.out / name, frames, compression="zlib")
            movies.append((name, k, dose, a.pixel_size_A, a.frames, *a.change_frames,
                           round(drift, 3), o["defocus_nm"], o["cs_um"], o["c5_mm"],
                           o["focal_spread_nm"], o["astigmatism_nm"], m["diameter_A"]))
            truth += [(name, f, c, f"{x:.3f}", f"{y:.3f}", h) for f, c, x, y, h in m["truth"]]
            events += [(name, c, f, f"{x:.3f}", f"{y:.3f}", hb, ha)
                       for c, f, x, y, hb, ha in m["events"]]
        print(f"particle {k}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    t_cols = ",".join(f"t{i + 1}" for i in range(len(a.change_frames)))
    header = {"movies.csv": f"file,particle,dose,pixel_size_A,frames,{t_cols},drift_max_A,"
                            "defocus_nm,Cs_um,C5_mm,focal_spread_nm,astig_nm,size_A",
              "truth.csv": "file,frame,column,x_px,y_px,height",
              "events.csv": "file,column,frame,x_px,y_px,height_before,height_after"}
    for name, rows in (("movies.csv", movies), ("truth.csv", truth), ("events.csv", events)):
        with open(a.out / name, "w", newline="") as fh:
            fh.write(header[name] + "\n")
            csv.writer(fh, lineterminator="\n").writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
