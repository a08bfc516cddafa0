"""Images per second of ``simulate_particle`` on this machine, with and without exit-wave reuse.

Usage::

    .venv/bin/python scripts/benchmarks/bench_simulate.py [--particles N] [--sampling Å] [--slice Å] [--cell Å]
    .venv/bin/python scripts/benchmarks/bench_simulate.py --dask [--particles N]
    .venv/bin/python scripts/benchmarks/bench_simulate.py --config configs/ceria110_v3_data.toml --breakdown
    .venv/bin/python scripts/benchmarks/bench_simulate.py --config configs/ceria110_v3_data.toml \
        --margin-check [--margins 4,6,10] [--seeds 340,20000]

One process, one thread (as inside one dask worker). A warm-up particle is simulated first (FFTW
plans, numba compilation) and not counted. Then ``N`` particles with ``optics_per_exit_wave``
= 8 (the default reuse) and ``N`` with 1 (a multislice per image). Without ``--config`` it
varies the old, cheap settings (``SimulationConfig.legacy()``: 0.1 Å, 2 Å slices, 64 Å cell) and
runs in well under 3 minutes with N = 3; the package's defaults are
``--config configs/ceria110_v3_data.toml`` (≈ 12 CPU s per particle of 8 images).

With ``--dask``: the same particles as dask tasks on a ``LocalCluster`` of one, then two worker
processes (one thread each); clusters are started and every worker warmed up before the clock
starts, so the figure is the steady-state speed-up of a long run (target here: ≥ 1.7× on 2 cores).

With ``--breakdown``: CPU seconds (user + sys of this process, so other load on shared cores
does not count) of the multislice and of one image per focal-spread model, per particle, for
choosing ``optics_per_exit_wave`` and sizing shards.

With ``--margin-check``: per particle (``build_particle(seed, config.structure)``), the
multislice in the whole cell (``multislice_margin_A`` None) against the multislice in the small
cell of each margin (the config's own, and ``--margins``) embedded in the whole cell: CPU
seconds of each exit wave and the RMS difference of ``optics_per_exit_wave`` images drawn from
the config's optics (``contrast_rms_difference``, % of the whole-cell image's contrast).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from ceriakeras.config import SimulationConfig, load_config  # noqa: E402
from ceriakeras.physics.simulate import simulate_particle  # noqa: E402


def _cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _breakdown(config: SimulationConfig, particles: int) -> None:
    """CPU seconds of the multislice and of single images, per particle."""
    import numpy as np

    from ceriakeras.physics.simulate import (draw_optics, image_from_exit_wave, image_sampling_A,
                                     particle_exit_wave, place_in_cell)
    from ceriakeras.physics.structures import build_particle

    o = config.optics
    grid = image_sampling_A(config.pixel_size_A, config.sampling_A, o.energy_keV,
                            o.max_aperture_mrad)
    rng = np.random.default_rng(0)
    ms, per_model = [], {m: [] for m in o.focal_spread_models}
    for pid in range(particles):
        atoms = place_in_cell(build_particle(20_000 + pid, config.structure), config.cell_size_A)
        start = _cpu_s()
        wave, _ = particle_exit_wave(atoms, config, grid)
        ms.append(_cpu_s() - start)
        for model in per_model:
            optics = dict(draw_optics(rng, o), focal_spread_model=model)
            start = _cpu_s()
            image_from_exit_wave(wave, optics, config.pixel_size_A)
            per_model[model].append(_cpu_s() - start)
        print(f"particle {pid}: {atoms.info['diameter_A']:.0f} Å, {len(atoms)} atoms, "
              f"multislice {ms[-1]:.1f} CPU s, images "
              + ", ".join(f"{m} {v[-1]:.2f} s" for m, v in per_model.items()), flush=True)
    print(f"mean CPU s per particle: multislice {np.mean(ms):.1f}; one image: "
          + ", ".join(f"{m} {np.mean(v):.2f}" for m, v in per_model.items()))


def _margin_check(config: SimulationConfig, seeds: list[int], margins: list[float]) -> None:
    """Whole cell vs small cell embedded in it: CPU s and RMS difference of the images."""
    import numpy as np

    from ceriakeras.physics.simulate import (contrast_rms_difference, delocalisation_A, draw_optics,
                                     image_from_exit_wave, image_sampling_A,
                                     particle_exit_wave, place_in_cell)
    from ceriakeras.physics.structures import build_particle

    o = config.optics
    grid = image_sampling_A(config.pixel_size_A, config.sampling_A, o.energy_keV,
                            o.max_aperture_mrad)
    margins = sorted({*margins, *([config.multislice_margin_A]
                                  if config.multislice_margin_A is not None else [])})
    whole = dataclasses.replace(config, multislice_margin_A=None)
    rng = np.random.default_rng(1)
    for seed in seeds:
        particle = build_particle(seed, config.structure)
        atoms = place_in_cell(particle, config.cell_size_A)
        optics = [draw_optics(rng, o) for _ in range(config.optics_per_exit_wave)]
        start = _cpu_s()
        wave, _ = particle_exit_wave(atoms, whole, grid)
        full_cpu = _cpu_s() - start
        ref = [image_from_exit_wave(wave, x, config.pixel_size_A) for x in optics]
        extent = np.ptp(atoms.positions[:, :2], axis=0).max()
        print(f"particle seed {seed}: {len(atoms)} atoms, lateral extent {extent:.1f} Å, "
              f"thickness {atoms.cell[2, 2]:.1f} Å, delocalisation "
              f"{min(map(delocalisation_A, optics)):.1f}–{max(map(delocalisation_A, optics)):.1f}"
              f" Å; whole {config.cell_size_A:.0f} Å cell: {full_cpu:.1f} CPU s", flush=True)
        for margin in margins:
            start = _cpu_s()
            wave, info = particle_exit_wave(
                atoms, dataclasses.replace(config, multislice_margin_A=margin), grid)
            cpu = _cpu_s() - start
            rms = [100.0 * contrast_rms_difference(image_from_exit_wave(
                wave, x, config.pixel_size_A), r) for x, r in zip(optics, ref)]
            print(f"  margin {margin:g} Å: cell {info['multislice_cell_A']:.1f} Å, {cpu:.1f} CPU s"
                  f" ({full_cpu / cpu:.1f}x less), RMS difference max {max(rms):.3f} %, mean "
                  f"{np.mean(rms):.3f} % of the contrast", flush=True)


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
    defaults = SimulationConfig.legacy()  # --sampling/--slice/--cell vary the old, cheap settings
    parser.add_argument("--sampling", type=float, default=defaults.sampling_A,
                        help="multislice sampling, Å")
    parser.add_argument("--slice", type=float, default=defaults.slice_thickness_A,
                        help="slice thickness, Å")
    parser.add_argument("--cell", type=float, default=defaults.cell_size_A, help="cell side, Å")
    parser.add_argument("--dask", action="store_true",
                        help="compare one and two local dask worker processes instead")
    parser.add_argument("--config", default=None,
                        help="SimulationConfig (TOML/JSON); --sampling/--slice/--cell then ignored")
    parser.add_argument("--breakdown", action="store_true",
                        help="CPU seconds of the multislice and of one image per focal-spread "
                             "model, per particle")
    parser.add_argument("--margin-check", action="store_true",
                        help="whole cell vs multislice in a small cell embedded in it: CPU s and "
                             "RMS difference of the images")
    parser.add_argument("--margins", default="",
                        help="extra margins for --margin-check, Å, comma-separated")
    parser.add_argument("--seeds", default="340,20000,20001",
                        help="particle seeds for --margin-check, comma-separated")
    args = parser.parse_args()
    if args.config:
        config = load_config(SimulationConfig, args.config)
    else:
        config = dataclasses.replace(defaults, sampling_A=args.sampling,
                                     slice_thickness_A=args.slice, cell_size_A=args.cell)
    print(f"cell {config.cell_size_A} Å, sampling {config.sampling_A} Å, slice "
          f"{config.slice_thickness_A} Å, pixel {config.pixel_size_A} Å, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.margin_check:
        simulate_particle(10_000, 0, dataclasses.replace(config, optics_per_exit_wave=1))
        _margin_check(config, [int(s) for s in args.seeds.split(",") if s],
                      [float(m) for m in args.margins.split(",") if m])
        return
    if args.breakdown:
        simulate_particle(10_000, 0, dataclasses.replace(config, optics_per_exit_wave=1))
        _breakdown(config, args.particles)
        return
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
