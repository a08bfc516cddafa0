"""Which calibration data and map keep `confidence` honest on labelled images of another generator.

Collects, once per dataset, the columns a model reports on noisy copies of each calibration set
(:func:`ceriakeras.evaluation.calibration.collect_columns`: noise seed 1, the doses of the calibration), and
once the model's raw columns on labelled image files (the cross-check set: resampled and
extracted as ``analyze`` does, matched within 1 Å as its ``score.py`` does). Then, for every pool
of sets and every map asked for, fits :func:`ceriakeras.evaluation.calibration.fit_map` on the pool only and
prints, per dose of the images, the ECE over matched columns and mean confidence − fraction right
(a markdown table: docs/model.md, "Calibration off the training generator"). The labelled images
are only scored, never fitted to.

    python scripts/studies/calibration_study.py --model saved_models/ceria110/2 \\
        --data S1=tfrecords/calib-fine --data S2=tfrecords/calib-generalization \\
        --pool S1 --pool S2 --pool S1+S2 --images ../shared/crosscheck --max-images 96

The S1 + S2 Platt row equals what ``ceriakeras calibrate`` then ``ceriakeras evaluate --images``
report (the end-to-end check in docs/model.md). Version 2 left the tree with issue 23: first
``git checkout ceria110-v2 -- saved_models/ceria110/2`` (docs/model.md, "Getting an old version
back").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def image_columns(model, folder: Path) -> list[dict]:
    """Per labelled image: the dose (e⁻/Å², from images.csv) and estimated dose, and the raw
    columns (confidence, height, height_std) with ``correct`` over the matched ones."""
    from ceriakeras.config import AnalyzeConfig
    from ceriakeras.evaluation.evaluate import labelled_image_plan, read_image_table, read_truth
    from ceriakeras.evaluation.scoring import Tally
    from ceriakeras.inference.served import model_settings
    from ceriakeras.inference.predict import ColumnSettings, predict_columns
    from ceriakeras.io.series import expand_inputs, open_series

    model_px = model_settings(model.info)[0]
    settings = ColumnSettings.for_model(model.info, calibrated=False)
    table = read_image_table(folder / "images.csv") if (folder / "images.csv").is_file() else {}
    plan, _ = labelled_image_plan(expand_inputs([folder]), read_truth(folder / "truth.csv"), folder,
                                  table, pixel_size_A=None, model_pixel_A=model_px,
                                  config=AnalyzeConfig())
    out = []
    for item in plan:
        with open_series(item["path"], item["pixel_size_A"]) as series:
            frame = next(series.frames())
        found, estimated = predict_columns(model, frame.image, item["factor"], settings)
        tally = Tally()
        tally.add(found, item["truth"], item["pixel_size_A"], 1.0)
        keep = tally.matched[0]
        out.append({"dose": item["dose_e_per_A2"], "estimated": estimated,
                    **{k: found[k][keep] for k in ("confidence", "height", "height_std")},
                    "correct": tally.correct[0][keep]})
    return out


def score(images: list[dict], table: dict | None) -> list[str]:
    """``'ECE (mean conf − accuracy)'`` per dose of the images, highest dose first."""
    from ceriakeras.inference.columns import calibrate_confidence
    from ceriakeras.evaluation.scoring import calibration

    cells = []
    for dose in sorted({im["dose"] for im in images}, reverse=True):
        conf, right = [], []
        for im in (i for i in images if i["dose"] == dose):
            c = im["confidence"] if table is None else calibrate_confidence(
                im["confidence"], im["estimated"], table, height=im["height"],
                height_std=im["height_std"])
            conf.append(c)
            right.append(im["correct"])
        conf, right = np.concatenate(conf), np.concatenate(right)
        cells.append(f"{calibration(conf, right)['ece']:.3f} ({conf.mean() - right.mean():+.3f})")
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="exported model (version folder)")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=PATH[:SPLIT]",
                        help="a calibration dataset and its short name (repeatable)")
    parser.add_argument("--pool", action="append", default=[], metavar="NAME+NAME",
                        help="datasets pooled for one fit (repeatable)")
    parser.add_argument("--maps", default="platt,logistic,isotonic", help="maps to fit")
    parser.add_argument("--images", required=True, type=Path,
                        help="labelled images: a folder with truth.csv (and images.csv)")
    parser.add_argument("--max-images", type=int, default=96, help="images per dataset (count)")
    args = parser.parse_args(argv)

    from ceriakeras.evaluation.calibration import collect_columns, fit_map
    from ceriakeras.inference.served import load_served_model

    model = load_served_model(args.model)
    sets = dict(spec.split("=", 1) for spec in args.data)
    columns = {}
    for name, path in sets.items():
        columns[name], _ = collect_columns(model.predict, [path], model.info,
                                           max_images=args.max_images, progress=True, desc=name)
    images = image_columns(model, args.images)
    doses = sorted({im["dose"] for im in images}, reverse=True)
    print("| calibrated on | map | " + " | ".join(f"{d:g}" for d in doses) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in doses) + " |")
    print("| — (raw confidence) | — | " + " | ".join(score(images, None)) + " |")
    if "confidence_calibration" in model.info:
        print("| the model's own table | " + model.info["confidence_calibration"].get("map", "platt")
              + " | " + " | ".join(score(images, model.info["confidence_calibration"])) + " |")
    for pool in args.pool:
        names = pool.split("+")
        pooled = {d: {k: np.concatenate([columns[n][d][k] for n in names])
                      for k in columns[names[0]][d]} for d in columns[names[0]]}
        for method in args.maps.split(","):
            cells = score(images, fit_map(pooled, method))
            print(f"| {' + '.join(names)} | {method} | " + " | ".join(cells) + " |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
