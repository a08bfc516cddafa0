"""Frame → columns, written once: resample to the model's pixel size, run the model, find the
columns, map them back to the input grid.

``analyze`` runs the three steps in different threads (:func:`run_model` on a batch, then
:func:`frame_columns` per frame); ``evaluate --images``, the calibration and the studies run one
frame at a time with :func:`predict_columns`. All give the same columns for the same frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import AnalyzeConfig
from ..noise import estimate_dose
from .columns import find_columns
from .served import model_settings, with_model_threshold
from .resample import model_to_input_px, resample_counts


@dataclass(frozen=True)
class ColumnSettings:
    """How columns are found in a model's answer.

    Attributes
    ----------
    model_pixel_A : float
        Pixel size the model works at, Å.
    label_radius_A : float
        Radius of the model's label disk, Å.
    min_distance_A : float
        Smallest distance between two columns, Å.
    threshold : float
        Smallest column probability at a column centre, in (0, 1).
    calibration : dict or None
        The model's ``confidence_calibration`` (None: raw confidences).
    """

    model_pixel_A: float
    label_radius_A: float
    min_distance_A: float
    threshold: float
    calibration: dict | None = None

    @classmethod
    def for_model(cls, info: dict, config: AnalyzeConfig | None = None, *,
                  calibrated: bool = True) -> ColumnSettings:
        """The settings for a model's ``info`` and an analysis ``config`` (the model's own
        column threshold unless ``config`` sets one; its calibration if ``calibrated``)."""
        config = with_model_threshold(config or AnalyzeConfig(), info)
        model_px, _, label_radius_A = model_settings(info)
        return cls(model_px, label_radius_A, config.min_distance_A, config.threshold,
                   info.get("confidence_calibration") if calibrated else None)


def run_model(model, images, *, optics: bool = False) -> tuple[np.ndarray, dict | None]:
    """The model's class probabilities for frames at its pixel size.

    Parameters
    ----------
    model : object with ``.predict``
        The served model (:mod:`ceriakeras.inference.served`) or a stand-in.
    images : sequence of (h, w) float
        Frames resampled to the model's pixel size, counts (one shape).
    optics : bool
        Also ask a model that estimates each frame's optics (``has_optics``) for them.

    Returns
    -------
    probabilities : (B, h, w, C) float32
    optics : dict of (B,) arrays or None
        ``{name: values}`` (defocus_nm, cs_um) when asked and the model has them, else None.
    """
    stack = np.stack(images).astype(np.float32, copy=False)
    if optics and getattr(model, "has_optics", False):
        probabilities, _, estimates = model.predict(stack, optics=True)
        return np.asarray(probabilities), estimates
    probabilities, _ = model.predict(stack)
    return np.asarray(probabilities), None


def frame_columns(probabilities: np.ndarray, factor: float, settings: ColumnSettings, *,
                  dose_e_per_A2: float | None = None) -> dict[str, np.ndarray]:
    """The columns of one frame, on the input pixel grid.

    Parameters
    ----------
    probabilities : (h, w, C) float
        The model's answer for the frame (:func:`run_model`).
    factor : float
        Model pixel / input pixel (:func:`ceriakeras.inference.resample.resample_factor`).
    settings : ColumnSettings
    dose_e_per_A2 : float, optional
        The frame's dose, e⁻/Å² (needed with a calibration).

    Returns
    -------
    dict of (N,) arrays
        :func:`ceriakeras.inference.columns.find_columns`' table with ``x_px``, ``y_px`` on the
        input grid, and ``model_x_px``, ``model_y_px`` on the model's grid.
    """
    table = find_columns(probabilities, settings.model_pixel_A,
                         min_distance_A=settings.min_distance_A, threshold=settings.threshold,
                         label_radius_A=settings.label_radius_A,
                         calibration=settings.calibration, dose_e_per_A2=dose_e_per_A2)
    return {**table, "model_x_px": table["x_px"], "model_y_px": table["y_px"],
            "x_px": model_to_input_px(table["x_px"], factor),
            "y_px": model_to_input_px(table["y_px"], factor)}


def predict_columns(model, image: np.ndarray, factor: float, settings: ColumnSettings, *,
                    counts_per_electron: float = 1.0) -> tuple[dict[str, np.ndarray], float]:
    """The columns of one frame: resample, run the model, find the columns, map them back.

    Parameters
    ----------
    model : object with ``.predict``
    image : (H, W) float
        The frame on the input grid, counts.
    factor : float
        Model pixel / input pixel.
    settings : ColumnSettings
    counts_per_electron : float
        Detector gain, counts per electron (the dose is in electrons).

    Returns
    -------
    columns : dict of (N,) arrays
        See :func:`frame_columns`.
    dose_e_per_A2 : float
        The frame's dose estimated from its counts, e⁻/Å².
    """
    small = resample_counts(image, factor)
    probabilities, _ = run_model(model, [small])
    dose = estimate_dose(small, settings.model_pixel_A, counts_per_electron)
    return frame_columns(probabilities[0], factor, settings, dose_e_per_A2=dose), dose
