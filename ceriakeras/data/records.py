"""TFRecord schema v1, sharded datasets (written in-process or on dask), the manifest, reading and verification.

A dataset is a folder::

    train-00000-of-00016.tfrecord.gz … validation-00000-of-00002.tfrecord.gz … test-…
    manifest.json          what is in it and how it was made (written last)
    .progress.json         while it is being written: the parameters and the finished shards
    structures/            particle-000123.xyz (with ``--save-structures``)
    preview/               example-00000.png (with ``--preview K``)

Determinism: the dataset is a function of ``(count, shards, seed, config)`` only. Particle
``p`` is simulated from ``(seed, p)``; its split follows from ``p`` alone (a golden-ratio
sequence over ``config.split_fractions``, so any run of consecutive particles is split in the
right proportions); each split's particles fill its shards in contiguous, particle-ordered
blocks; shards are written by one process (the client) in particle order with deterministic
serialization, so the bytes do not depend on the number of workers or on the order in which
the particles finish.

Heavy libraries (TensorFlow, dask) are imported inside the functions that need them, so that
dask workers, which only run :func:`_simulate_task`, never import TensorFlow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..config import SCHEMA_VERSION, ConfigError, DataError, SimulationConfig, from_dict, to_dict
from ..io.files import atomic_path, file_sha256, read_json, write_text_atomic
from ..noise import poisson_counts

SPLITS = ("train", "validation", "test")
"""The three splits, in the order their particles are assigned."""
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".progress.json"
SHARD_SUFFIX = ".tfrecord.gz"
PREVIEW_DOSE_E_PER_A2 = 200.0
"""Dose of the noisy panel of ``--preview`` images, e⁻/Å²."""
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SKIP_RANGE_KEYS = {"seed", "particle_id", "example_index", "optics_index", "versions"}

Simulator = Callable[[int, int, SimulationConfig], list]


# --- schema v1 ---------------------------------------------------------------------------------
def _tf():
    import tensorflow as tf

    return tf


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def serialize_example(ex: Any) -> bytes:
    """One simulated example as a schema-v1 ``tf.train.Example`` (deterministic bytes).

    Parameters
    ----------
    ex : Example
        Anything with ``image (H, W)`` float (vacuum = 1), ``label (H, W)`` uint8, ``columns
        (N, 3)`` (x_px, y_px, height), ``pixel_size_A`` (Å) and ``metadata`` (JSON-able dict).
    """
    tf = _tf()
    image = np.ascontiguousarray(ex.image, dtype="<f4")
    label = np.asarray(ex.label)
    if image.ndim != 2 or label.shape != image.shape:
        raise DataError(
            f"example image {image.shape} and label {label.shape} must be equal 2-D grids; "
            "this is a bug in the simulator"
        )
    if label.dtype != np.uint8:
        raise DataError(f"example label has dtype {label.dtype}, schema v1 needs uint8")
    columns = np.asarray(ex.columns, dtype=np.float32).reshape(-1, 3)
    meta = _dumps(dict(ex.metadata)).encode("utf-8")
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[np.ascontiguousarray(label).tobytes()])),
        "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[image.shape[0]])),
        "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[image.shape[1]])),
        "pixel_size": tf.train.Feature(float_list=tf.train.FloatList(value=[float(ex.pixel_size_A)])),
        "columns": tf.train.Feature(float_list=tf.train.FloatList(value=columns.ravel().tolist())),
        "metadata": tf.train.Feature(bytes_list=tf.train.BytesList(value=[meta])),
    }
    proto = tf.train.Example(features=tf.train.Features(feature=feature))
    return proto.SerializeToString(deterministic=True)


@functools.lru_cache(maxsize=None)
def feature_spec(with_extras: bool = True) -> dict:
    """The schema-v1 parsing spec (``with_extras=False`` leaves out ``columns`` and ``metadata``)."""
    tf = _tf()
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "pixel_size": tf.io.FixedLenFeature([], tf.float32),
    }
    if with_extras:
        spec["columns"] = tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True)
        spec["metadata"] = tf.io.FixedLenFeature([], tf.string, default_value="{}")
    return spec


def parse_example(serialized: Any, *, with_extras: bool = True) -> dict:
    """Parse one serialized schema-v1 record (works eagerly and inside ``tf.data``).

    Returns
    -------
    dict of tensors
        ``image (H, W) float32``, ``label (H, W) uint8``, ``height``, ``width`` (int64),
        ``pixel_size`` (float32, Å), and with ``with_extras``: ``columns (N, 3) float32``
        (x_px, y_px, height) and ``metadata`` (string, JSON).
    """
    tf = _tf()
    f = tf.io.parse_single_example(serialized, feature_spec(with_extras))
    shape = tf.stack([f["height"], f["width"]])
    out = {
        "image": tf.reshape(tf.io.decode_raw(f["image"], tf.float32), shape),
        "label": tf.reshape(tf.io.decode_raw(f["label"], tf.uint8), shape),
        "height": f["height"],
        "width": f["width"],
        "pixel_size": f["pixel_size"],
    }
    if with_extras:
        out["columns"] = tf.reshape(f["columns"], [-1, 3])
        out["metadata"] = f["metadata"]
    return out


# --- the plan: particles → splits → shards -----------------------------------------------------
def split_of_particle(particle_id: int, split_fractions: Sequence[float]) -> str:
    """The split of particle ``particle_id``: depends on the id and the fractions only.

    ``u = frac(particle_id · (√5 − 1)/2)`` is compared with the cumulative fractions; this
    low-discrepancy sequence keeps any run of consecutive particles within a particle or two of
    the requested proportions, and particle 0 is always in ``train``.
    """
    u = (particle_id * _GOLDEN) % 1.0
    edge = 0.0
    for name, frac in zip(SPLITS, split_fractions):
        edge += frac
        if u < edge - 1e-12:
            return name
    return next(n for n, f in zip(reversed(SPLITS), reversed(split_fractions)) if f > 0)


@dataclass(frozen=True)
class ShardPlan:
    """One shard: its file name and the particles (in order) it holds."""

    split: str
    index: int
    of: int
    particles: tuple[int, ...]
    images: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.of:05d}{SHARD_SUFFIX}"


def images_of_particle(particle_id: int, count: int, per_particle: int) -> int:
    """Images taken from particle ``particle_id``: ``per_particle``, the last one the remainder."""
    return max(0, min(per_particle, count - particle_id * per_particle))


def plan_shards(count: int, shards: int, config: SimulationConfig) -> list[ShardPlan]:
    """Assign ``ceil(count / optics_per_exit_wave)`` particles to splits and shards.

    ``shards`` is the number of train shards (at most one per train particle); validation and
    test get ``round(shards · fraction / train_fraction)`` shards, at least 1 if they hold a
    particle. Each split's particles fill its shards in contiguous blocks, in particle order.
    """
    k = config.optics_per_exit_wave
    n_particles = math.ceil(count / k)
    members: dict[str, list[int]] = {s: [] for s in SPLITS}
    for p in range(n_particles):
        members[split_of_particle(p, config.split_fractions)].append(p)
    f_train = config.split_fractions[0]
    plan: list[ShardPlan] = []
    for split, frac in zip(SPLITS, config.split_fractions):
        ids = members[split]
        if not ids:
            continue
        if split == "train":
            n_shards = shards
        else:
            n_shards = max(1, round(shards * frac / f_train)) if f_train > 0 else max(1, round(shards * frac))
        n_shards = min(n_shards, len(ids))
        for s in range(n_shards):
            block = tuple(ids[s * len(ids) // n_shards:(s + 1) * len(ids) // n_shards])
            images = sum(images_of_particle(p, count, k) for p in block)
            plan.append(ShardPlan(split, s, n_shards, block, images))
    return plan


# --- per-shard statistics ----------------------------------------------------------------------
def _flatten_numbers(meta: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in meta.items():
        if key in _SKIP_RANGE_KEYS:
            continue
        name = prefix + key
        if isinstance(value, dict):
            yield from _flatten_numbers(value, name + ".")
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                yield name, float(value)


class _Stats:
    """Label histogram and parameter ranges of a set of examples."""

    def __init__(self, n_classes: int):
        self.histogram = np.zeros(n_classes, dtype=np.int64)
        self.ranges: dict[str, list[float]] = {}
        self.examples = 0

    def add(self, label: np.ndarray, columns: np.ndarray, meta: dict) -> None:
        counts = np.bincount(np.asarray(label, dtype=np.uint8).ravel(), minlength=len(self.histogram))
        if len(counts) > len(self.histogram):
            raise DataError(
                f"a label holds class {len(counts) - 1} above max_height={len(self.histogram) - 1}; "
                "raise max_height in the config or check the simulator"
            )
        self.histogram += counts
        columns = np.asarray(columns, dtype=np.float64).reshape(-1, 3)
        values = list(_flatten_numbers(meta))
        values.append(("columns_per_image", float(len(columns))))
        if len(columns):
            values += [("column_height", float(columns[:, 2].min())),
                       ("column_height", float(columns[:, 2].max()))]
        for name, v in values:
            lo_hi = self.ranges.setdefault(name, [v, v])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], v), max(lo_hi[1], v)
        self.examples += 1

    def to_dict(self) -> dict:
        return {"label_histogram": self.histogram.tolist(),
                "parameter_ranges": {k: self.ranges[k] for k in sorted(self.ranges)}}


def _merge_stats(infos: Iterable[dict], n_classes: int) -> dict:
    hist = np.zeros(n_classes, dtype=np.int64)
    ranges: dict[str, list[float]] = {}
    for info in infos:
        hist += np.asarray(info["label_histogram"], dtype=np.int64)
        for k, (lo, hi) in info["parameter_ranges"].items():
            r = ranges.setdefault(k, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
    return {"label_histogram": hist.tolist(), "parameter_ranges": {k: ranges[k] for k in sorted(ranges)}}


def iter_shard(path: str | Path, *, with_extras: bool = True) -> Iterator[dict]:
    """Parsed records of one shard as dicts of NumPy values; a damaged shard raises DataError."""
    tf = _tf()
    path = Path(path)
    ds = tf.data.TFRecordDataset(str(path), compression_type="GZIP")
    ds = ds.map(functools.partial(parse_example, with_extras=with_extras))
    try:
        for rec in ds.as_numpy_iterator():
            yield rec
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as err:
        raise DataError(
            f"shard {path} is corrupt or truncated ({_first_line(err)}); rebuild it with "
            f"`ceriakeras simulate --out {path.parent} --repair`"
        ) from None
    except tf.errors.NotFoundError:
        raise DataError(
            f"shard {path} is missing; rebuild it with `ceriakeras simulate --out {path.parent} --repair`"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "message", "") or err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _stats_of_shard_file(path: Path, n_classes: int) -> tuple[dict, list[int]]:
    stats = _Stats(n_classes)
    particles: list[int] = []
    for rec in iter_shard(path):
        meta = json.loads(rec["metadata"])
        stats.add(rec["label"], rec["columns"], meta)
        pid = meta.get("particle_id")
        if pid is not None and (not particles or particles[-1] != pid):
            particles.append(int(pid))
    return {"examples": stats.examples, **stats.to_dict()}, particles


# --- manifest and folder state -----------------------------------------------------------------
def _params(count: int, shards: int, seed: int, config: SimulationConfig) -> dict:
    return {"schema_version": SCHEMA_VERSION, "count": int(count), "shards": int(shards),
            "seed": int(seed), "config": to_dict(config)}


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("ceriakeras", "numpy", "tensorflow", "abtem", "ase", "dask", "distributed"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _read_json(path: Path) -> dict:
    return read_json(path, error=DataError, advice="rebuild it with "
                     f"`ceriakeras simulate --out {path.parent} --repair`")


def read_manifest(data_dir: str | Path) -> dict:
    """The dataset's ``manifest.json``, checked for the schema version this code reads.

    Raises
    ------
    DataError
        If the folder or the manifest is missing, unreadable or of another schema version.
    """
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise DataError(
            f"dataset folder {data_dir} does not exist; make one with "
            f"`ceriakeras simulate --out {data_dir} --count N`"
        )
    if not path.is_file():
        hint = ("it is unfinished: rerun the `ceriakeras simulate` command that made it to resume"
                if (data_dir / PROGRESS_NAME).exists() else
                f"make a dataset with `ceriakeras simulate --out {data_dir} --count N`")
        raise DataError(f"{path} is missing; {hint}")
    manifest = _read_json(path)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{path} has schema version {version}, this ceriakeras reads version {SCHEMA_VERSION}; "
            "regenerate the dataset with this version's `ceriakeras simulate`"
        )
    for key in ("splits", "counts", "config"):
        if key not in manifest:
            raise DataError(f"{path} lacks {key!r}; rebuild it with `ceriakeras simulate --out {data_dir} --repair`")
    return manifest


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    """The shard files of ``split`` as the manifest lists them (they may be missing on disk)."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} must be one of {', '.join(SPLITS)}")
    manifest = read_manifest(data_dir)
    return [Path(data_dir) / s["file"] for s in manifest["splits"].get(split, {}).get("shards", [])]


