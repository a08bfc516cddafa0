"""How does the column threshold trade missed columns against false ones, on our own data?

``find_columns`` keeps a peak of the column probability ``1 − p(background)`` only above
``threshold`` (``AnalyzeConfig.threshold``; unset, the model's own ``column_threshold``, else
0.3). This script runs a model over a split of our own simulated records at fixed doses (noise
as ``ceriakeras evaluate`` adds it), runs the column finder at several thresholds on the same
probability maps, and prints precision, recall, F1, exact accuracy and bias per dose and
threshold, and the threshold with the best F1 per dose. Record the one you choose with
``ceriakeras export --column-threshold``.

    python scripts/studies/threshold_study.py --model saved_models/ceria110 \
        --data tfrecords/ceria110-v3-a --split validation --doses 200,1000,5000 --max-images 64

Use our own validation data (or the calibration sets), never the cross-check set: a threshold
chosen on the yardstick would make the yardstick's figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ceriakeras.evaluation.threshold import threshold_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="saved_models/ceria110", help="saved_models/NAME or a version")
    ap.add_argument("--data", action="append", required=True,
                    help="dataset folder of our own records (repeat for several)")
    ap.add_argument("--split", default="validation", help="split of the records (default validation)")
    ap.add_argument("--doses", default="200,1000,5000", help="doses, e⁻/Å², comma-separated")
    ap.add_argument("--thresholds", default="0.2,0.3,0.4,0.5,0.6,0.7",
                    help="column thresholds to try (column probability, in (0, 1)), comma-separated")
    ap.add_argument("--max-images", type=int, default=64, help="records per folder (images)")
    ap.add_argument("--json", default=None, help="also write the table to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # TensorFlow's C++ start-up lines
    from ceriakeras.inference.served import load_served_model
    from ceriakeras.evaluation.scoring import check_doses

    doses = check_doses(float(d) for d in args.doses.split(","))
    thresholds = tuple(float(t) for t in args.thresholds.split(","))
    if not all(0 < t < 1 for t in thresholds):
        ap.error("every threshold must be in (0, 1)")
    model = load_served_model(args.model)
    table = threshold_table(model, args.data, doses, thresholds, split=args.split,
                            max_images=args.max_images)
    print(f"model {model.path}; {args.split} split of {', '.join(args.data)}, "
          f"≤ {args.max_images} images each")
    print(f"{'dose (e-/Å²)':>12} {'threshold':>9} {'precision':>9} {'recall':>7} {'F1':>6} "
          f"{'exact':>6} {'bias (atoms)':>12}")
    for d, rows in table.items():
        for t, m in rows.items():
            print(f"{d:>12g} {t:>9g} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} "
                  f"{m['exact_accuracy']:>6.3f} {m['bias_atoms']:>+12.2f}")
    for d, rows in table.items():
        best = max(rows, key=lambda t: rows[t]["f1"])
        print(f"best F1 at {d:g} e-/Å²: threshold {best:g} (F1 {rows[best]['f1']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": str(model.path), "data": args.data, "split": args.split,
             "table": [{"dose_e_per_A2": d, "threshold": t, **{k: m[k] for k in
                        ("precision", "recall", "f1", "exact_accuracy", "bias_atoms")}}
                       for d, rows in table.items() for t, m in rows.items()]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
