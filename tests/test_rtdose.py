"""P3 (raw dose -> DICOM RT Dose): content, geometry, scaling and the CLI, on real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from mqi_communicator.formats import raw_dose, rtdose_read
from mqi_communicator.rtdose import writer as rtdose

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"  # in the repository: never skipped
REF_PLAN = REFERENCE / "RP_G2_9spots_phantom.dcm"
REF_RAW = REFERENCE / "1S070_2_Dose.raw"
needs_reference = pytest.mark.skipif(
    not (REF_PLAN.is_file() and REF_RAW.is_file()),
    reason=f"reference data (RP_G2_9spots_phantom.dcm, 1S070_2_Dose.raw) not found in {REFERENCE}",
)
RT_ION_PLAN = UID("1.2.840.10008.5.1.4.1.1.481.8")
PLANE = raw_dose.PLANE_2CM
VOLUME = raw_dose.PHANTOM_3D


def make_plan(
    path: Path,
    beams: list[tuple[int, str]] = [(1, "1G180:TX"), (2, "2G090")],  # noqa: B006 - read only
    iso: tuple[float, float, float] = (0.0, 30.0, 0.0),
) -> Path:
    """A small RT Ion Plan (one 100 MeV spot per beam) that plan.read_plan accepts."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_ION_PLAN
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = RT_ION_PLAN
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTPLAN"
    ds.PatientName = "PHANTOM^TEST"
    ds.PatientID = "QA-0001"
    ds.PatientBirthDate = "20000101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.ReferringPhysicianName = "DOC^REF"
    ds.AccessionNumber = "ACC42"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ion_beams = []
    for number, name in beams:
        cp0 = Dataset()
        cp0.ControlPointIndex = 0
        cp0.NominalBeamEnergy = 100
        cp0.CumulativeMetersetWeight = 0
        cp0.GantryAngle = 0
        cp0.IsocenterPosition = list(iso)
        cp0.ScanSpotPositionMap = [0.0, 0.0]
        cp0.ScanSpotMetersetWeights = 1.0
        cp1 = Dataset()
        cp1.ControlPointIndex = 1
        cp1.NominalBeamEnergy = 100
        cp1.CumulativeMetersetWeight = 1
        cp1.ScanSpotPositionMap = [0.0, 0.0]
        cp1.ScanSpotMetersetWeights = 0.0
        beam = Dataset()
        beam.BeamNumber = number
        beam.BeamName = name
        beam.TreatmentMachineName = "G2"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.FinalCumulativeMetersetWeight = 1
        beam.IonControlPointSequence = Sequence([cp0, cp1])
        ion_beams.append(beam)
    ds.IonBeamSequence = Sequence(ion_beams)
    group = Dataset()
    group.FractionGroupNumber = 1
    refs = []
    for number, _ in beams:
        ref = Dataset()
        ref.ReferencedBeamNumber = number
        ref.BeamMeterset = 1.0
        refs.append(ref)
    group.ReferencedBeamSequence = Sequence(refs)
    ds.FractionGroupSequence = Sequence([group])
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def plan_path(tmp_path: Path) -> Path:
    return make_plan(tmp_path / "RP_test.dcm")


def pixel_to_patient(ds: Dataset, frame: int | np.integer, row: int | np.integer, col: int | np.integer) -> np.ndarray:
    """Patient position of a pixel centre from the DICOM attributes alone (PS3.3 C.7.6.2.1.1)."""
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    offset = float(ds.GridFrameOffsetVector[frame]) if int(ds.get("NumberOfFrames", 1)) > 1 else 0.0
    return origin + col * col_spacing * row_dir + row * row_spacing * col_dir + offset * np.cross(row_dir, col_dir)


def stored_dose(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array, dtype=np.float64) * float(ds.DoseGridScaling)


# --- the real reference data --------------------------------------------------------------------


