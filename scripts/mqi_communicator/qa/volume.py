"""The dose line in 3-D: the delivered dose volume of a beam against the TPS dose volume.

Where both the TPS RT Dose and ours are volumes (axial multi-frame RT Doses, e.g.
`simulation.dose_type: 3d`), the whole volume is assessed with 3-D gamma (qa/gamma_3d.py), not
one plane: a plane at 2 cm lies in the entrance plateau and misses a distal-layer error
(docs/gamma.md). The TPS volume is the reference; the delivered volume is interpolated
(trilinearly) where gamma and the mean dose difference need it. Criteria, the RELATIVE scaling
and the thresholds are the plane's (qa/verdict.py), and the result has the same shape, with
`evaluation` saying which evaluation was done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy.interpolate import RegularGridInterpolator

from mqi_communicator.errors import InputError
from mqi_communicator.formats.rtdose_read import read_rtdose_dose
from mqi_communicator.qa.gamma_3d import gamma_3d
from mqi_communicator.qa.tps_dose import Plane, TpsDoseProblem, check_frame, check_header
from mqi_communicator.qa.verdict import GAMMA_CRITERIA, criteria_from, dose_result, error, scaled_to_tps


@dataclass
class Volume:
    """A dose volume: dose[z, y, x] at z_mm, y_mm, x_mm (patient mm, ascending), in `units`,
    per fraction."""

    dose: np.ndarray
    z_mm: np.ndarray
    y_mm: np.ndarray
    x_mm: np.ndarray
    units: str
    notes: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.z_mm, self.y_mm, self.x_mm


def is_volume(path: Path) -> bool:
    """Whether an RT Dose holds a volume (several frames), from its header only."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.get("NumberOfFrames") or 1) > 1


