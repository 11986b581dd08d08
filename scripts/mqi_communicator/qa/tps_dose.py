"""TPS dose intake: find the TPS RT Dose of each beam, check it, and take the plane to compare.

Where: every DICOM file (*.dcm or no suffix) with Modality RTDOSE in the case folder (any depth), or in the folder
`qa.tps_dose_directory` names (with a `{case_id}` placeholder). Our own output (Manufacturer
mqi_communicator) is never taken for the TPS dose.

Matching: the RT Dose must reference the plan (ReferencedRTPlanSequence SOP Instance UID) and
the beam (ReferencedBeamNumber, DoseSummationType BEAM); a PLAN dose is used only when the plan
has a single treatment beam. Checks (each failure is a `TpsDoseProblem` with its reason, which
the verdict turns into ERROR or NOT ASSESSED, never PASS): DoseUnits GY or RELATIVE; DoseType
PHYSICAL, or EFFECTIVE divided by the configured RBE; summation BEAM or PLAN; a dose for all
fractions divided by the plan's NumberOfFractionsPlanned (`qa.tps_dose_per: plan`).

The plane: a single-frame RT Dose is the plane as exported (rows, columns in its own patient
axes). From a volume (axial frames), the coronal plane at `qa.plane_depth_mm` below the phantom
surface (the isocentre's y minus 20 mm, the MOQUI phantom's convention, so 20 mm is the plane
through the isocentre) is interpolated linearly between the two neighbouring rows; outside the
grid is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from .. import geometry
from ..rtdose import MANUFACTURER
from ..rtdose_read import read_rtdose_dose

PHYSICAL, EFFECTIVE = "PHYSICAL", "EFFECTIVE"


class TpsDoseProblem(Exception):
    """Why a beam cannot be assessed: `kind` is "NOT ASSESSED" (nothing to compare) or "ERROR"."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(reason)


@dataclass
class Plane:
    """A dose plane: dose[row, col] at row_mm x col_mm (ascending), in `units`, per fraction."""

    dose: np.ndarray
    row_mm: np.ndarray
    col_mm: np.ndarray
    axes: str  # patient axes along columns then rows, e.g. "xz"
    units: str
    notes: list[str] = field(default_factory=list)
    source: str = ""


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, AttributeError, ValueError):
        return None


