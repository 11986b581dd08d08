"""Verdicts: the delivered dose of a beam against its TPS plane, and the case's worst verdict.

Defaults after AAPM TG-218, every number from `qa:` in the config: gamma 3%/2 mm (primary)
and 2%/2 mm, global, 10 % low-dose cutoff, the TPS plane the reference. PASS when the primary
pass rate is >= 95 %; REVIEW at 90-95 %, when the 2%/2 mm rate is < 90 % or when the mean dose
difference in the >= 50 % region exceeds 2 %; FAIL below 90 % or beyond 3 %.

A PASS needs an absolute dose whose scale is verified (docs/qa.md): both doses in Gy and a current
calibration of the engine and room (`calibration.status`). Otherwise the comparison still runs
(relative when either dose is RELATIVE: the delivered dose scaled to the TPS mean over the
TPS >= 90 % region) and its FAIL or REVIEW stands, but it can be no better than NOT ASSESSED,
with the reason "dose scale not verified".

Before any comparison the geometry is proven: both planes along the same patient axes, the TPS
plane within 0.5 mm of ours along the normal, and the TPS grid covering our dose above the
cutoff; anything else is ERROR with the reason, never a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from mqi_communicator.qa.gamma import Criteria, GammaResult, gamma_2d
from mqi_communicator.qa.tps_dose import Plane

ORDER = ("PASS", "REVIEW", "NOT ASSESSED", "FAIL", "ERROR")
NORMALISATION_REGION_PERCENT = 90.0
PLANE_POSITION_TOLERANCE_MM = 0.5
GAMMA_CRITERIA = ("primary", "secondary")


class DoseGrid(Protocol):
    """What a comparison needs of a dose, plane (`tps_dose.Plane`) or volume (`volume.Volume`)."""

    dose: np.ndarray
    units: str
    notes: list[str]


@dataclass(frozen=True)
class Scaled:
    """The delivered dose brought onto the TPS grid: the units (TPS, delivered), the notes on the
    comparison, the TPS maximum, the factor the delivered dose is scaled by (1 unless a dose is
    RELATIVE) and the mean dose difference (percent) over the TPS high-dose region."""

    units: tuple[str, str]
    notes: list[str]
    peak: float
    scale: float
    mean_diff: float

    @property
    def relative(self) -> bool:
        return "RELATIVE" in self.units


def worst(verdicts: list[str]) -> str:
    """The worst of some verdicts (ERROR > FAIL > NOT ASSESSED > REVIEW > PASS); NOT APPLICABLE
    (a delivery check without logs) counts for nothing; nothing at all is NOT ASSESSED."""
    counted = [v for v in verdicts if v != "NOT APPLICABLE"]
    return max(counted, key=ORDER.index) if counted else "NOT ASSESSED"


def criteria_from(qa: dict[str, Any], which: str) -> Criteria:
    gamma = qa["gamma"]
    return Criteria(
        dose_percent=float(gamma[which]["dose_percent"]),
        distance_mm=float(gamma[which]["distance_mm"]),
        cutoff_percent=float(gamma["cutoff_percent"]),
        local=bool(gamma["local"]),
        max_gamma=float(gamma["max_gamma"]),
        interp_fraction=int(gamma["interp_fraction"]),
    )


def resample(plane: Plane, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`plane` bilinearly at the grid rows x cols (NaN outside it)."""
    interp = RegularGridInterpolator((plane.row_mm, plane.col_mm), plane.dose, bounds_error=False, fill_value=np.nan)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return interp(np.stack([rr, cc], axis=-1))


def _extent(values: np.ndarray) -> tuple[float, float]:
    """The span a row of pixel centres covers, half a pixel beyond the outer centres."""
    half = abs(float(values[1] - values[0])) / 2 if values.size > 1 else 0.5
    return float(values.min()) - half, float(values.max()) + half


