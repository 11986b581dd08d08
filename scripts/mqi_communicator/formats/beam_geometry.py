"""A treatment beam's geometry read as the plan writes it, control point by control point.

PS3.3 C.8.8.25 (Ion Control Point Sequence): the first control point carries GantryAngle and
PatientSupportAngle (Type 1C), TableTopPitchAngle, TableTopRollAngle, the table-top vertical,
longitudinal and lateral positions, IsocenterPosition and SnoutPosition (Type 2C: present, empty
when unknown); a later control point carries one of them only when it changes, so an absent value
is the previous one. The patient position is the PatientPosition of the beam's patient setup
(C.8.8.12, PatientSetupSequence, referenced by the beam's ReferencedPatientSetupNumber).

Nothing is filled in: an absent or empty value stays None, and every such gap, a value that changes
within the beam or a beam without its patient setup is said in `statements`
(docs/plan-geometry.md). The beam-frame phantom QA needs none of it but the first control point's
isocentre; what a patient-frame RT Dose cannot honour is `patient_frame_refusal`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from mqi_communicator.errors import InputError

# (keyword, record key, PS3.3 type in the first control point, number of values)
FIELDS = (
    ("GantryAngle", "gantry_angle_deg", "1C", 1),
    ("PatientSupportAngle", "patient_support_angle_deg", "1C", 1),
    ("TableTopPitchAngle", "table_top_pitch_angle_deg", "2C", 1),
    ("TableTopRollAngle", "table_top_roll_angle_deg", "2C", 1),
    ("TableTopVerticalPosition", "table_top_vertical_position_mm", "2C", 1),
    ("TableTopLongitudinalPosition", "table_top_longitudinal_position_mm", "2C", 1),
    ("TableTopLateralPosition", "table_top_lateral_position_mm", "2C", 1),
    ("IsocenterPosition", "isocenter_position_mm", "2C", 3),
    ("SnoutPosition", "snout_position_mm", "2C", 1),
)
# What a patient-frame dose is placed with, so may not change within a beam.
_PLACEMENT = ("GantryAngle", "PatientSupportAngle", "TableTopPitchAngle", "TableTopRollAngle", "IsocenterPosition")
_TOLERANCE = 1e-6  # degrees and mm: values are compared as written, not rounded

Value = float | tuple[float, ...] | None


@dataclass(frozen=True)
class Change:
    """A geometry value that a later control point changes."""

    keyword: str
    control_point: int  # ControlPointIndex of the control point that changes it
    before: Value
    after: Value

    def as_record(self) -> dict[str, Any]:
        return {
            "keyword": self.keyword,
            "control_point": self.control_point,
            "from": _json(self.before),
            "to": _json(self.after),
        }


@dataclass
class BeamGeometry:
    number: int
    name: str
    first: dict[str, Value]  # keyword -> the first control point's value (None: absent or empty)
    absent: list[str]  # keywords the first control point does not carry at all
    changes: list[Change]
    patient_setup_number: int | None
    patient_position: str | None
    # Every absent value, change within the beam or missing patient setup, in words (an empty
    # Type 2C value is conformant, "unknown", and shows as None only).
    statements: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"beam {self.number} ({self.name!r})"

    @property
    def gantry(self) -> float | None:
        return _scalar(self.first["GantryAngle"])

    @property
    def couch(self) -> float | None:
        return _scalar(self.first["PatientSupportAngle"])

    def missing_required(self) -> list[str]:
        """The Type 1C values the first control point lacks (or leaves empty): a plan error."""
        return [k for k, _, kind, _ in FIELDS if kind == "1C" and self.first[k] is None]

    def patient_frame_refusal(self) -> str | None:
        """Why this beam cannot be placed in the patient frame, or None: only couch 0, table-top
        pitch and roll 0, HFS and one placement (and snout) for the whole beam are honoured. The
        caller names the beam."""
        reasons = [] if self.gantry is not None else ["gantry angle (GantryAngle) not given"]
        for keyword, what in (("PatientSupportAngle", "couch"), ("TableTopPitchAngle", "table-top pitch"),
                              ("TableTopRollAngle", "table-top roll")):  # fmt: skip
            value = _scalar(self.first[keyword])
            if value is None:
                reasons.append(f"{what} angle ({keyword}) not given")
            elif abs(_signed_angle(value)) > _TOLERANCE:
                reasons.append(f"{what} angle {value:g} deg is not handled in the patient frame (only 0)")
        if self.patient_position is None:
            reasons.append("patient position not given (no patient setup with a PatientPosition)")
        elif self.patient_position != "HFS":
            reasons.append(f"patient position {self.patient_position!r} is not handled in the patient frame (only HFS)")
        reasons += [
            f"{c.keyword} changes within the beam at control point {c.control_point} "
            f"({shown(c.before)} -> {shown(c.after)})"
            for c in self.changes
            if c.keyword in _PLACEMENT or c.keyword == "SnoutPosition"
        ]
        return "; ".join(reasons) + "; use the beam frame" if reasons else None

    def as_record(self) -> dict[str, Any]:
        """The geometry as written, for intake.json and qa.json (docs/plan-geometry.md)."""
        record: dict[str, Any] = {key: _json(self.first[k]) for k, key, _, _ in FIELDS}
        record |= {
            "patient_setup_number": self.patient_setup_number,
            "patient_position": self.patient_position,
            "absent_in_first_control_point": list(self.absent),
            "changes": [c.as_record() for c in self.changes],
            "statements": list(self.statements),
        }
        return record


def _scalar(value: Value) -> float | None:
    return value if isinstance(value, float) else None


def _signed_angle(value: float) -> float:
    """An angle in (-180, 180]: 359.9999999 is as near 0 as 0.0000001."""
    return (value + 180.0) % 360.0 - 180.0


def _json(value: Value) -> float | list[float] | None:
    return list(value) if isinstance(value, tuple) else value


def shown(value: Value) -> str:
    """A value for a message: 'not given' when absent or empty."""
    return "not given" if value is None else (f"{list(value)}" if isinstance(value, tuple) else f"{value:g}")


def _value(cp: Dataset, keyword: str, count: int) -> Value:
    """The value as written; None when empty. A value of the wrong multiplicity is a ValueError."""
    raw = cp[keyword].value
    if raw is None or raw == "" or (isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) == 0):
        return None
    values = [float(v) for v in raw] if isinstance(raw, Sequence) and not isinstance(raw, str) else [float(raw)]
    if len(values) != count:
        raise InputError(f"{keyword} has {len(values)} values, PS3.6 gives it {count}")
    return tuple(values) if count > 1 else values[0]


def _differs(a: Value, b: Value) -> bool:
    if a is None or b is None:
        return (a is None) != (b is None)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return any(abs(x - y) > _TOLERANCE for x, y in zip(a, b, strict=True))
    assert isinstance(a, float) and isinstance(b, float)
    return abs(a - b) > _TOLERANCE


def _patient_setup(plan_ds: Dataset, beam: Dataset, label: str) -> tuple[int | None, str | None, list[str]]:
    """(setup number, PatientPosition, statements) of the beam's patient setup: the one its
    ReferencedPatientSetupNumber names, else the plan's only one (said), else none (said)."""
    setups = {
        int(s.PatientSetupNumber): s for s in plan_ds.get("PatientSetupSequence", []) if "PatientSetupNumber" in s
    }
    statements = []
    reference = beam.get("ReferencedPatientSetupNumber")
    if reference is not None and str(reference) != "":
        number = int(reference)
        if number not in setups:
            return None, None, [f"{label}: ReferencedPatientSetupNumber {number} names no item of PatientSetupSequence"]
    elif len(setups) == 1:
        number = next(iter(setups))
        statements.append(
            f"{label}: no ReferencedPatientSetupNumber; the plan's only patient setup ({number}) is taken"
        )
    else:
        what = "no PatientSetupSequence" if not setups else f"{len(setups)} patient setups"
        return (
            None,
            None,
            [f"{label}: no ReferencedPatientSetupNumber and the plan has {what}: patient position unknown"],
        )
    position = str(setups[number].get("PatientPosition") or "") or None
    if position is None:
        statements.append(f"{label}: patient setup {number} gives no PatientPosition: patient position unknown")
    return number, position, statements


