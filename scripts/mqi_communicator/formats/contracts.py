"""The case files the steps hand each other: `intake.json`, `qa.json`, `case_summary.json`
(docs/contracts.md). Each has a JSON Schema beside this module (`schemas/<name>.schema.json`),
checked in full where the file is written, and a typed model (the TypedDicts below, checked by
mypy) for reading it. A reader gets a cheap check (the schema's required top-level keys and
their types, no jsonschema import); a file that fails names the file and the key.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast

from mqi_communicator.errors import MqiError
from mqi_communicator.files import write_json_atomic

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
Contract = Literal["intake", "qa", "case_summary"]
Verdict = Literal["PASS", "REVIEW", "NOT ASSESSED", "FAIL", "ERROR"]


class ContractError(MqiError, ValueError):
    """A case file that does not hold what its contract says; the message names file and key."""


# --- intake.json (written by intake/case.py build_manifest) ---------------------------------


class ManifestPlan(TypedDict):
    path: str  # relative to case_dir
    file_name: str
    sop_instance_uid: NotRequired[str | None]
    patient_id: NotRequired[str | None]
    sha256: NotRequired[str]


class ManifestBeam(TypedDict):
    number: int
    name: str
    sanitized_name: str
    simulate: bool
    plan_layers: NotRequired[int]
    energies_mev: NotRequired[list[float]]
    fractions: NotRequired[list[list[str]]]
    simulated_deliveries: NotRequired[list[str]]
    range_shifters: NotRequired[list[dict[str, Any]]]
    geometry: NotRequired[dict[str, Any]]


class PtnRecord(TypedDict):
    file: str
    sha256: str
    layer: NotRequired[int]
    size: NotRequired[int]
    rows: NotRequired[int]


class ManifestDelivery(TypedDict):
    folder: str
    beam_number: int
    ptn: list[PtnRecord]
    irradiation_time: NotRequired[str | None]
    start_layer: NotRequired[int]
    stop_layer: NotRequired[int]
    dose1_range_codes: NotRequired[list[int]]
    layer_count: NotRequired[int]


class ManifestFraction(TypedDict):
    number: int
    complete: bool
    beams: dict[str, list[str]]  # beam number (as text) -> delivery folders


class IntakeManifest(TypedDict):
    case_id: str
    case_dir: str
    mode: Literal["logs", "plan"]
    plan: ManifestPlan
    room: str
    setup_beams: list[int]
    beams: list[ManifestBeam]
    deliveries: list[ManifestDelivery]
    warnings: list[str]
    labels: NotRequired[list[str]]
    flags: NotRequired[list[str]]
    fractions: NotRequired[list[ManifestFraction]]
    inputs: NotRequired[dict[str, Any]]


# --- qa.json (written by qa/run.py assess) --------------------------------------------------


class QaLine(TypedDict):
    verdict: Verdict | Literal["NOT APPLICABLE"]  # no delivery logs to check (plan mode)
    reasons: NotRequired[list[str]]


class QaBeam(TypedDict):
    number: int
    name: str
    dose: QaLine
    delivery: QaLine
    verdict: Verdict
    gantry_angle: NotRequired[float | None]
    geometry: NotRequired[dict[str, Any]]
    tps_dose: NotRequired[str]


class QaResult(TypedDict):
    case_id: str
    verdict: Verdict
    beams: list[QaBeam]
    room: NotRequired[str]
    plan_sop_instance_uid: NotRequired[str | None]
    labels: NotRequired[list[str]]
    engine: NotRequired[str]
    calibration: NotRequired[dict[str, Any]]
    fraction_assessed: NotRequired[dict[str, Any]]
    criteria: NotRequired[dict[str, Any]]
    provenance: NotRequired[dict[str, Any]]


# --- case_summary.json (written by report.py case_summary) ----------------------------------


class SummaryBeam(TypedDict):
    beam: str
    beam_number: int
    max_dose: float
    units: str
    rt_dose: str
    engine: NotRequired[str]
    gpu: NotRequired[int | None]
    slurm_job: NotRequired[str]
    seconds: NotRequired[float]
    raw_dose: NotRequired[str]
    raw_sha256: NotRequired[str]


class SummaryQa(TypedDict):
    verdict: Verdict
    beams: dict[str, dict[str, str]]  # beam name -> verdict, dose, delivery
    qa_json: NotRequired[str]
    sheet: NotRequired[str]
    labels: NotRequired[list[str]]
    engine: NotRequired[str | None]
    dose_scale: NotRequired[dict[str, Any]]
    fraction_assessed: NotRequired[dict[str, Any] | None]


class CaseSummary(TypedDict):
    case_id: str
    beams: list[SummaryBeam]
    plan_dose: dict[str, Any]
    qa: NotRequired[SummaryQa | None]
    mode: NotRequired[str | None]
    labels: NotRequired[list[str]]
    flags: NotRequired[list[str]]
    warnings: NotRequired[list[str]]


# --- checks ---------------------------------------------------------------------------------


@functools.cache
def schema(contract: Contract) -> dict[str, Any]:
    """The contract's JSON Schema (read once per process)."""
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / f"{contract}.schema.json").read_text())
    return loaded


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def _type_matches(value: Any, spec: dict[str, Any]) -> bool:
    if "enum" in spec:
        return value in spec["enum"]
    if "$ref" in spec:
        return True  # only a full validation follows references
    names = spec.get("type")
    if names is None:
        return True
    for name in [names] if isinstance(names, str) else names:
        # JSON has no bool among its numbers: True is not an integer here.
        if isinstance(value, _JSON_TYPES[name]) and not (isinstance(value, bool) and name in ("integer", "number")):
            return True
    return False