def geometry_problem(tps: Plane, delivered: Plane, cutoff_percent: float) -> str | None:
    """Why the two planes are not the same plane of the same phantom, or None."""
    if tps.axes != delivered.axes:
        return f"the TPS plane lies along patient {tps.axes} but the delivered plane along {delivered.axes}"
    normal = next(a for a in "xyz" if a not in tps.axes)
    if tps.position_mm is not None and delivered.position_mm is not None:
        offset = tps.position_mm - delivered.position_mm
        if abs(offset) > PLANE_POSITION_TOLERANCE_MM:
            return (
                f"the TPS plane lies at {normal} = {tps.position_mm:g} mm but ours at {normal} = "
                f"{delivered.position_mm:g} mm ({offset:+.1f} mm, more than {PLANE_POSITION_TOLERANCE_MM:g} mm): "
                "not the same plane (another depth or phantom position)"
            )
    above = delivered.dose >= cutoff_percent / 100 * float(delivered.dose.max(initial=0.0))
    if above.any():
        rows, cols = np.nonzero(above)
        need_rows = (float(delivered.row_mm[rows].min()), float(delivered.row_mm[rows].max()))
        need_cols = (float(delivered.col_mm[cols].min()), float(delivered.col_mm[cols].max()))
        have_rows, have_cols = _extent(tps.row_mm), _extent(tps.col_mm)
        if (
            need_rows[0] < have_rows[0]
            or need_rows[1] > have_rows[1]
            or need_cols[0] < have_cols[0]
            or need_cols[1] > have_cols[1]
        ):
            return (
                f"the TPS grid ({tps.axes[0]} {have_cols[0]:g}..{have_cols[1]:g} mm, {tps.axes[1]} {have_rows[0]:g}.."
                f"{have_rows[1]:g} mm) does not cover our dose above the cutoff ({tps.axes[0]} {need_cols[0]:g}.."
                f"{need_cols[1]:g} mm, {tps.axes[1]} {need_rows[0]:g}..{need_rows[1]:g} mm)"
            )
    return None


def compare(tps: Plane, delivered: Plane, qa: dict[str, Any], dose_scale: dict[str, Any]) -> dict[str, Any]:
    """Gamma, mean dose difference and the dose verdict of one beam (TPS = reference).
    `dose_scale`: the calibration status of the delivered dose (`calibration.status`)."""
    problem = geometry_problem(tps, delivered, float(qa["gamma"]["cutoff_percent"]))
    if problem:
        return error(problem)
    on_tps = resample(delivered, tps.row_mm, tps.col_mm)
    scaled = scaled_to_tps(tps, delivered, on_tps, qa, "grid")
    if isinstance(scaled, str):
        return error(scaled)
    evaluated = delivered.dose * scaled.scale
    primary, secondary = (
        gamma_2d(
            (tps.row_mm, tps.col_mm),
            tps.dose,
            (delivered.row_mm, delivered.col_mm),
            evaluated,
            criteria_from(qa, which),
        )
        for which in GAMMA_CRITERIA
    )
    arrays = {
        "gamma": primary.gamma,
        "tps": tps,
        "delivered_on_tps": on_tps * scaled.scale,
        "units": f"{tps.units}; delivered scaled x{scaled.scale:.4g}" if scaled.relative else tps.units,
    }
    return dose_result(
        (primary, secondary),
        scaled,
        qa,
        dose_scale=dose_scale,
        evaluation=f"2-D gamma on the plane at depth {qa['plane_depth_mm']:g} mm",
        arrays=arrays,
        points="points",
    )


def scaled_to_tps(
    tps: DoseGrid, delivered: DoseGrid, on_tps: np.ndarray, qa: dict[str, Any], grid: str
) -> Scaled | str:
    """The delivered dose resampled on the TPS grid (`on_tps`) made comparable, plane or volume
    alike (scaled when a dose is RELATIVE), or why it cannot be (an ERROR's reason; `grid`
    names the delivered grid in it)."""
    notes = list(tps.notes)
    relative = "RELATIVE" in (tps.units, delivered.units)
    peak = float(tps.dose.max())
    if np.isnan(on_tps[tps.dose >= qa["gamma"]["cutoff_percent"] / 100 * peak]).any():
        return f"the TPS dose above the cutoff reaches outside the delivered dose {grid}"
    scale = relative_scale(tps.dose, on_tps, tps.units, notes) if relative else 1.0
    if scale is None:
        return "the delivered dose is zero where the TPS dose is highest"
    high = tps.dose >= qa["high_dose_region_percent"] / 100 * peak
    mean_diff = float(100.0 * (on_tps[high].mean() * scale - tps.dose[high].mean()) / tps.dose[high].mean())
    return Scaled((tps.units, delivered.units), notes, peak, scale, mean_diff)


