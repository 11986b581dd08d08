"""P1 intake: decide a case is ready, validate it, and map each delivery to its plan beam.

The manifest (`intake.json`) is the contract with every later step: the plan, the room, the
treatment beams, and for each delivery folder the beam number it declares in PlanInfo.txt (never
its position among the folders), its layer range, monitor range codes and PTN files (size, sha256).
All problems of a case are collected and reported together, each naming its file.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import ptn, settings
from .errors import CaseError
from .files import sha256_of, write_json_atomic
from .plan import Plan, find_plan, read_plan

CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
DELIVERY_FOLDER_PATTERN = re.compile(r"^\d{16}$")
PLANINFO_NAME = "PlanInfo.txt"
PLANRANGE_NAMES = ("PlanRange.txt", "PlanRange.csv")


@dataclass
class PtnFile:
    file: str
    size: int
    rows: int
    sha256: str


@dataclass
class Delivery:
    folder: str  # relative to the case folder
    irradiation_time: str | None  # the 16-digit folder name, when it is one
    beam_number: int
    start_layer: int
    stop_layer: int
    dose1_range_codes: list[int]
    ptn: list[PtnFile] = field(default_factory=list)

    @property
    def layer_count(self) -> int:
        return self.stop_layer - self.start_layer + 1


def is_ready(case_dir: Path, marker: str, quiet_seconds: float, now: float | None = None) -> bool:
    """Ready = marker present and, when asked, no file in the case changed for quiet_seconds."""
    if not (case_dir / marker).is_file():
        return False
    if quiet_seconds <= 0:
        return True
    newest = max((p.stat().st_mtime for p in case_dir.rglob("*")), default=0.0)
    return ((time.time() if now is None else now) - newest) >= quiet_seconds


def case_fingerprint(case_dir: Path) -> str:
    """Names, sizes and modification times of every file in the case: changes when the sender
    adds, replaces or edits anything, so a failed case is retried exactly when it was touched."""
    digest = hashlib.sha256()
    for path in sorted(p for p in case_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(case_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def recorded_failure(record: Path, case_dir: Path) -> str | None:
    """The recorded intake error when the case is unchanged since it failed, else None."""
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return str(data.get("error")) if data.get("fingerprint") == case_fingerprint(case_dir) else None


def read_planinfo(path: Path) -> dict[str, str]:
    """`KEY,VALUE` lines; keys upper-cased, blank lines ignored."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(",")
        if not sep:
            raise CaseError(path, f"line {number} is not KEY,VALUE: {line!r}")
        values[key.strip().upper()] = value.strip()
    return values


def _int_field(path: Path, values: dict[str, str], key: str, default: int | None = None) -> int:
    if key not in values:
        if default is not None:
            return default
        raise CaseError(path, f"missing {key}")
    try:
        return int(float(values[key]))
    except ValueError as exc:
        raise CaseError(path, f"{key} is not a number: {values[key]!r}") from exc


def read_planrange(path: Path) -> list[int]:
    """DOSE1_RANGE codes, one per row (layer), from the CSV with header."""
    with open(path, newline="", errors="replace") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise CaseError(path, "no layer rows")
    header = {name.strip().upper(): name for name in rows[0] if name is not None}
    if "DOSE1_RANGE" not in header:
        raise CaseError(path, "no DOSE1_RANGE column")
    codes: list[int] = []
    for number, row in enumerate(rows, start=2):
        raw = (row[header["DOSE1_RANGE"]] or "").strip()
        try:
            code = int(float(raw))
        except ValueError as exc:
            raise CaseError(path, f"line {number}: DOSE1_RANGE {raw!r} is not a number") from exc
        if not 1 <= code <= 5:
            raise CaseError(path, f"line {number}: DOSE1_RANGE {code} is not a monitor range code 1-5")
        codes.append(code)
    return codes


