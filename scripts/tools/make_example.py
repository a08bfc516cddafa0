"""Make the shipped example: a low-dose HRTEM time series of one simulated CeO2 particle.

Writes ``examples/ceria_series.tif`` (ImageJ multi-page TIFF, uint16 detector counts, pixel size
in its calibration) and ``examples/ceria_series_truth.csv`` (the true Ce columns in the TIFF's
pixel grid: ``x_px, y_px, height``) and ``examples/ceria_series.json`` (optics, dose, seed).

The particle and optics come from the project's own simulator; each frame is a fresh Poisson
draw at the same dose, as a camera recording a static particle would see.

    .venv/bin/python scripts/tools/make_example.py [--dose 500] [--frames 6] [--seed 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import tifffile

from ceriakeras.config import SimulationConfig, StructureConfig
from ceriakeras.io.files import atomic_path, write_text_atomic
from ceriakeras.physics.simulate import simulate_particle

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dose", type=float, default=500.0, help="dose per frame, e-/Å² (default 500)")
    parser.add_argument("--frames", type=int, default=6, help="frames in the series (default 6)")
    parser.add_argument("--pixel-size", type=float, default=0.1, help="pixel size of the TIFF, Å (default 0.1)")
    parser.add_argument("--seed", type=int, default=7, help="seed of particle, optics and noise")
    parser.add_argument("--out", type=Path, default=EXAMPLES, help="output folder")
    args = parser.parse_args()

    config = SimulationConfig(
        structure=StructureConfig(diameter_range_A=(25.0, 35.0)),
        cell_size_A=52.0, sampling_A=args.pixel_size, pixel_size_A=args.pixel_size,
        optics_per_exit_wave=1,
    )
    example = simulate_particle(0, args.seed, config)[0]
    rng = np.random.default_rng(args.seed)
    counts_per_pixel = args.dose * args.pixel_size**2
    frames = rng.poisson(example.image * counts_per_pixel, size=(args.frames, *example.image.shape))

    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "ceria_series.tif") as tmp:
        tifffile.imwrite(tmp, frames.astype(np.uint16), imagej=True,
                         resolution=(1.0 / args.pixel_size, 1.0 / args.pixel_size),
                         metadata={"unit": "angstrom", "axes": "TYX"})
    truth = "x_px,y_px,height\n" + "".join(
        f"{x:.3f},{y:.3f},{int(h)}\n" for x, y, h in example.columns)
    write_text_atomic(args.out / "ceria_series_truth.csv", truth)
    meta = {k: example.metadata[k] for k in (
        "defocus_nm", "cs_um", "c5_mm", "focal_spread_nm", "astigmatism_nm", "energy_keV",
        "diameter_A", "n_columns")}
    meta.update(dose_e_per_A2=args.dose, frames=args.frames, pixel_size_A=args.pixel_size,
                seed=args.seed, config=dataclasses.asdict(config))
    write_text_atomic(args.out / "ceria_series.json", json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/ceria_series.tif: {args.frames} frames of {frames.shape[1]}×{frames.shape[2]} px "
          f"at {args.pixel_size} Å, {args.dose:g} e-/Å², {len(example.columns)} Ce columns")


if __name__ == "__main__":
    main()