def dose_result(
    gammas: tuple[GammaResult, GammaResult],
    scaled: Scaled,
    qa: dict[str, Any],
    *,
    dose_scale: dict[str, Any],
    evaluation: str,
    arrays: dict[str, Any],
    points: str,
    shown: list[str] | None = None,
) -> dict[str, Any]:
    """The dose line's result, plane or volume alike: the TG-218 verdict, held at NOT ASSESSED
    at best when the dose scale is not verified, and the figure's numbers (`arrays`)."""
    primary, secondary = gammas
    relative, mean_diff = scaled.relative, scaled.mean_diff
    verdict, reasons = dose_verdict(primary, secondary, mean_diff, qa["thresholds"])
    unverified = scale_not_verified(*scaled.units, dose_scale)
    if unverified:
        verdict = worst([verdict, "NOT ASSESSED"])
        reasons = [unverified, *reasons]
    arrays["numbers"] = [
        verdict,
        f"{primary.criteria.label}: {primary.pass_rate:.1f} % of {primary.evaluated} {points}",
        f"{secondary.criteria.label}: {secondary.pass_rate:.1f} %",
        f"mean dose difference (TPS >= {qa['high_dose_region_percent']:g} %): {mean_diff:+.2f} %",
        f"{'RELATIVE' if relative else 'absolute'} comparison",
        *(shown or []),
    ]
    return {
        "verdict": verdict,
        "reasons": reasons,
        "evaluation": evaluation,
        "comparison": "relative" if relative else "absolute",
        "dose_scale_verified": not unverified,
        "scale_applied": scaled.scale,
        "notes": scaled.notes,
        "gamma_primary": primary.summary(),
        "gamma_secondary": secondary.summary(),
        "mean_dose_difference_percent": round(mean_diff, 3),
        "high_dose_region_percent": qa["high_dose_region_percent"],
        "tps_max": scaled.peak,
        "units": "RELATIVE" if relative else "GY",
        "_arrays": arrays,
    }


def relative_scale(tps_dose: np.ndarray, on_tps: np.ndarray, tps_units: str, notes: list[str]) -> float | None:
    """The factor that brings the delivered dose (resampled on the TPS grid) to the TPS mean over
    the TPS >= 90 % region, for a comparison of shape when a dose is RELATIVE (never a PASS);
    None when the delivered dose is zero there. Says so in `notes`."""
    region = tps_dose >= NORMALISATION_REGION_PERCENT / 100 * float(tps_dose.max())
    delivered_mean = float(on_tps[region].mean())
    if not delivered_mean > 0:
        return None
    scale = float(tps_dose[region].mean()) / delivered_mean
    notes.append(
        f"RELATIVE comparison ({'TPS' if tps_units == 'RELATIVE' else 'delivered'} dose not in Gy): the delivered "
        f"dose was scaled by {scale:.4g} to the TPS mean over the TPS >= {NORMALISATION_REGION_PERCENT:g} % region "
        "to compare shapes; absolute dose and uniform MU errors are not assessed by the dose line"
    )
    return scale


def scale_not_verified(tps_units: str, delivered_units: str, dose_scale: dict[str, Any]) -> str | None:
    """Why the comparison cannot show that the delivered dose is right in Gy, or None."""
    if delivered_units == "RELATIVE":
        why = str(dose_scale.get("reason") or "no calibration").removeprefix("dose scale not verified: ")
        return f"dose scale not verified: our dose is RELATIVE ({why})"
    if tps_units == "RELATIVE":
        return "dose scale not verified: the TPS dose is RELATIVE (export it in Gy)"
    if dose_scale.get("state") != "current":
        return str(dose_scale.get("reason") or "dose scale not verified")
    return None


def dose_verdict(
    primary: GammaResult, secondary: GammaResult, mean_diff: float, limits: dict[str, Any]
) -> tuple[str, list[str]]:
    """TG-218-style verdict and the reasons behind it."""
    if primary.evaluated == 0:
        return "ERROR", ["no TPS point above the low-dose cutoff"]
    rate, rate2 = primary.pass_rate, secondary.pass_rate
    fails, reviews = [], []
    if rate < limits["fail_below_percent"]:
        fails.append(f"{primary.criteria.label} pass rate {rate:.1f} % < {limits['fail_below_percent']:g} %")
    elif rate < limits["pass_from_percent"]:
        reviews.append(f"{primary.criteria.label} pass rate {rate:.1f} % < {limits['pass_from_percent']:g} %")
    if rate2 < limits["secondary_review_below_percent"]:
        reviews.append(
            f"{secondary.criteria.label} pass rate {rate2:.1f} % < {limits['secondary_review_below_percent']:g} %"
        )
    if abs(mean_diff) > limits["mean_difference_fail_percent"]:
        fails.append(f"mean dose difference {mean_diff:+.2f} % beyond {limits['mean_difference_fail_percent']:g} %")
    elif abs(mean_diff) > limits["mean_difference_review_percent"]:
        reviews.append(f"mean dose difference {mean_diff:+.2f} % beyond {limits['mean_difference_review_percent']:g} %")
    if fails:
        return "FAIL", fails + reviews
    if reviews:
        return "REVIEW", reviews
    return "PASS", [f"{primary.criteria.label} pass rate {rate:.1f} %, mean dose difference {mean_diff:+.2f} %"]


def error(reason: str, kind: str = "ERROR") -> dict[str, Any]:
    return {"verdict": kind, "reasons": [reason]}
