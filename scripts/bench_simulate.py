"""Images per second of ``simulate_particle`` on this machine, with and without exit-wave reuse.

Usage::

    .venv/bin/python scripts/bench_simulate.py [--particles N] [--sampling Å] [--slice Å] [--cell Å]

One process, one thread (as inside one dask worker). A warm-up particle is simulated first (FFTW
plans, numba compilation) and not counted. Then ``N`` particles with ``optics_per_exit_wave``
= 8 (the default reuse) and ``N`` with 1 (a multislice per image). Runs in well under 3 minutes
at the defaults with N = 3.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=3, help="particles per setting")
    defaults = SimulationConfig()
    parser.add_argument("--sampling", type=float, default=defaults.sampling_A,
                        help="multislice sampling, Å")
    parser.add_argument("--slice", type=float, default=defaults.slice_thickness_A,
                        help="slice thickness, Å")
    parser.add_argument("--cell", type=float, default=defaults.cell_size_A, help="cell side, Å")
    args = parser.parse_args()
    config = dataclasses.replace(defaults, sampling_A=args.sampling,
                                 slice_thickness_A=args.slice, cell_size_A=args.cell)
    print(f"cell {config.cell_size_A} Å, sampling {config.sampling_A} Å, slice "
          f"{config.slice_thickness_A} Å, pixel {config.pixel_size_A} Å, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
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
