"""The run folder of a training run: made or cleared, its JSON files read (a broken one is a
:class:`ceriakeras.config.ModelError` saying what to do), ``dataset.json`` written, ``log.csv``
cut back on a resume, and what a warm restart (``--init-from``) takes from an earlier run."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import (
    ConfigError,
    ModelConfig,
    ModelError,
    TrainConfig,
    from_dict,
    to_dict,
)
from ..io.files import read_json, write_text_atomic


def drop_log_rows(path: Path, first_epoch: int) -> None:
    """Keep the header and the rows of epochs before ``first_epoch`` in the CSV log (a run
    killed between its log row and its checkpoint redoes that epoch: its row must not stay)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [row for row in lines[1:]
                        if row.split(",", 1)[0].strip().isdigit()
                        and int(row.split(",", 1)[0]) < first_epoch]
    if keep != lines:
        write_text_atomic(path, "".join(keep))


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """The run folder checked (:func:`ceriakeras.nn.plan.check_run_folder`), then emptied for
    ``overwrite`` (the folder itself stays) or made."""
    from .plan import check_run_folder

    exists = check_run_folder(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        return
    if exists:
        for entry in run_dir.iterdir():  # the folder itself stays: it holds the --out lock
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


RUN_ADVICE = "start again with --overwrite"
"""What to do about a broken file in the run folder being trained (``--out``)."""


def read_run_file(path: Path, advice: str = RUN_ADVICE) -> dict:
    """A run's JSON file; a missing or broken one is a :class:`ModelError` with ``advice``."""
    return read_json(path, error=ModelError, advice=advice)


SOURCE_ADVICE = "name another --init-from run"
"""What to do about a broken file in the run a warm restart starts from (never --overwrite:
that would start the new run afresh and leave the broken source as it is)."""


def saved_model_config(run_dir: Path, advice: str = RUN_ADVICE) -> dict:
    """The model settings a run was started with, with the defaults of fields added since
    (a run of versions 1–2 has no ``architecture``: it is a 'unet')."""
    saved = read_run_file(run_dir / "config.json", advice).get("model") or {}
    try:
        return to_dict(from_dict(ModelConfig, saved))
    except (ConfigError, TypeError):
        return saved


def _dataset_entry(data_dir: Path, digest: str, manifest: dict) -> dict:
    from ..data.records import manifest_data_sha256

    return {"data_dir": str(data_dir.resolve()), "manifest_sha256": digest,
            "data_sha256": manifest_data_sha256(manifest), "counts": manifest.get("counts")}


def dataset_record(data_dirs, digests, manifests, weights, previous: dict | None,
                    epoch: int, added, removed, source: dict | None = None) -> dict:
    """The run's ``dataset.json``: the first dataset's fields as versions 1–2 wrote them (read
    by old tools), ``datasets`` (every one), summed ``counts``, the ``class_weights`` in use,
    ``changes``: the datasets added or removed on a resume, with the epoch it happened, and
    ``initialized_from``: the run and epoch a warm-started run took its weights from
    (``source``, see :func:`warm_start_source`)."""
    from ..data.records import run_datasets

    first = manifests[0]
    counts: dict[str, int] = {}
    for m in manifests:
        for split, n in (m.get("counts") or {}).items():
            counts[split] = counts.get(split, 0) + int(n)
    entries = [_dataset_entry(d, h, m) for d, h, m in zip(data_dirs, digests, manifests)]
    changes = list((previous or {}).get("changes", []))
    if previous is not None and (added or removed):
        dirs = {e["manifest_sha256"]: e["data_dir"] for e in run_datasets(previous) + entries}
        changes.append({"after_epoch": epoch,
                        "added": [{"data_dir": dirs[h], "manifest_sha256": h} for h in added],
                        "removed": [{"data_dir": dirs[h], "manifest_sha256": h} for h in removed]})
    record = {
        "data_dir": entries[0]["data_dir"], "manifest_sha256": digests[0],
        "pixel_size_A": first.get("pixel_size_A"), "max_height": first.get("max_height"),
        "label_radius_A": first.get("config", {}).get("label_radius_A"),
        "counts": counts, "class_weights": [float(w) for w in weights],
        "datasets": entries,
    }
    # the datasets whose summed label histograms gave the class weights (a resume keeps them,
    # and a warm start takes the earlier run's)
    if source is not None:
        record["class_weights_from"] = source["class_weights_from"]
    elif previous is not None and previous.get("class_weights_from"):
        record["class_weights_from"] = previous["class_weights_from"]
    elif previous is not None and previous.get("class_weights"):
        record["class_weights_from"] = [e["manifest_sha256"] for e in run_datasets(previous)]
    else:
        record["class_weights_from"] = list(digests)
    if changes:
        record["changes"] = changes
    initialized = (source or {}).get("initialized_from") or (previous or {}).get("initialized_from")
    if initialized:
        record["initialized_from"] = initialized
    return record




def warm_start_source(source_run: Path, config: TrainConfig) -> dict:
    """What a new run started from another run's weights needs of it: its checkpoint of the
    last finished epoch, its class weights (the loss must not jump) and where they came from.

    Raises
    ------
    ModelError
        The run has no checkpoint, or its model settings differ from ``config.model``.
    """
    from ..data.records import run_datasets

    if not (source_run / "checkpoints" / "last.keras").is_file():
        raise ModelError(f"--init-from {source_run} has no checkpoints/last.keras; name a "
                         "training run folder")
    if saved_model_config(source_run, SOURCE_ADVICE) != to_dict(config.model):
        raise ModelError(f"the model settings of --init-from {source_run} (its config.json) "
                         "differ from --config's; start from a run with the same [model] table")
    state = read_run_file(source_run / "state.json", SOURCE_ADVICE)
    record = read_run_file(source_run / "dataset.json", SOURCE_ADVICE)
    checkpoint = source_run / "checkpoints" / state.get("checkpoint", "last.keras")
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint} named by {source_run}/state.json is missing; "
                         "name another --init-from run")
    weights = record.get("class_weights")
    if weights is None or len(weights) != config.model.max_height + 1:
        raise ModelError(f"{source_run}/dataset.json has no class weights for "
                         f"{config.model.max_height + 1} classes; name another --init-from run")
    return {
        "checkpoint": checkpoint,
        "class_weights": weights,
        "class_weights_from": record.get("class_weights_from")
        or [e["manifest_sha256"] for e in run_datasets(record)],
        "initialized_from": {"run_dir": str(source_run.resolve()), "checkpoint": checkpoint.name,
                             "epoch": int(state.get("epoch", 0))},
    }
