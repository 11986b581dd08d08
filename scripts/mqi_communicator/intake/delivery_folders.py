"""A case's delivery folders: PlanInfo.txt, PlanRange, and each PTN log matched to its plan layer.

Deliveries are paired with plan beams by PlanInfo.txt's DICOM_BEAM_NUMBER and PTN files with plan
layers by the number in their name (never by sorted position, whatever the zero padding); each
fraction's layer logs are checked against the plan by `fractions.log_problems`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from mqi_communicator.errors import CaseError
from mqi_communicator.files import sha256_of
from mqi_communicator.formats import ptn
from mqi_communicator.formats.plan import Beam, Plan

DELIVERY_FOLDER_PATTERN = re.compile(r"^\d{16}$")
PLANINFO_NAME = "PlanInfo.txt"
PLANRANGE_NAMES = ("PlanRange.txt", "PlanRange.csv")
ENERGY_TOLERANCE_MEV = 0.05


@dataclass
class PlanRangeRow:
    line: int
    code: int
    layer: int | None
    energy: float | None


@dataclass
class PtnFile:
    file: str
    layer: int  # the plan's layer number, from the number in the file name
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
    dose1_range_codes: list[int]  # per delivered layer, start..stop
    ptn: list[PtnFile] = field(default_factory=list)  # in layer order

    @property
    def layer_count(self) -> int:
        return self.stop_layer - self.start_layer + 1


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


def read_planrange(path: Path) -> list[PlanRangeRow]:
    """DOSE1_RANGE codes, one row per layer, from the CSV with header (LAYER_NUMBER and ENERGY
    too, where the file has those columns)."""
    with open(path, newline="", errors="replace") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise CaseError(path, "no layer rows")
    header = {name.strip().upper(): name for name in rows[0] if name is not None}
    if "DOSE1_RANGE" not in header:
        raise CaseError(path, "no DOSE1_RANGE column")

    def number(row: dict[str, str], column: str, line: int) -> float | None:
        if column not in header:
            return None
        raw = (row[header[column]] or "").strip()
        try:
            return float(raw)
        except ValueError as exc:
            raise CaseError(path, f"line {line}: {column} {raw!r} is not a number") from exc

    result: list[PlanRangeRow] = []
    for line, row in enumerate(rows, start=2):
        code = int(number(row, "DOSE1_RANGE", line) or 0)
        if not 1 <= code <= 5:
            raise CaseError(path, f"line {line}: DOSE1_RANGE {code} is not a monitor range code 1-5")
        layer = number(row, "LAYER_NUMBER", line)
        result.append(PlanRangeRow(line, code, None if layer is None else int(layer), number(row, "ENERGY", line)))
    return result


def find_delivery_folders(case_dir: Path) -> list[Path]:
    """Folders holding a PlanInfo.txt, or named like a delivery (16 digits), up to two levels down."""
    found = {p.parent for p in case_dir.rglob(PLANINFO_NAME) if len(p.relative_to(case_dir).parts) <= 3}
    found |= {p for p in case_dir.rglob("*") if p.is_dir() and DELIVERY_FOLDER_PATTERN.match(p.name)}
    return sorted(found, key=lambda p: (p.name, str(p)))


def delivery_header(case_dir: Path, folder: Path, plan: Plan) -> Delivery:
    """A delivery as its PlanInfo.txt declares it (beam, layer range), checked against the plan;
    no PTN file is read (cheap enough for deciding whether a case is complete)."""
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
    return Delivery(
        folder=str(folder.relative_to(case_dir)),
        irradiation_time=folder.name if DELIVERY_FOLDER_PATTERN.match(folder.name) else None,
        beam_number=beam_number,
        start_layer=start,
        stop_layer=stop,
        dose1_range_codes=[],
    )


def numbered_ptn_files(folder: Path, start: int, stop: int) -> list[tuple[int, Path]]:
    """(plan layer number, file) for each PTN of a delivery, by the number in its name (never by
    sorted position): the plan's layer numbers start..stop, or 1..n counted within the delivery."""
    numbered: dict[int, Path] = {}
    for path in sorted(folder.glob("*.ptn")):
        try:
            number = ptn.layer_number(path)
        except ValueError as exc:
            raise CaseError(path, str(exc).split(": ", 1)[1]) from exc
        if number in numbered:
            raise CaseError(path, f"layer number {number} again (also in {numbered[number].name})")
        numbered[number] = path
    delivered = list(range(start, stop + 1))
    if len(numbered) != len(delivered):
        raise CaseError(
            folder,
            f"{len(numbered)} PTN files for {len(delivered)} delivered layers "
            f"(START_LAYER_NUMBER {start}, STOP_LAYER_NUMBER {stop} in {PLANINFO_NAME})",
        )
    if sorted(numbered) == delivered:
        return sorted(numbered.items())
    if sorted(numbered) == list(range(1, len(delivered) + 1)):
        return [(start + n - 1, path) for n, path in sorted(numbered.items())]
    raise CaseError(
        folder,
        f"PTN layer numbers {sorted(numbered)} are not the delivered layers {start}..{stop} "
        f"(START_LAYER_NUMBER/STOP_LAYER_NUMBER in {PLANINFO_NAME})",
    )


