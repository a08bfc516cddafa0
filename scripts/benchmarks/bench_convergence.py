"""Multislice convergence of the noise-free images of the thickest particle (issue 11).

Usage::

    python scripts/benchmarks/bench_convergence.py [--seed 340] [--cell 64] [--out docs/img/convergence.png]

A particle of the version-3 size range (default seed 340 of ``configs/ceria110_v3_data.toml``'s
structure: 5 nm across, 14-atom columns, the thickest the data hold) is simulated at several
multislice samplings and slice thicknesses; each exit wave is imaged through a few optics
(from Gaussian focus to the corners of the envelope: defocus ±12 nm, Cs ±25 µm, C5 5 mm, 40 mrad
aperture, 3 nm focal spread) at the stored 0.2 Å pixel size and compared with the image of the
reference setting (0.025 Å, 0.5 Å slices) by :func:`ceriakeras.physics.simulate.contrast_rms_difference`
(RMS difference / RMS contrast of the reference). Prints a table (Markdown) and saves a figure
of RMS % against sampling. The cell only needs to hold the particle: every setting is compared
on the same cell. Single-threaded; CPU seconds per multislice are in the table. Takes about
6 CPU minutes at the defaults (the 0.025 Å runs dominate).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from ceriakeras.config import SimulationConfig, load_config  # noqa: E402
from ceriakeras.physics.simulate import multislice_convergence, place_in_cell  # noqa: E402
from ceriakeras.physics.structures import build_particle, column_table  # noqa: E402

OPTICS = [  # (label, defocus nm, Cs µm, C5 mm)
    ("Gaussian focus", 0.0, 0.0, 0.0),
    ("NCSI: -6 nm, -15 µm", -6.0, -15.0, 1.0),
    ("+12 nm, +25 µm, 5 mm", 12.0, 25.0, 5.0),
    ("-12 nm, -25 µm", -12.0, -25.0, 0.0),
]
SETTINGS = [(0.1, 2.0), (0.05, 2.0), (0.04, 2.0), (0.025, 2.0),
            (0.1, 1.0), (0.05, 1.0), (0.04, 1.0), (0.025, 1.0),
            (0.05, 0.5), (0.04, 0.5), (0.025, 0.5), (0.05, 4.0)]
REFERENCE = (0.025, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ceria110_v3_data.toml",
                        help="SimulationConfig whose structure settings build the particle")
    parser.add_argument("--seed", type=int, default=340, help="particle seed")
    parser.add_argument("--cell", type=float, default=64.0, help="cell side, Å")
    parser.add_argument("--out", default="docs/img/convergence.png", help="figure (PNG)")
    parser.add_argument("--quick", action="store_true",
                        help="only 0.1 and 0.05 Å against 0.04 Å (a smoke test)")
    args = parser.parse_args()
    config = load_config(SimulationConfig, args.config)
    atoms = place_in_cell(build_particle(args.seed, config.structure), args.cell)
    table = column_table(atoms)
    settings, reference = SETTINGS, REFERENCE
    if args.quick:
        settings, reference = [(0.1, 2.0), (0.05, 2.0), (0.04, 2.0)], (0.04, 2.0)
    optics = [dict(energy_keV=300.0, defocus_nm=f, cs_um=cs, c5_mm=c5, focal_spread_nm=3.0,
                   astigmatism_nm=0.0, astigmatism_angle_deg=0.0, aperture_mrad=40.0)
              for _, f, cs, c5 in OPTICS]
    print(f"particle seed {args.seed}: {atoms.info['diameter_A']:.1f} Å across, "
          f"{int(table[:, 2].max())} Ce in the tallest column, {len(atoms)} atoms; "
          f"cell {args.cell} Å; reference {reference[0]} Å sampling, {reference[1]} Å slices; "
          f"images at 0.2 Å pixels, 300 keV, 40 mrad, 3 nm focal spread", flush=True)
    rows = multislice_convergence(atoms, settings, reference, optics, 0.2)
    head = " | ".join(label for label, *_ in OPTICS)
    print(f"\n| sampling (Å) | slice (Å) | {head} | max | CPU s per multislice |")
    print("|" + " --- |" * (len(OPTICS) + 4))
    for r in rows:
        cells = " | ".join(f"{v:.1f} %" for v in r["rms_percent"])
        print(f"| {r['sampling_A']} | {r['slice_thickness_A']} | {cells} | "
              f"{max(r['rms_percent']):.1f} % | {r['cpu_s']:.0f} |")
    sys.stdout.flush()

    plot(rows, reference, int(table[:, 2].max()), Path(args.out))
    print(f"\nfigure: {args.out}")


def plot(rows: list[dict], reference: tuple[float, float], tallest: int, out: Path) -> None:
    """RMS % against sampling, one colour per optics, one line style per slice thickness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=120)
    for dz, style in ((2.0, "-o"), (1.0, "--s"), (0.5, ":^")):
        sel = [r for r in rows if r["slice_thickness_A"] == dz]
        if not sel:
            continue
        x = [r["sampling_A"] for r in sel]
        for i, (label, *_) in enumerate(OPTICS):
            ax.plot(x, [r["rms_percent"][i] for r in sel], style, color=f"C{i}",
                    label=label if dz == 2.0 else (f"{dz:g} Å slices" if i == 0 else None))
    ax.axhline(5.0, color="k", lw=0.8, ls=":")
    ax.text(0.1, 5.4, "5 %", fontsize=8)
    ax.set_xlabel("multislice sampling (Å)")
    ax.set_ylabel("RMS difference (% of reference contrast)")
    ax.set_title(f"{tallest}-atom columns, against {reference[0]} Å sampling and "
                 f"{reference[1]:g} Å slices\n(solid: 2 Å, dashed: 1 Å, dotted: 0.5 Å slices)",
                 fontsize=9)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
