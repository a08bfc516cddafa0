"""Writing a sharded dataset: particles → splits → shards, simulated in-process or on dask.

Determinism: the dataset is a function of ``(count, shards, seed, config)`` only. Particle
``p`` is simulated from ``(seed, p)``; the plan of splits and shards is
:mod:`ceriakeras.data.shards`; shards are written by one process (the client) in particle
order with deterministic serialization, so the bytes do not depend on the number of workers
or on the order in which the particles finish. The folder's layout, the schema and reading are
:mod:`ceriakeras.data.records`.

Heavy libraries (TensorFlow, dask) are imported inside the functions that need them, so that
dask workers, which only run :func:`_simulate_task`, never import TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


from ..config import (SCHEMA_VERSION, CeriakerasError, ConfigError, DataError, SimulationConfig,
                      from_dict, to_dict)
from ..io.files import atomic_path, file_sha256, write_text_atomic
from .plan import check_write_arguments
from .preview import write_previews
from .records import (MANIFEST_NAME, PROGRESS_NAME, SHARD_SUFFIX, SPLITS,
                      first_line, metadata_json, read_dataset_json, serialize_example,
                      software_versions, verify_dataset)
from .shards import (ShardPlan, ShardStats, images_of_particle, merge_stats, plan_shards,
                     stats_of_shard_file)

Simulator = Callable[[int, int, SimulationConfig], list]


def _params(count: int, shards: int, seed: int, config: SimulationConfig) -> dict:
    return {"schema_version": SCHEMA_VERSION, "count": int(count), "shards": int(shards),
            "seed": int(seed), "config": to_dict(config)}


def _default_simulator() -> Simulator:
    from ..physics.simulate import simulate_particle

    return simulate_particle


def _simulate_task(particle_id: int, seed: int, config: SimulationConfig, n_images: int,
                   simulator: Simulator | None) -> list:
    """One particle's examples (the first ``n_images``); runs on a dask worker or in-process."""
    sim = simulator if simulator is not None else _default_simulator()
    examples = list(sim(particle_id, seed, config))
    if len(examples) < n_images:
        raise DataError(
            f"the simulator returned {len(examples)} images for particle {particle_id}, "
            f"{n_images} were needed; check optics_per_exit_wave"
        )
    return examples[:n_images]


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write to {out} ({err.strerror or err}); choose a writable --out"
        ) from None


def _describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for key in ("schema_version", "count", "shards", "seed"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)} here, {new.get(key)} asked")

    def flat(d: Any, prefix: str = "") -> dict:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    fo, fn = flat(old.get("config", {})), flat(new.get("config", {}))
    for key in sorted(set(fo) | set(fn)):
        if fo.get(key) != fn.get(key):
            diffs.append(f"{key} {fo.get(key)} here, {fn.get(key)} asked")
    return "; ".join(diffs[:3]) + ("; …" if len(diffs) > 3 else "")


def _params_of_manifest(manifest: dict) -> dict:
    return {"schema_version": manifest.get("schema_version"), "count": manifest.get("count"),
            "shards": manifest.get("shards_requested"), "seed": manifest.get("seed"),
            "config": manifest.get("config")}


def _our_files(out: Path) -> list[Path]:
    files = [out / MANIFEST_NAME, out / PROGRESS_NAME, out / "structures", out / "preview"]
    for split in SPLITS:
        files += out.glob(f"{split}-*{SHARD_SUFFIX}")
        files += out.glob(f".{split}-*.tmp")
    return [f for f in files if f.exists()]


