"""The physical constants every stage shares, the error classes (:class:`CeriakerasError` and its
kinds) and the range checks of the config classes."""

from __future__ import annotations

import math

CEO2_LATTICE_A = 5.411
"""Cubic lattice constant of fluorite CeO2, Å."""
CE_COLUMN_SPACING_A = CEO2_LATTICE_A / math.sqrt(2.0)
"""Distance between neighbouring Ce atoms inside one [110] column, Å (≈ 3.83)."""
MIN_COLUMN_SEPARATION_A = 3.3
"""Smallest projected distance between two Ce columns along [110], Å."""
FOCAL_SPREAD_MODELS = ("incoherent", "envelope")
"""Focal-spread models of :class:`OpticsConfig` (see ``focal_spread_models``)."""
SCHEMA_VERSION = 1
"""Version of the TFRecord schema written by :mod:`ceriakeras.data.records`."""
CALIBRATION_MAPS = ("platt", "logistic", "isotonic")
"""Confidence maps :mod:`ceriakeras.evaluation.calibration` can fit (``export --calibration-map``, ``calibrate --map``)."""


class CeriakerasError(Exception):
    """An error the user can fix; its message says what was wrong and what to do.

    The CLI prints it as one line and exits with status 2.
    """


class ConfigError(CeriakerasError, ValueError):
    """A setting is unknown or outside what the physics or the code allows."""


class DataError(CeriakerasError):
    """A dataset (TFRecord shards, manifest) is missing, corrupt or inconsistent."""


class InputError(CeriakerasError):
    """An input image or series cannot be analysed (unreadable, wrong shape, bad values)."""


class ModelError(CeriakerasError):
    """A model or training run is missing, incomplete or incompatible."""


def check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    a, b = value
    if not (lo <= a <= b <= hi):
        raise ConfigError(
            f"{name}={list(value)} must be an increasing pair inside [{lo}, {hi}]"
        )


def check_unit(name: str, values, unit: str, smallest: float, example: str) -> None:
    """Refuse values whose largest magnitude is non-zero but below ``smallest`` ``unit``: a
    length given in metres (or another unit) by mistake, e.g. a defocus of 1e-8."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    largest = max((abs(v) for v in values), default=0.0)
    if 0.0 < largest < smallest:
        raise ConfigError(
            f"{name}={values} is implausibly small: the unit is {unit}, not metres "
            f"(write e.g. {example})"
        )
