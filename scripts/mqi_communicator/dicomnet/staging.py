"""Where a received DICOM object is kept until a case is built from it (docs/dicom-network.md).

Layout under the staging folder, keyed so that nothing a sender chose can name a path:
  <patient>/plans/<plan SOP instance UID>.dcm                      RT Ion Plan
  <patient>/doses/<referenced plan SOP instance UID>/<SOP UID>.dcm  RT Dose (TPS), by the plan it
                                                                    names (ReferencedRTPlanSequence)
  <patient>/doses/unreferenced/<SOP UID>.dcm                       RT Dose naming no plan
  <patient>/structures/<SOP UID>.dcm, <patient>/ct/<SOP UID>.dcm     kept, unused
Every file is written whole or not at all (temp file in the same folder, fsync, rename, folder
fsync): a reader never sees half an object, and a power cut keeps what was acknowledged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from mqi_communicator.errors import MqiError
from mqi_communicator.files import atomic_output

RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: The storage SOP classes the receiver accepts, and the staging sub-folder of each.
ACCEPTED = {RT_ION_PLAN: "plans", RT_DOSE: "doses", RT_STRUCTURE_SET: "structures", CT_IMAGE: "ct"}
UNREFERENCED = "unreferenced"
# PS3.5 9.1: a UID is digits and dots, at most 64 characters.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class StagingError(MqiError, ValueError):
    """The object cannot be staged as it is (its content, not the disk): the sender must not retry it."""


def patient_folder_name(patient_id: str) -> str:
    """A folder name for a Patient ID: its own characters where they are safe in a path; otherwise
    those replaced and a digest of the original appended, so two IDs never share a folder."""
    safe = _SAFE.sub("_", patient_id).lstrip(".")
    if safe == patient_id and safe:
        return safe
    return f"{safe or 'no_id'}~{hashlib.sha256(patient_id.encode()).hexdigest()[:8]}"


def _uid(value: object, what: str) -> str:
    text = str(value or "").strip()
    if len(text) > 64 or not _UID.match(text):
        raise StagingError(f"{what} {text!r} is not a valid UID")
    return text


def read_header(encoded: bytes) -> Dataset:
    """The object's elements before its pixel data (a DICOM file's bytes, preamble and meta included)."""
    try:
        return dcmread(BytesIO(encoded), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise StagingError(f"cannot be read as DICOM: {exc}") from exc


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in (0x7FE00010, 0x7FE00009, 0x7FE00008)  # Pixel Data, Double / Float Pixel Data


def read_dataset_header(stream: BinaryIO, implicit_vr: bool, little_endian: bool) -> Dataset:
    """The elements before the pixel data of a bare dataset (no file meta) in ``stream``, encoded
    as its transfer syntax says (not deflated); the stream is read in place, not copied."""
    stream.seek(0)
    try:
        return read_dataset(stream, implicit_vr, little_endian, stop_when=_at_pixel_data)
    except (EOFError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise StagingError(f"cannot be read as DICOM: {exc}") from exc


def referenced_plan(header: Dataset) -> str | None:
    """The SOP instance UID of the plan an RT Dose was computed for (PS3.3 C.8.8.3, Referenced RT
    Plan Sequence), or None when it names none."""
    sequence = header.get("ReferencedRTPlanSequence") or []
    if not sequence:
        return None
    return _uid(sequence[0].get("ReferencedSOPInstanceUID"), "ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID")


def staged_path(staging: Path, header: Dataset) -> Path:
    """Where ``header``'s object belongs in ``staging`` (see the module docstring)."""
    sop_class = _uid(header.get("SOPClassUID"), "SOP Class UID")
    if sop_class not in ACCEPTED:
        raise StagingError(f"SOP class {sop_class} is not one the receiver stages")
    sop_instance = _uid(header.get("SOPInstanceUID"), "SOP Instance UID")
    patient = patient_folder_name(str(header.get("PatientID") or ""))
    folder = staging / patient / ACCEPTED[sop_class]
    if sop_class == RT_DOSE:
        folder = folder / (referenced_plan(header) or UNREFERENCED)
    return folder / f"{sop_instance}.dcm"


def stage(staging: Path, header: Dataset, parts: Iterable[bytes | memoryview]) -> Path:
    """Write one received object durably into ``staging`` where ``header`` (its elements) says;
    ``parts``: its bytes as a DICOM file (preamble, file meta, dataset), written one after the other.
    StagingError: the object itself is unusable; OSError: the disk refused (full, read-only)."""
    target = staged_path(staging, header)
    with atomic_output(target, durable=True) as handle:
        for part in parts:
            handle.write(part)
    return target
