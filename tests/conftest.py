"""Shared test helpers: a tiny exported model (the project's own export code)."""

from __future__ import annotations

import json
from pathlib import Path


def export_tiny_model(root: Path, *, pixel_size_A: float = 0.2, name: str = "tiny",
                      seed: int = 0) -> Path:
    """A tiny untrained U-Net (depth 2, 4 base filters) saved in a run folder and exported with
    :func:`ceriakeras.export.export_run` as ``root/saved_models/NAME/1``; returns that folder."""
    import keras

    from ceriakeras.config import ModelConfig, TrainConfig, to_dict
    from ceriakeras.export import export_run
    from ceriakeras.model import build_unet

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
