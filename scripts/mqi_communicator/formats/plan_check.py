"""The RT Ion Plan's self-check against cut and damaged files, judged by what PS3.3 requires.

PS3.3 C.8.8.13 (RT Fraction Scheme): each fraction group's NumberOfBeams is the number of beams
in *that* fraction group and its ReferencedBeamSequence lists them; fraction groups reference the
beams delivered, so a setup beam may or may not be referenced (Eclipse, RayStation and MOSAIQ
leave it out, our samples keep it in). BeamMeterset (300A,0086, in ReferencedBeamSequence) is
Type 3: it may be absent, and then the beam's MU are unknown (docs/plan-support.md).

What a file cut short shows, and this catches: a fraction group referencing a beam that
IonBeamSequence no longer holds (the beams come after the fraction groups in the file), and a
beam whose control points or spots fall short of what it declares.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

# SHI line-scanning private tags mirroring ScanSpotPositionMap / ScanSpotMetersetWeights.
PRIVATE_SPOT_POSITIONS = (0x300B, 0x1094)
PRIVATE_SPOT_WEIGHTS = (0x300B, 0x1096)


@dataclass
class PlanCheck:
    errors: list[str] = field(default_factory=list)
    # Valid PS3.3 that this pipeline refuses by name (not a damaged file).
    unsupported: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Treatment beams whose meterset weights are taken as MU although no fraction group gives
    # their BeamMeterset: only the numbering mismatch seen in the clinic's phantom export.
    weights_as_mu: set[int] = field(default_factory=set)


def count(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def is_setup_beam(beam: Dataset) -> bool:
    return (
        str(beam.get("BeamName", "")).strip().upper() == "SETUP"
        or str(beam.get("BeamDescription", "")).strip() == "Site Setup"
        or str(beam.get("TreatmentDeliveryType", "")).strip().upper() == "SETUP"
    )


def beam_references(ds: Dataset, beam_number: int) -> list[tuple[int | None, Dataset]]:
    """(FractionGroupNumber, ReferencedBeamSequence item) of every fraction group that references the beam."""
    return [
        (count(group.get("FractionGroupNumber")), ref)
        for group in ds.get("FractionGroupSequence") or []
        for ref in group.get("ReferencedBeamSequence") or []
        if count(ref.get("ReferencedBeamNumber")) == beam_number
    ]


def beam_meterset(ds: Dataset, beam_number: int) -> float | None:
    """The beam's BeamMeterset (MU) from the fraction group that references it; None when no
    group gives one. Several groups giving different values are refused by `plan_problems`."""
    values = [
        float(ref.BeamMeterset) for _, ref in beam_references(ds, beam_number) if ref.get("BeamMeterset") is not None
    ]
    return values[0] if values else None


def float32_array(element: object) -> np.ndarray:
    """Decode a private float32 array that pydicom may hand over as raw UN bytes."""
    value = getattr(element, "value", element)
    if isinstance(value, bytes | bytearray):
        return np.frombuffer(bytes(value), dtype="<f4").astype(np.float64)
    return np.asarray(value if isinstance(value, list | tuple) else [value], dtype=np.float64)


def _float32_count(element: object) -> float:
    """How many float32 values an element holds; fractional for raw bytes cut mid-value."""
    value = getattr(element, "value", element)
    if isinstance(value, bytes | bytearray):
        return len(value) / 4
    if value is None or value == "":  # an element cut to zero length
        return 0.0
    return float(float32_array(value).size)


def _number(value: object) -> float | None:
    """A DS value as a float; None when absent or empty (a value cut short reads as '')."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _spot_kinds(cp: Dataset) -> set[str]:
    """Which spot arrays a control point holds: 'standard', 'private' (either tag of the pair)."""
    kinds = set()
    if "ScanSpotPositionMap" in cp or "ScanSpotMetersetWeights" in cp:
        kinds.add("standard")
    if PRIVATE_SPOT_POSITIONS in cp or PRIVATE_SPOT_WEIGHTS in cp:
        kinds.add("private")
    return kinds


