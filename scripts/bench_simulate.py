"""Images per second of ``simulate_particle`` on this machine, with and without exit-wave reuse.

Usage::

    .venv/bin/python scripts/bench_simulate.py [--particles N] [--sampling Å] [--slice Å] [--cell Å]
    .venv/bin/python scripts/bench_simulate.py --dask [--particles N]

One process, one thread (as inside one dask worker). A warm-up particle is simulated first (FFTW
plans, numba compilation) and not counted. Then ``N`` particles with ``optics_per_exit_wave``
= 8 (the default reuse) and ``N`` with 1 (a multislice per image). Runs in well under 3 minutes
at the defaults with N = 3.

With ``--dask``: the same particles as dask tasks on a ``LocalCluster`` of one, then two worker
processes (one thread each); clusters are started and every worker warmed up before the clock
starts, so the figure is the steady-state speed-up of a long run (target here: ≥ 1.7× on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from ceriakeras.config import SimulationConfig  # noqa: E402
from ceriakeras.simulate import simulate_particle  # noqa: E402


def _rate(config: SimulationConfig, particles: int, first_id: int) -> tuple[float, float]:
    start = time.perf_counter()
    images = 0
    for pid in range(first_id, first_id + particles):
        images += len(simulate_particle(pid, 0, config))
    elapsed = time.perf_counter() - start
    return images / elapsed, elapsed


def _dask_rate(config: SimulationConfig, particles: int, workers: int) -> float:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        warm = [client.submit(simulate_particle, 10_000 + w, 0, config, pure=False,
                              workers=[addr]) for w, addr in enumerate(client.scheduler_info()["workers"])]
        client.gather(warm)
        start = time.perf_counter()
        futures = client.map(simulate_particle, range(particles), [0] * particles,
                             [config] * particles, pure=False)
        images = sum(len(r) for r in client.gather(futures))
        return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=3, help="particles per setting")
    defaults = SimulationConfig()
    parser.add_argument("--sampling", type=float, default=defaults.sampling_A,
                        help="multislice sampling, Å")
    parser.add_argument("--slice", type=float, default=defaults.slice_thickness_A,
                        help="slice thickness, Å")
    parser.add_argument("--cell", type=float, default=defaults.cell_size_A, help="cell side, Å")
    parser.add_argument("--dask", action="store_true",
                        help="compare one and two local dask worker processes instead")
    args = parser.parse_args()
    config = dataclasses.replace(defaults, sampling_A=args.sampling,
                                 slice_thickness_A=args.slice, cell_size_A=args.cell)
    print(f"cell {config.cell_size_A} Å, sampling {config.sampling_A} Å, slice "
          f"{config.slice_thickness_A} Å, pixel {config.pixel_size_A} Å, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.dask:
        one = _dask_rate(config, args.particles, 1)
        two = _dask_rate(config, args.particles, 2)
        print(f"dask, 1 worker: {one:.2f} images/s; 2 workers: {two:.2f} images/s; "
              f"speed-up {two / one:.2f}x ({args.particles} particles each)")
        return
    start = time.perf_counter()
    simulate_particle(10_000, 0, dataclasses.replace(config, optics_per_exit_wave=1))
    print(f"warm-up (FFTW planning, compilation): {time.perf_counter() - start:.1f} s")
    for reuse in (config.optics_per_exit_wave, 1):
        rate, elapsed = _rate(dataclasses.replace(config, optics_per_exit_wave=reuse),
                              args.particles, first_id=0)
        print(f"optics_per_exit_wave={reuse}: {rate:.2f} images/s "
              f"({args.particles} particles in {elapsed:.1f} s)")


if __name__ == "__main__":
    main()