@needs_reference
def test_reference_plane_matches_raw_and_puts_spots_at_plus_minus_50_mm(tmp_path: Path) -> None:
    raw = raw_dose.read_raw(str(REF_RAW), PLANE)
    out = rtdose.write_rtdose(
        raw, PLANE, REF_PLAN, tmp_path, beam_number=1, engine_label="MOQUI Monte Carlo", calibrated=False
    )
    assert out == tmp_path / "RD_1S070.dcm"

    ds = pydicom.dcmread(out)
    validate_file_meta(ds.file_meta, enforce_standard=True)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == rtdose.RT_DOSE_SOP_CLASS == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    plan = pydicom.dcmread(REF_PLAN, stop_before_pixels=True)
    assert ds.Modality == "RTDOSE"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID"):
        assert ds[keyword].value == plan[keyword].value, keyword
    # The beam frame is a phantom, not the patient: a frame of its own (docs/rtdose-frames.md).
    assert ds.FrameOfReferenceUID != plan.FrameOfReferenceUID and ds.PositionReferenceIndicator == "PHANTOM"
    assert ds.SOPInstanceUID != plan.SOPInstanceUID and ds.SeriesInstanceUID != plan.SeriesInstanceUID
    ref = ds.ReferencedRTPlanSequence[0]
    assert ref.ReferencedSOPClassUID == RT_ION_PLAN
    assert ref.ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert ds.DoseSummationType == "BEAM_SESSION"  # one delivered session of one beam
    assert len(ref.ReferencedFractionGroupSequence) == 1
    assert ref.ReferencedFractionGroupSequence[0].ReferencedFractionGroupNumber == 1
    assert [b.ReferencedBeamNumber for b in ref.ReferencedFractionGroupSequence[0].ReferencedBeamSequence] == [1]
    assert (ds.DoseUnits, ds.DoseType) == ("RELATIVE", "PHYSICAL")
    assert "MOQUI Monte Carlo" in ds.SeriesDescription and ds.DoseComment == "MOQUI Monte Carlo"

    # The TPS-like coronal plane.
    assert (ds.Rows, ds.Columns) == (400, 400)
    assert [float(v) for v in ds.PixelSpacing] == [1.0, 1.0]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, 1]
    assert [float(v) for v in ds.ImagePositionPatient] == [-199.5, 30.0, -199.5]
    # One plane, one frame: no Multi-frame Module (GridFrameOffsetVector has VM 2-n in PS3.6).
    assert not {"NumberOfFrames", "FrameIncrementPointer", "GridFrameOffsetVector"} & set(ds.dir())

    # Stored dose equals the raw plane (raw row = MOQUI y, raw column = MOQUI x).
    dose = stored_dose(ds)
    deviation = np.abs(dose - raw[0]).max() / raw.max()
    assert deviation < 1e-3, f"max deviation {deviation:.2e} of max"
    assert np.isclose(float(ds.DoseGridScaling), raw.max() / (2**32 - 1), rtol=1e-9)

    # Each of the 9 spots, located by its dose centroid in a 40 mm window around the expected
    # position (MC noise makes the single hottest pixel unreliable), lands at -50/0/+50 mm.
    x_mm = np.array([pixel_to_patient(ds, 0, 0, c)[0] for c in range(ds.Columns)])
    z_mm = np.array([pixel_to_patient(ds, 0, r, 0)[2] for r in range(ds.Rows)])
    for z_expected in (-50.0, 0.0, 50.0):
        for x_expected in (-50.0, 0.0, 50.0):
            rows = np.abs(z_mm - z_expected) < 20
            cols = np.abs(x_mm - x_expected) < 20
            window = dose[np.ix_(rows, cols)]
            window = np.where(window > 0.2 * window.max(), window, 0.0)  # the spot's core only
            x_found = (window.sum(axis=0) * x_mm[cols]).sum() / window.sum()
            z_found = (window.sum(axis=1) * z_mm[rows]).sum() / window.sum()
            assert abs(x_found - x_expected) < 1.0, (x_expected, z_expected, x_found)
            assert abs(z_found - z_expected) < 1.0, (x_expected, z_expected, z_found)


@needs_reference
def test_reference_plan_hot_pixel_mapping(tmp_path: Path) -> None:
    """An asymmetric plane through the real plan: raw (y 170, x 260) -> patient x +60.5, z -29.5."""
    raw = np.zeros(PLANE.shape)
    raw[0, 170, 260] = 1.0
    out = rtdose.write_rtdose(
        raw, PLANE, REF_PLAN, tmp_path / "hot.dcm", beam_number=1, engine_label="test", calibrated=False
    )
    ds = pydicom.dcmread(out)
    row, col = np.unravel_index(np.argmax(ds.pixel_array), ds.pixel_array.shape)
    assert (row, col) == (170, 260)
    assert pixel_to_patient(ds, 0, row, col).tolist() == [60.5, 30.0, -29.5]


# --- geometry, pinned with asymmetric patterns --------------------------------------------------


