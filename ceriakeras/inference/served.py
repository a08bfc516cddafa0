"""The served model: which version folder, what it is (``assets/ceriakeras.json``), loading it.

A SavedModel version folder ``saved_models/NAME/VERSION/`` holds the graph and, in
``assets/ceriakeras.json``, what every consumer needs to know before running it: the pixel size
it works at (Å), its largest height class (Ce atoms), the label radius (Å), the confidence
calibration. :func:`find_version` resolves a model's version (the one place that does);
:func:`read_info` and :func:`model_settings` read that file without loading the graph, so the
command line can check an input against the model before TensorFlow is imported (TensorFlow is
imported only by :func:`load_served_model`). :class:`ServedModel` runs a loaded version,
:class:`DihedralAveraged` averages a model over the 8 flips and rotations, :func:`load_model`
gives the model ``analyze`` uses (the shipped one by default) and its identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DEFAULT_COLUMN_THRESHOLD, AnalyzeConfig, ModelError
from ..io.files import read_json

ASSET_NAME = "ceriakeras.json"
"""File name of the model's description in its ``assets/`` folder."""
DEFAULT_MODEL = "saved_models/ceria110"
"""The shipped model, relative to the repository (or the current folder); newest version used."""


OPTICS_DESCRIPTIONS = {
    "defocus_nm": "float32 [batch], estimated defocus of each frame, nm (abTEM sign, = -C10)",
    "cs_um": "float32 [batch], estimated spherical aberration C30 of each frame, µm",
    "max_column_height_atoms": "float32 [batch], estimated largest Ce column height in the "
                               "frame, Ce atoms (a thickness scale)",
}
"""The optional per-frame outputs of a model with a global branch, as the signature lists them."""


def find_version(path) -> Path:
    """The SavedModel folder for ``path``: a version folder, or the newest integer version in a
    model base folder ``saved_models/NAME``.

    Raises
    ------
    ModelError
        If there is no SavedModel there.
    """
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    versions = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()
                       and (p / "saved_model.pb").is_file()) if path.is_dir() else [])
    if not versions:
        raise ModelError(f"no SavedModel at {path}; export one with "
                         f"`ceriakeras export --run runs/NAME --out {path}`")
    return path / str(versions[-1])


def new_version_folder(out_dir, version: int | None = None) -> Path:
    """The folder ``out_dir/<version>`` a new model version is written to, checked without
    loading TensorFlow: ``version`` defaults to the next free integer; versions are never
    overwritten.

    Raises
    ------
    ModelError
        A version below 1, or one that exists already.
    """
    out_dir = Path(out_dir)
    if version is None:
        taken = [int(p.name) for p in out_dir.iterdir() if p.name.isdigit()] if out_dir.is_dir() else []
        version = max(taken, default=0) + 1
    if int(version) < 1:
        raise ModelError(f"--version {version} must be a positive integer")
    target = out_dir / str(int(version))
    if target.exists():
        raise ModelError(f"{target} already exists; versions are never overwritten, choose "
                         "another --version or leave it out for the next free one")
    return target


def read_info(version_dir) -> dict:
    """The ``assets/ceriakeras.json`` of a SavedModel version folder (pixel size, max_height, …).

    Raises
    ------
    ModelError
        If it is missing or unreadable.
    """
    info_path = Path(version_dir) / "assets" / ASSET_NAME
    if not info_path.is_file():
        raise ModelError(f"{version_dir} has no assets/{ASSET_NAME}; re-export it with "
                         "`ceriakeras export`")
    return read_json(info_path, error=ModelError, advice="re-export the model")


def model_version(model) -> tuple[Path, dict]:
    """The version folder and ``assets/ceriakeras.json`` of ``model`` (a path, or None for the
    shipped model), read as JSON without loading the graph.

    Raises
    ------
    ModelError
        The folder does not exist, holds no SavedModel, or its description is missing or invalid.
    """
    if model is None:
        path = default_model_path()
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"model {path} does not exist: pass --model saved_models/NAME")
    version = find_version(path)
    info = read_info(version)
    model_settings(info)
    return version, info


def model_settings(info: dict) -> tuple[float, int, float]:
    """``(pixel_size_A, max_height, label_radius_A)`` from a model's ``ceriakeras.json``.

    Returns
    -------
    pixel_size_A : float
        Pixel size the model works at, Å.
    max_height : int
        Largest height class, Ce atoms (default 16 for models that do not say).
    label_radius_A : float
        Radius of the label disk, Å (default 0.5).

    Raises
    ------
    ModelError
        If a value is missing or invalid (the model must be re-exported).
    """
    try:
        pixel = float(info["pixel_size_A"])
        max_height = int(info.get("max_height", 16))
        radius = float(info.get("label_radius_A", 0.5))
    except (KeyError, TypeError, ValueError):
        raise ModelError("the model's ceriakeras.json lacks pixel_size_A (Å); re-export it") from None
    if not (pixel > 0 and max_height >= 1 and radius > 0):
        raise ModelError(f"the model's ceriakeras.json has an invalid pixel_size_A={pixel} Å, "
                         f"max_height={max_height} or label_radius_A={radius} Å; re-export it")
    return pixel, max_height, radius


