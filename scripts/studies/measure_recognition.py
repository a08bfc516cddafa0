"""Measure how well `recognised` (ceriakeras.inference.recognise) separates frames the model knows from others.

Simulates frames of CeO2 along [110] (the training generator's particles, with a seed outside the
training set, and round particles) and of things the model was not made for (Pt and Au along
[110], CeO2 along [100], vacuum) at several doses, runs the shipped model and the column
extraction exactly as `analyze` does, and prints the fraction of frames recognised per class and
dose as a Markdown table. The real STEM files in ../shared/realdata/ are added as they are.
With --scale-errors it also reports CeO2 [110] with a wrong pixel-size calibration.

    .venv/bin/python scripts/studies/measure_recognition.py [--images 12] [--doses 50,200,1000,5000] [--seed S]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ceriakeras.inference.served import load_model, model_settings
from ceriakeras.inference.columns import find_columns
from ceriakeras.config import AnalyzeConfig, OpticsConfig, SimulationConfig, StructureConfig
from ceriakeras.io.series import open_series
from ceriakeras.inference.resample import resample_counts, resample_factor
from ceriakeras.inference.served import with_model_threshold
from ceriakeras.inference.recognise import recognise_frame
from ceriakeras.physics.simulate import draw_optics, image_of_atoms, simulate_particle
from ceriakeras.physics.structures import build_other_particle

ROOT = Path(__file__).resolve().parents[2]
REAL = next((p / "shared" / "realdata" for p in ROOT.parents
             if (p / "shared" / "realdata").is_dir()), ROOT.parent / "shared" / "realdata")
CELL_A = 48.0
SEED = 31337  # not a training seed (--seed changes it)


def simulated_classes(n_images: int, pixel_A: float, seed: int = SEED
                      ) -> dict[str, list[np.ndarray]]:
    """Noise-free images (vacuum = 1) of each class, at ``pixel_A``."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    config = SimulationConfig.legacy(structure=StructureConfig(diameter_range_A=(15.0, 32.0)),
                                     cell_size_A=CELL_A, pixel_size_A=pixel_A, optics_per_exit_wave=2)
    images = []
    for p in range((n_images + 1) // 2):
        images += [ex.image for ex in simulate_particle(p, seed, config)]
    out["CeO2 [110] (training generator)"] = images[:n_images]
    for name, material, axis in (("CeO2 [110] (round particle)", "CeO2", (1, 1, 0)),
                                 ("Pt [110]", "Pt", (1, 1, 0)), ("Au [110]", "Au", (1, 1, 0)),
                                 ("CeO2 [100]", "CeO2", (1, 0, 0))):
        out[name] = [image_of_atoms(build_other_particle(material, axis, rng.uniform(15, 32),
                                                         rng.uniform(0, 360)),
                                    draw_optics(rng, OpticsConfig()), cell_size_A=CELL_A,
                                    pixel_size_A=pixel_A)
                     for _ in range(n_images)]
    n = int(round(CELL_A / pixel_A))
    out["vacuum"] = [np.ones((n, n), np.float32)] * n_images
    return out


def recognised(served, counts: np.ndarray, model_px: float, radius: float, dose: float,
               scale: float = 1.0) -> dict:
    probabilities, _ = served.predict(counts[None].astype(np.float32))
    threshold = with_model_threshold(AnalyzeConfig(), served.info).threshold   # as analyze
    table = find_columns(np.asarray(probabilities)[0], model_px, label_radius_A=radius,
                         threshold=threshold)
    return recognise_frame(table["x_px"] * model_px * scale, table["y_px"] * model_px * scale,
                           dose)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images per class (default 12)")
    parser.add_argument("--doses", default="50,200,1000,5000", help="doses, e-/Å² (comma list)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of particles, optics, "
                        f"noise (default {SEED}; not a training seed)")
    parser.add_argument("--scale-errors", default="0.92,0.95,1.05,1.08",
                        help="pixel-size calibration errors tried on CeO2 [110] (factors)")
    args = parser.parse_args()
    doses = [float(d) for d in args.doses.split(",")]
    served, _ = load_model(None)
    model_px, _, radius = model_settings(served.info)
    t0 = time.perf_counter()
    classes = simulated_classes(args.images, model_px, args.seed)
    print(f"simulated {sum(map(len, classes.values()))} images in {time.perf_counter() - t0:.0f} s")
    rng = np.random.default_rng(args.seed + 1)
    rows, details = [], []
    for name, images in classes.items():
        rates, fractions = [], []
        for dose in doses:
            results = [recognised(served, rng.poisson(im * dose * model_px**2), model_px,
                                  radius, dose) for im in images]
            rates.append(np.mean([r["recognised"] for r in results]))
            f = np.array([r["lattice_fraction"] for r in results], float)
            fractions.append(float(np.nanmean(f)) if np.isfinite(f).any() else np.nan)
            why = sorted({r["reason"] for r in results if r["reason"]})
            details.append(f"{name} at {dose:g} e⁻/Å²: lattice fraction "
                           + (f"{np.nanmin(f):.2f}–{np.nanmax(f):.2f}" if np.isfinite(f).any()
                              else "–")
                           + f", columns {min(r['n_columns'] for r in results)}–"
                           f"{max(r['n_columns'] for r in results)}"
                           + (f"; not recognised: {'; '.join(why[:4])}" if why else ""))
        rows.append((name, rates, fractions))
    print(f"\n| frames ({args.images} per class) | "
          + " | ".join(f"{d:g} e⁻/Å²" for d in doses) + " |")
    print("| --- |" + " --- |" * len(doses))
    for name, rates, fractions in rows:
        cells = [f"{r:.0%} ({f:.2f})" if np.isfinite(f) else f"{r:.0%} (–)"
                 for r, f in zip(rates, fractions)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\ncells: fraction of frames recognised (mean fraction of columns on the CeO2 [110] "
          "lattice)\n")
    print("\n".join(details))

    for scale in [float(s) for s in args.scale_errors.split(",") if s]:
        images = classes["CeO2 [110] (training generator)"]
        r = [recognised(served, rng.poisson(im * 1000 * model_px**2), model_px, radius, 1000,
                        scale)["recognised"] for im in images]
        print(f"CeO2 [110] at 1000 e⁻/Å² with the pixel size off by ×{scale:g}: "
              f"{np.mean(r):.0%} recognised")

    for path in sorted(REAL.glob("*.dm3")) + sorted(REAL.glob("*.emd")):
        try:
            with open_series(path) as series:
                factor = resample_factor(series.pixel_size_A, model_px)
                frame = next(series.frames())
                small = resample_counts(frame.image, factor)
                dose = float(small.mean()) / model_px**2
                r = recognised(served, small, model_px, radius, dose)
                print(f"{path.name}: {r['n_columns']} columns, recognised={r['recognised']} "
                      f"({r['reason'] or 'recognised'})")
        except Exception as err:  # a reader missing for one of them must not hide the rest
            print(f"{path.name}: not measured ({err})")


if __name__ == "__main__":
    main()