def _remove(paths: Iterable[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _existing_params(out: Path) -> tuple[dict | None, dict | None, dict | None]:
    """(params, manifest, progress) of what the folder already holds."""
    manifest = progress = None
    if (out / MANIFEST_NAME).exists():
        try:
            manifest = read_dataset_json(out / MANIFEST_NAME)
        except DataError:
            manifest = None
    if (out / PROGRESS_NAME).exists():
        try:
            progress = read_dataset_json(out / PROGRESS_NAME)
        except DataError:
            progress = None
    if progress is not None and "params" in progress:
        return progress["params"], manifest, progress
    if manifest is not None:
        return _params_of_manifest(manifest), manifest, progress
    return None, manifest, progress


class _ShardWriter:
    """Collects particle results (in any order) and writes each shard when its particles are in."""

    def __init__(self, out: Path, todo: list[ShardPlan], config: SimulationConfig, state: dict,
                 params: dict, save_structures: bool):
        self.out = out
        self.config = config
        self.state = state
        self.params = params
        self.save_structures = save_structures
        self.shard_of = {p: s for s in todo for p in s.particles}
        self.missing = {s.name: set(s.particles) for s in todo}
        self.results: dict[int, list] = {}

    def add(self, particle_id: int, examples: list) -> None:
        shard = self.shard_of[particle_id]
        if self.save_structures:
            self._write_structure(particle_id, examples)
        self.results[particle_id] = examples
        self.missing[shard.name].discard(particle_id)
        if not self.missing[shard.name]:
            self._write(shard)

    def _write_structure(self, particle_id: int, examples: list) -> None:
        atoms = getattr(examples[0], "atoms", None) if examples else None
        if atoms is None:
            return
        import ase.io

        with atomic_path(self.out / "structures" / f"particle-{particle_id:06d}.xyz") as tmp:
            ase.io.write(str(tmp), atoms, format="extxyz")

    def _write(self, shard: ShardPlan) -> None:
        import tensorflow as tf
        stats = ShardStats(self.config.max_height + 1)
        n = 0
        with atomic_path(self.out / shard.name) as tmp:
            options = tf.io.TFRecordOptions(compression_type="GZIP")
            with tf.io.TFRecordWriter(str(tmp), options=options) as writer:
                for pid in shard.particles:
                    for ex in self.results[pid]:
                        writer.write(serialize_example(ex))
                        stats.add(ex.label, ex.columns, dict(ex.metadata))
                        n += 1
            info = {"file": shard.name, "split": shard.split, "examples": n,
                    "particles": len(shard.particles), "bytes": tmp.stat().st_size,
                    "sha256": file_sha256(tmp), **stats.to_dict()}
        for pid in shard.particles:
            del self.results[pid]
        self.state[shard.name] = info
        write_text_atomic(self.out / PROGRESS_NAME,
                          metadata_json({"params": self.params, "shards": self.state}) + "\n")


def _run_particles(tasks: list[tuple[int, int]], seed: int, config: SimulationConfig,
                   simulator: Simulator | None, workers: int, scheduler: str | None,
                   on_result: Callable[[int, list], None]) -> None:
    """Simulate ``(particle_id, n_images)`` tasks in-process or on dask, calling ``on_result``."""
    if not tasks:
        return
    if scheduler is None and workers == 1:
        for pid, n in tasks:
            on_result(pid, _simulate_task(pid, seed, config, n, simulator))
        return
    from distributed import Client, LocalCluster, as_completed

    with contextlib.ExitStack() as stack:
        if scheduler is None:
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=None, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(scheduler, timeout="20s"))
            except (OSError, TimeoutError, ValueError) as err:
                raise ConfigError(
                    f"cannot reach the dask scheduler at {scheduler} ({first_line(err)}); start it "
                    "with `dask scheduler` and workers with `dask worker ADDRESS`, or use --workers"
                ) from None
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or workers)
        window = max(4, 3 * n_workers)
        pending = iter(tasks)
        ac = as_completed()
        pid_of = {}

        def submit_next() -> None:
            nxt = next(pending, None)
            if nxt is not None:
                pid, n = nxt
                fut = client.submit(_simulate_task, pid, seed, config, n, simulator,
                                    key=f"ceriakeras-particle-{seed}-{pid}-{n}", pure=False)
                pid_of[fut.key] = pid
                ac.add(fut)

        for _ in range(window):
            submit_next()
        for fut in ac:
            examples = fut.result()
            on_result(pid_of.pop(fut.key), examples)
            fut.release()
            submit_next()



def _build_manifest(params: dict, plan: list[ShardPlan], state: dict, config: SimulationConfig,
                    command: str, versions: dict) -> dict:
    n_classes = config.max_height + 1
    splits: dict[str, dict] = {}
    for split in SPLITS:
        infos = [state[s.name] for s in plan if s.split == split]
        splits[split] = {"examples": sum(i["examples"] for i in infos),
                         "particles": sum(i["particles"] for i in infos),
                         "shards": infos, **merge_stats(infos, n_classes)}
    all_stats = merge_stats([state[s.name] for s in plan], n_classes)
    return {
        "schema_version": SCHEMA_VERSION,
        "description": "ceriakeras TFRecord dataset: noise-free HRTEM images of CeO2 nanoparticles "
                       "(vacuum = 1) with column-height label masks",
        "count": params["count"],
        "seed": params["seed"],
        "shards_requested": params["shards"],
        "optics_per_exit_wave": config.optics_per_exit_wave,
        "particles": sum(len(s.particles) for s in plan),
        "counts": {s: splits[s]["examples"] for s in SPLITS},
        "particles_per_split": {s: splits[s]["particles"] for s in SPLITS},
        "image_size_px": [config.image_size_px, config.image_size_px],
        "pixel_size_A": config.pixel_size_A,
        "max_height": config.max_height,
        "label_histogram": splits["train"]["label_histogram"],
        "label_histogram_split": "train",
        "parameter_ranges": all_stats["parameter_ranges"],
        "splits": splits,
        "config": params["config"],
        "command": command,
        "versions": versions,
    }


