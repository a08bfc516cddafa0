"""TFRecord schema v1, the dataset folder and its manifest: reading, verification, several datasets together.

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

Writing a dataset (the plan of particles, splits and shards; in-process or on dask) is
:mod:`ceriakeras.data.writer`. TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..config import SCHEMA_VERSION, ConfigError, DataError
from ..io.files import file_sha256, read_json

SPLITS = ("train", "validation", "test")
"""The three splits, in the order their particles are assigned."""
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".progress.json"
MAX_COUNT = 10_000_000
"""Most images one ``write_dataset`` call simulates (the plan lists every particle in memory)."""
MAX_COUNT_WHY = ("the shard plan of one dataset is held in memory and would take months to "
                 "simulate; simulate chunks of at most this many images into several --out "
                 "folders and train on them together (train --data A --data B)")
MAX_SHARDS = 10_000
"""Most train shards of one dataset (each is a file that tf.data opens)."""
MAX_SHARDS_WHY = ("each shard is a file that training opens and interleaves; a few hundred "
                  "images per shard is plenty (the default is 16 shards)")
SHARD_SUFFIX = ".tfrecord.gz"
PREVIEW_DOSE_E_PER_A2 = 200.0
"""Dose of the noisy panel of ``--preview`` images, e⁻/Å²."""


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


def metadata_json(obj: Any) -> str:
    """JSON text as records and the progress file store it: keys sorted, NumPy values plain."""
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
    meta = metadata_json(dict(ex.metadata)).encode("utf-8")
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
            f"shard {path} is corrupt or truncated ({first_line(err)}); rebuild it with "
            f"`ceriakeras simulate --out {path.parent} --repair`"
        ) from None
    except tf.errors.NotFoundError:
        raise DataError(
            f"shard {path} is missing; rebuild it with `ceriakeras simulate --out {path.parent} --repair`"
        ) from None


def first_line(err: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), for one-line errors."""
    text = str(getattr(err, "message", "") or err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


# --- manifest and folder state -----------------------------------------------------------------
def software_versions() -> dict:
    """Versions of Python and the libraries a dataset is made with (None: not installed)."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("ceriakeras", "numpy", "tensorflow", "abtem", "ase", "dask", "distributed"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def read_dataset_json(path: Path) -> dict:
    """A dataset's ``manifest.json`` or ``.progress.json``; one-line :class:`DataError` if unreadable."""
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
    manifest = read_dataset_json(path)
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
            return f"does not parse ({first_line(err)})"
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

    A run since chunked data records ``datasets``: a list of ``{data_dir, manifest_sha256}``
    (and, since 2026-12, ``data_sha256``: :func:`manifest_data_sha256`); a run of versions 1–2
    has only the single ``data_dir`` and ``manifest_sha256`` fields (still written too, for the
    first dataset). Both read as a list of ``{data_dir, manifest_sha256}``, with ``data_sha256``
    where the record has it (empty if the record names none).
    """
    if isinstance(record.get("datasets"), list) and record["datasets"]:
        out = []
        for d in record["datasets"]:
            entry = {"data_dir": d.get("data_dir"), "manifest_sha256": d.get("manifest_sha256")}
            if d.get("data_sha256"):
                entry["data_sha256"] = d["data_sha256"]
            out.append(entry)
        return out
    if record.get("manifest_sha256") or record.get("data_dir"):
        return [{"data_dir": record.get("data_dir"),
                 "manifest_sha256": record.get("manifest_sha256")}]
    return []


PROVENANCE_KEYS = ("command", "versions")
"""Manifest fields that say how a dataset was made (the command line, the package versions),
not what it holds: a dataset simulated again bit for bit in another environment differs there."""


def manifest_sha256(data_dir) -> str:
    """sha256 (hex) of ``data_dir/manifest.json``, the identity of a dataset's file."""
    return file_sha256(Path(data_dir) / "manifest.json")


def manifest_data_sha256(manifest: dict) -> str:
    """sha256 (hex) of a manifest without its :data:`PROVENANCE_KEYS`: the identity of the images
    and labels a dataset holds (its config, seed, counts, histograms), whatever made it.

    A resume compares it as well as the manifest file's sha256, so that a chunk simulated again
    with the same command and seed in a fresh environment is the run's data still."""
    body = {k: v for k, v in manifest.items() if k not in PROVENANCE_KEYS}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def compare_run_datasets(record: dict, digests: Sequence[str],
                         manifests: Sequence[dict] | None = None) -> tuple[list[str], list[str]]:
    """``(added, removed)``: the manifest sha256s in ``digests`` (the datasets given now) that
    the run's ``dataset.json`` ``record`` lacks, and those it has that are not given now.

    ``manifests`` (of the datasets given now, in the order of ``digests``): a dataset whose
    manifest changed only in its provenance (same :func:`manifest_data_sha256`) is the same
    dataset, neither added nor removed (only for runs that recorded ``data_sha256``)."""
    saved = run_datasets(record)
    data_digests = ([manifest_data_sha256(m) for m in manifests] if manifests is not None
                    else [None] * len(digests))
    saved_full = {d["manifest_sha256"] for d in saved}
    saved_data = {d["data_sha256"] for d in saved if d.get("data_sha256")}
    added = [h for h, dh in zip(digests, data_digests)
             if h not in saved_full and (dh is None or dh not in saved_data)]
    removed = [d["manifest_sha256"] for d in saved
               if d["manifest_sha256"] not in digests
               and not (d.get("data_sha256") and d["data_sha256"] in data_digests)]
    return added, removed


def data_change_message(run_dir, record: dict, removed) -> str:
    """The one-line refusal of a resume whose datasets leave out some of the run's."""
    gone = [d["data_dir"] for d in run_datasets(record) if d["manifest_sha256"] in removed]
    return (f"run {run_dir} was trained on {', '.join(str(g) for g in gone)}, which --data now "
            "lacks (not given, or its manifest.json changed); "
            "give every dataset of the run again (more may be added), pass --allow-data-change "
            "to continue on other data, or start a new run")


__all__ = [
    "SPLITS", "MANIFEST_NAME", "serialize_example", "parse_example", "feature_spec",
    "iter_shard", "read_manifest", "shard_paths", "verify_dataset", "as_data_dirs",
    "read_manifests", "summed_label_histogram", "run_datasets", "compare_run_datasets",
    "data_change_message",
]
