"""A served model folder and a Keras checkpoint checked without TensorFlow, before it loads.

:func:`check_model_files` refuses, in one line, a model version folder that TensorFlow would
load with a traceback, or load and then use wrongly:

- ``saved_model.pb`` that is not a SavedModel protobuf (cut, bit-flipped), or whose
  ``serving_default`` signature is missing;
- files that differ from the sha256 recorded in ``assets/ceriakeras.json``'s ``files_sha256`` at
  export (:func:`files_sha256`; ``saved_model.pb`` and every ``variables/`` file): truncated or
  changed variables, a swapped graph. Models exported before this record (versions 1–5) have
  none; for them only the variables' presence is checked;
- a ``max_height`` in the assets that differs from the depth of the signature's
  ``probabilities`` output (``max_height + 1`` classes), read from the protobuf;
- calibration tables (``confidence_calibration``, ``confidence_calibration_tta``) that are not
  finite, not of one length, or whose doses are not positive and increasing.

:func:`check_keras_archive` refuses a ``.keras`` checkpoint that is not a whole zip archive.

``saved_model.pb`` is read with a small protobuf wire-format walker (only the fields named in
:data:`SIGNATURE_PATH`), so neither TensorFlow nor its generated protobuf classes are needed.
"""

from __future__ import annotations

import itertools
import json
import math
import zipfile
from pathlib import Path

from .config import CALIBRATION_MAPS, ModelError
from .io.files import file_sha256

HASHED_NAMES = ("saved_model.pb", "variables")
"""What :func:`files_sha256` hashes in a version folder: the graph and every variables file."""
SIGNATURE_PATH = "SavedModel.meta_graphs(2) → MetaGraphDef.signature_def(5) → SignatureDef.outputs(2) → TensorInfo.tensor_shape(3) → dim(2).size(1)"
"""The protobuf fields read from ``saved_model.pb`` (field numbers of tensorflow/core/protobuf)."""


def files_sha256(version_dir) -> dict[str, str]:
    """``{relative path: sha256}`` of ``saved_model.pb`` and every file under ``variables/`` of a
    SavedModel version folder (recorded at export as ``files_sha256``)."""
    version_dir = Path(version_dir)
    paths = [version_dir / "saved_model.pb"]
    paths += sorted(p for p in (version_dir / "variables").rglob("*") if p.is_file())
    return {p.relative_to(version_dir).as_posix(): file_sha256(p) for p in paths}


def check_model_files(version_dir, info: dict) -> None:
    """Refuse a damaged or inconsistent model version folder (see the module doc).

    Parameters
    ----------
    version_dir : path
        A SavedModel version folder (``saved_models/NAME/N``).
    info : dict
        Its ``assets/ceriakeras.json``.

    Raises
    ------
    ModelError
        What is wrong, and to re-export or restore the model.
    """
    version_dir = Path(version_dir)
    fix = "restore the model from a copy or export it again"
    recorded = info.get("files_sha256")
    if recorded is not None:
        if not isinstance(recorded, dict) or not recorded:
            raise ModelError(f"{version_dir}/assets/ceriakeras.json has an invalid files_sha256; {fix}")
        for name, digest in recorded.items():
            path = version_dir / name
            if not path.is_file():
                raise ModelError(f"{path} is missing; {fix}")
            if file_sha256(path) != digest:
                raise ModelError(f"{path} differs from the sha256 recorded at export (damaged "
                                 f"or changed); {fix}")
    else:
        variables = version_dir / "variables"
        index = variables / "variables.index"
        if not index.is_file() or not any(variables.glob("variables.data-*")):
            raise ModelError(f"{version_dir} has no variables/variables.index and data; {fix}")
    depth = probabilities_depth(version_dir / "saved_model.pb")
    max_height = info.get("max_height", 16)
    if depth is not None and max_height != depth - 1:
        raise ModelError(f"{version_dir}/assets/ceriakeras.json says max_height={max_height} but "
                         f"the model outputs {depth} classes (max_height {depth - 1}); {fix}")
    for key in ("confidence_calibration", "confidence_calibration_tta"):
        if info.get(key):
            check_calibration_table(info[key], f"{version_dir}/assets/ceriakeras.json {key}")


