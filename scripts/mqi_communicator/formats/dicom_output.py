"""What every DICOM object we write for a case (the RT Doses, the Encapsulated PDF report) shares:
its Part 10 file meta, and the Patient and General Study attributes it copies from the RT Ion
Plan, so an archive files it with the plan."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from mqi_communicator import __version__

# (keyword, Type 2: written empty when the plan lacks it). The frame of reference is not among
# them: `dose_reference.frame_of_reference` decides it for an RT Dose.
PATIENT_STUDY_KEYWORDS = (
    ("PatientName", True),
    ("PatientID", True),
    ("PatientBirthDate", True),
    ("PatientSex", True),
    ("StudyInstanceUID", True),
    ("StudyDate", True),
    ("StudyTime", True),
    ("StudyID", True),
    ("ReferringPhysicianName", True),
    ("AccessionNumber", True),
    ("StudyDescription", False),
)


def copy_patient_study(plan: Dataset, ds: Dataset) -> None:
    """Copy the plan's patient and study attributes into `ds` (Type 2 ones empty when absent)."""
    for keyword, type2 in PATIENT_STUDY_KEYWORDS:
        if keyword in plan:
            setattr(ds, keyword, plan[keyword].value)
        elif type2:
            setattr(ds, keyword, "")


def new_instance(sop_class: UID, sop_uid: UID) -> Dataset:
    """An empty instance of `sop_class` with its file meta (Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MQI_COMM_{__version__}"[:16]
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds
