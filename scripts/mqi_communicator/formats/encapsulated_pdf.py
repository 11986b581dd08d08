"""The PDF QA report as a DICOM Encapsulated PDF object (PS3.3 A.45.1), for the archives the DICOM
sender stores into (docs/qa-report-pdf.md): Patient and General Study copied from the case's plan
(so the report files under the same patient and study as the RT Doses), an Encapsulated Document
Series of its own, the PDF bytes unchanged.

The SOP Instance UID is derived from the PDF's sha256: the same report is the same instance
(a destination that confirmed it is not sent it again); a new report (a reprocess) is a new one.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from mqi_communicator import __version__
from mqi_communicator.errors import InputError
from mqi_communicator.files import atomic_output
from mqi_communicator.formats.dicom_output import copy_patient_study, new_instance

ENCAPSULATED_PDF_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.104.1")
MANUFACTURER = "mqi_communicator"
SERIES_NUMBER = 900  # apart from the RT Doses' series (beam numbers, 999 for the plan sum)


def build(pdf: bytes, plan: Dataset, title: str, now: datetime.datetime | None = None) -> Dataset:
    """The Encapsulated PDF dataset of `pdf` for the patient and study of `plan`."""
    if not pdf.startswith(b"%PDF-"):
        raise InputError("not a PDF (no %PDF- header)")
    if "StudyInstanceUID" not in plan:
        raise InputError("the plan has no StudyInstanceUID")
    now = now or datetime.datetime.now()
    digest = hashlib.sha256(pdf).hexdigest()
    sop_uid = generate_uid(entropy_srcs=["mqi_communicator QA report", digest])
    ds = new_instance(ENCAPSULATED_PDF_SOP_CLASS, sop_uid)
    if "SpecificCharacterSet" in plan:
        ds.SpecificCharacterSet = plan.SpecificCharacterSet
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    copy_patient_study(plan, ds)
    # Encapsulated Document Series: one series per study for the QA reports.
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["mqi_communicator QA reports", str(plan.StudyInstanceUID)])
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = "QA report"
    # General Equipment, SC Equipment: a document made on a workstation.
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = f"mqi_communicator {__version__}"
    ds.ConversionType = "WSD"
    # Encapsulated Document.
    ds.InstanceNumber = 1
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the report names the case and plan
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB values have even length: a trailing NUL pads an odd PDF; the length says where it ends.
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds


def write_for_plan(pdf_path: Path, plan_path: Path, target: Path, title: str) -> Dataset:
    """Write the Encapsulated PDF of the report at `pdf_path` for the plan at `plan_path`."""
    try:
        plan = dcmread(plan_path, stop_before_pixels=True)
        ds = build(pdf_path.read_bytes(), plan, title)
    except (OSError, ValueError) as exc:
        raise InputError(f"{pdf_path} / {plan_path}: no Encapsulated PDF ({exc})") from exc
    with atomic_output(target, durable=True) as handle:
        ds.save_as(handle, enforce_file_format=True)
    return ds