def write_dataset(out_dir: str | Path, count: int, shards: int, seed: int,
                  config: SimulationConfig, *, workers: int = 1, scheduler: str | None = None,
                  save_structures: bool = False, preview: int = 0, command: str = "",
                  progress: bool = True, overwrite: bool = False, repair: bool = False,
                  simulator: Simulator | None = None) -> dict:
    """Simulate ``count`` images and write them as a sharded schema-v1 dataset in ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Dataset folder (created). If it already holds this dataset (same count, shards, seed and
        config), finished shards are kept (checked against their recorded sha256) and only
        the rest is simulated; a finished dataset is verified and returned as it is.
    count : int
        Number of images; ``ceil(count / config.optics_per_exit_wave)`` particles.
    shards : int
        Number of train shards (validation and test get proportionally fewer).
    seed : int
        Seed of the whole dataset (particle ``p`` is simulated from ``(seed, p)``).
    config : SimulationConfig
    workers : int
        1 runs in this process; K > 1 starts a dask ``LocalCluster`` of K single-threaded
        worker processes.
    scheduler : str, optional
        ``tcp://HOST:PORT`` of an existing dask scheduler to run the particles on instead.
    save_structures : bool
        Write each simulated particle as ``structures/particle-NNNNNN.xyz`` (extended XYZ).
    preview : int
        Write the first ``preview`` examples as PNGs (image | noisy image | label) in ``preview/``.
    command : str
        The command line, recorded in the manifest.
    progress : bool
        Show a progress bar (images per second).
    overwrite : bool
        Remove a dataset made with other parameters (only ceriakeras' own files) first.
    repair : bool
        Re-simulate the shards of a finished dataset that are missing or corrupt.
    simulator : callable, optional
        ``(particle_id, seed, config) -> list[Example]``; default
        :func:`ceriakeras.physics.simulate.simulate_particle`. Must be importable by dask workers.

    Returns
    -------
    dict
        The manifest (also written to ``out_dir/manifest.json``).
    """
    check_write_arguments(count, shards, workers, seed, preview)
    config.validate()
    out = Path(out_dir)
    _check_writable(out)
    params = _params(count, shards, seed, config)
    old, manifest, progress_state = _earlier_dataset(out, params, overwrite)
    plan = plan_shards(count, shards, config)
    if manifest is not None and old == params and progress_state is None and not repair:
        try:
            verify_dataset(out, deep=False)
        except DataError as err:
            raise DataError(f"{err} (the dataset was already finished)") from None
        write_previews(out, plan, preview, seed)
        return manifest
    state, todo = _shards_to_do(out, plan, config, progress_state, manifest)
    write_text_atomic(out / PROGRESS_NAME, metadata_json({"params": params, "shards": state}) + "\n")
    try:
        _simulate_shards(out, plan, todo, count, seed, config, state, params, save_structures,
                         simulator=simulator, workers=workers, scheduler=scheduler,
                         progress=progress)
    except CeriakerasError:  # refused before a shard was finished: leave no trace
        if not state and progress_state is None:
            (out / PROGRESS_NAME).unlink(missing_ok=True)
        raise

    result = _finish(out, params, plan, state, config, command, manifest if repair else None)
    write_previews(out, plan, preview, seed)
    return result


def _simulate_shards(out: Path, plan: list[ShardPlan], todo: list[ShardPlan], count: int,
                     seed: int, config: SimulationConfig, state: dict, params: dict,
                     save_structures: bool, *, simulator, workers: int, scheduler,
                     progress: bool) -> None:
    """Simulate the particles of the shards still to do, writing each shard when it is whole."""
    from tqdm.auto import tqdm

    total_done = sum(s.images for s in plan) - sum(s.images for s in todo)
    tasks = [(p, images_of_particle(p, count, config.optics_per_exit_wave))
             for s in todo for p in s.particles]
    writer = _ShardWriter(out, todo, config, state, params, save_structures)
    with tqdm(total=count, initial=total_done, unit="img", desc=f"simulate {out.name}",
              disable=not progress, smoothing=0.1, dynamic_ncols=True) as bar:
        def on_result(pid: int, examples: list) -> None:
            writer.add(pid, examples)
            bar.update(len(examples))

        _run_particles(tasks, seed, config, simulator, workers, scheduler, on_result)