def test_plane_mapping_hot_pixel(tmp_path: Path, plan_path: Path) -> None:
    raw = np.zeros(PLANE.shape)
    raw[0, 170, 260] = 5.0  # MOQUI y index 170 (y = -29.5), x index 260 (x = +60.5)
    raw[0, 10, 20] = 1.0  # a second, weaker one in another quadrant
    out = rtdose.write_rtdose(
        raw, PLANE, plan_path, tmp_path / "rd.dcm", beam_number=2, engine_label="t", calibrated=True
    )
    ds = pydicom.dcmread(out)
    pixels = ds.pixel_array
    assert pixels.shape == (400, 400)
    np.testing.assert_allclose(stored_dose(ds), raw[0], rtol=1e-9)  # pixel_array[r, c] == raw_plane[r, c]
    row, col = np.unravel_index(np.argmax(pixels), pixels.shape)
    assert pixel_to_patient(ds, 0, row, col).tolist() == [60.5, 30.0, -29.5]
    assert pixel_to_patient(ds, 0, 10, 20).tolist() == [-179.5, 30.0, -189.5]
    assert ds.DoseUnits == "GY"
    image = rtdose_read.read_rtdose_dose(out)
    assert image.axes == "xzy" and image.units == "GY"
    frame, r, c = np.unravel_index(np.argmax(image.dose), image.dose.shape)
    assert (image.col_mm[c], image.row_mm[r], image.frame_mm[frame]) == (60.5, -29.5, 30.0)


def test_plane_follows_isocentre(tmp_path: Path) -> None:
    """Lateral positions are relative to the isocentre; depth 20 mm is the isocentre plane."""
    plan = make_plan(tmp_path / "RP.dcm", iso=(10.0, -42.25, -5.0))
    raw = np.zeros(PLANE.shape)
    raw[0, 200, 199] = 1.0  # x = -0.5, y = +0.5 in the beam frame
    ds = pydicom.dcmread(
        rtdose.write_rtdose(raw, PLANE, plan, tmp_path / "rd.dcm", beam_number=1, engine_label="t", calibrated=False)
    )
    assert [float(v) for v in ds.ImagePositionPatient] == [-189.5, -42.25, -204.5]
    assert pixel_to_patient(ds, 0, 200, 199).tolist() == [9.5, -42.25, -4.5]


def test_volume_mapping_hot_voxel(tmp_path: Path, plan_path: Path) -> None:
    """3-D: columns = MOQUI x, rows = depth (patient y = iso_y - 20 + d), frames = MOQUI y."""
    raw = np.zeros(VOLUME.shape)  # (depth 175, y 200, x 200)
    raw[10, 30, 150] = 2.0  # depth 21 mm, y -139 mm, x +101 mm
    raw[100, 180, 5] = 1.0  # depth 201 mm, y +161 mm, x -189 mm
    out = rtdose.write_rtdose(
        raw, VOLUME, plan_path, tmp_path / "rd3.dcm", beam_number=1, engine_label="t", calibrated=False, bits=16
    )
    ds = pydicom.dcmread(out)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns) == (200, 175, 200)
    assert [float(v) for v in ds.PixelSpacing] == [2.0, 2.0]
    assert [float(v) for v in ds.ImagePositionPatient] == [-199.0, 11.0, -199.0]  # surface at y = 30 - 20
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert offsets[0] == 0.0 and np.allclose(np.diff(offsets), 2.0) and len(offsets) == 200
    pixels = ds.pixel_array
    frame, row, col = np.unravel_index(np.argmax(pixels), pixels.shape)
    assert (frame, row, col) == (30, 10, 150)
    assert pixel_to_patient(ds, frame, row, col).tolist() == [101.0, 30.0 - 20.0 + 21.0, -139.0]
    assert pixels[180, 100, 5] > 0
    assert pixel_to_patient(ds, 180, 100, 5).tolist() == [-189.0, 30.0 - 20.0 + 201.0, 161.0]
    assert np.count_nonzero(pixels) == 2
    image = rtdose_read.read_rtdose_dose(out)
    assert image.axes == "xyz"
    assert (image.col_mm[150], image.row_mm[10], image.frame_mm[30]) == (101.0, 31.0, -139.0)
    assert np.isclose(image.dose[30, 10, 150], 2.0, rtol=1e-4)


# --- scaling ------------------------------------------------------------------------------------


