"""End-to-end speed and memory of `ceriakeras analyze`: read → resample → model → columns → CSV → pictures.

Writes a synthetic low-dose series (a projected CeO2 [110] Ce lattice with Poisson noise) as a
multi-page TIFF at 0.1 Å per pixel for each frame size, analyzes it with the shipped model
(or ``--model``) and prints frames per second, the time per frame of each stage, the cost of the
pictures against the model's (default picture settings: a sample of overlays and the movie) and
the resident memory (peak, and at 10 % and 100 % of the run: flat for a long series).

    python scripts/benchmarks/bench_analyze.py                        # 512² and 1024², 20 frames each
    python scripts/benchmarks/bench_analyze.py --frames 120 --sizes 1024   # the issue-12 measurement
    python scripts/benchmarks/bench_analyze.py --frames 2000 --sizes 512   # memory over a long series
    python scripts/benchmarks/bench_analyze.py --stand-in             # no trained model: a NumPy stand-in

The stages run at once (reader, model, writer threads), so their times add up to more than
the wall time; ``frames/s`` is the wall-clock speed of the whole run, ``cpu ms`` the process's
CPU time per frame (a fairer yardstick on a machine that others share). The lattice fills the
whole frame, so the pictures here are of whole frames: their worst case.

The peak is analyze's own: the series is written before through a tifffile memmap whose written
pages count in this process's resident memory (1.3 GB for 10 000 frames of 256²), so the
kernel's high-water mark (VmHWM) is reset (``/proc/self/clear_refs``) just before analyze and
read just after; where that is not possible, the peak is the largest RSS sampled during analyze
(every 0.2 s).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ceriakeras.cli.startup import quiet_libraries  # noqa: E402

quiet_libraries()  # TensorFlow's, absl's and CUDA's start-up lines off the terminal, as in the CLI

from ceriakeras.analysis.run import analyze  # noqa: E402
from ceriakeras.config import CEO2_LATTICE_A, AnalyzeConfig  # noqa: E402
from ceriakeras.noise import counts_per_pixel  # noqa: E402


class StandInModel:
    """Not the network: a smoothed, normalized image as the column probability, height 5.

    Only for timing the rest of the chain when no trained model is at hand.
    """

    def __init__(self, pixel_size_A=0.2, max_height=16):
        self.info = {"pixel_size_A": pixel_size_A, "max_height": max_height, "label_radius_A": 0.5}

    def predict(self, images):
        from scipy import ndimage

        images = np.asarray(images, np.float32)
        c = self.info["max_height"] + 1
        out = np.zeros(images.shape + (c,), np.float32)
        for k, img in enumerate(images):
            s = ndimage.gaussian_filter(img, 1.5)
            s = (s - np.median(s)) / max(float(np.ptp(s)), 1e-6)
            col = np.clip(2 * s, 0, 1)
            out[k, ..., 0] = 1 - col
            out[k, ..., 5] = col
        return out, out.argmax(-1).astype(np.int32)


def lattice_frame(n_px: int, pixel_A: float, dose_e_per_A2: float, rng) -> np.ndarray:
    """Poisson counts of Gaussian Ce columns on the [110] projected lattice (a × a/√2)."""
    ax, ay = CEO2_LATTICE_A, CEO2_LATTICE_A / math.sqrt(2)
    coords = np.arange(n_px) * pixel_A
    x = (coords % ax) - ax / 2
    y = (coords % ay) - ay / 2
    gx = np.exp(-x**2 / (2 * 0.3**2))
    gy = np.exp(-y**2 / (2 * 0.3**2))
    mean = 1.0 - 0.5 * gy[:, None] * gx[None, :]  # dark columns on bright vacuum
    counts = counts_per_pixel(dose_e_per_A2, pixel_A) * mean
    return rng.poisson(counts).astype(np.uint16)


def write_series(path: Path, n_frames: int, n_px: int, pixel_A: float) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    distinct = [lattice_frame(n_px, pixel_A, 2000.0, rng) for _ in range(min(n_frames, 4))]
    mm = tifffile.memmap(path, shape=(n_frames, n_px, n_px), dtype=np.uint16, imagej=True,
                         resolution=(1 / (pixel_A / 10), 1 / (pixel_A / 10)),
                         metadata={"unit": "nm", "axes": "TYX"})
    for i in range(n_frames):  # one frame in memory at a time
        mm[i] = distinct[i % len(distinct)]
    mm.flush()
    del mm


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux VmHWM); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's resident-memory high-water mark (VmHWM), bytes; None where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """Samples this process's resident memory every ``interval`` seconds."""

    def __init__(self, interval=0.2):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.interval, self.samples = psutil.Process(), interval, []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), self.proc.memory_info().rss))
            self.stop.wait(self.interval)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20, help="frames per series (frames)")
    ap.add_argument("--sizes", default="512,1024", help="frame sides, px, comma-separated")
    ap.add_argument("--pixel-size", type=float, default=0.1, help="input pixel size, Å")
    ap.add_argument("--model", default=None, help="saved_models/NAME (default: the shipped model)")
    ap.add_argument("--stand-in", action="store_true",
                    help="use a NumPy stand-in instead of a trained model (says so in the output)")
    ap.add_argument("--batch-size", type=int, default=AnalyzeConfig.batch_size,
                    help="frames per inference batch (frames)")
    ap.add_argument("--model-workers", type=int, default=AnalyzeConfig.model_workers,
                    help="model calls at once, each on cores // N cores")
    ap.add_argument("--overlay-every", type=int, default=None,
                    help="overlay every K-th frame (frames; default: analyze's sample)")
    ap.add_argument("--no-movie", action="store_true", help="no movie (default: analyze's movie)")
    ap.add_argument("--no-pictures", action="store_true",
                    help="no overlays and no movie: the analysis alone")
    ap.add_argument("--workdir", default=None, help="folder for the series and results")
    ap.add_argument("--no-tracks", action="store_true",
                    help="no tracks (issue 22): compare the columns stage with and without")
    ap.add_argument("--no-sites", action="store_true",
                    help="tracks without the changes read at sites (analysis/sites.py): their cost")
    args = ap.parse_args(argv)

    if args.stand_in:
        model = StandInModel()
        print("model: NumPy STAND-IN (not the network; times the rest of the chain only)")
    else:
        from ceriakeras.analysis.run import share_cores
        from ceriakeras.inference.served import load_model

        share_cores(args.model_workers)  # before TensorFlow starts, as analyze does
        model, ident = load_model(args.model)
        print(f"model: {ident.get('path')}")
    if args.no_sites:  # no settings object reaches the sites from the command line: patch it
        from ceriakeras.analysis import tracking

        tracking.site_changes = lambda *a, **k: (None, None)
    config = AnalyzeConfig(batch_size=args.batch_size, model_workers=args.model_workers,
                           overlay_every=args.overlay_every,
                           overlay_samples=0 if args.no_pictures else AnalyzeConfig.overlay_samples,
                           movie=not (args.no_movie or args.no_pictures),
                           tracks=not args.no_tracks)
    print(f"cpus: {os.cpu_count()}  pixel size: {args.pixel_size} Å  frames: {args.frames}  "
          f"batch: {args.batch_size}  model workers: {args.model_workers}  overlays: "
          + ("none" if args.no_pictures else f"every {args.overlay_every}" if args.overlay_every
             else f"sample of {config.overlay_samples}")
          + f"  movie: {'yes' if config.movie else 'no'}")
    stage_names = ("read", "resample", "model", "columns", "write", "pictures")
    header = f"{'size':>6} {'frames/s':>9} {'cpu ms':>7} " + " ".join(
        f"{k + ' ms':>11}" for k in stage_names
    ) + f" {'pict/model':>10} {'RSS@10% MB':>11} {'RSS@end MB':>11} {'peak MB':>8}"
    print(header)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            series = Path(tmp) / f"series_{size}.tif"
            write_series(series, args.frames, size, args.pixel_size)
            reset = reset_peak_rss()  # the peak of analyze alone, not of write_series' memmap
            sampler = RssSampler()
            sampler.start()
            t0, c0 = time.perf_counter(), time.process_time()
            summary = analyze([series], Path(tmp) / f"out_{size}", model=model, config=config,
                              progress=False)
            t1, c1 = time.perf_counter(), time.process_time()
            sampler.stop.set()
            sampler.join()
            series.unlink()
            rss = [(t - t0, r) for t, r in sampler.samples if t >= t0]
            at10 = next((r for t, r in rss if t >= 0.1 * (t1 - t0)), rss[0][1] if rss else 0)
            at_end = rss[-1][1] if rss else 0
            hwm = peak_rss_bytes() if reset else None
            peak_kb = (hwm if hwm is not None else max((r for _, r in rss), default=0)) / 1024
            n = max(1, summary["frames_analysed_now"])
            stages = summary["seconds_by_stage"]
            ratio = stages["pictures"] / stages["model"] if stages["model"] else float("nan")
            print(f"{size:>5}² {summary['frames_per_second']:>9.2f} {1000 * (c1 - c0) / n:>7.0f} "
                  + " ".join(f"{1000 * stages[k] / n:>11.1f}" for k in stage_names)
                  + f" {ratio:>10.2f} {at10 / 2**20:>11.0f} {at_end / 2**20:>11.0f}"
                  f" {peak_kb / 1024:>8.0f}")
            print(f"       columns/frame {summary['columns_per_frame']:.0f}; whole run "
                  f"{t1 - t0:.1f} s = {n / (t1 - t0):.2f} frames/s (analysis "
                  f"{summary['seconds_analysing']:.1f} s, then tables, movie and series plot); "
                  f"pictures {stages['pictures']:.1f} s = {ratio:.0%} of the model's "
                  f"{stages['model']:.1f} s")
            if "tracks" in stages:  # tracks (issue 22): linking, stretches, events, tables
                print(f"       tracks {stages['tracks']:.2f} s = "
                      f"{stages['tracks'] / stages['model']:.1%} of the model's time")
            if "stacks" in stages:  # heights from summed frames: second read and model calls
                print(f"       stacks {stages['stacks']:.2f} s = "
                      f"{stages['stacks'] / stages['model']:.1%} of the model's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