def with_model_threshold(config: AnalyzeConfig, info: dict) -> AnalyzeConfig:
    """``config`` with its column threshold made concrete.

    A threshold set in ``config`` wins; otherwise the model's own ``column_threshold`` (recorded
    by ``ceriakeras export --column-threshold``, chosen on our own validation data with
    ``scripts/studies/threshold_study.py``), else :data:`ceriakeras.config.DEFAULT_COLUMN_THRESHOLD`.

    Raises
    ------
    ModelError
        If the model's ``column_threshold`` is not a number in (0, 1).
    """
    if config.threshold is not None:
        return config
    value = info.get("column_threshold", DEFAULT_COLUMN_THRESHOLD)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise ModelError(f"the model's ceriakeras.json has column_threshold="
                         f"{info.get('column_threshold')!r}, not in (0, 1); re-export it")
    return dataclasses.replace(config, threshold=value)


@dataclass
class ServedModel:
    """A loaded SavedModel version: ``info`` (its ``assets/ceriakeras.json``) and ``predict``."""

    path: Path
    info: dict
    signature: object

    @property
    def optics_names(self) -> tuple[str, ...]:
        """Names of the per-frame optics outputs (``defocus_nm``, ``cs_um``, …); () for models
        without them (versions 1–2)."""
        outputs = self.info.get("signature", {}).get("outputs", {})
        return tuple(name for name in OPTICS_DESCRIPTIONS if name in outputs)

    @property
    def has_optics(self) -> bool:
        """Whether the model estimates the optics of each frame."""
        return bool(self.optics_names)

    def predict(self, images, *, optics: bool = False):
        """Height probabilities for raw frames (and, when asked, the per-frame optics).

        Parameters
        ----------
        images : (B, H, W) or (B, H, W, 1) or (H, W) array
            Raw counts or any linear intensity, at the model's ``info['pixel_size_A']``.
        optics : bool
            Also return the optics estimates as a third value.

        Returns
        -------
        probabilities : (B, H, W, max_height + 1) float32
        height : (B, H, W) int32
        optics : dict of (B,) float32, only with ``optics=True``
            ``{name: value per frame}`` for :attr:`optics_names` (empty for a model without).
        """
        import tensorflow as tf

        x = np.asarray(images, np.float32)
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 3:
            x = x[..., None]
        out = self.signature(image=tf.constant(x))
        if not optics:
            return out["probabilities"].numpy(), out["height"].numpy()
        estimates = {name: np.asarray(out[name], np.float32) for name in OPTICS_DESCRIPTIONS
                     if name in out}
        return out["probabilities"].numpy(), out["height"].numpy(), estimates

    def predict_optics(self, images) -> dict:
        """The per-frame optics estimates alone: ``{name: (B,) float32}`` (empty without)."""
        return self.predict(images, optics=True)[2]


DIHEDRAL = tuple((transpose, flip) for transpose in (False, True)
                 for flip in ((), (1,), (2,), (1, 2)))
"""The 8 symmetries of the square (the dihedral group D4) as (transpose, flipped axes) of a
(B, H, W) batch: the identity, 3 flips, the transpose and its 3 flips (= the 90° and 270°
rotations and the anti-transpose)."""


def dihedral_average(predict, images) -> tuple[np.ndarray, np.ndarray]:
    """Test-time augmentation: the mean of the probabilities of the 8 flipped and rotated copies.

    Each copy is transformed, predicted and transformed back before averaging, so the result is
    on the input's pixel grid. Ceria along [110] has mirror symmetry but the network, trained on
    flipped and rotated crops, is only approximately equivariant; the average removes the part
    of its error that is not.

    Parameters
    ----------
    predict : callable
        ``predict(images (B, H, W) float32) -> (probabilities (B, H, W, C), height)``, such as
        :meth:`ServedModel.predict`.
    images : (B, H, W) or (H, W) array
        Frames at the model's pixel size. H ≠ W is fine (transposed copies are predicted apart).

    Returns
    -------
    probabilities : (B, H, W, C) float32
        Mean over the 8 copies.
    height : (B, H, W) int32
        Their most probable class.
    """
    x = np.asarray(images, np.float32)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"images must be (B, H, W) or (H, W), got shape {np.shape(images)}")
    total = None
    for transpose, flip in DIHEDRAL:
        copy = x.transpose(0, 2, 1) if transpose else x
        copy = np.flip(copy, flip) if flip else copy
        probabilities, _ = predict(np.ascontiguousarray(copy))
        back = np.asarray(probabilities, np.float32)
        back = np.flip(back, flip) if flip else back  # axes 1, 2 of (B, H, W, C)
        back = back.transpose(0, 2, 1, 3) if transpose else back
        total = back.copy() if total is None else total + back
    total /= len(DIHEDRAL)
    return total, total.argmax(axis=-1).astype(np.int32)