def test_all_zero_dose_gives_valid_file(tmp_path: Path, plan_path: Path) -> None:
    out = rtdose.write_rtdose(
        np.zeros(PLANE.shape),
        PLANE,
        plan_path,
        tmp_path / "zero.dcm",
        beam_number=1,
        engine_label="t",
        calibrated=False,
    )
    ds = pydicom.dcmread(out)
    validate_file_meta(ds.file_meta)
    assert float(ds.DoseGridScaling) == 1.0
    assert ds.pixel_array.shape == (400, 400) and not ds.pixel_array.any()


@pytest.mark.parametrize(("bits", "dtype"), [(32, np.uint32), (16, np.uint16)])
def test_pixel_size_and_quantization(tmp_path: Path, plan_path: Path, bits: int, dtype: type) -> None:
    """uint32 is the default; both keep DoseGridScaling = max / (2^n - 1) and round to nearest."""
    rng = np.random.default_rng(7)
    raw = rng.gamma(2.0, 1e-7, size=PLANE.shape)
    kwargs = {} if bits == 32 else {"bits": 16}
    out = rtdose.write_rtdose(
        raw, PLANE, plan_path, tmp_path / "rd.dcm", beam_number=1, engine_label="t", calibrated=False, **kwargs
    )
    ds = pydicom.dcmread(out)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (bits, bits, bits - 1, 0)
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, "MONOCHROME2")
    assert ds.pixel_array.dtype == dtype
    scaling = float(ds.DoseGridScaling)
    assert np.isclose(scaling, raw.max() / (2**bits - 1), rtol=1e-9)
    assert int(ds.pixel_array.max()) >= 2**bits - 2
    error = np.abs(stored_dose(ds) - raw[0]).max()
    assert error <= 0.5 * scaling * (1 + 1e-6) + 1e-9 * raw.max()
    assert out.stat().st_size > 400 * 400 * bits // 8