def _ascending(values: np.ndarray, axis: int, dose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if values.size > 1 and values[1] < values[0]:
        return values[::-1].copy(), np.flip(dose, axis=axis)
    return values, dose


def load_volume(path: Path, factor: float = 1.0, notes: list[str] | None = None) -> Volume:
    """An axial RT Dose volume (frames along z, rows along y, columns along x), times `factor`;
    a plane or another orientation is a ValueError naming the file."""
    try:
        image = read_rtdose_dose(path)
    except (ValueError, AttributeError, KeyError) as exc:
        raise InputError(f"{path.name}: cannot read the dose grid ({exc})") from exc
    if image.dose.shape[0] < 2 or image.axes != "xyz":
        raise InputError(
            f"{path.name}: not an axial dose volume ({image.dose.shape[0]} frame(s) along patient "
            f"{image.axes[2]}); 3-D gamma needs frames along z, rows along y, columns along x"
        )
    zs, dose = _ascending(image.frame_mm, 0, image.dose)
    ys, dose = _ascending(image.row_mm, 1, dose)
    xs, dose = _ascending(image.col_mm, 2, dose)
    return Volume(np.ascontiguousarray(dose) * factor, zs, ys, xs, image.units, list(notes or []), str(path))


def load_tps_volume(path: Path, qa: dict[str, Any], fractions: int | None, plan_frame_uid: str) -> Volume:
    """The TPS volume of one beam as physical dose per fraction (the frame and header checks of a
    TPS plane, qa/tps_dose.py: a volume in the plan's own frame is a patient dose); raises
    TpsDoseProblem."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    check_frame(ds, path, plan_frame_uid)
    factor, notes = check_header(ds, path, float(qa["rbe"]), str(qa["tps_dose_per"]), fractions)
    try:
        volume = load_volume(path, factor, notes)
    except ValueError as exc:
        raise TpsDoseProblem("ERROR", str(exc)) from exc
    volume.units = str(ds.DoseUnits)
    if float(volume.dose.max(initial=0.0)) <= 0.0:
        raise TpsDoseProblem("ERROR", f"{path.name}: the TPS volume is empty (no dose above zero)")
    return volume


def load_delivered_volume(path: Path) -> Volume:
    """The pipeline's RT Dose volume of one beam; raises TpsDoseProblem (an ERROR) when it is
    not an axial volume."""
    try:
        return load_volume(path)
    except ValueError as exc:
        raise TpsDoseProblem("ERROR", f"delivered dose {exc}") from exc


def resample(volume: Volume, axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """`volume` trilinearly at the grid `axes` (z, y, x; NaN outside it)."""
    interp = RegularGridInterpolator(volume.axes, volume.dose, bounds_error=False, fill_value=np.nan)
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return interp(np.stack([zz, yy, xx], axis=-1))


def coverage_problem(tps: Volume, delivered: Volume, cutoff_percent: float) -> str | None:
    """Why the TPS grid does not cover our dose above the cutoff, or None (qa/verdict.py)."""
    above = delivered.dose >= cutoff_percent / 100 * float(delivered.dose.max(initial=0.0))
    if not above.any():
        return None
    for name, index, ours, theirs in zip("zyx", range(3), delivered.axes, tps.axes, strict=True):
        used = ours[np.flatnonzero(np.moveaxis(above, index, 0).any(axis=(1, 2)))]
        half = abs(float(theirs[1] - theirs[0])) / 2 if theirs.size > 1 else 0.5
        low, high = float(theirs.min()) - half, float(theirs.max()) + half
        if used.min() < low or used.max() > high:
            return (
                f"the TPS grid ({name} {low:g}..{high:g} mm) does not cover our dose above the cutoff "
                f"({name} {used.min():g}..{used.max():g} mm)"
            )
    return None


def compare_volume(tps: Volume, delivered: Volume, qa: dict[str, Any], dose_scale: dict[str, Any]) -> dict[str, Any]:
    """3-D gamma, mean dose difference and the dose verdict of one beam (TPS = reference);
    `dose_scale` as for the plane (qa/verdict.py): no PASS without a verified dose scale."""
    problem = coverage_problem(tps, delivered, float(qa["gamma"]["cutoff_percent"]))
    if problem:
        return error(problem)
    on_tps = resample(delivered, tps.axes)
    scaled = scaled_to_tps(tps, delivered, on_tps, qa, "volume")
    if isinstance(scaled, str):
        return error(scaled)
    evaluated = delivered.dose * scaled.scale
    primary, secondary = (
        gamma_3d(tps.axes, tps.dose, delivered.axes, evaluated, criteria_from(qa, which)) for which in GAMMA_CRITERIA
    )
    arrays = _figure_arrays(tps, on_tps * scaled.scale, primary.gamma, scaled.relative, scaled.scale)
    return dose_result(
        (primary, secondary),
        scaled,
        qa,
        dose_scale=dose_scale,
        evaluation=f"3-D gamma over the volume ({primary.evaluated} voxels above the cutoff)",
        arrays=arrays,
        points="voxels (3-D)",
        shown=[f"shown: {arrays['plane']}"],
    )


def _figure_arrays(
    tps: Volume, delivered_on_tps: np.ndarray, gamma: np.ndarray, relative: bool, scale: float
) -> dict[str, Any]:
    """The coronal plane (x, z) of the volume for the beam figure: the one with the most voxels
    failing the primary gamma (through the TPS maximum when none fails), and which one it is."""
    failing = np.nansum(gamma > 1.0, axis=(0, 2))
    row = (
        int(np.argmax(failing)) if failing.max() > 0 else int(np.unravel_index(np.argmax(tps.dose), tps.dose.shape)[1])
    )
    why = "most voxels failing" if failing.max() > 0 else "through the TPS maximum"
    plane = Plane(
        tps.dose[:, row, :],
        tps.z_mm,
        tps.x_mm,
        "xz",
        tps.units,
        [f"coronal plane y = {tps.y_mm[row]:g} mm of the volume ({why})"],
        tps.source,
    )
    return {
        "gamma": gamma[:, row, :],
        "tps": plane,
        "delivered_on_tps": delivered_on_tps[:, row, :],
        "units": f"{tps.units}; delivered scaled x{scale:.4g}" if relative else tps.units,
        "plane": plane.notes[0],
    }
