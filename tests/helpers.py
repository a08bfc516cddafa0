"""Helpers shared by the tests of every stage: stand-in simulators, tiny datasets and models.

They use the project's own writers and export, so a test that uses them exercises the real code.
Tests import them as ``from helpers import ...`` (``tests/`` is on ``sys.path`` through conftest).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from ceriakeras.config import ModelConfig, PipelineConfig, SimulationConfig, TrainConfig


SMALL = SimulationConfig.legacy(cell_size_A=16.0, pixel_size_A=0.2, optics_per_exit_wave=2)


CALLS: list[int] = []


@dataclasses.dataclass
class FakeExample:
    image: np.ndarray
    label: np.ndarray
    columns: np.ndarray
    pixel_size_A: float
    metadata: dict
    atoms: object = None


def fake_simulator(particle_id: int, seed: int, config: SimulationConfig) -> list[FakeExample]:
    """Examples with the shapes and fields of the real ones, from random numbers."""
    import ase

    CALLS.append(particle_id)
    rng = np.random.default_rng([seed, particle_id])
    n = config.image_size_px
    n_cols = int(rng.integers(3, 8))
    heights = rng.integers(1, config.structure.max_height + 1, n_cols)
    grid = np.array([(x, y) for x in range(8, n - 8, 12) for y in range(8, n - 8, 12)], float)
    sites = grid[rng.choice(len(grid), n_cols, replace=False)] + rng.uniform(-2, 2, (n_cols, 2))
    cols = np.column_stack([sites, heights])  # columns ≥ 8 px apart, disks of 2 px do not touch
    cols = cols.astype(np.float32)
    yy, xx = np.mgrid[:n, :n]
    label = np.zeros((n, n), np.uint8)
    for x, y, h in cols:
        label[(xx - x) ** 2 + (yy - y) ** 2 <= 4.0] = int(h)
    atoms = ase.Atoms("Ce" * n_cols, positions=np.column_stack([cols[:, :2] * config.pixel_size_A,
                                                                np.zeros(n_cols)]))
    diameter = float(rng.uniform(*config.structure.diameter_range_A))
    out = []
    for j in range(config.optics_per_exit_wave):
        image = (1.0 + 0.05 * rng.standard_normal((n, n)) - 0.02 * label).astype(np.float32)
        meta = {"particle_id": particle_id, "seed": seed, "optics_index": j,
                "defocus_nm": float(rng.uniform(*config.optics.defocus_range_nm)),
                "cs_um": float(rng.uniform(*config.optics.cs_range_um)),
                "diameter_A": diameter, "particle": {"n_ce": int(n_cols)}}
        out.append(FakeExample(image, label, cols, config.pixel_size_A, meta, atoms))
    return out


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tfrecord.gz"))}


def slow_simulator(particle_id, seed, config):
    time.sleep(0.4)
    return fake_simulator(particle_id, seed, config)



MAX_HEIGHT = 4


def synthetic_optics(seed, particle_id):
    """Defocus (nm) and Cs (µm) recorded in a synthetic record's metadata (targets of the
    context U-Net's optics output; the synthetic image does not depend on them)."""
    rng = np.random.default_rng([seed, particle_id, 1])
    return {"defocus_nm": float(rng.uniform(-12, 12)), "cs_um": float(rng.uniform(-25, 25))}


def synthetic_particle(particle_id, seed, config):
    """Stand-in for ``simulate_particle``: dark Gaussian columns on a 4 Å grid, depth ∝ height."""
    from ceriakeras.physics.simulate import Example, label_mask

    rng = np.random.default_rng([seed, particle_id])
    n, px = config.image_size_px, config.pixel_size_A
    examples = []
    for _ in range(config.optics_per_exit_wave):
        grid = np.arange(2.5 / px, n - 2.5 / px, 4.0 / px)
        xs, ys = np.meshgrid(grid, grid)
        heights = rng.integers(1, MAX_HEIGHT + 1, xs.size)
        columns = np.stack([xs.ravel(), ys.ravel(), heights], axis=1).astype(np.float32)
        yy, xx = np.mgrid[:n, :n]
        image = np.ones((n, n), np.float32)
        for x, y, h in columns:
            image -= 0.12 * h * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * (0.3 / px) ** 2))
        label = label_mask(columns, (n, n), px, config.label_radius_A, config.max_height)
        examples.append(Example(image=image.astype(np.float32), label=label, columns=columns,
                                pixel_size_A=px, metadata={"particle_id": particle_id,
                                                           **synthetic_optics(seed, particle_id)},
                                atoms=None))
    return examples


def empty_particle(particle_id, seed, config):
    """Stand-in for ``simulate_particle``: vacuum only (no column), to tell its records apart."""
    return [dataclasses.replace(ex, image=np.ones_like(ex.image), label=np.zeros_like(ex.label),
                                columns=np.zeros((0, 3), np.float32))
            for ex in synthetic_particle(particle_id, seed, config)]


def make_synthetic_dataset(out_dir, count=12, seed=0, simulator=synthetic_particle):
    """A dataset folder of ``count`` 80×80 px images (0.2 Å pixels, heights 1–4)."""
    from ceriakeras.data.writer import write_dataset

    config = SimulationConfig.legacy(cell_size_A=16.0, optics_per_exit_wave=1, max_height=MAX_HEIGHT,
                                     split_fractions=(0.5, 0.5, 0.0))
    config = dataclasses.replace(config, structure=dataclasses.replace(config.structure,
                                                                       max_height=MAX_HEIGHT))
    write_dataset(out_dir, count, 1, seed, config, progress=False, simulator=simulator)
    return Path(out_dir)


TINY = TrainConfig(
    pipeline=PipelineConfig(crop_px=32, batch_size=4, validation_doses_e_per_A2=(1000.0,)),
    model=ModelConfig(depth=2, base_filters=4, max_height=MAX_HEIGHT),
    epochs=1, steps_per_epoch=2, warmup_steps=1, validation_steps=1, mixed_precision="off",
)


CONTEXT = dataclasses.replace(TINY, model=ModelConfig(
    architecture="context_unet", depth=3, base_filters=4, max_filters=8, full_resolution_filters=2,
    global_units=4, max_height=MAX_HEIGHT, detector_correlation_max=0.3))



def export_tiny_model(root: Path, *, pixel_size_A: float = 0.2, name: str = "tiny",
                      seed: int = 0) -> Path:
    """A tiny untrained U-Net (depth 2, 4 base filters) saved in a run folder and exported with
    :func:`ceriakeras.nn.export.export_run` as ``root/saved_models/NAME/1``; returns that folder."""
    import keras

    from ceriakeras.config import ModelConfig, TrainConfig, to_dict
    from ceriakeras.nn.export import export_run
    from ceriakeras.nn.model import build_unet

    config = TrainConfig(model=ModelConfig(depth=2, base_filters=4, pixel_size_A=pixel_size_A))
    keras.utils.set_random_seed(seed)
    model = build_unet(config.model)
    run = Path(root) / "runs" / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(to_dict(config)))
    (run / "metrics.json").write_text(json.dumps({}))
    model.save(run / "checkpoints" / "best.keras")
    model.save(run / "checkpoints" / "last.keras")
    return Path(export_run(run, Path(root) / "saved_models" / name))
