"""TPS dose intake: find the TPS RT Dose of each beam, check it, and take the plane to compare.

Where: every DICOM file (*.dcm or no suffix) with Modality RTDOSE in the case folder (any depth), or in the folder
`qa.tps_dose_directory` names (with a `{case_id}` placeholder). Our own output (Manufacturer
mqi_communicator) is never taken for the TPS dose.

A file that is DICOM (Part 10: "DICM" after its preamble) but cannot be read, e.g. a deflated one
(PS3.5 A.5) cut short, is kept as a candidate without a header: where no readable RT Dose is the
beam's, the beam is an ERROR naming that file, not a quiet "no TPS RT Dose" (docs/encodings.md).

Matching: the RT Dose must reference the plan (ReferencedRTPlanSequence SOP Instance UID) and
exactly one beam (ReferencedBeamNumber, DoseSummationType BEAM); a PLAN dose is used only when the
plan has a single treatment beam. Checks (each failure is a `TpsDoseProblem` with its reason, which
the verdict turns into ERROR or NOT ASSESSED, never PASS): DoseUnits GY or RELATIVE; DoseType
PHYSICAL, or EFFECTIVE divided by the configured RBE; summation BEAM or PLAN (a dose for all
fractions, divided by the plan's NumberOfFractionsPlanned when `qa.tps_dose_per: plan`), or their
one-session forms BEAM_SESSION / FRACTION_SESSION (PS3.3 C.8.8.3.4: one fraction, never divided).

Geometry (docs/qa.md, "The TPS dose the clinic exports"): the TPS dose must be the beam's dose on
the water phantom, in a frame of reference of its own. A dose in the plan's own frame of
reference is a dose on the patient's images (the RT Dose most often found next to a plan): it is
refused, never cut and compared with a water plane. The plane's position along its normal is
kept (`Plane.position_mm`) so the verdict can prove it lies where ours does.

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

from mqi_communicator.errors import InputError, MqiError
from mqi_communicator.formats import raw_dose
from mqi_communicator.formats.plan import READ_ERRORS
from mqi_communicator.formats.rtdose_read import read_rtdose_dose
from mqi_communicator.rtdose.writer import MANUFACTURER

PHYSICAL, EFFECTIVE = "PHYSICAL", "EFFECTIVE"
# DoseSummationType of one beam's dose, and of all the beams of a fraction group (PS3.3 C.8.8.3.4).
BEAM_SUMMATIONS = ("BEAM", "BEAM_SESSION")
PLAN_SUMMATIONS = ("PLAN", "FRACTION_SESSION")
SESSION_SUMMATIONS = ("BEAM_SESSION", "FRACTION_SESSION")


class TpsDoseProblem(MqiError):
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
    position_mm: float | None = None  # where the plane lies along its normal (the third axis)


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (*READ_ERRORS, AttributeError) as exc:
        raise InputError(f"cannot read DICOM (cut short or damaged?): {exc}") from exc


def _header(path: Path) -> pydicom.Dataset | None:
    try:
        return _read_header(path)
    except ValueError:
        return None


def _is_part10(path: Path) -> bool:
    """A DICOM Part 10 file: "DICM" after the 128-byte preamble (PS3.10 7.1)."""
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def find_tps_doses(folder: Path) -> list[tuple[Path, pydicom.Dataset | None]]:
    """Every TPS RT Dose below `folder` (by Modality, not by name); our own doses are skipped.
    A DICOM file that cannot be read comes with None for its header (`match` names it)."""
    found: list[tuple[Path, pydicom.Dataset | None]] = []
    files = (
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", "") and not p.name.startswith(".")
    )
    for path in sorted(files):
        ds = _header(path)
        if ds is None:
            if _is_part10(path):
                found.append((path, None))
            continue
        if ds.get("Modality") != "RTDOSE" or ds.get("Manufacturer") == MANUFACTURER:
            continue
        found.append((path, ds))
    return found


def _unreadable(unreadable: list[Path]) -> str:
    """Why each DICOM file that could not be read was not read."""
    reasons = []
    for path in unreadable:
        try:
            _read_header(path)
        except ValueError as exc:
            reasons.append(f"{path.name}: {exc}")
    return "; ".join(reasons)


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
    found: list[tuple[Path, pydicom.Dataset | None]], plan_uid: str, beam_number: int, treatment_beams: int
) -> Path:
    """The TPS RT Dose of one beam; raises TpsDoseProblem saying what was found instead."""
    candidates = [(p, ds) for p, ds in found if ds is not None]
    unreadable = [p for p, ds in found if ds is None]
    try:
        return _match_readable(candidates, plan_uid, beam_number, treatment_beams)
    except TpsDoseProblem as problem:
        if unreadable:  # one of them may be the beam's: an ERROR naming them, not a quiet miss
            raise TpsDoseProblem(
                "ERROR", f"{problem.reason}; DICOM file(s) that cannot be read: {_unreadable(unreadable)}"
            ) from None
        raise


def _match_readable(
    candidates: list[tuple[Path, pydicom.Dataset]], plan_uid: str, beam_number: int, treatment_beams: int
) -> Path:
    if not candidates:
        raise TpsDoseProblem("NOT ASSESSED", "no TPS RT Dose in the case (nothing to compare with)")
    of_plan = [(p, ds) for p, ds in candidates if _plan_uid(ds) == plan_uid]
    if not of_plan:
        others = ", ".join(f"{p.name} -> {_plan_uid(ds)}" for p, ds in candidates)
        raise TpsDoseProblem("ERROR", f"no TPS RT Dose references plan {plan_uid} (found {others})")
    beams = [
        (p, ds)
        for p, ds in of_plan
        if ds.get("DoseSummationType") in BEAM_SUMMATIONS and beam_number in _beam_numbers(ds)
    ]
    several = [f"{p.name} (beams {_beam_numbers(ds)})" for p, ds in beams if len(set(_beam_numbers(ds))) > 1]
    if several:
        raise TpsDoseProblem("ERROR", f"a BEAM dose must reference one beam; {', '.join(several)} references several")
    if len(beams) > 1:
        names = ", ".join(p.name for p, _ in beams)
        raise TpsDoseProblem("ERROR", f"{len(beams)} TPS RT Doses for beam {beam_number} ({names}); expected one")
    if beams:
        return beams[0][0]
    plans = [p for p, ds in of_plan if ds.get("DoseSummationType") in PLAN_SUMMATIONS]
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
    if summation not in BEAM_SUMMATIONS + PLAN_SUMMATIONS:
        raise TpsDoseProblem(
            "ERROR",
            f"{path.name}: DoseSummationType {summation!r}; expected BEAM, BEAM_SESSION, PLAN or FRACTION_SESSION",
        )
    dose_type = ds.get("DoseType")
    factor = 1.0
    if dose_type == EFFECTIVE:
        factor /= rbe
        notes.append(f"TPS dose is EFFECTIVE (RBE-weighted); divided by RBE {rbe:g} to compare with physical dose")
    elif dose_type != PHYSICAL:
        raise TpsDoseProblem("ERROR", f"{path.name}: DoseType {dose_type!r}; expected PHYSICAL or EFFECTIVE")
    if per == "plan" and units == "GY" and summation not in SESSION_SUMMATIONS:
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


def check_frame(ds: pydicom.Dataset, path: Path, plan_frame_uid: str) -> None:
    """Refuse a TPS dose that is not on the water phantom: one without a frame of reference, or
    one in the plan's own frame (the patient's images: a patient dose, not a QA dose)."""
    frame = str(ds.get("FrameOfReferenceUID") or "")
    if not frame:
        raise TpsDoseProblem("ERROR", f"{path.name}: no FrameOfReferenceUID; its geometry cannot be proven")
    if frame == plan_frame_uid:
        shape = f"{int(ds.get('NumberOfFrames') or 1)} frame(s)"
        raise TpsDoseProblem(
            "ERROR",
            f"{path.name}: a dose on the patient's images (its FrameOfReferenceUID is the plan's, {shape}), not the "
            "beam's dose on the water phantom; export the verification dose on the phantom (docs/qa.md)",
        )


def plane_from(path: Path, iso_y_mm: float, depth_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, float]:
    """The coronal plane (dose, row_mm, col_mm, axes, position along the normal) of an RT Dose
    plane or axial volume."""
    try:
        image = read_rtdose_dose(path)
    except (ValueError, AttributeError, KeyError) as exc:
        raise TpsDoseProblem("ERROR", f"{path.name}: cannot read the dose grid ({exc})") from exc
    if image.dose.shape[0] == 1:
        dose = image.dose[0]
        rows, dose = _ascending(image.row_mm, 0, dose)
        cols, dose = _ascending(image.col_mm, 1, dose)
        return dose, rows, cols, image.axes[:2], float(image.frame_mm[0])
    if image.axes != "xyz":
        raise TpsDoseProblem("ERROR", f"{path.name}: a volume must be axial (frames along z), not {image.axes}")
    y = iso_y_mm - raw_dose.PLANE_DEPTH_MM + depth_mm
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
    return plane, zs, cols, "xz", y


def load_tps_plane(
    path: Path, iso_y_mm: float, qa: dict[str, Any], fractions: int | None, plan_frame_uid: str
) -> Plane:
    """The TPS plane of one beam, as physical dose per fraction; raises TpsDoseProblem."""
    ds = _header(path)
    if ds is None:
        raise TpsDoseProblem("ERROR", f"{path.name}: not a readable DICOM file")
    check_frame(ds, path, plan_frame_uid)
    factor, notes = check_header(ds, path, float(qa["rbe"]), str(qa["tps_dose_per"]), fractions)
    dose, rows, cols, axes, position = plane_from(path, iso_y_mm, float(qa["plane_depth_mm"]))
    if not np.all(np.isfinite(dose)) or float(dose.max(initial=0.0)) <= 0.0:
        raise TpsDoseProblem("ERROR", f"{path.name}: the TPS plane is empty (no dose above zero)")
    return Plane(dose * factor, rows, cols, axes, str(ds.DoseUnits), notes, str(path), position)


def load_delivered_plane(path: Path, depth_mm: float = raw_dose.PLANE_DEPTH_MM) -> Plane:
    """The pipeline's RT Dose of one beam as a plane (a volume: its plane `depth_mm` below the
    phantom surface, the depth the TPS plane is taken at)."""
    image = read_rtdose_dose(path)
    if image.dose.shape[0] == 1:
        position = float(image.frame_mm[0])
        return Plane(image.dose[0], image.row_mm, image.col_mm, image.axes[:2], image.units, [], str(path), position)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    iso_y = float(ds.ImagePositionPatient[1]) - 1.0 + raw_dose.PLANE_DEPTH_MM  # first row centre is 1 mm deep
    dose, rows, cols, axes, position = plane_from(path, iso_y, depth_mm)
    return Plane(dose, rows, cols, axes, image.units, [], str(path), position)


def beam_dose_check(
    tps: Plane, iso_mm: tuple[float, float, float], beam_dose_gy: float | None, fractions: int | None
) -> str | None:
    """Why the TPS dose per fraction cannot be the plan's (`BeamDose`, Gy per fraction at the
    beam's dose specification point), or None. The water plane is not the patient, so only a
    gross mismatch is an error (a factor of 3 either way): a whole-course dose taken for one
    fraction, or the reverse."""
    if not beam_dose_gy or beam_dose_gy <= 0 or tps.axes != "xz":
        return None
    cols, rows = tps.col_mm, tps.row_mm
    if not (cols[0] <= iso_mm[0] <= cols[-1] and rows[0] <= iso_mm[2] <= rows[-1]):
        return None
    at_iso = float(resample_at(tps, iso_mm[2], iso_mm[0]))
    ratio = at_iso / beam_dose_gy
    if 1 / 3 <= ratio <= 3:
        return None
    hint = ""
    if fractions and fractions > 1 and (abs(ratio / fractions - 1) < 0.5 or abs(ratio * fractions - 1) < 0.5):
        hint = f" (close to NumberOfFractionsPlanned {fractions}: is the TPS dose for the whole course, or qa.tps_dose_per wrong?)"
    return (
        f"fraction scaling: the TPS dose per fraction at the isocentre is {at_iso:.4g} Gy but the plan's BeamDose is "
        f"{beam_dose_gy:.4g} Gy per fraction (ratio {ratio:.3g}){hint}"
    )


def resample_at(plane: Plane, row: float, col: float) -> float:
    """The plane's dose at one point (bilinear)."""
    from scipy.interpolate import RegularGridInterpolator

    interp = RegularGridInterpolator((plane.row_mm, plane.col_mm), plane.dose, bounds_error=False, fill_value=np.nan)
    return float(interp([[row, col]])[0])