def check_shard(path: Path, info: dict, *, deep: bool) -> str | None:
    """What is wrong with one shard compared with its manifest entry (None if nothing)."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != info["bytes"]:
        return f"has {size} bytes, the manifest says {info['bytes']} (truncated or replaced)"
    if file_sha256(path) != info["sha256"]:
        return "has changed since it was written (sha256 differs from the manifest)"
    if deep:
        tf = _tf()
        n = 0
        try:
            for _ in tf.data.TFRecordDataset(str(path), compression_type="GZIP"):
                n += 1
        except tf.errors.OpError as err:
            return f"does not parse ({_first_line(err)})"
        if n != info["examples"]:
            return f"holds {n} examples, the manifest says {info['examples']}"
    return None


def _repair_hint(data_dir: Path) -> str:
    return f"rebuild it with `ceriakeras simulate --out {data_dir} --repair`"


def verify_dataset(data_dir: str | Path, *, splits: Sequence[str] = SPLITS, deep: bool = True) -> dict:
    """Check that the dataset on disk is exactly what its manifest says.

    Every shard listed exists with the recorded size and sha256; with ``deep`` every record
    of every shard is read (TFRecord and GZIP checksums) and counted; the per-shard counts add
    up to the split counts; no stray shard files of another layout lie beside them.

    Returns
    -------
    dict
        The manifest.

    Raises
    ------
    DataError
        Naming the first bad file and how to rebuild it (``ceriakeras simulate --repair``).
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    listed = set()
    for split in splits:
        entry = manifest["splits"].get(split, {"shards": [], "examples": 0})
        total = 0
        for info in entry["shards"]:
            path = data_dir / info["file"]
            listed.add(info["file"])
            problem = check_shard(path, info, deep=deep)
            if problem:
                raise DataError(f"shard {path} {problem}; {_repair_hint(data_dir)}")
            total += info["examples"]
        if total != manifest["counts"].get(split, 0) or total != entry.get("examples", 0):
            raise DataError(
                f"{data_dir / MANIFEST_NAME} disagrees with itself: the {split} shards hold {total} "
                f"examples, the counts say {manifest['counts'].get(split, 0)}; {_repair_hint(data_dir)}"
            )
    all_listed = {s["file"] for e in manifest["splits"].values() for s in e["shards"]}
    for split in splits:
        for path in sorted(data_dir.glob(f"{split}-*{SHARD_SUFFIX}")):
            if path.name not in all_listed:
                raise DataError(
                    f"shard {path} is not in {data_dir / MANIFEST_NAME} (left from another run?); "
                    f"move it away or {_repair_hint(data_dir)[0].lower() + _repair_hint(data_dir)[1:]}"
                )
    return manifest