def range_codes_by_layer(path: Path, beam: Beam, start: int, stop: int) -> dict[int, int]:
    """DOSE1_RANGE per plan layer number; PlanRange lists the delivered layers or every layer of
    the beam, and where it has LAYER_NUMBER / ENERGY columns they must agree with the plan."""
    rows = read_planrange(path)
    delivered = stop - start + 1
    if all(r.layer is not None for r in rows):
        numbers = [r.layer for r in rows]
    elif len(rows) == len(beam.layers):
        numbers = list(range(1, len(beam.layers) + 1))
    elif len(rows) == delivered:
        numbers = list(range(start, stop + 1))
    else:
        raise CaseError(
            path, f"{len(rows)} rows, expected {delivered} delivered layers or {len(beam.layers)} plan layers"
        )
    codes: dict[int, int] = {}
    for row, number in zip(rows, numbers, strict=True):
        assert number is not None
        if not 1 <= number <= len(beam.layers):
            raise CaseError(
                path, f"line {row.line}: layer {number} is not a layer of beam {beam.number} ({beam.name!r})"
            )
        planned = beam.layers[number - 1].energy_mev
        if row.energy is not None and abs(row.energy - planned) > ENERGY_TOLERANCE_MEV:
            raise CaseError(
                path, f"line {row.line}: layer {number} energy {row.energy:g} MeV, the plan has {planned:g} MeV"
            )
        codes[number] = row.code
    missing = [n for n in range(start, stop + 1) if n not in codes]
    if missing:
        raise CaseError(path, f"no row for delivered layer(s) {missing}")
    return codes


def read_delivery(case_dir: Path, folder: Path, plan: Plan) -> Delivery:
    """A delivery with its PTN files matched to plan layers. Whether each layer's log is plausible
    is judged per fraction (`fractions.log_problems`): a layer resumed in a later delivery is
    only whole in the union of both logs."""
    delivery = delivery_header(case_dir, folder, plan)
    beam = plan.beam(delivery.beam_number)
    assert beam is not None  # delivery_header checked it
    start, stop = delivery.start_layer, delivery.stop_layer
    numbered = numbered_ptn_files(folder, start, stop)
    planrange = next((folder / n for n in PLANRANGE_NAMES if (folder / n).is_file()), None)
    if planrange is None:
        raise CaseError(folder, f"no {' or '.join(PLANRANGE_NAMES)}")
    codes = range_codes_by_layer(planrange, beam, start, stop)
    delivery.dose1_range_codes = [codes[n] for n in range(start, stop + 1)]
    for number, path in numbered:
        try:
            rows = ptn.check_size(path)
        except ValueError as exc:
            raise CaseError(path, str(exc).split(": ", 1)[1]) from exc
        delivery.ptn.append(
            PtnFile(file=path.name, layer=number, size=path.stat().st_size, rows=rows, sha256=sha256_of(path))
        )
    return delivery