def test_bad_input_is_refused(plan_path: Path, tmp_path: Path) -> None:
    kwargs = {"beam_number": 1, "engine_label": "t", "calibrated": False}
    with pytest.raises(ValueError, match="shape"):
        rtdose.write_rtdose(np.zeros((1, 400, 399)), PLANE, plan_path, tmp_path / "a.dcm", **kwargs)  # type: ignore[arg-type]
    negative = np.zeros(PLANE.shape)
    negative[0, 1, 1] = -1.0
    with pytest.raises(ValueError, match="negative"):
        rtdose.write_rtdose(negative, PLANE, plan_path, tmp_path / "a.dcm", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bits"):
        rtdose.write_rtdose(np.zeros(PLANE.shape), PLANE, plan_path, tmp_path / "a.dcm", bits=8, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(rtdose.CaseError, match="no beam number 9"):
        rtdose.write_rtdose(np.zeros(PLANE.shape), PLANE, plan_path, tmp_path / "a.dcm", **{**kwargs, "beam_number": 9})  # type: ignore[arg-type]
    assert list(tmp_path.glob("*.dcm")) == [plan_path]


def test_dose_scale(tmp_path: Path, plan_path: Path) -> None:
    raw = np.zeros(PLANE.shape)
    raw[0, 3, 4] = 0.5
    out = rtdose.write_rtdose(
        raw, PLANE, plan_path, tmp_path / "rd.dcm", beam_number=1, engine_label="t", calibrated=True, dose_scale=4.0
    )
    assert np.isclose(rtdose_read.read_rtdose_dose(out).dose.max(), 2.0, rtol=1e-9)


# --- plan sum -----------------------------------------------------------------------------------


def test_plan_sum_equals_sum_of_beams(tmp_path: Path, plan_path: Path) -> None:
    rng = np.random.default_rng(3)
    beam1 = rng.random(PLANE.shape) * 2e-7
    beam2 = np.zeros(PLANE.shape)
    beam2[0, 50:60, 300:320] = 7e-7
    paths = [tmp_path / "1G180:TX_2_Dose.raw", tmp_path / "2G090_2_Dose.raw"]
    beam1.astype("<f8").tofile(paths[0])
    beam2.astype("<f8").tofile(paths[1])
    total = rtdose.sum_doses(paths, PLANE)
    np.testing.assert_array_equal(total, beam1 + beam2)

    out = rtdose.write_rtdose(total, PLANE, plan_path, tmp_path, beam_number=None, engine_label="t", calibrated=False)
    assert out.name == "RD_PLAN.dcm"
    ds = pydicom.dcmread(out)
    # Both treatment beams of fraction group 1, one session: FRACTION_SESSION, which references
    # the fraction group but no beams (PS3.3 C.8.8.3).
    assert ds.DoseSummationType == "FRACTION_SESSION"
    ref = ds.ReferencedRTPlanSequence[0]
    assert ref.ReferencedSOPInstanceUID == pydicom.dcmread(plan_path).SOPInstanceUID
    (group,) = ref.ReferencedFractionGroupSequence
    assert group.ReferencedFractionGroupNumber == 1 and "ReferencedBeamSequence" not in group
    assert np.abs(stored_dose(ds) - (beam1 + beam2)[0]).max() <= 1e-9 * total.max()
    with pytest.raises(ValueError, match="no raw dose"):
        rtdose.sum_doses([], PLANE)


# --- command line -------------------------------------------------------------------------------


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
    return subprocess.run(
        [sys.executable, "-m", "mqi_communicator.rtdose", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cli_beam_and_sum(tmp_path: Path, plan_path: Path) -> None:
    raw1 = np.zeros(PLANE.shape)
    raw1[0, 170, 260] = 3.0
    raw2 = np.zeros(PLANE.shape)
    raw2[0, 20, 30] = 1.0
    in1 = tmp_path / "1G180:TX_2_Dose.raw"  # MOQUI's name keeps the ':'
    in2 = tmp_path / "2G090_2_Dose.raw"
    raw1.tofile(in1)
    raw2.tofile(in2)
    out_dir = tmp_path / "rtdose"

    # Beam taken from the MOQUI file name; the output name uses the sanitized beam name.
    result = run_cli("--input", in1, "--output", out_dir, "--dosetype", "2d", "--plan", plan_path,
                     "--engine-label", "built-in analytical pencil beam (not Monte Carlo), RELATIVE")  # fmt: skip
    assert result.returncode == 0, result.stderr
    beam_file = out_dir / "RD_1G180_TX.dcm"
    assert result.stdout.strip() == str(beam_file)
    ds = pydicom.dcmread(beam_file)
    assert ds.DoseSummationType == "BEAM_SESSION" and ds.DoseUnits == "RELATIVE"
    assert (
        ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence[0].ReferencedBeamSequence[0].ReferencedBeamNumber
        == 1
    )
    assert ds.DoseComment == "built-in analytical pencil beam (not Monte Carlo), RELATIVE"
    assert "built-in analytical pencil beam" in ds.ImageComments
    np.testing.assert_allclose(stored_dose(ds), raw1[0], atol=1e-9)

    result = run_cli("--sum", in1, in2, "--output", out_dir, "--dosetype", "2d", "--plan", plan_path,
                     "--calibrated", "--bits", "16")  # fmt: skip
    assert result.returncode == 0, result.stderr
    ds = pydicom.dcmread(out_dir / "RD_PLAN.dcm")
    assert (ds.DoseSummationType, ds.DoseUnits, ds.BitsAllocated) == ("FRACTION_SESSION", "GY", 16)
    np.testing.assert_allclose(stored_dose(ds), raw1[0] + raw2[0], atol=3.0 / 65535)
    assert sorted(p.name for p in out_dir.iterdir()) == ["RD_1G180_TX.dcm", "RD_PLAN.dcm"]  # no temp files left


def test_cli_errors_name_the_file(tmp_path: Path, plan_path: Path) -> None:
    short = tmp_path / "2G090_2_Dose.raw"
    np.zeros(1000).tofile(short)
    out_dir = tmp_path / "out"
    result = run_cli(
        "--input", short, "--output", out_dir, "--dosetype", "2d", "--plan", plan_path, "--beam-number", "2"
    )
    assert result.returncode != 0
    assert str(short) in result.stderr and "8000 bytes" in result.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())

    bad_plan = tmp_path / "RP_broken.dcm"
    bad_plan.write_bytes(b"not a dicom file")
    good = tmp_path / "ok.raw"
    np.zeros(PLANE.shape).tofile(good)
    result = run_cli("--input", good, "--output", out_dir, "--dosetype", "2d", "--plan", bad_plan, "--beam-number", "1")
    assert result.returncode != 0 and str(bad_plan) in result.stderr

    # No beam number and a file name that names no beam.
    result = run_cli("--input", good, "--output", out_dir, "--dosetype", "2d", "--plan", plan_path)
    assert result.returncode != 0 and str(good) in result.stderr and "--beam-number" in result.stderr
