"""Which received objects and dropped delivery folders make one case (docs/dicom-network.md#case-assembly).

A delivery folder in the logs inbox belongs to a staged plan when its PlanInfo.txt names the plan's
patient (DICOM_PATIENT_ID) and one of its treatment beams (DICOM_BEAM_NUMBER) with a layer range that
fits that beam, and, where it has a PlanRange with an ENERGY column, the energies agree. All of it is
intake's own reading (`delivery.delivery_header`, `delivery.range_codes_by_layer`): a folder that
assembly places is one intake accepts. It is complete when it holds one PTN file per layer of its
range (`delivery.numbered_ptn_files`). The TPS doses are the staged RT Doses referencing the plan,
matched to beams as the QA matches them (`qa.tps_dose.match`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from mqi_communicator.errors import CaseError
from mqi_communicator.formats.plan import Plan
from mqi_communicator.intake.delivery_folders import (
    DELIVERY_FOLDER_PATTERN,
    PLANINFO_NAME,
    PLANRANGE_NAMES,
    Delivery,
    delivery_header,
    numbered_ptn_files,
    range_codes_by_layer,
    read_planinfo,
)
from mqi_communicator.qa.tps_dose import TpsDoseProblem, find_tps_doses, match


@dataclass
class InboxFolder:
    """A delivery folder dropped in the logs inbox, as far as its PlanInfo.txt says."""

    path: Path
    patient_id: str


def inbox_folders(inbox: Path) -> list[Path]:
    """The inbox's delivery folders: its sub-folders named like one (16 digits) or holding a
    PlanInfo.txt, in name (irradiation time) order. One level only: one `scandir` per run."""
    if not inbox.is_dir():
        return []
    with os.scandir(inbox) as entries:
        found = [
            Path(e.path)
            for e in entries
            if e.is_dir()
            and (DELIVERY_FOLDER_PATTERN.match(e.name) or os.path.isfile(os.path.join(e.path, PLANINFO_NAME)))
        ]
    return sorted(found, key=lambda p: p.name)


def patient_of(folder: Path) -> str | None:
    """DICOM_PATIENT_ID of a delivery folder; None while its PlanInfo.txt is not there (yet)."""
    try:
        return read_planinfo(folder / PLANINFO_NAME).get("DICOM_PATIENT_ID")
    except (OSError, CaseError):
        return None


def quiet(folder: Path, seconds: float, now: float | None = None) -> bool:
    """Nothing in the folder changed for `seconds` (application.ready_quiet_seconds): the treatment
    control system is done writing it."""
    if seconds <= 0:
        return True
    newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
    return ((time.time() if now is None else now) - newest) >= seconds


def fits(plan: Plan, folder: Path) -> Delivery:
    """The delivery as it belongs to `plan`; CaseError saying why it does not (patient, beam,
    layer range, energies)."""
    delivery = delivery_header(folder.parent, folder, plan)
    beam = plan.beam(delivery.beam_number)
    assert beam is not None  # delivery_header checked it
    planrange = next((folder / n for n in PLANRANGE_NAMES if (folder / n).is_file()), None)
    if planrange is not None:
        range_codes_by_layer(planrange, beam, delivery.start_layer, delivery.stop_layer)
    return delivery


def incomplete(folder: Path, delivery: Delivery) -> str | None:
    """Why a fitting delivery is not complete yet (PTN files missing), or None."""
    try:
        numbered_ptn_files(folder, delivery.start_layer, delivery.stop_layer)
    except CaseError as exc:
        return str(exc)
    return None


def tps_doses(dose_folder: Path, plan: Plan) -> tuple[list[Path], list[str]]:
    """The staged TPS RT Doses of the plan and, per treatment beam without one, why."""
    candidates = find_tps_doses(dose_folder) if dose_folder.is_dir() else []
    if not candidates:
        return [], [f"beam {b.number} ({b.name!r}): no TPS RT Dose received for the plan" for b in plan.treatment_beams]
    missing = []
    for beam in plan.treatment_beams:
        try:
            match(candidates, plan.sop_instance_uid, beam.number, len(plan.treatment_beams))
        except TpsDoseProblem as problem:
            missing.append(f"beam {beam.number} ({beam.name!r}): {problem.reason}")
    return [path for path, _ in candidates], missing
