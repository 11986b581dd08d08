"""DICOM objects for the network tests and benchmark: copies of a real plan and of TPS doses with
new SOP instance UIDs, a chosen patient name, and (for volume sizes) a multi-frame dose grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.tag import Tag
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
#: A real RT Ion Plan (RayStation, tests/data/reference/README.md), implicit VR little endian.
REFERENCE_PLAN = REPO / "tests" / "data" / "reference" / "RP_G2_9spots_phantom.dcm"
#: A TPS dose and its plan as the sample cases hold them (explicit VR little endian).
SAMPLE_PLAN = REPO / "sample_cases" / "case001_G2" / "RP.case001_G2.dcm"
SAMPLE_DOSE = REPO / "sample_cases" / "case001_G2" / "RD_TPS_2.dcm"


def _renamed(ds: pydicom.Dataset, patient_name: str | None) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if patient_name is not None:
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: a Hangul name needs it (PS3.3 C.12.1.1.2)
        ds.PatientName = patient_name


def plan_copy(out: Path, *, patient_name: str | None = None, source: Path = SAMPLE_PLAN) -> pydicom.Dataset:
    ds = pydicom.dcmread(source)
    _renamed(ds, patient_name)
    ds.save_as(out, enforce_file_format=True)
    return ds


def dose_copy(
    out: Path,
    plan: pydicom.Dataset,
    *,
    frames: int = 1,
    rows: int = 81,
    columns: int = 81,
    seed: int = 0,
    patient_name: str | None = None,
) -> pydicom.Dataset:
    """The sample TPS dose, referencing ``plan``, with a ``frames`` x ``rows`` x ``columns`` grid of
    random 32-bit values (4 bytes a voxel: 100 MB is about 25 M voxels)."""
    ds = pydicom.dcmread(SAMPLE_DOSE)
    _renamed(ds, patient_name or str(plan.PatientName))
    ds.PatientID = plan.PatientID
    ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.GridFrameOffsetVector = [float(2 * i) for i in range(frames)]
        ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    pixels = np.random.default_rng(seed).integers(0, 2**31, size=(frames, rows, columns), dtype=np.uint32)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(out, enforce_file_format=True)
    return ds
