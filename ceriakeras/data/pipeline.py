"""tf.data from the shards: parse, crop, flip/rot90, shuffle, batch, prefetch.

Training batches hold *expected counts* (noise-free intensity × dose × pixel area, a dose drawn
log-uniformly per image, :func:`ceriakeras.noise.expected_counts`); the model's ``PoissonNoise``
layer draws the counts on the accelerator with :func:`ceriakeras.noise.poisson_sample`, so every
epoch sees fresh noise at no CPU cost.
Validation and test batches are already noisy, at the fixed doses of the config, with seeds that
depend only on the example's position in the split, so epochs compare.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from ..config import DataError, PipelineConfig
from ..noise import expected_counts, poisson_sample
from .records import check_shard, as_data_dirs, feature_spec, read_manifests, shard_paths

_VALIDATION_SEED_SALT = 0x5EED_7A11


def draw_dose(seed: Any, shape: Any, dose_range_e_per_A2: Sequence[float]) -> tf.Tensor:
    """Doses drawn log-uniformly over ``dose_range_e_per_A2`` (e⁻/Å²), float32, stateless."""
    lo, hi = (math.log(float(d)) for d in dose_range_e_per_A2)
    u = tf.random.stateless_uniform(shape, seed=tf.cast(seed, tf.int64), dtype=tf.float32)
    return tf.exp(lo + (hi - lo) * u)


# --- the dataset -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _verified(path: str, size: int, mtime_ns: int, sha256: str, expected_bytes: int) -> str | None:
    return check_shard(Path(path), {"bytes": expected_bytes, "sha256": sha256}, deep=False)


def _check_split(data_dir: Path, split: str, manifest: dict, verify: bool) -> list[Path]:
    entry = manifest["splits"].get(split, {"shards": []})
    infos = entry.get("shards", [])
    count = manifest["counts"].get(split, 0)
    if not infos or count == 0:
        raise DataError(
            f"{data_dir} has no {split} examples ({split} shards: {len(infos)}); simulate more "
            f"particles (a larger --count) so that the {split} split gets some"
        )
    if sum(i["examples"] for i in infos) != count:
        raise DataError(
            f"{data_dir / 'manifest.json'} disagrees with itself: its {split} shards hold "
            f"{sum(i['examples'] for i in infos)} examples, its counts say {count}; rebuild it "
            f"with `ceriakeras simulate --out {data_dir} --repair`"
        )
    paths = []
    for info in infos:
        path = data_dir / info["file"]
        if not path.is_file():
            problem = "is missing"
        elif verify:
            st = path.stat()
            problem = _verified(str(path), st.st_size, st.st_mtime_ns, info["sha256"], info["bytes"])
        else:
            problem = None
        if problem:
            raise DataError(
                f"shard {path} {problem}; rebuild it with `ceriakeras simulate --out {data_dir} --repair`"
            )
        paths.append(path)
    return paths


def _seed_pair(seed: int, index: tf.Tensor, salt: int) -> tf.Tensor:
    return tf.stack([tf.constant(seed * 1_000_003 + salt, tf.int64) % (2**31 - 1),
                     tf.cast(index, tf.int64)])


def _crop_offsets(uniform: tf.Tensor, height: int, width: int, crop: int,
                  jitter: int | None) -> tuple[tf.Tensor, tf.Tensor]:
    """Top and left pixel of each training crop from ``uniform (b, 2)`` draws in [0, 1): anywhere
    in the image (``jitter`` None), or the centred crop shifted by at most ``jitter`` px per axis."""
    out = []
    for u, size in ((uniform[:, 0], height), (uniform[:, 1], width)):
        room = size - crop
        if jitter is None:
            lo, span = 0, room + 1
        else:
            reach = min(int(jitter), room // 2)
            lo, span = room // 2 - reach, 2 * reach + 1
        out.append(tf.minimum(lo + tf.cast(u * span, tf.int32), lo + span - 1))
    return out[0], out[1]


def _crop_batch(x: tf.Tensor, top: tf.Tensor, left: tf.Tensor, size: int) -> tf.Tensor:
    """Crop ``(b, H, W)`` to ``(b, size, size)`` at per-example offsets ``top, left (b,)``."""
    r = tf.range(size, dtype=top.dtype)
    rows = top[:, None] + r[None, :]
    cols = left[:, None] + r[None, :]
    x = tf.gather(x, rows, axis=1, batch_dims=1)
    return tf.gather(x, cols, axis=2, batch_dims=1)


def _dihedral(x: tf.Tensor, code: tf.Tensor) -> tf.Tensor:
    """Apply one of the 8 flips/90° rotations per example; ``code (b,)`` in 0..7, bits = transpose, flip rows, flip cols."""
    def sel(bit, a, b):
        mask = tf.reshape(tf.bitwise.bitwise_and(code, bit) > 0, [-1, 1, 1])
        return tf.where(mask, a, b)

    x = sel(1, tf.transpose(x, [0, 2, 1]), x)
    x = sel(2, tf.reverse(x, [1]), x)
    return sel(4, tf.reverse(x, [2]), x)


def _metadata_number(metadata: tf.Tensor, key: str) -> tf.Tensor:
    """The number after ``"key":`` in each JSON string of ``metadata (b,)``, NaN where absent."""
    pattern = r'(?s).*?"' + key + r'"\s*:\s*(-?[0-9][0-9.eE+-]*).*'
    found = tf.strings.regex_full_match(metadata, pattern)
    text = tf.where(found, tf.strings.regex_replace(metadata, pattern, r"\1"), "nan")
    return tf.strings.to_number(text, tf.float32)


def optics_targets(metadata: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """Per-record targets of the optics output: ``(b, 3)`` float32 = defocus (nm, abTEM sign),
    Cs (µm) from each record's metadata JSON (``defocus_nm``, ``cs_um``; NaN when absent) and the
    largest column height in the record (Ce atoms, 0 for an image without columns).

    Parameters
    ----------
    metadata : (b,) string tensor
        The records' ``metadata`` feature.
    columns : (b, 3 n) float tensor
        The records' flattened ``columns`` (x_px, y_px, height), zero-padded to the longest.
    """
    heights = tf.reshape(columns, [tf.shape(columns)[0], -1, 3])[:, :, 2]
    largest = tf.reduce_max(tf.concat([tf.zeros_like(heights[:, :1]), heights], axis=1), axis=1)
    return tf.stack([_metadata_number(metadata, "defocus_nm"), _metadata_number(metadata, "cs_um"),
                     largest], axis=1)


def make_dataset(data_dir: str | Path | Sequence[str | Path], split: str, config: PipelineConfig, *,
                 class_weights: Any = None, training: bool | None = None, repeat: bool | None = None,
                 verify: bool = True, optics: bool = False) -> tf.data.Dataset:
    """Batches of ``(image, label, sample_weight)`` from a dataset folder's split.

    Parameters
    ----------
    data_dir : path or sequence of paths
        Folder written by ``ceriakeras simulate`` (shards and ``manifest.json``), or several
        such folders (chunks of one dataset, :func:`ceriakeras.data.records.read_manifests` checks
        that they agree on pixel size, max_height, label radius and image size). For training
        the shards of all of them are shuffled and interleaved together; otherwise each
        dataset's records come in the order they have alone, one dataset after the other, so
        example positions, and with them the fixed validation noise seeds, continue from one
        dataset to the next and the first dataset gives exactly the examples it gives alone.
    split : {'train', 'validation', 'test'}
    config : PipelineConfig
        Crop size, batch size, dose range, validation doses, shuffle buffer, seed, determinism.
    class_weights : (max_height + 1,) array-like, optional
        Weight of each label class; ``sample_weight`` is ``class_weights[label]`` (1 if None).
    training : bool, optional
        Default: ``split == "train"``. True: shards shuffled and interleaved, random crops
        (``config.crops_per_image`` of each record, at most as many as fit side by side),
        random flips/90° rotations (identical on image and label), shuffled; images are
        *expected counts* at a dose drawn per crop, log-uniform over
        ``config.dose_range_e_per_A2``. False: records in order,
        centre crops, no augmentation, each example repeated at every
        ``config.validation_doses_e_per_A2`` with Poisson noise from a fixed seed (the same
        noisy images every epoch).
    repeat : bool, optional
        Repeat forever (default: ``training``).
    verify : bool
        Check every shard of the split against the manifest's size and sha256 first
        (remembered per file while it is unchanged).
    optics : bool
        Also deliver the targets of the ``optics`` output (:func:`optics_targets`): the label
        becomes ``{'probabilities': label, 'optics': (B, 3)}`` and the sample weight
        ``{'probabilities': weight, 'optics': ones (B,)}``, as a model with two outputs is fitted.

    Returns
    -------
    tf.data.Dataset
        ``image (B, crop, crop, 1) float32`` (counts), ``label (B, crop, crop) int32``,
        ``sample_weight (B, crop, crop) float32``. Training batches are full (``drop_remainder``).

    Raises
    ------
    DataError
        A missing or empty dataset or split, a truncated or changed shard, another schema
        version, or a crop larger than the images; the message names the file and what to do.
    """
    config.validate()
    training = (split == "train") if training is None else bool(training)
    groups, (height, width), weights = _checked_split(data_dir, split, config, class_weights, verify)
    repeat = training if repeat is None else repeat
    deterministic = bool(config.deterministic or not training)
    ds = _records(groups, training, repeat, int(config.seed), deterministic)
    ds = ds.enumerate().batch(max(1, min(config.batch_size, 32)))
    parse_chunk = _chunk_parser(config, height, width, training, bool(optics))
    ds = ds.map(parse_chunk, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.unbatch()
    ds = _examples(ds, config, weights, training, bool(optics), deterministic)
    ds = ds.batch(config.batch_size, drop_remainder=training,
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def _checked_split(data_dir, split: str, config: PipelineConfig, class_weights: Any,
                   verify: bool) -> tuple[list[list[Path]], tuple[int, int], tf.Tensor]:
    """The shards of ``split`` per dataset (checked), the image size (px) and the class weights
    (one per class, 1 if None); :class:`DataError` for a crop larger than the images or too few
    weights."""
    data_dirs = as_data_dirs(data_dir)
    manifests = read_manifests(data_dirs)
    data_dir, manifest = data_dirs[0], manifests[0]
    shard_paths(data_dir, split)  # checks the split name
    groups = [_check_split(d, split, m, verify) for d, m in zip(data_dirs, manifests)]
    height, width = (int(v) for v in manifest.get("image_size_px", [0, 0]))
    crop = config.crop_px
    if crop > min(height, width):
        raise DataError(
            f"crop_px={crop} is larger than the {height}×{width} px images of {data_dir}; use a "
            f"crop of at most {min(height, width)} px or simulate larger cells (--cell-size)"
        )
    n_classes = int(manifest.get("max_height", len(manifest["label_histogram"]) - 1)) + 1
    if class_weights is None:
        weights = tf.ones([n_classes], tf.float32)
    else:
        weights = tf.constant(np.asarray(class_weights, np.float32).reshape(-1))
        if weights.shape[0] < n_classes:
            raise DataError(
                f"class_weights has {weights.shape[0]} entries but {data_dir} has labels up to "
                f"{n_classes - 1}; give one weight per class 0..{n_classes - 1}"
            )
    return groups, (height, width), weights


def _records(groups: list[list[Path]], training: bool, repeat: bool, seed: int,
             deterministic: bool) -> tf.data.Dataset:
    """The serialized records of the shards in ``groups`` (one list per dataset)."""

    def records_of(group: list[Path], repeat_files: bool) -> tf.data.Dataset:
        files = tf.data.Dataset.from_tensor_slices([str(p) for p in group])
        if training:
            files = files.shuffle(len(group), seed=seed, reshuffle_each_iteration=True)
        if repeat_files:
            files = files.repeat()
        return files.interleave(
            lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP", buffer_size=1 << 20),
            cycle_length=min(len(group), max(2, os.cpu_count() or 2)), block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

    # Training shuffles and interleaves the shards of all datasets as one list; otherwise each
    # dataset's records come in the order they would alone, one dataset after the other.
    if training or len(groups) == 1:
        return records_of([path for group in groups for path in group], repeat)
    ds = records_of(groups[0], False)
    for group in groups[1:]:
        ds = ds.concatenate(records_of(group, False))
    return ds.repeat() if repeat else ds


def _chunk_parser(config: PipelineConfig, height: int, width: int, training: bool,
                  optics: bool):
    """``parse_chunk(index, serialized)`` of a chunk of enumerated records: images, labels,
    pixel sizes and optics targets, randomly cropped, flipped and dosed for training, centre
    crops otherwise."""
    spec = feature_spec(optics)
    crop = config.crop_px
    crops = max(1, min(config.crops_per_image, (height // crop) * (width // crop)))
    seed = int(config.seed)

    def parse_chunk(index, serialized):
        f = tf.io.parse_example(serialized, spec)
        b = tf.shape(serialized)[0]
        image = tf.reshape(tf.io.decode_raw(f["image"], tf.float32), [b, height, width])
        label = tf.reshape(tf.io.decode_raw(f["label"], tf.uint8), [b, height, width])
        px = tf.reshape(f["pixel_size"], [b, 1, 1])
        targets = (optics_targets(f["metadata"], tf.reshape(f["columns"], [b, -1]))
                   if optics else tf.zeros([b, 3]))
        if training:  # `crops` random crops of each record, each with its own flip/rotation
            s = _seed_pair(seed, index[0], 1)
            images, labels = [], []
            for k in range(crops):
                offsets = tf.random.stateless_uniform([b, 2], seed=s + [0, 3 * k], dtype=tf.float32)
                top, left = _crop_offsets(offsets, height, width, crop, config.crop_jitter_px)
                code = tf.random.stateless_uniform([b], seed=s + [0, 3 * k + 1], minval=0, maxval=8,
                                                   dtype=tf.int32)
                images.append(_dihedral(_crop_batch(image, top, left, crop), code))
                labels.append(_dihedral(_crop_batch(label, top, left, crop), code))
            image, label = tf.concat(images, 0), tf.concat(labels, 0)
            px = tf.tile(px, [crops, 1, 1])
            dose = draw_dose(_seed_pair(seed, index[0], 2), [crops * b], config.dose_range_e_per_A2)
            image = expected_counts(image, tf.reshape(dose, [-1, 1, 1]), px)
            index = tf.tile(index, [crops])
            targets = tf.tile(targets, [crops, 1])
        else:  # centre crops
            top = tf.fill([b], (height - crop) // 2)
            left = tf.fill([b], (width - crop) // 2)
            image = _crop_batch(image, top, left, crop)
            label = _crop_batch(label, top, left, crop)
        return {"index": index, "image": image, "label": tf.cast(label, tf.int32),
                "pixel_size": px[:, 0, 0], "optics": targets}

    return parse_chunk


def _examples(ds: tf.data.Dataset, config: PipelineConfig, weights: tf.Tensor, training: bool,
              optics: bool, deterministic: bool) -> tf.data.Dataset:
    """Parsed examples → ``(image, label, sample_weight)``: shuffled for training; for
    validation each example at every validation dose with Poisson noise of a fixed seed."""
    seed = int(config.seed)

    def _pack(image, label, weight, targets):
        if not optics:
            return image, label, weight
        ones = tf.ones(tf.shape(targets)[:-1], tf.float32)
        return image, {"probabilities": label, "optics": targets}, {"probabilities": weight,
                                                                    "optics": ones}

    if training:
        ds = ds.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

        def finish(ex):
            return _pack(ex["image"][..., None], ex["label"], tf.gather(weights, ex["label"]),
                         ex["optics"])

        return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    doses = tf.constant(config.validation_doses_e_per_A2, tf.float32)
    n_doses = len(config.validation_doses_e_per_A2)

    def noisy(ex):
        mean = expected_counts(ex["image"][None], tf.reshape(doses, [-1, 1, 1]), ex["pixel_size"])
        counts = poisson_sample(mean, _seed_pair(seed, ex["index"], _VALIDATION_SEED_SALT))
        label = tf.repeat(ex["label"][None], n_doses, axis=0)
        targets = tf.repeat(ex["optics"][None], n_doses, axis=0)
        return _pack(counts[..., None], label, tf.gather(weights, label), targets)

    return ds.map(noisy, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


__all__ = ["draw_dose", "make_dataset", "optics_targets"]
