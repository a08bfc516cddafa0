"""The objective lens: drawn optics, the wavelength, delocalisation, and images from an exit wave.

Conventions (abTEM's sign, aberrations, focal spread, coordinates) are those of
:mod:`ceriakeras.physics.simulate`. :class:`ExitWave` is what the lens acts on (the multislice
result of :mod:`ceriakeras.physics.multislice`); :func:`image_from_exit_wave` makes one image
at one draw of the optics (:func:`draw_optics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, OpticsConfig


_FOCAL_SPREAD_RANGE = 3.0  # defocus grid spans ±3 Δ (weight exp(-9) at the ends)


_ALIAS_TOLERANCE = 1e-3  # temporal envelope value below which aliased frequencies may land


@dataclass
class ExitWave:
    """An exit wave in reciprocal space, ready for many optics draws.

    Attributes
    ----------
    fourier : (Nx, Ny) complex64
        ``fft2`` of the exit wave, abTEM axis order (x first).
    sampling_A : float
        Real-space grid spacing, Å; real-space sample ``j`` sits at ``(j + 1/2)·sampling_A``.
    energy_keV : float
        Beam energy, keV.
    """

    fourier: np.ndarray
    sampling_A: float
    energy_keV: float

    @classmethod
    def from_array(cls, wave: np.ndarray, sampling_A: float, energy_keV: float) -> "ExitWave":
        """Build from a real-space exit wave ``(Nx, Ny)`` complex (abTEM axis order)."""
        from abtem.core.fft import fft2

        wave = np.ascontiguousarray(wave, dtype=np.complex64)
        return cls(fft2(wave), float(sampling_A), float(energy_keV))


def wavelength_A(energy_keV: float) -> float:
    """Relativistic electron wavelength, Å."""
    from abtem.core.energy import energy2wavelength

    return float(energy2wavelength(energy_keV * 1e3))


def delocalisation_A(optics: dict) -> float:
    """Largest lateral shift of any beam the aperture passes, for one set of optics, Å.

    A beam at spatial frequency ``k`` is imaged displaced by ``|∇_k chi| / 2π`` (the
    delocalisation). Bounded here by
    ``max_{k ≤ k_ap} |λk C10 + λ³k³ C30 + λ⁵k⁵ C50| + λk (|C12| + Δ) + λ²k² (|C21| + |C23|)``
    (C10 = -defocus, Δ the focal spread's 1/e half width: the defocus spread of the image).

    Parameters
    ----------
    optics : dict
        As returned by :func:`draw_optics` (``energy_keV``, ``defocus_nm``, ``cs_um``,
        ``c5_mm``, ``aperture_mrad``; optional ``astigmatism_nm``, ``focal_spread_nm``,
        ``coma_nm``, ``three_fold_astigmatism_nm``, 0 if absent).

    Returns
    -------
    float
        Delocalisation, Å.
    """
    lam = wavelength_A(optics["energy_keV"])
    k = np.linspace(0.0, optics["aperture_mrad"] * 1e-3 / lam, 2001)
    c10 = -optics["defocus_nm"] * 10.0
    c30 = optics["cs_um"] * 1e4
    c50 = optics["c5_mm"] * 1e7
    round_part = np.abs(lam * k * c10 + lam**3 * k**3 * c30 + lam**5 * k**5 * c50)
    c12 = abs(optics.get("astigmatism_nm", 0.0)) * 10.0
    spread = abs(optics.get("focal_spread_nm", 0.0)) * 10.0
    odd = 10.0 * (abs(optics.get("coma_nm", 0.0))
                  + abs(optics.get("three_fold_astigmatism_nm", 0.0)))
    return float(np.max(round_part + lam * k * (c12 + spread) + (lam * k) ** 2 * odd))


def envelope_delocalisation_A(config: OpticsConfig) -> float:
    """Largest :func:`delocalisation_A` over the whole optics envelope of ``config``, Å.

    The worst corner of the defocus, Cs and C5 ranges (the bound is linear in each), at the
    largest aperture, astigmatism, focal spread, coma and three-fold astigmatism.
    """
    worst = 0.0
    for defocus in config.defocus_range_nm:
        for cs in config.cs_range_um:
            for c5 in config.c5_range_mm:
                worst = max(worst, delocalisation_A({
                    "energy_keV": config.energy_keV, "defocus_nm": defocus, "cs_um": cs,
                    "c5_mm": c5, "aperture_mrad": config.max_aperture_mrad,
                    "astigmatism_nm": config.max_astigmatism_nm,
                    "focal_spread_nm": config.focal_spread_range_nm[1],
                    "coma_nm": config.max_coma_nm,
                    "three_fold_astigmatism_nm": config.max_three_fold_astigmatism_nm}))
    return worst


def draw_optics(rng: np.random.Generator, config: OpticsConfig) -> dict:
    """Draw the objective-lens settings of one image, uniformly inside ``config``'s ranges.

    Returns
    -------
    dict
        ``energy_keV``, ``defocus_nm`` (abTEM sign, = -C10), ``cs_um`` (C30),
        ``c5_mm`` (C50), ``focal_spread_nm`` (1/e half width), ``astigmatism_nm`` (C12),
        ``astigmatism_angle_deg`` (phi12), ``aperture_mrad`` (semi-angle),
        ``focal_spread_model`` (``"incoherent"`` or ``"envelope"``), ``coma_nm`` (C21),
        ``coma_angle_deg`` (phi21), ``three_fold_astigmatism_nm`` (C23),
        ``three_fold_astigmatism_angle_deg`` (phi23); plain floats and one string.

    Notes
    -----
    The draws of the version-1/2 settings come first and in their old order, and a new setting
    is drawn only when its range is open, so a config without the new settings gives the same
    optics (and images) as before.
    """
    optics = {
        "energy_keV": float(config.energy_keV),
        "defocus_nm": float(rng.uniform(*config.defocus_range_nm)),
        "cs_um": float(rng.uniform(*config.cs_range_um)),
        "c5_mm": float(rng.uniform(*config.c5_range_mm)),
        "focal_spread_nm": float(rng.uniform(*config.focal_spread_range_nm)),
        "astigmatism_nm": float(rng.uniform(0.0, config.max_astigmatism_nm)),
        "astigmatism_angle_deg": float(rng.uniform(0.0, 180.0)),
        "aperture_mrad": float(config.aperture_mrad),
        "focal_spread_model": config.focal_spread_models[0],
        "coma_nm": 0.0,
        "coma_angle_deg": 0.0,
        "three_fold_astigmatism_nm": 0.0,
        "three_fold_astigmatism_angle_deg": 0.0,
    }
    if config.aperture_range_mrad is not None:
        optics["aperture_mrad"] = float(rng.uniform(*config.aperture_range_mrad))
    if len(config.focal_spread_models) > 1:
        optics["focal_spread_model"] = str(
            config.focal_spread_models[int(rng.integers(len(config.focal_spread_models)))])
    if config.max_coma_nm > 0:
        optics["coma_nm"] = float(rng.uniform(0.0, config.max_coma_nm))
        optics["coma_angle_deg"] = float(rng.uniform(0.0, 360.0))
    if config.max_three_fold_astigmatism_nm > 0:
        optics["three_fold_astigmatism_nm"] = float(
            rng.uniform(0.0, config.max_three_fold_astigmatism_nm))
        optics["three_fold_astigmatism_angle_deg"] = float(rng.uniform(0.0, 120.0))
    return optics


def defocus_samples(focal_spread_A: float, max_frequency_inv_A: float, energy_keV: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Defocus offsets and weights for the incoherent focal-spread sum.

    The intensity at defocus ``f`` holds terms ``exp(-i π λ f (k1² - k2²))`` with
    ``|k1² - k2²| ≤ k_max²``, i.e. frequencies in ``f`` up to ``ω_max = π λ k_max²``.
    A uniform grid of step ``h`` with Gaussian weights reproduces each term's exact average
    (the temporal envelope ``exp(-(ωΔ/2)²)``) up to aliases at ``ω ± 2π/h``; ``h`` is chosen so
    that ``2π/h ≥ ω_max + ω_ε`` where the envelope has fallen to 1e-3 at ``ω_ε``.

    Parameters
    ----------
    focal_spread_A : float
        1/e half width Δ of the defocus distribution, Å.
    max_frequency_inv_A : float
        Largest spatial frequency in the wave (aperture), 1/Å.
    energy_keV : float
        Beam energy, keV.

    Returns
    -------
    offsets_A : (n,) float64
        Defocus offsets from the mean, Å (n odd, 1 if Δ = 0).
    weights : (n,) float64
        Normalized weights (sum 1).
    """
    if focal_spread_A <= 0:
        return np.zeros(1), np.ones(1)
    lam = wavelength_A(energy_keV)
    omega_max = math.pi * lam * max_frequency_inv_A**2
    omega_eps = 2.0 / focal_spread_A * math.sqrt(math.log(1.0 / _ALIAS_TOLERANCE))
    step = 2.0 * math.pi / (omega_max + omega_eps)
    half = max(1, int(math.ceil(_FOCAL_SPREAD_RANGE * focal_spread_A / step)))
    offsets = np.linspace(-_FOCAL_SPREAD_RANGE, _FOCAL_SPREAD_RANGE, 2 * half + 1) * focal_spread_A
    weights = np.exp(-((offsets / focal_spread_A) ** 2))
    return offsets, weights / weights.sum()


def _phase_grid(shape: tuple[int, int], sampling_A: float) -> tuple[np.ndarray, np.ndarray]:
    kx = np.fft.fftfreq(shape[0], sampling_A)
    ky = np.fft.fftfreq(shape[1], sampling_A)
    k2 = kx[:, None] ** 2 + ky[None, :] ** 2
    phi = np.arctan2(ky[None, :], kx[:, None])
    return k2, phi


def image_sampling_A(pixel_size_A: float, sampling_A: float, energy_keV: float,
                     aperture_mrad: float) -> float:
    """Grid spacing on which images are formed before pixel integration, Å.

    The largest ``pixel_size_A / f`` (``f`` a whole number) that samples the intensity
    without aliasing (``≤ 1 / (4 k_ap)``, the intensity holding frequencies up to twice the
    aperture's ``k_ap``), but never finer than the multislice grid ``sampling_A``.
    """
    k_ap = aperture_mrad * 1e-3 / wavelength_A(energy_keV)
    f_max = int(round(pixel_size_A / sampling_A))
    f = max(1, int(math.ceil(4.0 * pixel_size_A * k_ap - 1e-9)))
    return pixel_size_A / min(f, f_max)


def abtem_settings() -> dict:
    """abTEM's settings for every call of this package: deterministic FFTW plans, CPU, float32."""
    # FFTW_ESTIMATE: plans chosen by rule, not by timing, so every process computes the same
    # bits (FFTW_MEASURE may pick other plans, hence other rounding, in another process) and no
    # seconds are spent planning each new grid. Measured within 10 % of FFTW_MEASURE here.
    return {"dask.lazy": False, "fft": "fftw", "fftw.threads": 1,
            "fftw.planning_effort": "FFTW_ESTIMATE",
            "diagnostics.progress_bar": False, "device": "cpu", "precision": "float32"}


def image_from_exit_wave(exit_wave: ExitWave, optics: dict, pixel_size_A: float | None = None
                         ) -> np.ndarray:
    """The HRTEM image of an exit wave through a lens with the given optics.

    Parameters
    ----------
    exit_wave : ExitWave
        The exit wave (reciprocal space, abTEM axis order, vacuum amplitude 1).
    optics : dict
        As returned by :func:`draw_optics` (units in the keys). ``energy_keV`` must match the
        exit wave's. The keys added in version 3 (``focal_spread_model``, ``coma_nm``,
        ``coma_angle_deg``, ``three_fold_astigmatism_nm``,
        ``three_fold_astigmatism_angle_deg``) may be left out: incoherent focal spread, no
        coma or three-fold astigmatism.
    pixel_size_A : float, optional
        Pixel size of the returned image, Å, an integer multiple of the exit wave's sampling
        (default: the sampling itself). Each pixel is the mean of the fine samples it covers.

    Returns
    -------
    (H, W) float32
        Intensity, vacuum = 1, rows = y, columns = x; pixel ``i`` covers ``[i·p, (i+1)·p)``.
    """
    import abtem
    from abtem.core.fft import ifft2

    if abs(optics["energy_keV"] - exit_wave.energy_keV) > 1e-6:
        raise ConfigError(f"optics energy_keV={optics['energy_keV']} differs from the exit "
                          f"wave's {exit_wave.energy_keV}; simulate a new exit wave")
    s = exit_wave.sampling_A
    p = s if pixel_size_A is None else float(pixel_size_A)
    factor = int(round(p / s))
    nx, ny = exit_wave.fourier.shape
    if factor < 1 or abs(factor * s - p) > 1e-6 * p or nx % factor or ny % factor:
        raise ConfigError(f"pixel_size_A={p} must be an integer multiple of sampling_A={s} "
                          f"that divides the grid {nx}×{ny}")
    lam = wavelength_A(exit_wave.energy_keV)
    k2, phi = _phase_grid((nx, ny), s)
    k_ap = optics["aperture_mrad"] * 1e-3 / lam
    inside = k2 <= k_ap**2
    k2_in, phi_in = k2[inside], phi[inside]
    c10 = -optics["defocus_nm"] * 10.0
    c12 = optics["astigmatism_nm"] * 10.0
    phi12 = math.radians(optics["astigmatism_angle_deg"])
    c30 = optics["cs_um"] * 1e4
    c50 = optics["c5_mm"] * 1e7
    chi0 = (math.pi * lam * k2_in * (c10 + c12 * np.cos(2.0 * (phi_in - phi12)))
            + 0.5 * math.pi * lam**3 * k2_in**2 * c30
            + math.pi / 3.0 * lam**5 * k2_in**3 * c50)
    c21 = optics.get("coma_nm", 0.0) * 10.0
    c23 = optics.get("three_fold_astigmatism_nm", 0.0) * 10.0
    if c21 or c23:
        phi21 = math.radians(optics.get("coma_angle_deg", 0.0))
        phi23 = math.radians(optics.get("three_fold_astigmatism_angle_deg", 0.0))
        # 2π/λ · α³/3 · (...), α = λk
        chi0 = chi0 + 2.0 * math.pi / 3.0 * lam**2 * k2_in**1.5 * (
            c21 * np.cos(phi_in - phi21) + c23 * np.cos(3.0 * (phi_in - phi23)))
    psi_in = exit_wave.fourier[inside]
    k_max = math.sqrt(float(k2_in.max())) if k2_in.size else 0.0
    spread_A = optics["focal_spread_nm"] * 10.0
    model = optics.get("focal_spread_model", "incoherent")
    if model == "envelope":
        # abTEM's TemporalEnvelope: exp(-(π/(2λ) Δ α²)²) with α = λk.
        psi_in = psi_in * np.exp(-(0.5 * math.pi * lam * spread_A * k2_in) ** 2).astype(np.float32)
        offsets, weights = np.zeros(1), np.ones(1)
    elif model == "incoherent":
        offsets, weights = defocus_samples(spread_A, k_max, exit_wave.energy_keV)
    else:
        raise ConfigError(f"focal_spread_model={model!r} must be 'incoherent' or 'envelope'")
    intensity = np.zeros((nx, ny), np.float64)
    buffer = np.zeros((nx, ny), np.complex64)
    with abtem.config.set(abtem_settings()):
        for offset, weight in zip(offsets, weights):
            # defocus f0 + offset ↔ C10 - offset: chi changes by -π λ k² offset.
            chi = chi0 - math.pi * lam * offset * k2_in
            buffer[inside] = psi_in * np.exp(-1j * chi).astype(np.complex64)
            wave = ifft2(buffer)
            intensity += weight * (wave.real**2 + wave.imag**2)
    binned = intensity.reshape(nx // factor, factor, ny // factor, factor).mean(axis=(1, 3))
    return np.ascontiguousarray(binned.T, dtype=np.float32)
