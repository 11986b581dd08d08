"""The dose line in 3-D on real RT Dose files: axial multi-frame volumes written here with
pydicom (not with the pipeline's writer), read back by qa/volume.py, compared with 3-D gamma;
the pass rates against pymedphys.gamma on the arrays read back independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.special import erf

from mqi_communicator.formats import raw_dose
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.qa import run as qa_run
from mqi_communicator.qa import verdict
from mqi_communicator.qa.tps_dose import Plane, TpsDoseProblem
from mqi_communicator.qa.volume import Volume, compare_volume, is_volume, load_tps_volume, load_volume
from mqi_communicator.rtdose import writer as rtdose
from tests import casegen
from tests.test_qa_verdict import current_calibration

RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
X = np.arange(20) * 2.0 - 19.0  # patient x (columns)
Y = np.arange(26) * 2.0 - 49.0  # patient y (rows): the beam goes along +y, the surface at y = -50
Z = np.arange(18) * 2.0 - 17.0  # patient z (frames)


def proton_field(range_mm: float = 36.0, shift_x_mm: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """dose[z, y, x] (Gy): a 2.4 x 2 cm field, entrance plateau, high-dose region, distal fall-off."""
    z, y, x = np.meshgrid(Z, Y, X, indexing="ij")
    depth = y + 50.0
    lateral = 0.25 * (1 + erf((12 - np.abs(x - shift_x_mm)) / 4.0)) * (1 + erf((10 - np.abs(z)) / 4.0))
    plateau = 0.5 + 0.5 / (1 + np.exp(-(depth - 24.0) / 4.0))
    return 2.0 * scale * lateral * plateau * 0.5 * (1 - erf((depth - range_mm) / 3.5))


def write_volume(
    path: Path,
    dose: np.ndarray,
    *,
    units: str = "GY",
    frames_descending: bool = False,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray] = (Z, Y, X),
    plan: Dataset | None = None,
    beam_number: int = 1,
) -> Path:
    """An axial RT Dose the way a TPS exports one (frames along z, rows along y, columns along
    x), referencing `plan`'s beam when given."""
    z_axis, y_axis, x_axis = axes
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_DOSE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RT_DOSE, meta.MediaStorageSOPInstanceUID, "RTDOSE"
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = units, "PHYSICAL", "BEAM"
    ds.FrameOfReferenceUID = PHANTOM_FRAME  # the water phantom's own frame (docs/qa.md)
    frames = dose[::-1] if frames_descending else dose
    zs = z_axis[: dose.shape[0]][::-1] if frames_descending else z_axis[: dose.shape[0]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [float(x_axis[0]), float(y_axis[0]), float(zs[0])]
    ds.PixelSpacing = [float(y_axis[1] - y_axis[0]), float(x_axis[1] - x_axis[0])]
    if plan is not None:
        ds.Manufacturer = "IndependentTPS"
        ds.PatientID, ds.StudyInstanceUID = plan.PatientID, plan.StudyInstanceUID
        beam = Dataset()
        beam.ReferencedBeamNumber = beam_number
        group = Dataset()
        group.ReferencedFractionGroupNumber = 1
        group.ReferencedBeamSequence = [beam]
        ref = Dataset()
        ref.ReferencedSOPClassUID = plan.SOPClassUID
        ref.ReferencedSOPInstanceUID = plan.SOPInstanceUID
        ref.ReferencedFractionGroupSequence = [group]
        ds.ReferencedRTPlanSequence = [ref]
    # Relative offsets along the normal (+z); a descending stack has absolute, falling z.
    ds.GridFrameOffsetVector = [float(v) for v in (zs if frames_descending else zs - zs[0])]
    scaling = float(frames.max()) / 65535
    pixels = np.rint(frames / scaling).astype("<u2")
    ds.NumberOfFrames, ds.Rows, ds.Columns = pixels.shape
    ds.FrameIncrementPointer = 0x3004000C
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.DoseGridScaling = f"{scaling:.10g}"
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


PHANTOM_FRAME = generate_uid(entropy_srcs=["water phantom of tests/test_qa_volume.py"])
PATIENT_FRAME = generate_uid(entropy_srcs=["a patient's planning CT"])
VERIFIED = {"state": "current"}  # a current calibration (qa/calibration.py status)


def read_back(path: Path) -> np.ndarray:
    """dose[z, y, x] as stored, read with pydicom alone (frames ascending in z)."""
    ds = pydicom.dcmread(path)
    dose = ds.pixel_array * float(ds.DoseGridScaling)
    return dose[::-1] if float(ds.GridFrameOffsetVector[1]) < float(ds.GridFrameOffsetVector[0]) else dose


@pytest.fixture
def qa(config: dict) -> dict:
    return config["qa"]


def test_noisy_delivered_volume_is_assessed_in_3d_as_pymedphys_does(tmp_path: Path, qa: dict) -> None:
    pymedphys = pytest.importorskip("pymedphys")
    rng = np.random.default_rng(3)
    tps_path = write_volume(tmp_path / "tps.dcm", proton_field(), frames_descending=True)
    delivered = np.clip(proton_field(range_mm=38.0) * (1 + rng.normal(0, 0.04, (Z.size, Y.size, X.size))), 0, None)
    delivered_path = write_volume(tmp_path / "delivered.dcm", delivered)
    assert is_volume(tps_path) and is_volume(delivered_path)
    result = compare_volume(
        load_tps_volume(tps_path, qa, fractions=1, plan_frame_uid=PATIENT_FRAME),
        load_volume(delivered_path),
        qa,
        VERIFIED,
    )
    assert result["evaluation"] == (
        f"3-D gamma over the volume ({result['gamma_primary']['points_evaluated']} voxels above the cutoff)"
    )
    for key, criteria in (("gamma_primary", qa["gamma"]["primary"]), ("gamma_secondary", qa["gamma"]["secondary"])):
        theirs = pymedphys.gamma(
            (Z, Y, X),
            read_back(tps_path),
            (Z, Y, X),
            read_back(delivered_path),
            criteria["dose_percent"],
            criteria["distance_mm"],
            lower_percent_dose_cutoff=qa["gamma"]["cutoff_percent"],
            max_gamma=qa["gamma"]["max_gamma"],
            interp_algo="scipy",
        )
        valid = theirs[np.isfinite(theirs)]
        assert result[key]["points_evaluated"] == valid.size
        assert result[key]["pass_rate_percent"] == pytest.approx(100.0 * np.mean(valid <= 1), abs=1e-3)
    assert 80.0 < result["gamma_primary"]["pass_rate_percent"] < 100.0
    assert result["_arrays"]["gamma"].shape == (Z.size, X.size)  # a coronal plane for the figure


def test_a_distal_error_fails_the_volume_but_passes_the_2cm_plane(tmp_path: Path, qa: dict) -> None:
    tps = load_tps_volume(
        write_volume(tmp_path / "tps.dcm", proton_field()), qa, fractions=1, plan_frame_uid=PATIENT_FRAME
    )
    short = load_volume(write_volume(tmp_path / "delivered.dcm", proton_field(range_mm=31.0)))
    in_volume = compare_volume(tps, short, qa, VERIFIED)
    assert in_volume["verdict"] == "FAIL", in_volume["reasons"]
    row = int(np.argmin(np.abs(Y + 50.0 - qa["plane_depth_mm"])))  # the plane 2 cm deep

    def plane(volume: Volume) -> Plane:
        return Plane(volume.dose[:, row, :], volume.z_mm, volume.x_mm, "xz", volume.units)

    on_plane = verdict.compare(plane(tps), plane(short), qa, VERIFIED)
    assert on_plane["verdict"] == "PASS" and on_plane["evaluation"].startswith("2-D gamma on the plane")
    # The figure shows where it fails: a plane in the distal fall-off, not the entrance.
    assert "most voxels failing" in in_volume["_arrays"]["plane"]


def test_relative_delivered_volume_is_scaled_says_so_and_never_passes(tmp_path: Path, qa: dict) -> None:
    tps = load_tps_volume(
        write_volume(tmp_path / "tps.dcm", proton_field()), qa, fractions=1, plan_frame_uid=PATIENT_FRAME
    )
    delivered = load_volume(write_volume(tmp_path / "d.dcm", proton_field(scale=0.37), units="RELATIVE"))
    result = compare_volume(tps, delivered, qa, VERIFIED)
    assert result["comparison"] == "relative" and result["scale_applied"] == pytest.approx(1 / 0.37, rel=1e-3)
    assert any("RELATIVE comparison" in n for n in result["notes"])
    # The shape agrees, but a RELATIVE dose can never PASS.
    assert result["verdict"] == "NOT ASSESSED" and result["gamma_primary"]["pass_rate_percent"] == 100.0
    assert result["reasons"][0].startswith("dose scale not verified: our dose is RELATIVE")


def test_tps_dose_beyond_the_delivered_volume_is_an_error(tmp_path: Path, qa: dict) -> None:
    tps = load_tps_volume(
        write_volume(tmp_path / "tps.dcm", proton_field()), qa, fractions=1, plan_frame_uid=PATIENT_FRAME
    )
    delivered = load_volume(write_volume(tmp_path / "d.dcm", proton_field()))
    cut = Volume(delivered.dose[:, :, 8:], delivered.z_mm, delivered.y_mm, delivered.x_mm[8:], "GY")
    result = compare_volume(tps, cut, qa, VERIFIED)
    assert result["verdict"] == "ERROR" and "outside the delivered dose volume" in result["reasons"][0]


def test_a_plane_is_not_a_volume(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "plane.dcm", proton_field()[:1])
    assert not is_volume(path)
    with pytest.raises(ValueError, match=r"plane\.dcm: not an axial dose volume"):
        load_volume(path)


def beam_field(x_mm: np.ndarray, z_mm: np.ndarray, depth_mm: np.ndarray, range_mm: float) -> np.ndarray:
    """Dose (Gy) of a 3 x 3 cm field around the beam axis, by depth in the phantom."""
    lateral = 0.25 * (1 + erf((15 - np.abs(x_mm)) / 4.0)) * (1 + erf((15 - np.abs(z_mm)) / 4.0))
    plateau = 0.5 + 0.5 / (1 + np.exp(-(depth_mm - 25.0) / 4.0))
    return 2.0 * lateral * plateau * 0.5 * (1 - erf((depth_mm - range_mm) / 3.5))


@pytest.mark.parametrize(("range_mm", "expected"), [(40.0, "PASS"), (35.0, "FAIL")], ids=["as planned", "5 mm short"])
def test_qa_run_assesses_a_delivered_volume_against_a_tps_volume_in_3d(
    tmp_path: Path, config: dict, range_mm: float, expected: str
) -> None:
    spec = casegen.CaseSpec(
        patient_id="QA3D", beams=[casegen.BeamSpec(1, "F1", [150.0, 145.0], [casegen.grid_spots(20, 5.0)] * 2)]
    )
    case = casegen.write_case(tmp_path / "scan", "qa3d", spec, samples_per_spot=20, off_samples=20)
    plan_path = next(p for p in case.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTPLAN")
    plan = pydicom.dcmread(plan_path)
    iso = spec.isocenter_mm
    # The TPS volume on its own, coarser 3 mm grid in patient mm: the beam runs along +y, the
    # phantom surface 20 mm before the isocentre (MOQUI x -> patient x, MOQUI y -> patient z).
    tps_axes = (
        iso[2] + np.arange(-30.0, 31.0, 3.0),
        iso[1] - 20.0 + np.arange(1.0, 71.0, 3.0),
        iso[0] + np.arange(-30.0, 31.0, 3.0),
    )
    z, y, x = np.meshgrid(*tps_axes, indexing="ij")
    write_volume(
        case / "RD_TPS_1.dcm", beam_field(x - iso[0], z - iso[2], y - iso[1] + 20.0, 40.0), axes=tps_axes, plan=plan
    )
    # What the engine would deliver, in MOQUI's raw order (depth, y, x), written as the pipeline does.
    grid = raw_dose.Grid(nx=41, ny=41, nz=40, spacing_mm=(2.0, 2.0, 2.0), first_centre_mm=(-40.0, -40.0, 1.0))
    depth, moqui_y, moqui_x = np.meshgrid(grid.centres("z"), grid.centres("y"), grid.centres("x"), indexing="ij")
    delivered = rtdose.write_rtdose(
        beam_field(moqui_x, moqui_y, depth, range_mm),
        grid,
        plan_path,
        tmp_path / "out" / "RD_1.dcm",
        beam_number=1,
        engine_label="test engine",
        calibrated=True,
    )
    entry = current_calibration()
    result, figures = qa_run.assess(build_manifest(case, config), [delivered], config, "test engine", entry)
    dose = result["beams"][0]["dose"]
    assert dose["evaluation"].startswith("3-D gamma over the volume"), dose
    assert dose["verdict"] == expected, dose["reasons"]
    assert set(figures) == {"F1"}


def test_a_volume_needs_the_phantom_frame_a_verified_scale_and_a_covering_grid(tmp_path: Path, qa: dict) -> None:
    path = write_volume(tmp_path / "tps.dcm", proton_field())
    with pytest.raises(TpsDoseProblem, match="a dose on the patient's images"):
        load_tps_volume(path, qa, fractions=1, plan_frame_uid=PHANTOM_FRAME)  # the plan's own frame
    tps = load_tps_volume(path, qa, fractions=1, plan_frame_uid=PATIENT_FRAME)
    delivered = load_volume(write_volume(tmp_path / "d.dcm", proton_field()))
    unverified = compare_volume(tps, delivered, qa, {"state": "missing", "reason": "dose scale not verified: none"})
    assert unverified["verdict"] == "NOT ASSESSED" and unverified["reasons"][0] == "dose scale not verified: none"
    assert unverified["gamma_primary"]["pass_rate_percent"] == 100.0
    small = Volume(tps.dose[:, :, 5:-5], tps.z_mm, tps.y_mm, tps.x_mm[5:-5], "GY")
    result = compare_volume(small, delivered, qa, VERIFIED)
    assert result["verdict"] == "ERROR" and result["reasons"][0].startswith("the TPS grid (x ")
