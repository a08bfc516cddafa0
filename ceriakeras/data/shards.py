"""The plan of a dataset: particles → splits → shards, and the statistics kept per shard.

Particle ``p``'s split follows from ``p`` alone (a golden-ratio sequence over
``config.split_fractions``, so any run of consecutive particles is split in the right
proportions); each split's particles fill its shards in contiguous, particle-ordered blocks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataError, SimulationConfig
from .records import SHARD_SUFFIX, SPLITS, iter_shard

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SKIP_RANGE_KEYS = {"seed", "particle_id", "example_index", "optics_index", "versions"}


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


class ShardStats:
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


def merge_stats(infos: Iterable[dict], n_classes: int) -> dict:
    hist = np.zeros(n_classes, dtype=np.int64)
    ranges: dict[str, list[float]] = {}
    for info in infos:
        hist += np.asarray(info["label_histogram"], dtype=np.int64)
        for k, (lo, hi) in info["parameter_ranges"].items():
            r = ranges.setdefault(k, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
    return {"label_histogram": hist.tolist(), "parameter_ranges": {k: ranges[k] for k in sorted(ranges)}}


def stats_of_shard_file(path: Path, n_classes: int) -> tuple[dict, list[int]]:
    stats = ShardStats(n_classes)
    particles: list[int] = []
    for rec in iter_shard(path):
        meta = json.loads(rec["metadata"])
        stats.add(rec["label"], rec["columns"], meta)
        pid = meta.get("particle_id")
        if pid is not None and (not particles or particles[-1] != pid):
            particles.append(int(pid))
    return {"examples": stats.examples, **stats.to_dict()}, particles
