"""Settings for every stage, as dataclasses with units, and the physical constants they share.

One dataclass per stage; each run saves the one it used beside its results (``to_dict``) and
can be rebuilt from that file (``load_config``). Units are in the field names: ``_A`` ångström,
``_nm`` nanometre, ``_um`` micrometre, ``_mm`` millimetre, ``_keV`` kilo-electronvolt,
``_mrad`` milliradian, ``_deg`` degree, ``_e_per_A2`` electrons per Å², ``_px`` pixels.

Sign convention for defocus: abTEM's ``defocus`` (positive = underfocus, weakened lens), which
is the negative of the aberration coefficient C10. All defocus values here use abTEM's sign.

The settings live by stage: ``config.base`` (constants, errors), ``config.simulation``,
``config.learning`` (pipeline, model, training), ``config.analysis`` and ``config.files``
(to_dict, from_dict, load_config); every public name is importable from ``ceriakeras.config``.
"""

from .analysis import DEFAULT_COLUMN_THRESHOLD, MAX_ANALYZE_BATCH, AnalyzeConfig
from .base import (
    CALIBRATION_MAPS,
    CE_COLUMN_SPACING_A,
    CEO2_LATTICE_A,
    FOCAL_SPREAD_MODELS,
    MIN_COLUMN_SEPARATION_A,
    SCHEMA_VERSION,
    CeriakerasError,
    ConfigError,
    DataError,
    InputError,
    ModelError,
    check_range,
    check_unit,
)
from .files import C, from_dict, load_config, to_dict
from .learning import MODEL_ARCHITECTURES, ModelConfig, PipelineConfig, TrainConfig
from .simulation import OpticsConfig, SimulationConfig, StructureConfig

__all__ = [
    "CALIBRATION_MAPS",
    "CEO2_LATTICE_A",
    "CE_COLUMN_SPACING_A",
    "DEFAULT_COLUMN_THRESHOLD",
    "FOCAL_SPREAD_MODELS",
    "MAX_ANALYZE_BATCH",
    "MIN_COLUMN_SEPARATION_A",
    "MODEL_ARCHITECTURES",
    "SCHEMA_VERSION",
    "AnalyzeConfig",
    "C",
    "CeriakerasError",
    "ConfigError",
    "DataError",
    "InputError",
    "ModelConfig",
    "ModelError",
    "OpticsConfig",
    "PipelineConfig",
    "SimulationConfig",
    "StructureConfig",
    "TrainConfig",
    "check_range",
    "check_unit",
    "from_dict",
    "load_config",
    "to_dict",
]