def _spot_arrays_problem(cp: Dataset) -> str | None:
    """How a control point's spot arrays (standard and SHI private, each as a pair) fall short of
    its NumberOfScanSpotPositions: a file cut inside its last control point loses exactly these."""
    spots = count(cp.get("NumberOfScanSpotPositions"))
    pairs = (
        ("ScanSpotPositionMap", "ScanSpotMetersetWeights", "standard"),
        (PRIVATE_SPOT_POSITIONS, PRIVATE_SPOT_WEIGHTS, "private"),
    )
    for positions_tag, weights_tag, kind in pairs:
        present = [tag in cp for tag in (positions_tag, weights_tag)]
        if any(present) and not all(present):
            return f"{kind} spot positions and weights: one without the other"
        if not all(present) or spots is None:
            continue
        positions, weights = _float32_count(cp[positions_tag]), _float32_count(cp[weights_tag])
        if (positions, weights) != (2 * spots, spots):
            return (
                f"NumberOfScanSpotPositions is {spots} but it holds {kind} arrays of {positions:g} coordinates "
                f"and {weights:g} weights"
            )
    return None


def _beam_problems(beam: Dataset, warnings: list[str]) -> list[str]:
    """What a treatment beam's own declarations say is missing from it (a declaration that is
    itself absent cannot be checked: a warning)."""
    problems: list[str] = []
    label = f"beam {beam.get('BeamNumber')} ({beam.get('BeamName', '')!r})"
    cps = list(beam.get("IonControlPointSequence", []))
    declared = count(beam.get("NumberOfControlPoints"))
    # PS3.3 C.8.8.25: IonControlPointSequence is Type 1; a treatment beam without it is one
    # the file was cut inside. (NumberOfControlPoints, Type 1 too, is missing from hand-made
    # test plans: a warning, as before; the control points themselves are checked below.)
    if "IonControlPointSequence" not in beam:
        problems.append(f"{label}: no IonControlPointSequence")
    if declared is None:
        warnings.append(f"{label}: no NumberOfControlPoints to check the control points against")
    elif declared != len(cps):
        problems.append(f"{label}: NumberOfControlPoints is {declared} but the beam holds {len(cps)} control points")
    final = _number(beam.get("FinalCumulativeMetersetWeight"))
    weights = [_number(cp.get("CumulativeMetersetWeight")) for cp in cps]
    if final is None:
        warnings.append(f"{label}: no FinalCumulativeMetersetWeight to check the meterset against")
    elif not cps or weights[-1] is None:
        problems.append(f"{label}: the last control point has no CumulativeMetersetWeight")
    elif abs(float(weights[-1]) - float(final)) > 1e-6 * max(1.0, abs(float(final))):
        problems.append(
            f"{label}: cumulative meterset weight ends at {float(weights[-1]):g}, "
            f"not at FinalCumulativeMetersetWeight {float(final):g}"
        )
    known = [float(w) for w in weights if w is not None]
    if any(b < a for a, b in itertools.pairwise(known)):
        problems.append(f"{label}: CumulativeMetersetWeight decreases between control points")
    # PS3.3 C.8.8.25: spot positions and weights are required in every control point of a
    # MODULATED beam; the SHI private mirror, where a beam has it, is in every one too.
    kinds = {kind for cp in cps for kind in _spot_kinds(cp)}
    if str(beam.get("ScanMode", "")).upper() in ("MODULATED", "MODULATED_SPEC") and not kinds:
        problems.append(f"{label}: a MODULATED beam without spot positions and weights")
    for cp in cps:
        problem = _spot_arrays_problem(cp) or (
            f"no {' or '.join(sorted(kinds - _spot_kinds(cp)))} spot arrays, which the beam's other control points hold"
            if kinds - _spot_kinds(cp)
            else None
        )
        if problem:
            problems.append(f"{label}, control point {cp.get('ControlPointIndex')}: {problem}")
    return problems


def _group_problems(ds: Dataset, check: PlanCheck) -> None:
    """Each fraction group against its own NumberOfBeams; a beam in several fraction groups with
    different BeamMeterset is refused by name (never group 1 taken silently), with the same
    BeamMeterset it is read with a warning naming the group its fractions come from."""
    groups = list(ds.get("FractionGroupSequence") or [])
    if not groups:
        check.warnings.append("no FractionGroupSequence: the beams' MU (BeamMeterset) are unknown")
    for group in groups:
        label = f"fraction group {group.get('FractionGroupNumber')}"
        refs = list(group.get("ReferencedBeamSequence") or [])
        declared = count(group.get("NumberOfBeams"))
        if declared is None:
            check.warnings.append(f"{label}: no NumberOfBeams to check ReferencedBeamSequence against")
        elif declared != len(refs):
            check.errors.append(
                f"{label}: NumberOfBeams is {declared} but ReferencedBeamSequence lists {len(refs)} beams"
            )
    for number in sorted({n for b in ds.get("IonBeamSequence") or [] if (n := count(b.get("BeamNumber"))) is not None}):
        refs = beam_references(ds, number)
        if len(refs) < 2:
            continue
        metersets = [
            f"{float(ref.BeamMeterset):g} MU" if "BeamMeterset" in ref else "no BeamMeterset" for _, ref in refs
        ]
        given = ", ".join(f"{mu} in fraction group {group}" for (group, _), mu in zip(refs, metersets, strict=True))
        if len(set(metersets)) > 1:
            check.unsupported.append(
                f"beam {number} is in several fraction groups with different BeamMeterset ({given}): not supported, "
                "which group's MU a delivery had would be a guess"
            )
        else:
            # Same MU: the beam is read alike; what differs per group is said, not guessed silently.
            check.warnings.append(
                f"beam {number} is in several fraction groups ({given}): its NumberOfFractionsPlanned and BeamDose "
                f"are those of fraction group {refs[0][0]}, the first naming it (docs/rtdose-frames.md does the same)"
            )


