"""The Patient and General Study attributes every DICOM object we write for a case (the RT Doses,
the Encapsulated PDF report) copies from its RT Ion Plan, so an archive files them with the plan."""

from __future__ import annotations

from pydicom.dataset import Dataset

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