# --- writing -----------------------------------------------------------------------------------
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
            manifest = _read_json(out / MANIFEST_NAME)
        except DataError:
            manifest = None
    if (out / PROGRESS_NAME).exists():
        try:
            progress = _read_json(out / PROGRESS_NAME)
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
        tf = _tf()
        stats = _Stats(self.config.max_height + 1)
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
                          _dumps({"params": self.params, "shards": self.state}) + "\n")


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
                    f"cannot reach the dask scheduler at {scheduler} ({_first_line(err)}); start it "
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


def _write_previews(out: Path, plan: list[ShardPlan], k: int, seed: int) -> None:
    if k <= 0:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out / "preview"
    done = 0
    for shard in plan:
        if done >= k:
            break
        for rec in iter_shard(out / shard.name):
            if done >= k:
                break
            path = pdir / f"example-{done:05d}.png"
            done += 1
            if path.exists():
                continue
            image, label, px = rec["image"], rec["label"], float(rec["pixel_size"])
            rng = np.random.default_rng([seed, done - 1])
            noisy = poisson_counts(rng, image, PREVIEW_DOSE_E_PER_A2, px)
            meta = json.loads(rec["metadata"])
            fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
            axes[0].imshow(image, cmap="gray")
            axes[0].set_title("image (noise-free, vacuum = 1)")
            axes[1].imshow(noisy, cmap="gray")
            axes[1].set_title(f"noisy, {PREVIEW_DOSE_E_PER_A2:g} e⁻/Å²")
            im = axes[2].imshow(label, cmap="viridis", vmin=0, interpolation="nearest")
            axes[2].set_title("label (column height, atoms)")
            fig.colorbar(im, ax=axes[2], fraction=0.046)
            for ax in axes:
                ax.set_axis_off()
            facts = [f"{key}={meta[key]:.3g}" for key in ("defocus_nm", "cs_um", "diameter_A")
                     if isinstance(meta.get(key), (int, float))]
            fig.suptitle(f"{shard.split} · particle {meta.get('particle_id', '?')} · pixel {px:g} Å  "
                         + "  ".join(facts), fontsize=9)
            fig.tight_layout()
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=80)
            plt.close(fig)