def check(contract: Contract, data: Any, path: Path | str) -> None:
    """The cheap check of a file read: an object with the schema's required top-level keys, each
    present top-level key of its type. Raises ContractError naming the file and the key."""
    spec = schema(contract)
    if not isinstance(data, dict):
        raise ContractError(f"{path}: not a {spec['title']} (a JSON object expected)")
    for key in spec["required"]:
        if key not in data:
            raise ContractError(f"{path}: key '{key}' missing ({spec['title']}, docs/contracts.md)")
    for key, sub in spec["properties"].items():
        if key in data and not _type_matches(data[key], sub):
            raise ContractError(f"{path}: key '{key}' has the wrong type ({spec['title']}, docs/contracts.md)")


def validate(contract: Contract, data: Any, path: Path | str) -> None:
    """The full check against the contract's JSON Schema (where the file is written). Raises
    ContractError naming the file and every offending key."""
    import jsonschema  # only writers pay for it; the steps that write load it for settings anyway

    validator = jsonschema.Draft202012Validator(schema(contract))
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"key '{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}': {e.message}" for e in errors]
        raise ContractError(f"{path}: not a valid {schema(contract)['title']}:\n  " + "\n  ".join(lines))


def write(contract: Contract, path: Path, data: dict[str, Any] | IntakeManifest | QaResult | CaseSummary) -> None:
    """Validate in full, then write atomically: no step ever leaves a file that breaks its contract."""
    validate(contract, data, path)
    write_json_atomic(path, cast(dict[str, Any], data))


def read(contract: Contract, path: Path | str) -> dict[str, Any]:
    """A case file, JSON-decoded and checked; ContractError (a ValueError) naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ContractError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ContractError(f"{path}: not JSON ({exc})") from exc
    check(contract, data, path)
    return cast(dict[str, Any], data)


def read_manifest(path: Path | str) -> IntakeManifest:
    return cast(IntakeManifest, read("intake", path))


def read_qa(path: Path | str) -> QaResult:
    return cast(QaResult, read("qa", path))


def read_summary(path: Path | str) -> CaseSummary:
    return cast(CaseSummary, read("case_summary", path))