def read(plan_ds: Dataset, beam_number: int) -> BeamGeometry:
    """The geometry of beam `beam_number` as the plan writes it (ValueError: no such beam, or a
    value of the wrong multiplicity, named)."""
    beam = next((b for b in plan_ds.get("IonBeamSequence", []) if int(b.BeamNumber) == beam_number), None)
    if beam is None:
        raise InputError(f"no beam number {beam_number} in the plan")
    label = f"beam {beam_number} ({str(beam.get('BeamName', ''))!r})"
    cps = list(beam.get("IonControlPointSequence", []))
    first_cp = cps[0] if cps else Dataset()
    first: dict[str, Value] = {}
    absent: list[str] = []
    statements: list[str] = []
    try:
        for keyword, _, kind, count in FIELDS:
            if keyword not in first_cp:
                absent.append(keyword)
                first[keyword] = None
                statements.append(
                    f"{label}: {keyword} (Type {kind}) is absent from the first control point"
                    + (" (PS3.3 requires it there)" if kind == "1C" else " (PS3.3 requires it there, empty if unknown)")
                )
                continue
            first[keyword] = _value(first_cp, keyword, count)  # empty (unknown): None, conformant for 2C
        changes = []
        current = dict(first)
        for order, cp in enumerate(cps[1:], start=1):
            index = int(cp.get("ControlPointIndex", order))
            for keyword, _, _, count in FIELDS:
                if keyword in cp:
                    value = _value(cp, keyword, count)
                    if _differs(current[keyword], value):
                        changes.append(Change(keyword, index, current[keyword], value))
                        statements.append(
                            f"{label}: {keyword} changes at control point {index} "
                            f"({shown(current[keyword])} -> {shown(value)})"
                        )
                    current[keyword] = value
    except (ValueError, TypeError) as exc:
        raise InputError(f"{label}: {exc}") from exc
    setup_number, position, setup_statements = _patient_setup(plan_ds, beam, label)
    return BeamGeometry(
        number=beam_number,
        name=str(beam.get("BeamName", "")),
        first=first,
        absent=absent,
        changes=changes,
        patient_setup_number=setup_number,
        patient_position=position,
        statements=statements + setup_statements,
    )


