"""Config values checked by type at the door: every field of a config dataclass has the type its
annotation names, and every number is finite.

:func:`check_types` runs in :func:`ceriakeras.config.load_config` and
:func:`ceriakeras.config.from_dict` before the stage's own ``validate()`` (which checks ranges),
so a config file with ``threshold = "high"``, ``structure = 5``, ``epochs = "ten"``,
``energy_keV = "300"`` or ``min_distance_A = nan`` is refused in one line that names the key,
instead of a ``TypeError`` traceback deep inside a stage, or a NaN that slips past every range
check (``nan <= 0`` is false).

Rules, from the field's annotation: ``float`` takes a finite int or float (not a bool, not a
string); ``int`` a whole number (not a bool; ``10.0`` is refused, write ``10``); ``bool`` only
true/false; ``str`` a string; ``tuple[float, ...]`` / ``tuple[float, float]`` a list of that
length; ``X | None`` also None; a nested config a table (JSON object / TOML table).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config value of the wrong type or not finite; :mod:`ceriakeras.config` re-raises it as
    its own :class:`ceriakeras.config.ConfigError` (this module imports nothing of the package,
    so that ``config`` may use it)."""


def check_types(config: Any, where: str = "") -> None:
    """Refuse a config dataclass instance whose fields do not have their annotated types.

    Parameters
    ----------
    config : dataclass instance
        E.g. a :class:`~ceriakeras.config.SimulationConfig`; nested configs are checked too.
    where : str
        Prefix of the key names in messages (``"structure."`` for a nested table).

    Raises
    ------
    ConfigError
        (this module's, a ValueError) A value of the wrong type, a NaN or infinite number; the
        message names the key.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        check_value(where + f.name, getattr(config, f.name), hints[f.name])


def check_value(name: str, value: Any, annotation: Any) -> None:
    """Refuse ``value`` unless it fits ``annotation`` (see the module doc); ``name`` is the key."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, annotation):
            raise ConfigError(f"config key {name!r} must be a table of {annotation.__name__} "
                              f"settings, not {_shown(value)}")
        check_types(value, name + ".")
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        kinds = [a for a in args if a is not type(None)]
        errors = []
        for kind in kinds:
            try:
                check_value(name, value, kind)
                return
            except ConfigError as err:
                errors.append(err)
        if len(kinds) == 1 and value is not None:
            raise errors[0]
        raise ConfigError(f"config key {name!r} must be {' or '.join(_word(a) for a in args)}, "
                          f"not {_shown(value)}")
    if origin is tuple:
        _check_sequence(name, value, args)
        return
    _check_scalar(name, value, annotation)


def _check_sequence(name: str, value: Any, args: tuple) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key {name!r} must be a list, not {_shown(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        kinds = [args[0]] * len(value)
    else:
        if len(value) != len(args):
            raise ConfigError(f"config key {name!r} must be a list of {len(args)} values, "
                              f"not {len(value)}")
        kinds = list(args)
    for i, (item, kind) in enumerate(zip(value, kinds)):
        check_value(f"{name}[{i}]", item, kind)


def _check_scalar(name: str, value: Any, kind: Any) -> None:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ConfigError(f"config key {name!r} is {value}: give a finite number")
    elif kind is str:
        ok = isinstance(value, str)
    else:  # a type these configs do not use: nothing to check here
        return
    if not ok:
        raise ConfigError(f"config key {name!r} must be {_word(kind)}, not {_shown(value)}")


def _word(kind: Any) -> str:
    return {float: "a number", int: "a whole number", bool: "true or false", str: "a string",
            type(None): "absent (null)"}.get(kind, getattr(kind, "__name__", str(kind)))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