def find_delivery_folders(case_dir: Path) -> list[Path]:
    """Folders holding a PlanInfo.txt, or named like a delivery (16 digits), up to two levels down."""
    found = {p.parent for p in case_dir.rglob(PLANINFO_NAME) if len(p.relative_to(case_dir).parts) <= 3}
    found |= {p for p in case_dir.rglob("*") if p.is_dir() and DELIVERY_FOLDER_PATTERN.match(p.name)}
    return sorted(found, key=lambda p: (p.name, str(p)))


def read_delivery(case_dir: Path, folder: Path, plan: Plan) -> Delivery:
    planinfo_path = folder / PLANINFO_NAME
    if not planinfo_path.is_file():
        raise CaseError(folder, f"delivery folder has no {PLANINFO_NAME}")
    info = read_planinfo(planinfo_path)
    patient_id = info.get("DICOM_PATIENT_ID")
    if patient_id is None:
        raise CaseError(planinfo_path, "missing DICOM_PATIENT_ID")
    if patient_id != plan.patient_id:
        raise CaseError(
            planinfo_path, f"DICOM_PATIENT_ID {patient_id!r} differs from the plan's PatientID {plan.patient_id!r}"
        )
    beam_number = _int_field(planinfo_path, info, "DICOM_BEAM_NUMBER")
    beam = plan.beam(beam_number)
    if beam is None:
        numbers = ", ".join(str(b.number) for b in plan.treatment_beams)
        raise CaseError(
            planinfo_path, f"DICOM_BEAM_NUMBER {beam_number} is not a beam of the plan (treatment beams: {numbers})"
        )
    if beam.is_setup:
        raise CaseError(
            planinfo_path, f"DICOM_BEAM_NUMBER {beam_number} is the setup beam {beam.name!r}, which has no logs"
        )
    start = _int_field(planinfo_path, info, "START_LAYER_NUMBER", default=1)
    stop = _int_field(planinfo_path, info, "STOP_LAYER_NUMBER")
    if not 1 <= start <= stop <= len(beam.layers):
        raise CaseError(
            planinfo_path,
            f"layers {start}..{stop} do not fit beam {beam_number} ({beam.name!r}), which has {len(beam.layers)} layers",
        )
    ptn_files = sorted(folder.glob("*.ptn"))
    delivered = stop - start + 1
    if len(ptn_files) != delivered:
        raise CaseError(
            folder,
            f"{len(ptn_files)} PTN files for {delivered} delivered layers "
            f"(START_LAYER_NUMBER {start}, STOP_LAYER_NUMBER {stop} in {PLANINFO_NAME})",
        )
    planrange = next((folder / n for n in PLANRANGE_NAMES if (folder / n).is_file()), None)
    if planrange is None:
        raise CaseError(folder, f"no {' or '.join(PLANRANGE_NAMES)}")
    codes = read_planrange(planrange)
    # PlanRange lists either the delivered layers or every layer of the beam.
    if len(codes) == len(beam.layers):
        codes = codes[start - 1 : stop]
    elif len(codes) != delivered:
        raise CaseError(
            planrange, f"{len(codes)} rows, expected {delivered} delivered layers or {len(beam.layers)} plan layers"
        )
    files = []
    for path in ptn_files:
        try:
            rows = ptn.check_size(path)
        except ValueError as exc:
            raise CaseError(path, str(exc).split(": ", 1)[1]) from exc
        files.append(PtnFile(file=path.name, size=path.stat().st_size, rows=rows, sha256=sha256_of(path)))
    return Delivery(
        folder=str(folder.relative_to(case_dir)),
        irradiation_time=folder.name if DELIVERY_FOLDER_PATTERN.match(folder.name) else None,
        beam_number=beam_number,
        start_layer=start,
        stop_layer=stop,
        dose1_range_codes=codes,
        ptn=files,
    )


def fractions_of(deliveries: list[Delivery]) -> list[list[Delivery]]:
    """Group one beam's deliveries (in time order) into fractions: a delivery that resumes at the
    layer after the previous one's last layer continues that fraction; anything else starts one."""
    fractions: list[list[Delivery]] = []
    for delivery in deliveries:
        if fractions and delivery.start_layer == fractions[-1][-1].stop_layer + 1:
            fractions[-1].append(delivery)
        else:
            fractions.append([delivery])
    return fractions


