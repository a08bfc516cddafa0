"""Config files: a config as plain JSON-able data (:func:`to_dict`), back (:func:`from_dict`), and
JSON or TOML files read into a stage's class (:func:`load_config`)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from .analysis import AnalyzeConfig
from .base import ConfigError
from .learning import ModelConfig, PipelineConfig, TrainConfig
from .simulation import OpticsConfig, SimulationConfig, StructureConfig

C = TypeVar("C")


def to_dict(config: Any) -> dict:
    """The config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[C], data: dict, *, where: str = "", base: C | None = None) -> C:
    """Build ``cls`` from nested plain data, refusing keys that do not exist.

    Fields missing from ``data`` take their values from ``base`` if given (e.g.
    ``SimulationConfig.legacy()`` for a manifest written before a field existed), else the
    class defaults. A nested table given in ``data`` is built from its own class's defaults.

    Raises
    ------
    ConfigError
        If ``data`` is not a table, a key is unknown (the message names it and lists the valid
        ones) or a value has the wrong type or is not finite (:mod:`ceriakeras.validate`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"the {cls.__name__} settings{' of ' + where.rstrip('.') if where else ''} "
                          f"must be a table of keys and values (a JSON object), not "
                          f"{type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key {where + key!r}; valid keys: {', '.join(sorted(names))}"
            )
        ftype = names[key].type
        sub = _dataclass_by_name(ftype)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where=f"{where}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    config = cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    _check_types(config, where)
    return config


def _check_types(config: Any, where: str = "") -> None:
    """:func:`ceriakeras.validate.check_types`, its error as this module's :class:`ConfigError`."""
    from .. import validate

    try:
        validate.check_types(config, where)
    except validate.ConfigError as err:
        raise ConfigError(str(err)) from None


def _dataclass_by_name(ftype: Any) -> type | None:
    name = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", "")
    return _CONFIG_CLASSES.get(name)


_CONFIG_CLASSES = {cls.__name__: cls for cls in (
    StructureConfig, OpticsConfig, SimulationConfig, PipelineConfig, ModelConfig, TrainConfig,
    AnalyzeConfig)}


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Read a JSON or TOML config file (or none) into ``cls``, apply overrides and validate.

    Parameters
    ----------
    cls : dataclass type
        The stage's config class, e.g. :class:`SimulationConfig`.
    path : str or Path, optional
        ``.json`` or ``.toml`` file holding a subset of the fields (nested tables for nested
        configs). Missing fields keep their defaults; a :class:`SimulationConfig` file with
        ``preset = "legacy"`` starts from :meth:`SimulationConfig.legacy` instead.
    **overrides
        Top-level fields to replace (e.g. from CLI options); ``None`` values are ignored.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            data = tomllib.loads(text.decode()) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid {path.suffix[1:] or 'JSON'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings (a JSON object or "
                          f"TOML keys), not a {type(data).__name__}")
    preset = data.pop("preset", None)
    if preset is not None and (preset != "legacy" or not hasattr(cls, "legacy")):
        raise ConfigError(f"preset={preset!r} is unknown: the only preset is \"legacy\" "
                          f"(SimulationConfig's old, unconverged settings); remove the line")
    config = from_dict(cls, data, base=cls.legacy() if preset else None)
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    _check_types(config)
    config.validate()
    return config
