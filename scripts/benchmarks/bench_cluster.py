"""`analyze --scheduler` against a local run: speed with 1 and 2 dask workers, and identical tables.

Writes bench_analyze's synthetic series (a CeO2 [110] lattice with Poisson noise, multi-page
TIFF at 0.1 Å), analyzes it locally, then on a LocalCluster of 1 and of 2 worker processes (one
thread each, as ``dask worker --nthreads 1``), and prints each run's frames per second (the
pipeline, as ``summary.json``), its whole wall time (connecting and loading the model on the
workers included) and whether ``columns.csv`` and ``frames.csv`` equal the local run's bytes.
The local run is timed again at the end, since a shared machine's load drifts meanwhile.

    python scripts/benchmarks/bench_cluster.py --frames 24 --sizes 1024 --workers 1,2
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_analyze import write_series

from ceriakeras.analysis.run import analyze
from ceriakeras.config import AnalyzeConfig

TABLES = ("columns.csv", "frames.csv")


def one_run(series: Path, out: Path, args, scheduler=None) -> tuple[dict, float]:
    config = AnalyzeConfig(batch_size=args.batch_size, movie=not args.no_pictures,
                           overlay_every=10**9 if args.no_pictures else None)
    t0 = time.perf_counter()
    summary = analyze([series], out, model=args.model, config=config, progress=False,
                      overwrite=True, scheduler=scheduler)
    return summary, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=24, help="frames in the series (frames)")
    ap.add_argument("--sizes", type=int, default=1024, help="frame side, px (0.1 Å pixels)")
    ap.add_argument("--workers", default="1,2", help="LocalCluster sizes to time, comma-separated")
    ap.add_argument("--model", default=None, help="saved_models/NAME (default: the shipped model)")
    ap.add_argument("--batch-size", type=int, default=AnalyzeConfig.batch_size, help="frames")
    ap.add_argument("--no-pictures", action="store_true", help="no overlays, no movie")
    ap.add_argument("--workdir", default=None, help="folder for the series and results")
    ap.add_argument("--worker-intra-threads", type=int, default=None, metavar="K",
                    help="TensorFlow threads per model call on each worker (TF_NUM_INTRAOP_THREADS"
                         " in the workers' environment; default: TensorFlow's, all cores)")
    args = ap.parse_args(argv)
    from distributed import LocalCluster

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    series = work / f"series-{args.sizes}.tif"
    write_series(series, args.frames, args.sizes, 0.1)
    print(f"{args.frames} frames of {args.sizes}² px at 0.1 Å; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    summary, wall = one_run(series, work / "local", args)
    reference = {name: (work / "local" / name).read_bytes() for name in TABLES}
    if args.worker_intra_threads:  # the workers inherit it; TensorFlow here is running already
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.worker_intra_threads)
        print(f"workers: TF_NUM_INTRAOP_THREADS={args.worker_intra_threads}")
    print(f"{'run':<12} {'frames/s':>9} {'wall s':>8}  tables")
    print(f"{'local':<12} {summary['frames_per_second']:>9.2f} {wall:>8.1f}  (reference)")
    for n in (int(v) for v in args.workers.split(",")):
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster:
            out = work / f"cluster-{n}"
            summary, wall = one_run(series, out, args, scheduler=cluster.scheduler_address)
        same = all((out / name).read_bytes() == reference[name] for name in TABLES)
        print(f"{f'{n} worker(s)':<12} {summary['frames_per_second']:>9.2f} {wall:>8.1f}  "
              f"{'identical' if same else 'DIFFERENT'}")
    summary, wall = one_run(series, work / "local", args)  # again: the load drifts meanwhile
    print(f"{'local again':<12} {summary['frames_per_second']:>9.2f} {wall:>8.1f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