def build_manifest(case_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Validate a case and return its manifest; raises CaseError listing every problem."""
    case_id = case_dir.name
    if not CASE_ID_PATTERN.match(case_id):
        raise CaseError(case_dir, "case folder name must match [A-Za-z0-9._-]+")
    plan_path = find_plan(case_dir)
    plan = read_plan(plan_path)
    problems: list[CaseError] = []
    deliveries: list[Delivery] = []
    source = config["interpreter"]["source"]
    folders = [] if source == "plan" else find_delivery_folders(case_dir)
    for folder in folders:
        try:
            deliveries.append(read_delivery(case_dir, folder, plan))
        except CaseError as exc:
            problems.append(exc)
    if problems:
        raise CaseError(case_dir, f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    mode = "logs" if deliveries else "plan"
    if source == "logs" and not deliveries:
        raise CaseError(case_dir, "interpreter.source is 'logs' but the case has no delivery folders")
    warnings: list[str] = []
    beams = []
    for beam in plan.treatment_beams:
        mine = sorted(
            (d for d in deliveries if d.beam_number == beam.number), key=lambda d: (d.irradiation_time or "", d.folder)
        )
        fractions = fractions_of(mine)
        if mode == "logs" and not mine:
            warnings.append(f"beam {beam.number} ({beam.name!r}) has no delivery folder; it is not simulated")
        if len(fractions) > 1:
            warnings.append(
                f"beam {beam.number} ({beam.name!r}) has {len(fractions)} fractions; the latest is simulated"
            )
        beams.append(
            {
                "number": beam.number,
                "name": beam.name,
                "sanitized_name": beam.sanitized_name,
                "plan_layers": len(beam.layers),
                "energies_mev": [layer.energy_mev for layer in beam.layers],
                "fractions": [[d.folder for d in fraction] for fraction in fractions],
                "simulated_deliveries": [d.folder for d in fractions[-1]] if fractions else [],
                "simulate": mode == "plan" or bool(mine),
            }
        )
    return {
        "case_id": case_id,
        "case_dir": str(case_dir.resolve()),
        "mode": mode,
        "plan": {
            "path": str(plan_path.relative_to(case_dir)),
            "file_name": plan_path.name,
            "sop_instance_uid": plan.sop_instance_uid,
            "patient_id": plan.patient_id,
            "sha256": sha256_of(plan_path),
        },
        "room": plan.room,
        "setup_beams": [b.number for b in plan.beams if b.is_setup],
        "beams": beams,
        "deliveries": [asdict(d) | {"layer_count": d.layer_count} for d in deliveries],
        "warnings": warnings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.intake",
        description="Validate a case folder and write its intake manifest (JSON).",
    )
    parser.add_argument("--case", type=Path, required=True, help="the case folder (read only)")
    parser.add_argument("--output", type=Path, required=True, help="manifest to write (intake.json)")
    settings.add_argument(parser)
    parser.add_argument(
        "--failure-record",
        type=Path,
        help="on failure, record the error with the case's fingerprint here (the workflow then skips "
        "the case until a file in it changes); removed on success",
    )
    args = parser.parse_args(argv)
    try:
        config = settings.load(args.settings)
        manifest = build_manifest(args.case, config)
    except (CaseError, ValueError) as exc:
        print(f"INTAKE FAILED for case {args.case.name}: {exc}", file=sys.stderr)
        if args.failure_record:
            record = {"case_id": args.case.name, "fingerprint": case_fingerprint(args.case), "error": str(exc)}
            write_json_atomic(args.failure_record, record)
        return 1
    if args.failure_record:
        args.failure_record.unlink(missing_ok=True)
    for warning in manifest["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    write_json_atomic(args.output, manifest)
    simulated = [b["name"] for b in manifest["beams"] if b["simulate"]]
    print(f"case {manifest['case_id']}: room {manifest['room']}, mode {manifest['mode']}, beams {simulated}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