def _earlier_dataset(out: Path, params: dict, overwrite: bool) -> tuple:
    """``(params, manifest, progress)`` of what ``out`` already holds (all None once removed
    with ``overwrite``); a dataset of other parameters, or stray shards, are refused without it."""
    old, manifest, progress_state = _existing_params(out)
    if old is not None and old != params:
        if not overwrite:
            raise ConfigError(
                f"{out} holds a dataset made with other parameters ({_describe_difference(old, params)}); "
                "use another --out, or --overwrite to replace it"
            )
    stray = [p for s in SPLITS for p in out.glob(f"{s}-*{SHARD_SUFFIX}")]
    if old is None and stray and not overwrite:
        raise ConfigError(
            f"{out} holds shards ({stray[0].name}, …) of an unknown dataset; "
            "use another --out, or --overwrite to replace them"
        )
    if overwrite and (old != params or (old is None and stray)):
        _remove(_our_files(out))
        old = manifest = progress_state = None
    return old, manifest, progress_state


def _shards_to_do(out: Path, plan: list[ShardPlan], config: SimulationConfig,
                  progress_state: dict | None, manifest: dict | None) -> tuple[dict, list]:
    """Which shards are finished (``state``: file name → manifest entry, checked against their
    recorded size and sha256, or recovered from a shard renamed before the progress file was
    updated) and which are still to simulate (``todo``; corrupt ones removed)."""
    state: dict = {}
    if progress_state is not None:
        state.update(progress_state.get("shards", {}))
    elif manifest is not None:
        state.update({i["file"]: i for e in manifest.get("splits", {}).values() for i in e.get("shards", [])})
    state = {name: info for name, info in state.items() if name in {s.name for s in plan}}
    todo: list[ShardPlan] = []
    for shard in plan:
        path = out / shard.name
        info = state.get(shard.name)
        if path.exists() and info is not None:
            if path.stat().st_size == info.get("bytes") and file_sha256(path) == info.get("sha256"):
                continue
        elif path.exists():   # renamed, but the progress file was not updated (crash in between)
            try:
                stats, particles = stats_of_shard_file(path, config.max_height + 1)
            except DataError:
                stats, particles = None, []
            if stats is not None and stats["examples"] == shard.images and particles == list(shard.particles):
                state[shard.name] = {"file": shard.name, "split": shard.split, "examples": shard.images,
                                     "particles": len(shard.particles), "bytes": path.stat().st_size,
                                     "sha256": file_sha256(path), **{k: stats[k] for k in ("label_histogram", "parameter_ranges")}}
                continue
        if path.exists():
            logging.getLogger(__name__).warning("shard %s is corrupt; simulating it again", path)
            path.unlink()
        state.pop(shard.name, None)
        todo.append(shard)
    return state, todo


def _finish(out: Path, params: dict, plan: list[ShardPlan], state: dict, config: SimulationConfig,
            command: str, repaired: dict | None) -> dict:
    """Write ``manifest.json`` (last) and drop the progress file. A repaired dataset keeps its
    manifest's versions and command (``repaired``: the manifest before the repair)."""
    versions = (repaired or {}).get("versions") if repaired else None
    if repaired and repaired.get("command"):
        command = repaired["command"]
    result = _build_manifest(params, plan, state, config, command, versions or software_versions())
    with atomic_path(out / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return result


def dataset_parameters(data_dir: str | Path) -> tuple[int, int, int, SimulationConfig, str]:
    """``(count, shards, seed, config, command)`` of the dataset (finished or not) in ``data_dir``.

    Used by ``ceriakeras simulate --repair`` when the command line does not repeat them.
    """
    data_dir = Path(data_dir)
    params, manifest, _ = _existing_params(data_dir)
    if params is None:
        raise DataError(
            f"{data_dir} holds no ceriakeras dataset (no readable manifest.json or .progress.json); "
            f"give --count (and the other options) to make one"
        )
    # a manifest written before a field existed was made with that field's old default
    config = from_dict(SimulationConfig, params["config"], base=SimulationConfig.legacy())
    command = (manifest or {}).get("command", "")
    return params["count"], params["shards"], params["seed"], config, command
