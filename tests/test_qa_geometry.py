"""Geometry of the RT Dose: the beam frame (QA comparison) and the patient frame (gantry applied),
proven with asymmetric doses against a reference built here from first principles (IEC 61217
gantry rotation written out by hand, patient coordinates of each pixel computed from the raw
DICOM attributes); a left/right or up/down flip must fail. Plus the plan-sum rule and the
RT Dose series attributes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_communicator.errors import CaseError
from mqi_communicator.formats import raw_dose, rtdose_read
from mqi_communicator.rtdose import dose_frame
from mqi_communicator.rtdose import writer as rtdose
from tests import casegen

ISO = (12.0, 30.0, -7.0)  # off-centre on purpose: a sign error in any axis moves the spots
GRID = raw_dose.PLANE_2CM
VOLUME = raw_dose.Grid(nx=40, ny=30, nz=20, spacing_mm=(2.0, 2.0, 2.0), first_centre_mm=(-39.0, -29.0, 1.0))
# Asymmetric raw dose: hot spots at MOQUI (x, y) = (+60, 0) and (0, +30) (and depth 21 mm in 3-D).
SPOTS = ((60.0, 0.0), (0.0, 30.0))


def plan(tmp_path: Path, gantry: float, couch: float = 0.0, second_gantry: float | None = None) -> Path:
    beams = [casegen.BeamSpec(1, "B1", [150.0], [[(0.0, 0.0)]], gantry_angle=gantry)]
    if second_gantry is not None:
        beams.append(casegen.BeamSpec(2, "B2", [150.0], [[(0.0, 0.0)]], gantry_angle=second_gantry))
    path = tmp_path / f"RP_{gantry:g}_{couch:g}_{second_gantry}.dcm"
    casegen.write_plan(path, casegen.CaseSpec(patient_id="GEO", room="G2", beams=beams, isocenter_mm=ISO))
    if couch:
        ds = pydicom.dcmread(path)
        ds.IonBeamSequence[0].IonControlPointSequence[0].PatientSupportAngle = couch
        ds.save_as(path)
    return path


def raw_plane() -> np.ndarray:
    dose = np.zeros(GRID.shape)
    xs, ys = GRID.centres("x"), GRID.centres("y")
    for value, (x, y) in zip((1.0, 0.5), SPOTS, strict=True):
        dose[0, int(np.argmin(np.abs(ys - y))), int(np.argmin(np.abs(xs - x)))] = value
    return dose


def expected_patient_point(gantry: float, x: float, y: float, depth_from_iso: float) -> np.ndarray:
    """IEC 61217, HFS, couch 0: the source sits at iso + SAD (sin g, -cos g, 0) in DICOM patient
    coordinates (+x left, +y posterior, +z head), gantry X = (cos g, sin g, 0), Y = +z."""
    g = np.deg2rad(gantry)
    source_direction = np.array([np.sin(g), -np.cos(g), 0.0])
    gantry_x = np.array([np.cos(g), np.sin(g), 0.0])
    return np.asarray(ISO) + x * gantry_x + y * np.array([0.0, 0.0, 1.0]) - depth_from_iso * source_direction


def pixel_positions(ds: pydicom.Dataset) -> np.ndarray:
    """Patient coordinates of every pixel (frame, row, col, 3) from IPP/IOP/PixelSpacing/offsets."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    along_row, along_col = iop[:3], iop[3:]  # column index direction, row index direction
    normal = np.cross(along_row, along_col)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    offsets = np.array([float(v) for v in ds.GridFrameOffsetVector] if "GridFrameOffsetVector" in ds else [0.0])
    f, r, c = np.meshgrid(offsets, np.arange(ds.Rows) * dr, np.arange(ds.Columns) * dc, indexing="ij")
    return ipp + f[..., None] * normal + r[..., None] * along_col + c[..., None] * along_row


def hot_points(ds: pydicom.Dataset) -> list[np.ndarray]:
    pixels = ds.pixel_array.reshape(int(ds.get("NumberOfFrames", 1)), ds.Rows, ds.Columns)
    positions = pixel_positions(ds)
    order = np.argsort(pixels.ravel())[::-1][:2]
    return [positions.reshape(-1, 3)[k] for k in order]  # hottest first


@pytest.mark.parametrize("gantry", [0.0, 90.0, 180.0, 270.0])
def test_patient_frame_places_an_asymmetric_plane_as_the_gantry_turns_it(tmp_path: Path, gantry: float) -> None:
    out = rtdose.write_rtdose(
        raw_plane(),
        GRID,
        plan(tmp_path, gantry),
        tmp_path / "RD.dcm",
        beam_number=1,
        engine_label="t",
        calibrated=False,
        frame="patient",
    )
    found = hot_points(pydicom.dcmread(out))
    for point, (x, y) in zip(found, SPOTS, strict=True):
        expected = expected_patient_point(gantry, x, y, 0.0)
        np.testing.assert_allclose(point, expected, atol=0.51)
        # A left/right or up/down flip of the reference does not match: the test can fail.
        assert np.linalg.norm(point - expected_patient_point(gantry, -x, y, 0.0)) > 5 or x == 0
        assert np.linalg.norm(point - expected_patient_point(gantry, x, -y, 0.0)) > 5 or y == 0


