"""The tracks stage of ``analyze`` alone, offline, on finished analyze outputs (issue 22).

For each RESULT folder (an ``analyze`` output with ``tracking/probabilities.bin``), copies to
``WORK/<n>`` its ``columns.csv`` with the track columns blank (as analyze leaves them until the
tracks stage), ``frames.csv`` without the drift columns and the probability log
(:func:`ceriakeras.analysis.offline.untracked_copy`); runs exactly
what analyze's tracks stage runs (:func:`ceriakeras.analysis.tracking.write_tracks`, the
frames read again for the ring counts unless ``--no-rings``; no stacked readings), then
:func:`add_drift_columns`; prints the wall and CPU time per frame of the stage, ms (SciPy's
spatial imported first, as analyze's column finding has by then; ``--repeat`` shows the best).

``--compare``: every output (``columns.csv``, ``events.csv``, ``frames.csv``, ``tracking/``)
must be byte-identical to the RESULT folder's own, or with ``--against BASE`` to those of an
earlier run's ``--work BASE`` (made by the code before a change). ``--profile N`` prints
cProfile's N most costly functions; ``--window`` sets ``TrackSettings.window`` (small: tracks
folded often).

    python scripts/benchmarks/bench_tracks.py OUT/ref OUT/ref6 --work /tmp/tracks --compare
    python scripts/benchmarks/bench_tracks.py OUT/ref --work /tmp/tracks --profile 25
    python scripts/benchmarks/bench_tracks.py OUT/ref --work /tmp/new --compare --against /tmp/tracks
"""

from __future__ import annotations

import argparse
import cProfile
import filecmp
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import scipy.spatial  # noqa: F401 -- analyze has it by then (column finding), as here

from ceriakeras.analysis import tracking
from ceriakeras.analysis.offline import untracked_copy
from ceriakeras.analysis.reading import series_counts

OUTPUTS = ("columns.csv", "events.csv", "frames.csv", "tracking/drift.csv",
           "tracking/probabilities.bin")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="analyze output folders")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for the copies")
    ap.add_argument("--repeat", type=int, default=1, help="runs per folder (the best is shown)")
    ap.add_argument("--compare", action="store_true",
                    help="fail unless every output is byte-identical to the folder's own")
    ap.add_argument("--against", type=Path, default=None,
                    help="with --compare: compare with AGAINST/<n> (an earlier --work) instead")
    ap.add_argument("--window", type=int, default=None,
                    help="TrackSettings.window (units; default analyze's): small to test folding")
    ap.add_argument("--profile", type=int, default=0, help="print the N most costly functions")
    ap.add_argument("--no-rings", action="store_true",
                    help="no ring counts (the frames not read again; analyze counts them)")
    args = ap.parse_args(argv)
    failed = 0
    settings = tracking.TrackSettings() if args.window is None else tracking.TrackSettings(
        window=args.window)
    for n, result in enumerate(args.results):
        best = None
        for _ in range(args.repeat):
            work = args.work / str(n)
            plan = untracked_copy(result, work)
            profiler = cProfile.Profile() if args.profile else None
            t0, c0 = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            counts = tracking.write_tracks(work, plan, settings,
                                           frame_reader=None if args.no_rings
                                           else series_counts)
            if profiler:
                profiler.disable()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best = (wall, cpu) if best is None or cpu < best[1] else best
            tracking.add_drift_columns(work)
        frames = sum(i["n_frames"] for i in plan)
        print(f"{result}: {frames} frames, {counts['tracks']} tracks, {counts['events']} events; "
              f"tracks stage {1000 * best[0] / frames:.1f} ms wall, "
              f"{1000 * best[1] / frames:.1f} ms CPU per frame")
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
        if args.compare:
            result = result if args.against is None else args.against / str(n)
            for name in OUTPUTS:
                same = filecmp.cmp(result / name, work / name, shallow=False)
                failed += not same
                print(f"  {name}: {'identical' if same else 'DIFFERENT'}")
            extra = sorted(p.name for p in (work / "tracking").iterdir()) != sorted(
                p.name for p in (result / "tracking").iterdir())
            failed += extra
            print(f"  tracking/ files: {'same' if not extra else 'DIFFERENT'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
