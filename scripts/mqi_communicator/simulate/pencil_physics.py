"""The built-in engine's proton physics in water: range, depth dose, lateral spread, and the
range shifter's effect on them (docs/beam-modifiers.md for the range shifter).

Bragg-Kleeman range R0 = alpha E^p, Bortfeld's analytical Bragg curve (Med. Phys. 24 (1997)
2024), multiple Coulomb scattering from the Highland formula without its log term, integrated
with the Bragg-Kleeman energy. The engine's module docstring says how they are put together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gamma, pbdv

from mqi_communicator.formats.raw_dose import PLANE_DEPTH_MM

# In-air spot sigma (mm) at the isocentre by energy (MeV), from the clinic's MOQUI beam models.
SIGMA_AIR_MM: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    1: ((70, 100, 126, 150, 190, 230), (10.70, 7.88, 6.52, 5.70, 4.66, 3.58)),
    2: ((70, 100, 126, 150, 162, 190, 214, 230), (8.62, 6.23, 5.12, 4.42, 4.46, 3.98, 3.52, 2.72)),
}

ALPHA_CM = 0.0022  # Bragg-Kleeman R = alpha E^p (water, cm, MeV)
P_EXP = 1.77
BETA_PER_CM = 0.012  # nuclear interactions
GAMMA_NUCLEAR = 0.6  # fraction of the energy of nuclear secondaries deposited locally
EPSILON = 0.1  # low-energy fluence fraction
ENERGY_SPREAD = 0.01  # sigma_E / E
PROTON_MASS_MEV = 938.272
WATER_X0_CM = 36.08
HIGHLAND_ES_MEV = 13.6
MCS_CUTOFF_MEV = 3.0  # stop the Highland integral here (it diverges at the end of range)
REFERENCE_ENERGY_MEV = 100.0  # one proton per count at this energy
GY_PER_MEV_PER_G = 1.602176634e-10


def sigma_in_air_mm(energy_mev: float | np.ndarray, gantry: int) -> np.ndarray:
    energies, sigmas = SIGMA_AIR_MM[gantry]
    return np.asarray(np.interp(energy_mev, energies, sigmas), dtype=np.float64)


def range_cm(energy_mev: float) -> float:
    return float(ALPHA_CM * energy_mev**P_EXP)


def stopping_power(energy_mev: float) -> float:
    """Bragg-Kleeman stopping power in water, MeV/cm: 1 / (dR/dE)."""
    return float(energy_mev ** (1.0 - P_EXP) / (ALPHA_CM * P_EXP))


def protons_per_count(energy_mev: float) -> float:
    return stopping_power(REFERENCE_ENERGY_MEV) / stopping_power(energy_mev)


def bortfeld_dose(depth_cm: np.ndarray, energy_mev: float) -> np.ndarray:
    """Dose per unit fluence (MeV cm^2/g per proton/cm^2 = MeV/g for 1 proton/cm^2) at depth."""
    z = np.atleast_1d(np.asarray(depth_cm, dtype=np.float64))
    r0 = range_cm(energy_mev)
    sigma_mono = 0.012 * r0**0.935
    sigma_e = ENERGY_SPREAD * energy_mev * ALPHA_CM * P_EXP * energy_mev ** (P_EXP - 1)
    sigma = math.hypot(sigma_mono, sigma_e)
    zeta = (r0 - z) / sigma
    norm = 1.0 / (P_EXP * ALPHA_CM ** (1 / P_EXP) * (1 + BETA_PER_CM * r0))
    dose = np.zeros_like(z)
    near = zeta <= 30.0  # parabolic-cylinder form; beyond, its asymptote (same to 3e-4)
    if near.any():
        zn = zeta[near]
        d_a = pbdv(-1 / P_EXP, -zn)[0]
        d_b = pbdv(-1 / P_EXP - 1, -zn)[0]
        pre = np.exp(-(zn**2) / 4) * sigma ** (1 / P_EXP) * gamma(1 / P_EXP) / math.sqrt(2 * math.pi) * norm
        dose[near] = pre * (d_a / sigma + (BETA_PER_CM / P_EXP + GAMMA_NUCLEAR * BETA_PER_CM + EPSILON / r0) * d_b)
    far = ~near
    if far.any():
        residual = r0 - z[far]
        coefficient = BETA_PER_CM + GAMMA_NUCLEAR * BETA_PER_CM * P_EXP + EPSILON * P_EXP / r0
        dose[far] = norm * (residual ** (1 / P_EXP - 1) + coefficient * residual ** (1 / P_EXP))
    return np.maximum(np.nan_to_num(dose, nan=0.0), 0.0)


def mcs_sigma_mm(energy_mev: float, depth_mm: np.ndarray) -> np.ndarray:
    """Lateral sigma from multiple Coulomb scattering in water after `depth_mm`: the Highland
    angular variance per length (13.6 MeV / pv)^2 / X0, integrated as sigma^2 = int (z-u)^2 T(u) du."""
    z = np.atleast_1d(np.asarray(depth_mm, dtype=np.float64)) / 10.0
    r0 = range_cm(energy_mev)
    u_cut = max(r0 - ALPHA_CM * MCS_CUTOFF_MEV**P_EXP, 0.0)
    if u_cut <= 0:
        return np.zeros_like(z)
    u = np.linspace(0.0, u_cut, 801)
    energy = ((r0 - u) / ALPHA_CM) ** (1 / P_EXP)
    pv = (energy**2 + 2 * energy * PROTON_MASS_MEV) / (energy + PROTON_MASS_MEV)
    t = (HIGHLAND_ES_MEV / pv) ** 2 / WATER_X0_CM

    def cumulative(f: np.ndarray) -> np.ndarray:
        return np.concatenate(([0.0], np.cumsum((f[1:] + f[:-1]) * 0.5 * np.diff(u))))

    zc = np.minimum(z, u_cut)
    a0 = np.interp(zc, u, cumulative(t))
    a1 = np.interp(zc, u, cumulative(t * u))
    a2 = np.interp(zc, u, cumulative(t * u * u))
    return 10.0 * np.sqrt(np.maximum(z * z * a0 - 2 * z * a1 + a2, 0.0))


# The phantom surface sits this far before the isocentre (geometry: as in 2 cm mode), so a
# range shifter IsocenterToRangeShifterDistance d before the isocentre is d - 20 mm before it.
ISOCENTRE_DEPTH_MM = PLANE_DEPTH_MM

# A range shifter in the beam, as the physics needs it: (water-equivalent thickness mm,
# distance mm from the isocentre to its downstream face, PS3.3 IsocenterToRangeShifterDistance).
Shifter = tuple[float, float]


def energy_after_water_mev(energy_mev: float, wet_mm: float) -> float:
    """Energy left after `wet_mm` of water by Bragg-Kleeman, R(E') = R(E) - WET; 0 when stopped."""
    residual_cm = range_cm(energy_mev) - wet_mm / 10.0
    return float((residual_cm / ALPHA_CM) ** (1 / P_EXP)) if residual_cm > 0 else 0.0


def scatter_angle_rad(energy_mev: float, wet_mm: float) -> float:
    """RMS projected angle after a slab of `wet_mm` water-equivalent thickness: the Highland
    angular variance per length (13.6 MeV / pv)^2 / X0 integrated over the slab, the energy
    falling along it by Bragg-Kleeman (the same model as `mcs_sigma_mm`, without the drift)."""
    r0 = range_cm(energy_mev)
    u_end = min(wet_mm / 10.0, max(r0 - ALPHA_CM * MCS_CUTOFF_MEV**P_EXP, 0.0))
    if u_end <= 0:
        return 0.0
    u = np.linspace(0.0, u_end, 401)
    energy = ((r0 - u) / ALPHA_CM) ** (1 / P_EXP)
    pv = (energy**2 + 2 * energy * PROTON_MASS_MEV) / (energy + PROTON_MASS_MEV)
    t = (HIGHLAND_ES_MEV / pv) ** 2 / WATER_X0_CM
    return math.sqrt(float(np.sum((t[1:] + t[:-1]) * 0.5 * np.diff(u))))


def shifter_sigma_mm(energy_mev: float, shifters: Sequence[Shifter], depth_mm: np.ndarray) -> np.ndarray:
    """Extra lateral sigma at `depth_mm` in the phantom from the range shifters: each one's
    angular spread (for the energy entering it) times the drift from its downstream face to
    that depth, added in quadrature. Shifters are crossed from the farthest upstream."""
    z = np.atleast_1d(np.asarray(depth_mm, dtype=np.float64))
    variance = np.zeros_like(z)
    energy = energy_mev
    for wet_mm, distance_mm in sorted(shifters, key=lambda s: -s[1]):
        drift_mm = distance_mm - ISOCENTRE_DEPTH_MM + z
        variance += (scatter_angle_rad(energy, wet_mm) * drift_mm) ** 2
        energy = energy_after_water_mev(energy, wet_mm)
    return np.sqrt(variance)


def lateral_sigma_mm(
    energy_mev: float, depth_mm: np.ndarray, gantry: int, shifters: Sequence[Shifter] = ()
) -> np.ndarray:
    """Spot sigma at depth: the room's in-air sigma at the nominal energy, scattering in the
    water with the energy left after the shifters, and the shifters' own scattering."""
    residual = energy_after_water_mev(energy_mev, sum(wet for wet, _ in shifters)) if shifters else energy_mev
    in_water = mcs_sigma_mm(residual, depth_mm) if residual > 0 else np.zeros_like(np.atleast_1d(depth_mm))
    return np.sqrt(
        sigma_in_air_mm(energy_mev, gantry) ** 2 + in_water**2 + shifter_sigma_mm(energy_mev, shifters, depth_mm) ** 2
    )