@pytest.mark.parametrize("gantry", [0.0, 90.0, 180.0, 270.0])
def test_patient_frame_places_an_asymmetric_volume(tmp_path: Path, gantry: float) -> None:
    dose = np.zeros(VOLUME.shape)
    xs, ys, ds_ = VOLUME.centres("x"), VOLUME.centres("y"), VOLUME.centres("z")
    k = int(np.argmin(np.abs(ds_ - 25.0)))  # depth 25 mm: 5 mm beyond the isocentre
    dose[k, int(np.argmin(np.abs(ys - 9.0))), int(np.argmin(np.abs(xs - 21.0)))] = 1.0
    out = rtdose.write_rtdose(
        dose,
        VOLUME,
        plan(tmp_path, gantry),
        tmp_path / "RD.dcm",
        beam_number=1,
        engine_label="t",
        calibrated=False,
        frame="patient",
    )
    ds = pydicom.dcmread(out)
    point = hot_points(ds)[0]
    np.testing.assert_allclose(point, expected_patient_point(gantry, 21.0, 9.0, ds_[k] - 20.0), atol=1e-6)
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert len(offsets) == VOLUME.ny and offsets[0] == 0 and np.all(np.diff(offsets) > 0)
    # the package's own reader agrees with this independent placement
    image = rtdose_read.read_rtdose_dose(out)
    f, r, c = np.unravel_index(np.argmax(image.dose), image.dose.shape)
    coords = {image.axes[0]: image.col_mm[c], image.axes[1]: image.row_mm[r], image.axes[2]: image.frame_mm[f]}
    np.testing.assert_allclose([coords["x"], coords["y"], coords["z"]], point, atol=1e-6)


@pytest.mark.parametrize("gantry", [0.0, 180.0, 90.0])
def test_beam_frame_is_the_tps_qa_plane_whatever_the_gantry(tmp_path: Path, gantry: float) -> None:
    out = rtdose.write_rtdose(
        raw_plane(),
        GRID,
        plan(tmp_path, gantry),
        tmp_path / "RD.dcm",
        beam_number=1,
        engine_label="t",
        calibrated=False,
    )
    ds = pydicom.dcmread(out)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, 1]
    for point, (x, y) in zip(hot_points(ds), SPOTS, strict=True):
        np.testing.assert_allclose(point, expected_patient_point(0.0, x, y, 0.0), atol=0.51)
    assert f"gantry {gantry:g} deg and couch 0 deg are not applied" in ds.ImageComments


@pytest.mark.parametrize(
    ("gantry", "couch", "message"),
    [(45.0, 0.0, "gantry angle 45 deg is not handled"), (0.0, 10.0, "couch angle 10 deg is not handled")],
)
def test_patient_frame_refuses_what_it_does_not_handle(
    tmp_path: Path, gantry: float, couch: float, message: str
) -> None:
    with pytest.raises(CaseError, match=message):
        rtdose.write_rtdose(
            raw_plane(),
            GRID,
            plan(tmp_path, gantry, couch),
            tmp_path / "RD.dcm",
            beam_number=1,
            engine_label="t",
            calibrated=False,
            frame="patient",
        )


def test_plan_sum_only_where_beams_share_one_geometry(tmp_path: Path) -> None:
    same = plan(tmp_path, 90.0, second_gantry=90.0)
    assert dose_frame.plan_sum_refusal_for(same) is None
    out = rtdose.write_rtdose(raw_plane(), GRID, same, tmp_path, beam_number=None, engine_label="t", calibrated=False)
    assert pydicom.dcmread(out).DoseSummationType == "FRACTION_SESSION"
    different = plan(tmp_path, 0.0, second_gantry=90.0)
    assert "do not share one geometry" in str(dose_frame.plan_sum_refusal_for(different))
    with pytest.raises(CaseError, match="no plan sum: beam 1 \\('B1'\\) \\(gantry 0"):
        rtdose.write_rtdose(
            raw_plane(), GRID, different, tmp_path / "x", beam_number=None, engine_label="t", calibrated=False
        )


def test_series_number_is_set_and_description_is_cut_at_a_word(tmp_path: Path) -> None:
    label = "built-in analytical pencil beam (not Monte Carlo), RELATIVE and uncalibrated"
    out = rtdose.write_rtdose(
        raw_plane(), GRID, plan(tmp_path, 0.0), tmp_path / "RD.dcm", beam_number=1, engine_label=label, calibrated=False
    )
    ds = pydicom.dcmread(out)
    assert ds.SeriesNumber == 1
    text = str(ds.SeriesDescription)
    assert len(text) <= 64 and text.endswith("...")
    assert (text[:-3] + " ") in f"PHANTOM beam 1 B1: {label} "  # ends on a whole word
    assert ds.ManufacturerModelName == label[:64] or len(label) > 64