def _build_manifest(params: dict, plan: list[ShardPlan], state: dict, config: SimulationConfig,
                    command: str, versions: dict) -> dict:
    n_classes = config.max_height + 1
    splits: dict[str, dict] = {}
    for split in SPLITS:
        infos = [state[s.name] for s in plan if s.split == split]
        splits[split] = {"examples": sum(i["examples"] for i in infos),
                         "particles": sum(i["particles"] for i in infos),
                         "shards": infos, **_merge_stats(infos, n_classes)}
    all_stats = _merge_stats([state[s.name] for s in plan], n_classes)
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
    for name, value, lo in (("count", count, 1), ("shards", shards, 1), ("workers", workers, 1),
                            ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ConfigError(f"{name}={value!r} must be an integer ≥ {lo}")
    if preview < 0:
        raise ConfigError(f"preview={preview} must be ≥ 0")
    config.validate()
    out = Path(out_dir)
    _check_writable(out)
    params = _params(count, shards, seed, config)
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

    plan = plan_shards(count, shards, config)
    if manifest is not None and old == params and progress_state is None and not repair:
        try:
            verify_dataset(out, deep=False)
        except DataError as err:
            raise DataError(f"{err} (the dataset was already finished)") from None
        _write_previews(out, plan, preview, seed)
        return manifest

    # Which shards are finished?
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
                stats, particles = _stats_of_shard_file(path, config.max_height + 1)
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

    write_text_atomic(out / PROGRESS_NAME, _dumps({"params": params, "shards": state}) + "\n")
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

    versions = (manifest or {}).get("versions") if repair and manifest else None
    if repair and manifest and manifest.get("command"):
        command = manifest["command"]
    result = _build_manifest(params, plan, state, config, command, versions or _versions())
    with atomic_path(out / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    _write_previews(out, plan, preview, seed)
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
    config = from_dict(SimulationConfig, params["config"])
    command = (manifest or {}).get("command", "")
    return params["count"], params["shards"], params["seed"], config, command


# --- several datasets trained together (chunks) --------------------------------------------------
def as_data_dirs(data_dirs: str | Path | Sequence[str | Path]) -> list[Path]:
    """One dataset folder or a sequence of them, as a list of paths (order kept, no repeats).

    Raises
    ------
    ConfigError
        No folder given, or the same folder given twice.
    """
    if isinstance(data_dirs, (str, os.PathLike)):
        data_dirs = [data_dirs]
    dirs = [Path(d) for d in data_dirs]
    if not dirs:
        raise ConfigError("no dataset given: pass --data tfrecords/NAME (repeatable)")
    seen: dict[Path, Path] = {}
    for d in dirs:
        key = d.resolve()
        if key in seen:
            raise ConfigError(f"dataset {d} is given twice (--data); give each dataset once")
        seen[key] = d
    return dirs


_MUST_AGREE = (("pixel size", "Å", lambda m: m.get("pixel_size_A")),
               ("max_height", "Ce atoms", lambda m: m.get("max_height")),
               ("label radius", "Å", lambda m: (m.get("config") or {}).get("label_radius_A")),
               ("image size", "px", lambda m: list(m["image_size_px"])
                if m.get("image_size_px") is not None else None))


def read_manifests(data_dirs: str | Path | Sequence[str | Path]) -> list[dict]:
    """The manifests of datasets that are trained together, checked to agree.

    Every dataset must have the same pixel size (Å), ``max_height`` (Ce atoms), label radius
    (Å) and image size (px) as the first one: their shards are read by one pipeline and label one
    model. Chunks of one dataset simulated with the same config and different ``--seed`` agree.

    Parameters
    ----------
    data_dirs : path or sequence of paths
        Dataset folders written by ``ceriakeras simulate``.

    Returns
    -------
    list of dict
        The manifests, in the order of ``data_dirs``.

    Raises
    ------
    DataError
        A dataset is missing or unreadable (:func:`read_manifest`), or differs from the first
        one; the message names the dataset, what differs and what to do.
    ConfigError
        No dataset, or one given twice.
    """
    dirs = as_data_dirs(data_dirs)
    manifests = [read_manifest(d) for d in dirs]
    first = manifests[0]
    for d, manifest in zip(dirs[1:], manifests[1:]):
        for what, unit, get in _MUST_AGREE:
            a, b = get(first), get(manifest)
            same = (a == b if not (isinstance(a, (int, float)) and isinstance(b, (int, float)))
                    else math.isclose(float(a), float(b), rel_tol=1e-6))
            if not same:
                raise DataError(
                    f"dataset {d} has {what} {b} {unit} but {dirs[0]} has {a} {unit}; datasets "
                    "trained together must be simulated with the same config (only --seed and "
                    "--count may differ): drop it or simulate it again with the first one's config")
    return manifests


def summed_label_histogram(manifests: Sequence[dict]) -> list[int]:
    """Pixel count of each label class over the training splits of all ``manifests`` (the
    ``label_histogram`` of each manifest, zero-padded to the longest), for the class weights."""
    hists = [np.asarray(m["label_histogram"], np.int64) for m in manifests]
    total = np.zeros(max(len(h) for h in hists), np.int64)
    for h in hists:
        total[: len(h)] += h
    return total.tolist()


def run_datasets(record: dict) -> list[dict]:
    """The datasets a training run was trained on, from its ``dataset.json``.

    A run since chunked data records ``datasets``: a list of ``{data_dir, manifest_sha256}``;
    a run of versions 1–2 has only the single ``data_dir`` and ``manifest_sha256`` fields (still
    written too, for the first dataset). Both read as a list of ``{data_dir, manifest_sha256}``
    (empty if the record names none).
    """
    if isinstance(record.get("datasets"), list) and record["datasets"]:
        return [{"data_dir": d.get("data_dir"), "manifest_sha256": d.get("manifest_sha256")}
                for d in record["datasets"]]
    if record.get("manifest_sha256") or record.get("data_dir"):
        return [{"data_dir": record.get("data_dir"),
                 "manifest_sha256": record.get("manifest_sha256")}]
    return []


def compare_run_datasets(record: dict, digests: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(added, removed)``: the manifest sha256s in ``digests`` (the datasets given now) that
    the run's ``dataset.json`` ``record`` lacks, and those it has that are not given now."""
    saved = [d["manifest_sha256"] for d in run_datasets(record)]
    return ([d for d in digests if d not in saved], [d for d in saved if d not in digests])


def data_change_message(run_dir, record: dict, removed) -> str:
    """The one-line refusal of a resume whose datasets leave out some of the run's."""
    gone = [d["data_dir"] for d in run_datasets(record) if d["manifest_sha256"] in removed]
    return (f"run {run_dir} was trained on {', '.join(str(g) for g in gone)}, which --data now "
            "lacks (not given, or its manifest.json changed); "
            "give every dataset of the run again (more may be added), pass --allow-data-change "
            "to continue on other data, or start a new run")


__all__ = [
    "SPLITS", "MANIFEST_NAME", "ShardPlan", "serialize_example", "parse_example", "feature_spec",
    "split_of_particle", "plan_shards", "images_of_particle", "iter_shard", "read_manifest",
    "shard_paths", "verify_dataset", "write_dataset", "dataset_parameters", "as_data_dirs",
    "read_manifests", "summed_label_histogram", "run_datasets", "compare_run_datasets",
    "data_change_message",
]