@dataclass
class DihedralAveraged:
    """A model (``.info``, ``.predict``) whose ``predict`` is :func:`dihedral_average` of the
    wrapped one's; ``info`` gains ``test_time_augmentation``."""

    model: object

    @property
    def info(self) -> dict:
        """The wrapped model's info; its ``confidence_calibration`` is the one fitted with
        test-time augmentation (none if there is none: averaging changes the confidences)."""
        info = {**self.model.info, "test_time_augmentation": "dihedral (8 flips and rotations)"}
        info["confidence_calibration"] = info.pop("confidence_calibration_tta", None)
        return info

    @property
    def optics_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.model, "optics_names", ()))

    @property
    def has_optics(self) -> bool:
        return bool(self.optics_names)

    def predict(self, images, *, optics: bool = False):
        """:func:`dihedral_average` of the wrapped model's probabilities; with ``optics=True``
        a third value, the per-frame optics averaged over the 8 copies (scalars per frame do
        not change under flips and rotations, so their mean is the plain average)."""
        if not optics:
            return dihedral_average(self.model.predict, images)
        estimates = []

        def one(x):
            probabilities, height, values = self.model.predict(x, optics=True)
            estimates.append(values)
            return probabilities, height

        probabilities, height = dihedral_average(one, images)
        mean = {name: np.mean([e[name] for e in estimates], axis=0).astype(np.float32)
                for name in (estimates[0] if estimates else {})}
        return probabilities, height, mean

    def predict_optics(self, images) -> dict:
        return self.predict(images, optics=True)[2]


def load_served_model(path) -> ServedModel:
    """Load ``saved_models/NAME`` (newest version) or a version folder for inference.

    Raises
    ------
    ModelError
        If there is no SavedModel there or its ``assets/ceriakeras.json`` is missing.
    """
    import tensorflow as tf

    version = find_version(path)
    info = read_info(version)
    loaded = tf.saved_model.load(str(version))
    if "serving_default" not in loaded.signatures:
        raise ModelError(f"{version} has no serving_default signature; re-export it")
    served = ServedModel(path=version, info=info, signature=loaded.signatures["serving_default"])
    served._loaded = loaded  # keep the variables alive
    return served


def default_model_path() -> Path:
    """The shipped model's base folder (its newest version is the one loaded).

    Raises
    ------
    ModelError
        If ``saved_models/ceria110`` is neither in the repository nor the current folder.
    """
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = base / DEFAULT_MODEL
        if candidate.is_dir():
            return candidate
    raise ModelError(f"no --model given and the shipped model {DEFAULT_MODEL} is missing: pass "
                     "--model saved_models/NAME or run `make demo`'s setup")


def load_model(model) -> tuple[object, dict]:
    """The model to use and a JSON-able identity of it (for resuming).

    ``model`` may be None (the shipped model), a path (``saved_models/NAME`` or a version
    folder, loaded with :func:`load_served_model`), or any object with
    ``.info`` (dict with ``pixel_size_A``, ``max_height``, ``label_radius_A``) and
    ``.predict(images (B, H, W) float32) -> (probabilities (B, H, W, C), height (B, H, W))``;
    an object's ``identity`` dict, if it has one, is its identity.
    """
    if model is None or isinstance(model, (str, os.PathLike)):
        path = default_model_path() if model is None else Path(model)
        if not path.exists():
            raise ModelError(f"model {path} does not exist: pass --model saved_models/NAME")
        path = find_version(path)
        served = load_served_model(path)
        identity = {"path": str(path.resolve()), "info_sha256": info_sha256(served.info)}
        return served, identity
    if not (hasattr(model, "info") and callable(getattr(model, "predict", None))):
        raise ModelError("model must be a path or an object with .info and .predict")
    identity = getattr(model, "identity", None)  # a model that runs a folder elsewhere
    if isinstance(identity, dict):
        return model, identity
    return model, {"path": None, "object": type(model).__name__, "info_sha256": info_sha256(model.info)}


def info_sha256(data) -> str:
    """SHA-256 of a JSON-able value (keys sorted): the identity of a model's info."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
