"""What an RT Dose says about itself: the frame of reference it lies in and which delivery it holds.

Both are decisions a TPS or review station acts on, so they follow DICOM PS3.3 to the letter;
docs/rtdose-frames.md explains them for a reader of our RT Doses.

Frame of reference (PS3.3 C.7.4.1 Frame of Reference Module). A dose in the default "beam" frame
is placed in a water phantom facing the beam (gantry and couch not applied, see
`geometry.beam_axes`): its coordinates are NOT the patient's, so it must not carry the plan's
FrameOfReferenceUID (a viewer would overlay it on the patient CT, mirrored or in the wrong plane
for any gantry other than 0). It gets a frame of its own, derived deterministically
(`phantom_frame_uid`) from the plan's SOP Instance UID and the beam's gantry, couch and isocentre
(part of what `beam_geometry.plan_sum_refusal` compares): a rerun gives the same frame, beams that
may be summed share one frame with their plan sum, and beams of different gantry, couch or
isocentre get different ones. Its PositionReferenceIndicator (an annotation only, PS3.3 C.7.4.1.1.2) is
"PHANTOM". A dose in the "patient" frame (gantry, couch and patient position applied) keeps the
plan's FrameOfReferenceUID and PositionReferenceIndicator.

Dose summation (PS3.3 C.8.8.3 RT Dose Module, DoseSummationType and the Type 1C Referenced RT
Plan / Fraction Group / Beam Sequences). What we compute is the delivery of ONE session (one
fraction), never the course, so:
- the dose of one beam is BEAM_SESSION ("a single session of one or more Beams within RT Plan"):
  ReferencedFractionGroupSequence (one item: the fraction group that references the beam) with
  ReferencedBeamSequence (the beam);
- the plan sum is FRACTION_SESSION ("a single session of a single Fraction Group") when its beams
  are exactly the treatment beams of one fraction group: one fraction group item, no
  ReferencedBeamSequence (required only for BEAM, BEAM_SESSION and CONTROL_POINT); when they are
  a part of one group it is BEAM_SESSION listing them; beams of different fraction groups are not
  one session and are not summed (`fraction_group_refusal`).
A plan with one fraction group delivers all its beams in that group, whatever beam numbers the
group's ReferencedBeamSequence lists (the clinic's RayStation export in tests/data/reference lists
1, 6, 7, 8, 9 for beams 1 to 5; `plan.plan_problems` tolerates it with a warning). A plan without
the (optional) RT Fraction Scheme Module has no fraction group to name: its doses reference
fraction group 1, the plan's single implicit group. With several groups, a beam must be named by
one of them (the first that names it is referenced).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, generate_uid

from mqi_communicator.errors import InputError
from mqi_communicator.formats.plan import RT_ION_PLAN_SOP_CLASS

PHANTOM = "PHANTOM"
BEAM_SESSION = "BEAM_SESSION"
FRACTION_SESSION = "FRACTION_SESSION"
IMPLICIT_FRACTION_GROUP = 1
# Changing this text changes every phantom frame UID: keep it as long as the frame's definition holds.
_PHANTOM_FRAME_ENTROPY = "mqi_communicator beam-frame water phantom v1"


def _fixed(value: float) -> str:
    """A number as the UID entropy sees it: to 0.001, no -0 (so 0 and -0.0001 agree)."""
    return f"{round(float(value), 3) + 0.0:.3f}"


def phantom_frame_uid(plan_sop_uid: str, gantry: float, couch: float, isocentre: Sequence[float]) -> UID:
    """The FrameOfReferenceUID of the beam-frame phantom of a beam geometry of one plan.

    Deterministic (pydicom `generate_uid` hashes the entropy sources): the same plan and geometry
    give the same UID on every run and machine, and no other plan or geometry gives it."""
    return generate_uid(
        entropy_srcs=[
            _PHANTOM_FRAME_ENTROPY,
            str(plan_sop_uid),
            f"gantry {_fixed(float(gantry) % 360.0)}",
            f"couch {_fixed(float(couch) % 360.0)}",
            "isocentre " + " ".join(_fixed(v) for v in isocentre),
        ]
    )


@dataclass(frozen=True)
class FrameOfReference:
    """The Frame of Reference Module of an RT Dose."""

    uid: str
    position_reference_indicator: str
    phantom: bool


def frame_of_reference(
    frame: str, plan_ds: Dataset, gantry: float, couch: float, isocentre: Sequence[float]
) -> FrameOfReference:
    """The frame of an RT Dose placed in `frame` ("beam": a phantom of its own; "patient": the
    plan's). Raises ValueError for a patient-frame dose of a plan without a frame."""
    if frame == "beam":
        return FrameOfReference(phantom_frame_uid(plan_ds.SOPInstanceUID, gantry, couch, isocentre), PHANTOM, True)
    uid = str(plan_ds.get("FrameOfReferenceUID") or "")
    if not uid:
        raise InputError("plan has no FrameOfReferenceUID; the dose cannot be placed in the patient frame")
    return FrameOfReference(uid, str(plan_ds.get("PositionReferenceIndicator") or ""), False)


@dataclass(frozen=True)
class Summation:
    """DoseSummationType and what it references: one fraction group and (BEAM_SESSION) beams."""

    type: str
    fraction_group: int
    beams: tuple[int, ...]


def _fraction_groups(plan_ds: Dataset) -> list[tuple[int, set[int]]]:
    """(FractionGroupNumber, beam numbers delivered in it) of each fraction group, in plan order;
    a single group holds every beam of the plan (see the module's docstring)."""
    groups = [
        (
            int(group.FractionGroupNumber),
            {int(ref.ReferencedBeamNumber) for ref in group.get("ReferencedBeamSequence", [])},
        )
        for group in plan_ds.get("FractionGroupSequence", [])
    ]
    if len(groups) == 1:
        number, referenced = groups[0]
        return [(number, referenced | {int(b.BeamNumber) for b in plan_ds.get("IonBeamSequence", [])})]
    return groups


def fraction_group_refusal(plan_ds: Dataset, beam_numbers: Collection[int]) -> str | None:
    """Why `beam_numbers` are not one session of one fraction group (so no plan sum), or None."""
    groups = _fraction_groups(plan_ds)
    if not groups or any(set(beam_numbers) <= beams for _, beams in groups):
        return None
    listed = "; ".join(f"group {number}: beams {sorted(beams)}" for number, beams in groups)
    return (
        f"beams {sorted(beam_numbers)} are not all in one fraction group ({listed}): one session delivers "
        "one fraction group, so their doses are not summed"
    )


def summation_for(
    plan_ds: Dataset, beam_numbers: Sequence[int], *, plan_sum: bool, treatment_beams: Collection[int]
) -> Summation:
    """The summation of the dose of `beam_numbers` delivered in one session: one beam's dose
    (`plan_sum` False) or the plan sum of the treatment beams given. Raises ValueError when the
    beams are in no single fraction group of the plan."""
    if not plan_sum and len(beam_numbers) != 1:
        raise InputError(f"the dose of one beam references one beam, not {list(beam_numbers)}")
    wanted = set(beam_numbers)
    groups = _fraction_groups(plan_ds)
    if not groups:
        return Summation(BEAM_SESSION, IMPLICIT_FRACTION_GROUP, tuple(beam_numbers))
    holding = [(number, beams) for number, beams in groups if wanted <= beams]
    if not holding:
        if plan_sum:
            raise InputError(str(fraction_group_refusal(plan_ds, wanted)))
        raise InputError(f"beam {beam_numbers[0]} is referenced by no fraction group of the plan")
    number, beams = holding[0]
    if plan_sum and beams & set(treatment_beams) == wanted:
        return Summation(FRACTION_SESSION, number, ())
    return Summation(BEAM_SESSION, number, tuple(beam_numbers))


def referenced_rt_plan(plan_ds: Dataset, summation: Summation) -> DicomSequence:
    """ReferencedRTPlanSequence for `summation` (PS3.3 C.8.8.3: one plan, one fraction group;
    ReferencedBeamSequence only where the summation type requires it)."""
    fraction_ref = Dataset()
    fraction_ref.ReferencedFractionGroupNumber = summation.fraction_group
    if summation.type == BEAM_SESSION:
        beam_refs = []
        for number in summation.beams:
            beam_ref = Dataset()
            beam_ref.ReferencedBeamNumber = number
            beam_refs.append(beam_ref)
        fraction_ref.ReferencedBeamSequence = DicomSequence(beam_refs)
    ref = Dataset()
    ref.ReferencedSOPClassUID = RT_ION_PLAN_SOP_CLASS
    ref.ReferencedSOPInstanceUID = plan_ds.SOPInstanceUID
    ref.ReferencedFractionGroupSequence = DicomSequence([fraction_ref])
    return DicomSequence([ref])