def check_calibration_table(table, where: str) -> None:
    """Refuse a confidence calibration table that would give NaN or wrong confidences.

    Raises
    ------
    ModelError
        Not a table, an unknown map, doses not positive and increasing, Platt parameters not
        finite or not one per dose.
    """
    fix = "recalibrate the model (ceriakeras calibrate) or restore it from a copy"
    try:
        kind = table.get("map", "platt")
        doses = [float(d) for d in table["dose_e_per_A2"]]
        pairs = [(float(a), float(b)) for a, b in zip(table["slope"], table["intercept"])]
        lengths = {len(doses), len(table["slope"]), len(table["intercept"])}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ModelError(f"{where} is not a calibration table; {fix}") from None
    if kind not in CALIBRATION_MAPS:
        raise ModelError(f"{where} has an unknown map {kind!r}; {fix}")
    if not doses or len(lengths) != 1:
        raise ModelError(f"{where} needs one slope and intercept per dose; {fix}")
    if not all(0 < d < math.inf for d in doses) or any(b <= a for a, b in itertools.pairwise(doses)):
        raise ModelError(f"{where} has doses that are not positive and increasing; {fix}")
    if not all(math.isfinite(a) and math.isfinite(b) for a, b in pairs):
        raise ModelError(f"{where} has a slope or intercept that is not finite; {fix}")
    for name in ("coefficients", "knots_confidence", "knots_probability"):
        values = table.get(name)
        if values is not None and (len(values) != len(doses) or not _all_finite(values)):
            raise ModelError(f"{where} has {name} that are not finite or not one per dose; {fix}")


def _all_finite(values) -> bool:
    try:
        return all(math.isfinite(float(v)) for row in values for v in row)
    except (TypeError, ValueError):
        return False


def probabilities_depth(saved_model_pb) -> int | None:
    """The last dimension of the ``serving_default`` signature's ``probabilities`` output (the
    number of height classes, ``max_height + 1``), or None if the graph does not say.

    Raises
    ------
    ModelError
        The file is not a SavedModel protobuf, or has no ``serving_default`` signature.
    """
    path = Path(saved_model_pb)
    bad = ModelError(f"{path} is damaged (not a SavedModel protobuf); restore the model from a "
                     "copy or export it again")
    try:
        data = memoryview(path.read_bytes())
        signatures = {}
        for num, meta in _fields(data):
            if num != 2 or not isinstance(meta, memoryview):
                continue
            for num2, entry in _fields(meta):
                if num2 == 5 and isinstance(entry, memoryview):
                    key, value = _map_entry(entry)
                    signatures[key] = value
    except (ValueError, IndexError, UnicodeDecodeError):
        raise bad from None
    except OSError as err:
        raise ModelError(f"cannot read {path} ({err.strerror}); restore the model") from None
    if "serving_default" not in signatures:
        raise ModelError(f"{path} has no serving_default signature (damaged, or not exported "
                         "by ceriakeras); restore the model from a copy or export it again")
    try:
        outputs = dict(_map_entry(v) for n, v in _fields(signatures["serving_default"]) if n == 2)
        info = outputs.get("probabilities")
        if info is None:
            return None
        shape = [v for n, v in _fields(info) if n == 3]
        dims = [dict(_fields(d)).get(1, -1) for n, d in _fields(shape[0]) if n == 2] if shape else []
    except (ValueError, IndexError, UnicodeDecodeError, TypeError):
        raise bad from None
    if not dims:
        return None
    size = dims[-1]
    size = size - (1 << 64) if size >= 1 << 63 else size
    return int(size) if size > 0 else None


def _map_entry(entry: memoryview) -> tuple[str, memoryview]:
    fields = dict(_fields(entry))
    return bytes(fields.get(1, b"")).decode("utf-8"), fields.get(2, memoryview(b""))


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _fields(data: memoryview):
    """(field number, value) of one protobuf message: varints as int, length-delimited fields as
    memoryview; fixed-width fields are skipped. Raises ValueError on a malformed message."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
            yield num, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError("field runs past the end")
            yield num, data[pos:pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ValueError("field runs past the end")
        else:
            raise ValueError(f"wire type {wire}")


def check_keras_archive(path, *, what: str = "checkpoint") -> None:
    """Refuse a ``.keras`` file that is not a whole zip archive with ``config.json`` (a cut or
    damaged checkpoint), before Keras opens it.

    Raises
    ------
    ModelError
        The file is missing, cut, or damaged; the message says to pick another checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                raise ModelError(f"{what} {path} is not a Keras checkpoint (no config.json in it); "
                                 "name a checkpoint written by `ceriakeras train`")
            json.loads(archive.read("config.json"))
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError):
        bad = ""
    if bad is not None:
        part = f" ({bad} unreadable)" if bad else ""
        raise ModelError(f"{what} {path} is cut or damaged{part}; use another checkpoint "
                         "(checkpoints/epoch-*.keras, last.keras) or train again")