def plan_sum_refusal(beams: Sequence[BeamGeometry]) -> str | None:
    """Why the beams may not be summed into one plan dose, or None when they share one geometry:
    the same gantry, couch, table-top pitch and roll angle, isocentre and patient position, none
    of them changing within a beam."""
    if not beams:
        return "no beams to sum"
    for beam in beams:
        moving = [c for c in beam.changes if c.keyword in _PLACEMENT]
        if moving:
            return f"{beam.label}: its {moving[0].keyword} changes at control point {moving[0].control_point}"
    first = beams[0]
    for other in beams[1:]:
        if other.patient_position != first.patient_position or any(
            _differs(first.first[k], other.first[k]) for k in _PLACEMENT
        ):
            return (
                f"{first.label} ({describe(first)}) and {other.label} ({describe(other)}) do not share one "
                "geometry: their doses lie in different beam frames and are not summed"
            )
    return None


def describe(beam: BeamGeometry) -> str:
    """The placement in a few words: gantry, couch, pitch, roll, isocentre, patient position."""
    return (
        f"gantry {shown(beam.first['GantryAngle'])}, couch {shown(beam.first['PatientSupportAngle'])}, "
        f"pitch {shown(beam.first['TableTopPitchAngle'])}, roll {shown(beam.first['TableTopRollAngle'])}, "
        f"isocentre {shown(beam.first['IsocenterPosition'])}, position {beam.patient_position or 'not given'}"
    )
