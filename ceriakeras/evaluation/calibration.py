"""Calibration of the column ``confidence``: a map per dose, fitted on simulated calibration data.

The raw confidence of a column (:func:`ceriakeras.inference.columns.find_columns`: the reported height's
share of the probability mass in the column's disk) is not the probability that the height is
right. :func:`fit_confidence_calibration` measures, at each of
:data:`CALIBRATION_DOSES_E_PER_A2`, how often columns of a given confidence are right on noisy
copies of one or more simulated datasets (:func:`ceriakeras.evaluation.scoring.noisy_predictions`; their
validation split by default, never a test split one reports) and fits a map from the raw
confidence (and, for some maps, the column's other outputs) to that probability;
``ceriakeras export --calibrate`` and ``ceriakeras calibrate`` (:func:`recalibrate`) store the
table in the model's ``assets/ceriakeras.json``. Applying it to a frame of a given dose is
:func:`ceriakeras.inference.columns.calibrate_confidence` (re-exported here), which ``find_columns`` calls.

Maps (``map`` in the table; :data:`CALIBRATION_MAPS`):

``platt``
    ``σ(a · logit(c) + b)`` per dose (:func:`fit_platt`), the only map of versions 1–2.
``logistic``
    ``σ(w · features + b)`` per dose with the features :data:`LOGISTIC_FEATURES` (the logit of
    the raw confidence, the column's ``height_std`` and its height), fitted by ridge-penalised
    maximum likelihood (:func:`fit_logistic`).
``isotonic``
    A non-decreasing step-free curve per dose: the raw confidence in quantile bins of at least
    :data:`ISOTONIC_MIN_BIN` columns, the bins' accuracies made monotone (pool adjacent
    violators), interpolated linearly between bin centres (:func:`fit_isotonic`); a dose with
    too few columns falls back to Platt.

Calibrating on data from the training generator alone makes ``confidence`` honest on that
generator only: images of other simulators or of a microscope are read less accurately, so the
same raw confidence means less. Pooling datasets made with *other* simulator settings (finer
multislice sampling, the quasi-coherent focal-spread envelope, residual aberrations, other
particle shapes; docs/model.md, "Calibration off the training generator") moves the fit towards
what the model delivers off its generator.

Imports only ``config``, ``io``, the inference modules (``served``, ``predict``, ``columns``),
``scoring`` and ``evaluation.plan``, so ``export`` and ``evaluate`` can both use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import optimize

from ..inference.columns import calibrate_confidence
from ..config import (CALIBRATION_MAPS, AnalyzeConfig, ConfigError, DataError,  # noqa: F401
                     InputError)
from ..io.files import file_sha256
from ..inference.predict import ColumnSettings, frame_columns
from ..inference.resample import resample_counts
from ..inference.served import model_settings
from .plan import dataset_factor, parse_dataset
from .scoring import MATCH_DISTANCE_A, Tally, calibration, check_doses, noisy_predictions

CALIBRATION_DOSES_E_PER_A2 = (20.0, 50.0, 200.0, 1000.0, 5000.0, 20000.0)
"""Doses at which the confidence calibration is fitted (the training envelope's ends), e⁻/Å²."""

DEFAULT_MAP = "platt"
"""The map ``export --calibrate`` and ``calibrate`` fit unless told otherwise."""

CALIBRATION_POOLINGS = ("pooled", "mean", "shared")
"""How :func:`fit_map` fits the Platt pairs on several datasets (see there)."""

DEFAULT_POOLING = "pooled"
"""The pooling ``export --calibrate`` and ``calibrate`` use unless told otherwise."""

LOGISTIC_FEATURES = ("logit_confidence", "height_std", "height")
"""Inputs of the ``logistic`` map: logit of the raw confidence, the column's ``height_std``
(atoms) and its reported height (atoms)."""

ISOTONIC_MIN_BIN = 150
"""Fewest columns in one bin of the ``isotonic`` map (fewer at a dose → Platt there)."""


def _logit(confidence) -> np.ndarray:
    c = np.clip(np.asarray(confidence, np.float64), 1e-4, 1 - 1e-4)
    return np.log(c / (1 - c))


def fit_platt(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``(slope, intercept)`` of ``P(right) = σ(slope · logit(c) + intercept)``.

    Fitted by maximum likelihood, with a weak pull towards the identity ``(1, 0)`` so that a
    handful of columns, or all of them right, still give finite numbers.
    """
    from scipy.special import expit

    y = np.asarray(correct, np.float64)
    z = _logit(confidence)

    def loss(params):
        a, b = params
        q = np.clip(expit(a * z + b), 1e-12, 1 - 1e-12)
        nll = -np.sum(y * np.log(q) + (1 - y) * np.log(1 - q))
        return nll + 1e-2 * ((a - 1) ** 2 + b**2)

    best = optimize.minimize(loss, x0=[1.0, 0.0], method="Nelder-Mead",
                             options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 2000})
    return float(best.x[0]), float(best.x[1])


def logistic_features(confidence, height_std, height) -> np.ndarray:
    """(N, 3) float64: the ``logistic`` map's inputs (:data:`LOGISTIC_FEATURES`)."""
    return np.stack([_logit(confidence), np.asarray(height_std, np.float64).ravel(),
                     np.asarray(height, np.float64).ravel()], axis=1)


def fit_logistic(features: np.ndarray, correct: np.ndarray, *, ridge: float = 1.0) -> list[float]:
    """Logistic regression ``P(right) = σ(features · w + b)``, returned as ``[*w, b]``.

    Maximum likelihood with an L2 penalty ``ridge · |w − w₀|²`` towards ``w₀ = (1, 0, …)`` (the
    raw confidence unchanged), so that few columns or separable data still give finite,
    modest weights. Features are used as given (atoms and logits are of order one).
    """
    from scipy.special import expit

    x = np.asarray(features, np.float64)
    y = np.asarray(correct, np.float64).ravel()
    w0 = np.zeros(x.shape[1] + 1)
    w0[0] = 1.0
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)

    def loss(w):
        z = xb @ w
        nll = np.sum(np.logaddexp(0.0, z) - y * z)
        grad = xb.T @ (expit(z) - y)
        pen = w - w0
        pen[-1] = 0.0
        return nll + ridge * np.sum(pen**2), grad + 2 * ridge * pen

    best = optimize.minimize(loss, x0=w0, jac=True, method="L-BFGS-B")
    return [float(v) for v in best.x]


def _pava(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit of ``values`` with ``weights`` (pool adjacent violators)."""
    blocks: list[list[float]] = []          # [value, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(n, v) for v, _, n in blocks])


def fit_isotonic(confidence: np.ndarray, correct: np.ndarray, *,
                 min_bin: int = ISOTONIC_MIN_BIN) -> tuple[list[float], list[float]]:
    """Binned isotonic regression: knots ``(raw confidence, P(right))`` of a monotone map.

    The columns are sorted by raw confidence and cut into ``len // min_bin`` bins of equal
    count (at least 2); each bin gives (mean raw confidence, fraction right, smoothed by one
    pseudo-count towards the mean accuracy), made non-decreasing by :func:`_pava`. Between knots
    the map is linear, beyond them constant (:func:`ceriakeras.inference.columns.calibrate_confidence`).
    Bins of ``min_bin`` columns keep each knot's standard error below about 0.04.
    """
    c = np.clip(np.asarray(confidence, np.float64).ravel(), 0.0, 1.0)
    y = np.asarray(correct, np.float64).ravel()
    order = np.argsort(c, kind="stable")
    c, y = c[order], y[order]
    n_bins = max(2, len(c) // max(1, int(min_bin)))
    parts = np.array_split(np.arange(len(c)), n_bins)
    mean_y = float(y.mean()) if len(y) else 0.5
    x = np.array([c[p].mean() for p in parts])
    acc = np.array([(y[p].sum() + mean_y) / (len(p) + 1.0) for p in parts])
    weight = np.array([len(p) + 1.0 for p in parts])
    fitted = _pava(acc, weight)
    return [float(v) for v in x], [float(v) for v in np.clip(fitted, 1e-4, 1 - 1e-4)]


def _resampled(predict, factor: float):
    """``predict`` behind ``analyze``'s input path: counts on a finer grid are summed into the
    model's pixels (:func:`ceriakeras.inference.resample.resample_counts`, area-shared for a non-integer
    ``factor``) before the model sees them."""
    if factor == 1:
        return predict

    def run(images):
        return predict(np.stack([resample_counts(im, factor) for im in np.asarray(images)]))

    return run


def collect_columns(predict, datasets: Sequence, info: dict, *,
                    doses: Sequence[float] = CALIBRATION_DOSES_E_PER_A2, max_images: int = 48,
                    seed: int = 1, config: AnalyzeConfig | None = None, progress: bool = True,
                    desc: str = "calibrate") -> tuple[dict, list[dict]]:
    """Every column the model reports on noisy copies of the calibration datasets, per dose.

    Parameters
    ----------
    predict : callable
        ``predict(images (B, H, W) float32 counts) -> (probabilities (B, H, W, C), height)``.
    datasets : sequence
        Dataset folders, each ``PATH``, ``PATH:SPLIT`` or ``(PATH, SPLIT)``
        (:func:`parse_dataset`; default split validation), at the model's pixel size or finer
        (0.05 Å up): then the noise is drawn on the dataset's pixels and summed into the model's
        as ``analyze`` does (:func:`ceriakeras.inference.resample.resample_counts`, area-shared for a
        non-integer ratio), and columns are matched on the dataset's grid.
    info : dict
        ``pixel_size_A``, ``max_height``, ``label_radius_A`` of the model.
    doses, max_images, seed
        Doses (e⁻/Å²), at most how many images of *each* dataset, and the noise seed.

    Returns
    -------
    columns : dict
        Per dose, a dict of (N,) arrays pooled over the datasets: ``confidence`` (raw),
        ``height`` (atoms), ``height_std`` (atoms), ``correct`` (bool; a spurious column counts
        as wrong), ``matched`` (bool), ``dataset`` (index into ``datasets``) and ``image``
        (index of the image within its dataset).
    sources : list of dict
        Per dataset: ``data_dir``, ``split``, ``n_images``, ``n_columns`` (true Ce columns),
        ``manifest_sha256`` (of its ``manifest.json``), and ``simulation`` (the sampling, Å, and
        focal-spread models it was simulated with, where recorded).
    """
    from ..data.records import read_manifest

    doses = check_doses(doses)
    config = config or AnalyzeConfig()
    pixel_size_A = model_settings(info)[0]
    settings = ColumnSettings.for_model(info, config, calibrated=False)
    keys = ("confidence", "height", "height_std", "correct", "matched", "dataset", "image")
    parts = {d: {k: [] for k in keys} for d in doses}
    sources = []
    for index, spec in enumerate(datasets):
        data_dir, split = parse_dataset(spec)
        manifest = read_manifest(data_dir)
        data_px = float(manifest.get("pixel_size_A", pixel_size_A))
        factor = dataset_factor(data_dir, data_px, pixel_size_A)
        n_images = n_columns = 0
        for _, true_columns, _, probabilities in noisy_predictions(
                _resampled(predict, factor), data_dir, split, doses, data_px, seed=seed,
                max_images=max_images, progress=progress, desc=f"{desc} {Path(data_dir).name}"):
            for k, d in enumerate(doses):
                found = frame_columns(probabilities[k], factor, settings)  # as analyze
                tally = Tally()
                tally.add(found, true_columns, data_px, MATCH_DISTANCE_A)
                p = parts[d]
                p["confidence"].append(found["confidence"])
                p["height"].append(found["height"])
                p["height_std"].append(found["height_std"])
                p["correct"].append(tally.correct[0])
                p["matched"].append(tally.matched[0])
                p["dataset"].append(np.full(len(found["height"]), index, np.int32))
                p["image"].append(np.full(len(found["height"]), n_images, np.int32))
            n_images += 1
            n_columns += len(true_columns)
        simulation = manifest.get("config", {}) if isinstance(manifest.get("config"), dict) else {}
        sources.append({
            "data_dir": str(data_dir), "split": split, "n_images": n_images,
            "n_columns": n_columns,
            "manifest_sha256": file_sha256(Path(data_dir) / "manifest.json"),
            "simulation": {k: v for k, v in (
                ("sampling_A", simulation.get("sampling_A")),
                ("focal_spread_models", simulation.get("optics", {}).get("focal_spread_models")),
                ("command", manifest.get("command"))) if v is not None},
        })
    columns = {d: {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts[d].items()}
               for d in doses}
    return columns, sources


def fit_platt_shared(confidence: Sequence[np.ndarray], correct: Sequence[np.ndarray]
                     ) -> tuple[float, list[float]]:
    """Platt scaling with one slope for all doses: ``(slope, [intercept per dose])``.

    Maximum likelihood over every dose's columns at once, with the same weak pull towards
    ``(1, 0)`` as :func:`fit_platt`.
    """
    from scipy.special import expit

    zs = [_logit(c) for c in confidence]
    ys = [np.asarray(r, np.float64) for r in correct]

    def loss(params):
        a, bs = params[0], params[1:]
        total = 1e-2 * ((a - 1) ** 2 + np.sum(bs**2))
        grad = np.zeros_like(params)
        grad[0] = 2e-2 * (a - 1)
        grad[1:] = 2e-2 * bs
        for k, (z, y) in enumerate(zip(zs, ys)):
            t = a * z + bs[k]
            total += np.sum(np.logaddexp(0.0, t) - y * t)
            r = expit(t) - y
            grad[0] += np.sum(r * z)
            grad[k + 1] += np.sum(r)
        return total, grad

    x0 = np.zeros(len(zs) + 1)
    x0[0] = 1.0
    best = optimize.minimize(loss, x0=x0, jac=True, method="L-BFGS-B")
    return float(best.x[0]), [float(v) for v in best.x[1:]]


def _platt_pairs(columns: dict, doses: list, pooling: str) -> tuple[list[float], list[float]]:
    """Per dose ``(slopes, intercepts)`` of the Platt map under ``pooling``
    (:data:`CALIBRATION_POOLINGS`)."""
    if pooling == "shared":
        a, bs = fit_platt_shared([columns[d]["confidence"] for d in doses],
                                 [columns[d]["correct"].astype(bool) for d in doses])
        return [a] * len(doses), bs
    slopes, intercepts = [], []
    for d in doses:
        col = columns[d]
        conf, right = col["confidence"], col["correct"].astype(bool)
        sets = np.unique(col["dataset"]) if pooling == "mean" and "dataset" in col else [None]
        pairs = [fit_platt(conf, right) if s is None else
                 fit_platt(conf[col["dataset"] == s], right[col["dataset"] == s]) for s in sets]
        slopes.append(float(np.mean([p[0] for p in pairs])))
        intercepts.append(float(np.mean([p[1] for p in pairs])))
    return slopes, intercepts


def fit_map(columns: dict, method: str = DEFAULT_MAP, *, min_bin: int = ISOTONIC_MIN_BIN,
            ridge: float = 1.0, pooling: str = DEFAULT_POOLING) -> dict:
    """Fit one confidence map per dose on :func:`collect_columns`' columns.

    Parameters
    ----------
    columns : dict
        :func:`collect_columns`' columns, per dose.
    method : str
        One of :data:`CALIBRATION_MAPS`.
    min_bin, ridge
        The isotonic map's fewest columns per bin, the logistic map's penalty.
    pooling : str
        How the Platt pairs (the ``platt`` map, and every map's fallback) use several datasets
        (:data:`CALIBRATION_POOLINGS`): ``pooled`` fits all their columns at once; ``mean``
        fits each dataset (``columns[dose]["dataset"]``) alone and averages the slopes and
        intercepts, so that sets of different difficulty do not flatten the map; ``shared``
        fits all columns with one slope for every dose and an intercept per dose.

    Returns
    -------
    dict
        The table for :func:`ceriakeras.inference.columns.calibrate_confidence`: ``map``, ``pooling``,
        ``dose_e_per_A2`` and ``slope`` / ``intercept`` (Platt; fitted at every dose whatever
        the map, as the fallback), ``features`` / ``coefficients`` (logistic), ``knots_confidence``
        / ``knots_probability`` (isotonic), and ``ece_before`` / ``ece_after`` (on the fitted
        columns themselves, every reported column).
    """
    if method not in CALIBRATION_MAPS:
        raise ConfigError(f"calibration map {method!r} is not one of {', '.join(CALIBRATION_MAPS)}")
    if pooling not in CALIBRATION_POOLINGS:
        raise ConfigError(f"calibration pooling {pooling!r} is not one of "
                          f"{', '.join(CALIBRATION_POOLINGS)}")
    doses = sorted(columns)
    slopes, intercepts = _platt_pairs(columns, doses, pooling)
    table: dict = {"map": method, "pooling": pooling, "dose_e_per_A2": list(doses),
                   "slope": slopes, "intercept": intercepts}
    if method == "logistic":
        table["features"] = list(LOGISTIC_FEATURES)
        table["coefficients"] = []
    if method == "isotonic":
        table["knots_confidence"], table["knots_probability"] = [], []
    before, after = [], []
    for d in doses:
        col = columns[d]
        conf, right = col["confidence"], col["correct"].astype(bool)
        if method == "logistic":
            table["coefficients"].append(fit_logistic(
                logistic_features(conf, col["height_std"], col["height"]), right, ridge=ridge))
        if method == "isotonic":
            if len(conf) >= 2 * min_bin:
                xs, ys = fit_isotonic(conf, right, min_bin=min_bin)
            else:
                xs, ys = [], []  # too few columns: Platt at this dose
            table["knots_confidence"].append(xs)
            table["knots_probability"].append(ys)
        before.append(calibration(conf, right)["ece"])
    for d in doses:
        col = columns[d]
        mapped = calibrate_confidence(col["confidence"], d, table, height=col["height"],
                                      height_std=col["height_std"])
        after.append(calibration(mapped, col["correct"].astype(bool))["ece"])
    table["ece_before"], table["ece_after"] = before, after
    return table


def fit_confidence_calibration(
    predict,
    data_dir,
    info: dict,
    *,
    doses: Sequence[float] = CALIBRATION_DOSES_E_PER_A2,
    split: str = "validation",
    max_images: int = 48,
    seed: int = 1,
    config: AnalyzeConfig | None = None,
    progress: bool = True,
    desc: str = "calibrate",
    method: str = DEFAULT_MAP,
) -> dict:
    """Fit, at each dose, the map that makes the column ``confidence`` calibrated.

    The raw confidence (the reported height's share of the probability mass in the column's
    disk) is not a probability of being right: at high dose the disk's pixels split their mass
    between neighbouring heights although the column is nearly always right (under-confident),
    at 20 e⁻/Å² the reverse. The same procedure as :func:`ceriakeras.evaluation.evaluate.evaluate` (noise
    at fixed seeds, columns as ``analyze`` finds them, Hungarian matching; a spurious column
    counts as wrong), on one or more datasets pooled (:func:`collect_columns`), gives the table
    for :func:`ceriakeras.inference.columns.calibrate_confidence`.

    Parameters
    ----------
    predict : callable
        ``predict(images (B, H, W) float32 counts) -> (probabilities (B, H, W, C), height)``.
    data_dir : path or sequence of paths
        Dataset folder(s) at the model's pixel size; each ``PATH``, ``PATH:SPLIT`` or
        ``(PATH, SPLIT)`` (a bare path takes ``split``). Their columns are pooled.
    info : dict
        ``pixel_size_A``, ``max_height``, ``label_radius_A`` of the model.
    doses : sequence of float
        Doses, e⁻/Å², at which to fit (interpolated in log dose in between).
    split, max_images, seed : str, int, int
        Default split, images per dataset, and noise seed.
    method : str
        One of :data:`CALIBRATION_MAPS`.

    Returns
    -------
    dict
        :func:`fit_map`'s table plus ``datasets`` (:func:`collect_columns`' sources), ``split``,
        ``n_images`` and ``n_columns`` (totals), ``seed`` and ``data_dir`` (the folders, joined
        by ``'; '``).
    """
    method = method or DEFAULT_MAP
    specs = [data_dir] if isinstance(data_dir, (str, os.PathLike, tuple)) else list(data_dir)
    if not specs:
        raise ConfigError("no calibration dataset given: pass at least one --calibrate folder")
    specs = [parse_dataset(s, split) for s in specs]
    columns, sources = collect_columns(predict, specs, info, doses=doses, max_images=max_images,
                                       seed=seed, config=config, progress=progress, desc=desc)
    table = fit_map(columns, method)
    splits = sorted({s["split"] for s in sources})
    return {**table, "datasets": sources, "split": "+".join(splits),
            "n_images": sum(s["n_images"] for s in sources),
            "n_columns": sum(s["n_columns"] for s in sources), "seed": seed,
            "data_dir": "; ".join(s["data_dir"] for s in sources)}


_METHOD_TEXT = {
    "platt": "Platt scaling of the raw confidence per dose",
    "logistic": "logistic map of (logit of the raw confidence, height_std, height) per dose",
    "isotonic": "binned isotonic map of the raw confidence per dose (Platt where too few columns)",
}


def method_text(method: str) -> str:
    """The ``method`` sentence recorded with a calibration table."""
    return (_METHOD_TEXT[method] + ", interpolated in log dose; the dose is the frame's mean count "
            "per pixel area, so frames must be in counts")


def fit_model_calibrations(predict, predict_tta, datasets, info: dict, *,
                           method: str | None = DEFAULT_MAP, max_images: int = 48,
                           split: str = "validation", progress: bool = False) -> dict:
    """The tables a model carries: ``confidence_calibration`` fitted through ``predict`` (plain
    inference) and, unless ``predict_tta`` is None, ``confidence_calibration_tta`` through it
    (test-time augmentation, :class:`ceriakeras.inference.served.DihedralAveraged`): the consumers' own
    paths. Each is :func:`fit_confidence_calibration` plus its ``method`` sentence."""
    method = method or DEFAULT_MAP
    out = {}
    for key, fn, desc in (("confidence_calibration", predict, "calibrate"),
                          ("confidence_calibration_tta", predict_tta, "calibrate (TTA)")):
        if fn is None:
            continue
        fit = fit_confidence_calibration(fn, datasets, info, split=split, max_images=max_images,
                                         progress=progress, desc=desc, method=method)
        out[key] = {"method": method_text(method), **fit}
    return out
