"""Beam geometry as other systems write it (issue 19, item 3): the first control point's geometry
values (casegen writes them through `first_control_point_geometry`) and shapes made by rewriting
a plan written by casegen.write_plan / write_case with pydicom and saving it in place.

PS3.3 C.8.8.25: GantryAngle and PatientSupportAngle are Type 1C, the table-top angles and
positions, IsocenterPosition and SnoutPosition Type 2C, all "required for the first control point,
or if they change"; ARIA and RayStation write them in the first control point only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset

from mqi_communicator.formats.plan_check import is_setup_beam

if TYPE_CHECKING:
    from tests.casegen import CaseSpec

# The ARIA three-field shape: each field's couch angle, in its first control point only.
ARIA_COUCH_ANGLES = (30.0, 0.0, 330.0)


def first_control_point_geometry(cp: Dataset, gantry: float, iso: Sequence[float]) -> None:
    """The geometry of a first control point as the clinic's RayStation plan writes it
    (tests/data/reference/RP_G2_9spots_phantom.dcm): angles 0 but the gantry, no rotation,
    table-top positions present and empty (Type 2C: unknown), the snout at 465 mm."""
    cp.GantryAngle = gantry
    cp.GantryRotationDirection = "NONE"
    cp.PatientSupportAngle = 0.0
    cp.PatientSupportRotationDirection = "NONE"
    cp.TableTopPitchAngle = 0.0
    cp.TableTopPitchRotationDirection = "NONE"
    cp.TableTopRollAngle = 0.0
    cp.TableTopRollRotationDirection = "NONE"
    cp.TableTopVerticalPosition = None
    cp.TableTopLongitudinalPosition = None
    cp.TableTopLateralPosition = None
    cp.IsocenterPosition = list(iso)
    cp.SnoutPosition = 465.0


def aria_three_fields(patient_id: str = "ARIA3") -> CaseSpec:
    """A setup beam and three treatment fields (gantry 90, 0, 270) of two layers each; write it
    with casegen.write_case, then `couch_angles(plan, ARIA_COUCH_ANGLES)`."""
    from tests import casegen  # here, not above: casegen imports this module

    spots = [casegen.grid_spots(10.0, 10.0)] * 2
    return casegen.CaseSpec(
        patient_id=patient_id,
        room="G2",
        beams=[
            casegen.BeamSpec(1, "SETUP", [], [], setup=True),
            casegen.BeamSpec(2, "F1", [150.0, 145.0], spots, gantry_angle=90.0),
            casegen.BeamSpec(3, "F2", [150.0, 145.0], spots, gantry_angle=0.0),
            casegen.BeamSpec(4, "F3", [150.0, 145.0], spots, gantry_angle=270.0),
        ],
    )


def _treatment_beams(ds: Dataset) -> list[Dataset]:
    return [b for b in ds.IonBeamSequence if not is_setup_beam(b)]


def couch_angles(path: Path, angles: Sequence[float]) -> None:
    """The ARIA three-field shape: the treatment beams' couch angles (e.g. 30, 0, 330), each
    written in its first control point only."""
    ds = pydicom.dcmread(path)
    beams = _treatment_beams(ds)
    assert len(beams) == len(angles), f"{len(beams)} treatment beams for {len(angles)} couch angles"
    for beam, angle in zip(beams, angles, strict=True):
        beam.IonControlPointSequence[0].PatientSupportAngle = angle
    ds.save_as(path)


def change_at(path: Path, beam_number: int, control_point: int, keyword: str, value: object) -> None:
    """A geometry value written again, changed, at one later control point of a beam (e.g. the
    isocentre moving at control point 4)."""
    ds = pydicom.dcmread(path)
    beam = next(b for b in ds.IonBeamSequence if int(b.BeamNumber) == beam_number)
    setattr(beam.IonControlPointSequence[control_point], keyword, value)
    ds.save_as(path)


def without_first_cp_value(path: Path, beam_number: int, keyword: str) -> None:
    """A first control point that lacks `keyword` (a plan not conformant to PS3.3 C.8.8.25)."""
    ds = pydicom.dcmread(path)
    beam = next(b for b in ds.IonBeamSequence if int(b.BeamNumber) == beam_number)
    delattr(beam.IonControlPointSequence[0], keyword)
    ds.save_as(path)


def without_patient_setup(path: Path) -> None:
    """No PatientSetupSequence and no beam referencing one (the Patient Setup module left out)."""
    ds = pydicom.dcmread(path)
    if "PatientSetupSequence" in ds:
        del ds.PatientSetupSequence
    for beam in ds.IonBeamSequence:
        if "ReferencedPatientSetupNumber" in beam:
            del beam.ReferencedPatientSetupNumber
    ds.save_as(path)


def patient_position(path: Path, position: str) -> None:
    """The plan's patient setup in another position (e.g. FFS), the beams referencing it."""
    ds = pydicom.dcmread(path)
    ds.PatientSetupSequence[0].PatientPosition = position
    ds.save_as(path)
