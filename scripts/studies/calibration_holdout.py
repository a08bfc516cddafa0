"""Choose a confidence-calibration recipe on our own held-out data: no labelled images of another
generator are needed or used.

Collects, once per dataset, the columns a model reports on noisy copies of it
(:func:`ceriakeras.evaluation.calibration.collect_columns`: noise seed 1, the calibration doses; cached as
``.npz`` under ``--cache``). Each recipe is fitted on some of the sets (``--fit``) and scored on
*other* sets (``--holdout``): sets simulated with the same shifted settings as the calibration
sets but other particles and optics (new seeds), and a validation split of the training
generator that the fit did not see. Per dose it prints the ECE over matched columns (as the
cross-check set's ``score.py`` counts it) and, in brackets, mean confidence − fraction right
(positive = over-confident), then the worst held-out ECE per dose: the figure to choose by,
since the images a user brings may be like any of the held-out sets.

    python scripts/studies/calibration_holdout.py --model saved_models/ceria110/6 \\
        --fit S1=tfrecords/calib-fine --fit S2=tfrecords/calib-generalization \\
        --fit V=tfrecords/ceria110-v3-b:validation \\
        --holdout S1h=tfrecords/calib-fine-h --holdout S2h=tfrecords/calib-generalization-h \\
        --holdout Vh=tfrecords/ceria110-v3-c:validation --max-images 64 --cache /tmp/calcache

Recipes (``--recipes``, comma-separated ``SETS/MAP/POOLING``; SETS joined by ``+``): MAP is one
of ``platt``, ``isotonic``, ``logistic``; POOLING is ``pooled`` (one fit on all the sets'
columns, what ``export --calibrate`` does), ``mean`` (Platt fitted per set, slopes and
intercepts averaged: ``calibration.fit_map(..., pooling="mean")``) or ``shared`` (pooled, one
Platt slope for every dose). The fitted datasets' own ECE (after the fit) is printed too.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from ceriakeras.evaluation.holdout import pooled, score, subset_ece

REPORT_DOSES = (5000.0, 1000.0, 200.0, 50.0)
DEFAULT_RECIPES = ("S1+S2/platt/pooled,S1+S2/platt/mean,S1+S2/isotonic/pooled,"
                   "S1+S2/platt/shared,S1+S2+V/platt/pooled,S1+S2+V/platt/mean")


def load_columns(model, name: str, spec: str, max_images: int, cache: Path | None,
                 need_image: bool = False) -> dict:
    """Per dose, :func:`collect_columns`' arrays for one dataset (read from or written to the
    cache, keyed by model folder, dataset and image count)."""
    from ceriakeras.evaluation.calibration import collect_columns

    path = None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        key = f"{Path(model.path).resolve()}|{spec}|{max_images}".replace("/", "_").replace(":", "~")
        path = cache / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
        if path.is_file():
            data = np.load(path, allow_pickle=False)
            doses = sorted({float(k.split("|")[0]) for k in data.files})
            if not need_image or f"{doses[0]}|image" in data.files:  # older caches lack it
                return {d: {k.split("|")[1]: data[k] for k in data.files
                            if float(k.split("|")[0]) == d} for d in doses}
    columns, _ = collect_columns(model.predict, [spec], model.info, max_images=max_images,
                                 progress=True, desc=name)
    if path is not None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"{d}|{k}": v for d, c in columns.items() for k, v in c.items()})
        tmp.replace(path)
    return columns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="exported model (version folder)")
    parser.add_argument("--fit", action="append", default=[], metavar="NAME=PATH[:SPLIT]",
                        help="a dataset recipes may be fitted on (repeatable)")
    parser.add_argument("--holdout", action="append", default=[], metavar="NAME=PATH[:SPLIT]",
                        help="a dataset recipes are scored on, never fitted on (repeatable)")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="SETS/MAP/POOLING, comma-separated")
    parser.add_argument("--max-images", type=int, default=64, help="images per dataset (count)")
    parser.add_argument("--cache", type=Path, default=None, help="folder for collected columns")
    parser.add_argument("--frames", type=int, default=0, metavar="N",
                        help="also print, for the first recipe, the spread of the ECE over random "
                             "sets of N held-out images per dose (a labelled set of N frames)")
    args = parser.parse_args(argv)

    from ceriakeras.evaluation.calibration import fit_map
    from ceriakeras.inference.served import load_served_model

    model = load_served_model(args.model)
    fit_specs = dict(s.split("=", 1) for s in args.fit)
    held_specs = dict(s.split("=", 1) for s in args.holdout)
    if set(fit_specs) & set(held_specs):
        parser.error("a dataset cannot be both fitted on and held out")
    data = {n: load_columns(model, n, s, args.max_images, args.cache,
                            need_image=n in held_specs and args.frames > 0)
            for n, s in {**fit_specs, **held_specs}.items()}
    for name, cols in data.items():
        right = [cols[d]["correct"][cols[d]["matched"].astype(bool)].mean() for d in REPORT_DOSES]
        print(f"# {name}: exact (matched columns) at {'/'.join(f'{d:g}' for d in REPORT_DOSES)}"
              f" e-/A2: " + " / ".join(f"{r:.3f}" for r in right))
    head = " | ".join(f"{n} {d:g}" for n in held_specs for d in REPORT_DOSES)
    print(f"| recipe | {head} | worst {' | worst '.join(f'{d:g}' for d in REPORT_DOSES)} | fit sets' own |")
    print("|" + " --- |" * (2 + len(held_specs) * len(REPORT_DOSES) + len(REPORT_DOSES)))
    recipes = args.recipes.split(",")
    tables = {}
    for recipe in ["raw//"] + recipes:
        sets, method, pooling = recipe.split("/")
        if recipe == "raw//":
            table = {"map": "platt", "dose_e_per_A2": [1.0], "slope": [1.0], "intercept": [0.0]}
            own = ""
        else:
            names = sets.split("+")
            table = fit_map(pooled([data[n] for n in names]), method, pooling=pooling)
            own = "/".join(f"{e:.3f}" for d, e in zip(table["dose_e_per_A2"], table["ece_after"])
                           if d in REPORT_DOSES)
        cells, worst = [], {d: 0.0 for d in REPORT_DOSES}
        for name in held_specs:
            for d in REPORT_DOSES:
                ece, gap = score(data[name], table, d)
                worst[d] = max(worst[d], ece)
                cells.append(f"{ece:.3f} ({gap:+.3f})")
        print(f"| {recipe if recipe != 'raw//' else 'raw confidence'} | " + " | ".join(cells)
              + " | " + " | ".join(f"**{worst[d]:.3f}**" for d in REPORT_DOSES) + f" | {own} |")
        sys.stdout.flush()
        tables[recipe] = table
    if args.frames:
        from ceriakeras.evaluation.calibration import parse_dataset
        from ceriakeras.data.records import read_manifest

        print(f"\nECE of {args.frames}-image sets (each image of another particle) drawn from "
              f"each held-out set (recipe {recipes[0]}): median / 90th / 95th "
              "percentile [median if each column were right with its calibrated confidence]")
        for name, spec in held_specs.items():
            per = int(read_manifest(parse_dataset(spec)[0]).get("optics_per_exit_wave", 1))
            cells = []
            for d in REPORT_DOSES:
                e, floor = subset_ece(data[name], tables[recipes[0]], d, args.frames,
                                      per_particle=per)
                cells.append(f"{d:g}: {np.median(e):.3f} / {np.quantile(e, 0.9):.3f} / "
                             f"{np.quantile(e, 0.95):.3f} [{np.median(floor):.3f}]")
            print(f"- {name}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