def find_tps_doses(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Every TPS RT Dose below `folder` (by Modality, not by name); our own doses are skipped."""
    found = []
    files = (
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", "") and not p.name.startswith(".")
    )
    for path in sorted(files):
        ds = _header(path)
        if ds is None or ds.get("Modality") != "RTDOSE" or ds.get("Manufacturer") == MANUFACTURER:
            continue
        found.append((path, ds))
    return found


def _plan_uid(ds: pydicom.Dataset) -> str | None:
    refs = ds.get("ReferencedRTPlanSequence") or []
    return str(refs[0].ReferencedSOPInstanceUID) if refs else None


def _beam_numbers(ds: pydicom.Dataset) -> list[int]:
    numbers = []
    for ref in ds.get("ReferencedRTPlanSequence") or []:
        for group in ref.get("ReferencedFractionGroupSequence") or []:
            numbers += [int(b.ReferencedBeamNumber) for b in group.get("ReferencedBeamSequence") or []]
    return numbers


def match(
    candidates: list[tuple[Path, pydicom.Dataset]], plan_uid: str, beam_number: int, treatment_beams: int
) -> Path:
    """The TPS RT Dose of one beam; raises TpsDoseProblem saying what was found instead."""
    if not candidates:
        raise TpsDoseProblem("NOT ASSESSED", "no TPS RT Dose in the case (nothing to compare with)")
    of_plan = [(p, ds) for p, ds in candidates if _plan_uid(ds) == plan_uid]
    if not of_plan:
        others = ", ".join(f"{p.name} -> {_plan_uid(ds)}" for p, ds in candidates)
        raise TpsDoseProblem("ERROR", f"no TPS RT Dose references plan {plan_uid} (found {others})")
    beams = [(p, ds) for p, ds in of_plan if ds.get("DoseSummationType") == "BEAM" and beam_number in _beam_numbers(ds)]
    if len(beams) > 1:
        names = ", ".join(p.name for p, _ in beams)
        raise TpsDoseProblem("ERROR", f"{len(beams)} TPS RT Doses for beam {beam_number} ({names}); expected one")
    if beams:
        return beams[0][0]
    plans = [p for p, ds in of_plan if ds.get("DoseSummationType") == "PLAN"]
    if plans and treatment_beams == 1:
        return plans[0]
    found = "; ".join(f"{p.name}: {ds.get('DoseSummationType')} beams {_beam_numbers(ds) or '-'}" for p, ds in of_plan)
    raise TpsDoseProblem("ERROR", f"no TPS RT Dose for beam {beam_number} of the plan (found {found})")


def check_header(
    ds: pydicom.Dataset, path: Path, rbe: float, per: str, fractions: int | None
) -> tuple[float, list[str]]:
    """The factor that turns the file's dose into physical dose per fraction, and notes."""
    notes = []
    units = ds.get("DoseUnits")
    if units not in ("GY", "RELATIVE"):
        raise TpsDoseProblem("ERROR", f"{path.name}: DoseUnits {units!r}; expected GY or RELATIVE")
    summation = ds.get("DoseSummationType")
    if summation not in ("BEAM", "PLAN"):
        raise TpsDoseProblem("ERROR", f"{path.name}: DoseSummationType {summation!r}; expected BEAM (or PLAN)")
    dose_type = ds.get("DoseType")
    factor = 1.0
    if dose_type == EFFECTIVE:
        factor /= rbe
        notes.append(f"TPS dose is EFFECTIVE (RBE-weighted); divided by RBE {rbe:g} to compare with physical dose")
    elif dose_type != PHYSICAL:
        raise TpsDoseProblem("ERROR", f"{path.name}: DoseType {dose_type!r}; expected PHYSICAL or EFFECTIVE")
    if per == "plan" and units == "GY":
        if not fractions or fractions < 1:
            raise TpsDoseProblem(
                "ERROR", f"{path.name}: dose is for the whole plan but the plan has no NumberOfFractionsPlanned"
            )
        factor /= fractions
        if fractions > 1:
            notes.append(f"TPS dose is for {fractions} fractions; divided by {fractions} (one delivery)")
    return factor, notes


def _ascending(values: np.ndarray, axis: int, dose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if values.size > 1 and values[1] < values[0]:
        return values[::-1].copy(), np.flip(dose, axis=axis)
    return values, dose


def plane_from(path: Path, iso_y_mm: float, depth_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The coronal plane (dose, row_mm, col_mm, axes) of an RT Dose plane or axial volume."""
    try:
        image = read_rtdose_dose(path)
    except (ValueError, AttributeError, KeyError) as exc:
        raise TpsDoseProblem("ERROR", f"{path.name}: cannot read the dose grid ({exc})") from exc
    if image.dose.shape[0] == 1:
        dose = image.dose[0]
        rows, dose = _ascending(image.row_mm, 0, dose)
        cols, dose = _ascending(image.col_mm, 1, dose)
        return dose, rows, cols, image.axes[:2]
    if image.axes != "xyz":
        raise TpsDoseProblem("ERROR", f"{path.name}: a volume must be axial (frames along z), not {image.axes}")
    y = iso_y_mm - geometry.PLANE_DEPTH_MM + depth_mm
    ys, volume = _ascending(image.row_mm, 1, image.dose)
    if not ys[0] <= y <= ys[-1]:
        raise TpsDoseProblem(
            "ERROR",
            f"{path.name}: the plane at y = {y:g} mm (depth {depth_mm:g} mm) is outside the dose grid ({ys[0]:g}..{ys[-1]:g} mm)",
        )
    k = min(int(np.searchsorted(ys, y, side="right")) - 1, ys.size - 2)
    w = (y - ys[k]) / (ys[k + 1] - ys[k])
    plane = volume[:, k, :] * (1 - w) + volume[:, k + 1, :] * w  # (frames = z, columns = x)
    zs, plane = _ascending(image.frame_mm, 0, plane)
    cols, plane = _ascending(image.col_mm, 1, plane)
    return plane, zs, cols, "xz"


def load_tps_plane(path: Path, iso_y_mm: float, qa: dict[str, Any], fractions: int | None) -> Plane:
    """The TPS plane of one beam, as physical dose per fraction; raises TpsDoseProblem."""
    ds = _header(path)
    if ds is None:
        raise TpsDoseProblem("ERROR", f"{path.name}: not a readable DICOM file")
    factor, notes = check_header(ds, path, float(qa["rbe"]), str(qa["tps_dose_per"]), fractions)
    dose, rows, cols, axes = plane_from(path, iso_y_mm, float(qa["plane_depth_mm"]))
    if not np.all(np.isfinite(dose)) or float(dose.max(initial=0.0)) <= 0.0:
        raise TpsDoseProblem("ERROR", f"{path.name}: the TPS plane is empty (no dose above zero)")
    return Plane(dose * factor, rows, cols, axes, str(ds.DoseUnits), notes, str(path))


def load_delivered_plane(path: Path) -> Plane:
    """The pipeline's RT Dose of one beam as a plane (a volume: its plane through the isocentre)."""
    image = read_rtdose_dose(path)
    if image.dose.shape[0] == 1:
        return Plane(image.dose[0], image.row_mm, image.col_mm, image.axes[:2], image.units, [], str(path))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    iso_y = float(ds.ImagePositionPatient[1]) - 1.0 + geometry.PLANE_DEPTH_MM  # first row centre is 1 mm deep
    dose, rows, cols, axes = plane_from(path, iso_y, geometry.PLANE_DEPTH_MM)
    return Plane(dose, rows, cols, axes, image.units, [], str(path))