def plan_problems(ds: Dataset) -> PlanCheck:
    """The plan checked against its own declarations (errors: a cut or damaged file), what it
    uses that is not supported, and warnings."""
    check = PlanCheck()
    beams = list(ds.get("IonBeamSequence") or [])
    numbers = {count(b.get("BeamNumber")) for b in beams}
    treatment = [b for b in beams if not is_setup_beam(b)]
    _group_problems(ds, check)
    referenced = {
        count(ref.get("ReferencedBeamNumber"))
        for group in ds.get("FractionGroupSequence") or []
        for ref in group.get("ReferencedBeamSequence") or []
    }
    unknown = sorted(n for n in referenced if n is not None and n not in numbers)
    unreferenced = sorted(n for b in treatment if (n := count(b.get("BeamNumber"))) not in referenced and n is not None)
    if unknown and len(unknown) == len(unreferenced):
        # Seen in a real export (the clinic's phantom plan: references 1, 6, 7, 8, 9 for beams 1
        # to 5): as many orphan references as unreferenced beams is a numbering slip, not a loss.
        check.weights_as_mu.update(unreferenced)
        check.warnings.append(
            f"the fraction group references beam number(s) {unknown} that are not in IonBeamSequence, and "
            f"beam(s) {unreferenced} are not referenced; those beams' MU come from their meterset weights"
        )
    elif unknown:
        check.errors.append(
            f"the fraction group references beam(s) {unknown} that are not in IonBeamSequence "
            f"(it holds beams {sorted(n for n in numbers if n is not None)})"
        )
    elif unreferenced:
        check.warnings.append(
            f"treatment beam(s) {unreferenced} are in no fraction group: their MU (BeamMeterset) are unknown"
        )
    if str(ds.get("RTPlanGeometry", "")).upper() == "PATIENT" and not ds.get("ReferencedStructureSetSequence"):
        # PS3.3 C.8.8.1: Type 1C, required when RTPlanGeometry is PATIENT. The plan's last element:
        # a file cut just before it parses whole, and this is how it shows (docs/plan-support.md).
        check.errors.append("RTPlanGeometry is PATIENT but the plan has no ReferencedStructureSetSequence (Type 1C)")
    for beam in treatment:
        check.unsupported.extend(_scan_mode_problems(beam))
        check.errors.extend(_beam_problems(beam, check.warnings))
    return check


# PS3.3 C.8.8.25 ScanMode (300A,0308) of a beam this pipeline computes: spots (MODULATED,
# MODULATED_SPEC) or the SHI line scanning (LINE), each read from the spot arrays.
SPOT_SCAN_MODES = ("MODULATED", "MODULATED_SPEC", "LINE")
OTHER_SCAN_MODES = {
    "NONE": "no beam scanning (a passively scattered beam)",
    "UNIFORM": "a beam scanned to a uniform lateral fluence (wobbling), without spots",
}


def _scan_mode_problems(beam: Dataset) -> list[str]:
    """A treatment beam that is not spot or line scanned: its control points hold no spots, and
    a dose computed from none would be no dose (docs/real-plans.md). An absent ScanMode is read
    as MODULATED, as before (hand-made test plans lack it)."""
    mode = str(beam.get("ScanMode", "") or "").strip().upper()
    if not mode or mode in SPOT_SCAN_MODES:
        return []
    what = OTHER_SCAN_MODES.get(mode, "a scan mode this pipeline does not know")
    return [
        f"beam {beam.get('BeamNumber')} ({beam.get('BeamName', '')!r}): ScanMode {mode}, {what}: only spot "
        "scanning (MODULATED) and line scanning (LINE) are computed"
    ]
