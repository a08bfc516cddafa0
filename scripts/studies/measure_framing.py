"""Does a model's height depend on how much vacuum the field of view holds?

Takes labelled images in the cross-check set's format (``images.csv``, ``truth.csv``, TIFFs of
counts), makes two more framings of each: *padded* (the frame grown by ``--pad`` of its side on
every edge with Poisson vacuum at the level of the image's edge) and *tight* (``--trim`` of its
side cut from every edge; truth columns outside dropped), scores the model on all three as
``ceriakeras evaluate --images`` does (``evaluate.evaluate_images``, the model loaded once) and
prints the bias and accuracy per dose. A model whose input normalisation ignores framing gives
the same heights on all three (up to the columns the tight frame loses).

    python scripts/studies/measure_framing.py --model saved_models/ceria110 \
        --images ../shared/crosscheck --doses 1000,5000 --out results/framing

Validation only: nothing is fitted to the images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ceriakeras.evaluation.framing import reframe, vacuum_shares

FRAMINGS = (("as given", "given"), ("padded", "padded"), ("tight", "tight"))
"""Label in the printed table and sub-folder of ``--out`` of each framing."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="saved_models/ceria110", help="saved_models/NAME")
    ap.add_argument("--images", default="../shared/crosscheck",
                    help="folder with images.csv, truth.csv and the TIFFs")
    ap.add_argument("--doses", default="1000,5000", help="doses to use, e⁻/Å², comma-separated")
    ap.add_argument("--pad", type=float, default=0.5, help="vacuum added per edge, share of the side")
    ap.add_argument("--trim", type=float, default=0.2, help="cut per edge, share of the side")
    ap.add_argument("--out", default="results/framing", help="work and result folder")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # TensorFlow's C++ start-up lines
    from ceriakeras.evaluation.evaluate import evaluate_images
    from ceriakeras.inference.served import load_served_model

    src, out = Path(args.images), Path(args.out)
    doses = {d.strip() for d in args.doses.split(",")}
    from ceriakeras.inference.recognise import required_vacuum_fraction

    model = load_served_model(args.model)            # once, for the three framings
    need = required_vacuum_fraction(model.info)
    table, vacuum = {}, {}
    for (label, sub), grow in zip(FRAMINGS, (0.0, args.pad, -args.trim)):
        folder = out / sub
        if folder.exists():
            shutil.rmtree(folder)
        reframe(src, folder / "images", doses, grow)
        name = f"{label} {abs(grow):g}" if grow else label
        table[name] = evaluate_images(
            model, folder / "images", folder / "images" / "truth.csv", folder / "result",
            progress=False)
        vacuum[name] = vacuum_shares(folder / "images", folder / "result" / "columns.csv")
    print(f"model {args.model}, images {src}")
    print(f"{'framing':<12} {'dose (e-/Å²)':>12} {'columns':>8} {'exact':>6} {'±1':>6} "
          f"{'bias (atoms)':>13}")
    for name, metrics in table.items():
        for row in metrics["results"]:
            m = row["network"]
            print(f"{name:<12} {row['dose_e_per_A2']:>12g} {m['n_true']:>8} "
                  f"{m['exact_accuracy']:>6.3f} {m['within_1_accuracy']:>6.3f} "
                  f"{m['bias_atoms']:>+13.2f}")
    print("share of each frame that is vacuum (area > 5 Å from every column found), as "
          "`analyze` measures it" + ("" if need is None else
                                     f"; this model needs ≥ {need:.1%}"))
    for name, shares in vacuum.items():
        flagged = "" if need is None else (
            f", {np.mean(np.asarray(shares) < need):.0%} of frames below it (not recognised)")
        print(f"{name:<12} median {np.median(shares):.0%}, range {min(shares):.0%}–"
              f"{max(shares):.0%}{flagged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
