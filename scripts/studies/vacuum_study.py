"""How much vacuum does a vacuum-normalised model need? Heights against framing, on our own data.

A model with ``intensity_reference = "vacuum"`` (version 3 on) scales each frame by the bright
vacuum around the particle; ``analyze`` refuses frames whose vacuum share (area farther than
5 Å from every detected column, :func:`ceriakeras.inference.recognise.vacuum_fraction`) is below
:func:`ceriakeras.inference.recognise.required_vacuum_fraction`. This script measures where heights start
to go wrong: it cuts each record of a split of our own simulated data to frames around the
particle, with ``--margins`` Å of room beyond the outermost true column on every side (a
negative margin cuts into the particle, as a frame that holds only part of it does), adds
Poisson noise at each dose, and scores the model per bin of the measured vacuum share.

    python scripts/studies/vacuum_study.py --model saved_models/ceria110 \
        --data tfrecords/ceria110-v3-a --split validation --doses 1000,5000 --max-images 48

Our own data only: the cross-check set is the yardstick, not something to set thresholds on.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ceriakeras.evaluation.framing import framings

SHARE_BINS = (0.0, 0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.60, 1.0)
"""Edges of the vacuum-share bins of the printed table (share of the frame's area)."""
MIN_FRAME_PX = 64
"""Frames narrower than this (px; 12.8 Å at 0.2 Å) are skipped: too small to analyse."""


def vacuum_table(model, data_dirs, doses, margins_A, *, split="validation", max_images=None,
                 seed=0, share_bins=SHARE_BINS, progress=True) -> dict:
    """Scores per dose and vacuum-share bin over the framings of the records of ``data_dirs``.

    Returns
    -------
    dict
        ``{dose: {(low, high): {"frames": n, **metrics}}}`` for the bins between consecutive
        ``share_bins`` edges (from 0 to 1; default :data:`SHARE_BINS`) that hold frames, with the
        metrics of :meth:`ceriakeras.evaluation.scoring.Tally.metrics`.
    """
    from ceriakeras.inference.columns import find_columns
    from ceriakeras.config import AnalyzeConfig
    from ceriakeras.inference.served import model_settings, with_model_threshold
    from ceriakeras.noise import counts_per_pixel, poisson_sample
    from ceriakeras.data.records import read_manifest
    from ceriakeras.inference.recognise import vacuum_fraction
    from ceriakeras.evaluation.scoring import MATCH_DISTANCE_A, Tally, noise_seed, split_records

    config = with_model_threshold(AnalyzeConfig(), model.info)   # as analyze
    pixel_size_A, max_height, label_radius_A = model_settings(model.info)
    bins = list(zip(share_bins[:-1], share_bins[1:]))
    tallies = {d: {b: Tally() for b in bins} for d in doses}
    frames = {d: {b: 0 for b in bins} for d in doses}
    # streamed, one record in memory at a time (the progress bar's total from the manifests)
    work = ((index, rec) for data_dir in data_dirs
            for index, rec in enumerate(split_records(data_dir, split, max_images)))
    if progress:
        from tqdm import tqdm

        total = sum(min(int(read_manifest(d)["counts"].get(split, 0)), max_images or 10**9)
                    for d in data_dirs)
        work = tqdm(work, total=total, desc="vacuum study", unit="image", file=sys.stderr,
                    dynamic_ncols=True)
    for index, rec in work:
        image = np.asarray(rec["image"], np.float32)
        true_columns = np.asarray(rec["columns"], np.float64).reshape(-1, 3)
        if len(true_columns) == 0:
            continue
        for margin, frame, columns in framings(image, true_columns, pixel_size_A, margins_A):
            if min(frame.shape) < MIN_FRAME_PX or len(columns) == 0:
                continue
            counts = np.stack([  # every dose of this framing in one model call
                np.asarray(poisson_sample(frame * counts_per_pixel(d, pixel_size_A),
                                          noise_seed(seed, index, d + margin)), np.float32)
                for d in doses])
            probabilities, _ = model.predict(counts)
            for k, d in enumerate(doses):
                found = find_columns(probabilities[k], pixel_size_A,
                                     min_distance_A=config.min_distance_A,
                                     threshold=config.threshold, label_radius_A=label_radius_A)
                share = vacuum_fraction(found["x_px"] * pixel_size_A, found["y_px"] * pixel_size_A,
                                        frame.shape[1] * pixel_size_A, frame.shape[0] * pixel_size_A)
                b = next(b for b in bins if b[0] <= share < b[1] or (b[1] == 1.0 and share == 1.0))
                tallies[d][b].add(found, columns, pixel_size_A, MATCH_DISTANCE_A)
                frames[d][b] += 1
    return {d: {b: {"frames": frames[d][b], **tallies[d][b].metrics(max_height)}
                for b in bins if frames[d][b]} for d in doses}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="saved_models/ceria110", help="saved_models/NAME or a version")
    ap.add_argument("--data", action="append", required=True,
                    help="dataset folder of our own records (repeat for several)")
    ap.add_argument("--split", default="validation", help="split of the records (default validation)")
    ap.add_argument("--doses", default="1000,5000", help="doses, e⁻/Å², comma-separated")
    ap.add_argument("--margins", default="-6,-3,1,3,5,8,12,20",
                    help="room beyond the outermost column on each side, Å, comma-separated "
                         "(negative: the frame cuts into the particle)")
    ap.add_argument("--bins", default=",".join(f"{b:g}" for b in SHARE_BINS),
                    help="edges of the vacuum-share bins (share of the frame, 0 to 1), comma-separated")
    ap.add_argument("--max-images", type=int, default=48, help="records per folder (images)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # TensorFlow's C++ start-up lines
    from ceriakeras.inference.served import load_served_model
    from ceriakeras.inference.recognise import required_vacuum_fraction
    from ceriakeras.evaluation.scoring import check_doses

    doses = check_doses(float(d) for d in args.doses.split(","))
    margins = tuple(float(m) for m in args.margins.split(","))
    model = load_served_model(args.model)
    bins = tuple(float(b) for b in args.bins.split(","))
    if bins[0] != 0.0 or bins[-1] != 1.0 or list(bins) != sorted(set(bins)):
        ap.error("--bins must rise from 0 to 1")
    table = vacuum_table(model, args.data, doses, margins, split=args.split,
                         max_images=args.max_images, share_bins=bins)
    need = required_vacuum_fraction(model.info)
    print(f"model {model.path}; {args.split} split of {', '.join(args.data)}, ≤ {args.max_images} "
          f"images each, framed with {args.margins} Å of room"
          + ("" if need is None else f"; analyze requires ≥ {need:.1%} vacuum"))
    print(f"{'dose (e-/Å²)':>12} {'vacuum share':>13} {'frames':>6} {'columns':>7} {'F1':>6} "
          f"{'exact':>6} {'±1':>6} {'bias (atoms)':>12}")
    for d, rows in table.items():
        for (low, high), m in rows.items():
            print(f"{d:>12g} {f'{low:.0%}–{high:.0%}':>13} {m['frames']:>6} {m['n_true']:>7} "
                  f"{m['f1']:>6.3f} {m['exact_accuracy']:>6.3f} {m['within_1_accuracy']:>6.3f} "
                  f"{m['bias_atoms']:>+12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
