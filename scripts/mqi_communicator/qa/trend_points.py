"""The points of the QA trend: one per assessed beam, with the stratum it belongs to and the time
its fraction was delivered, and the ledger that keeps them (docs/alerts-and-trend.md).

A stratum is what makes pass rates comparable: room, engine, mode (log-based or PLAN-BASED),
comparison (absolute or RELATIVE) and the primary gamma criteria. A beam's time is the
irradiation time of the fraction its QA assessed: the 16-digit delivery folder names
(YYYYMMDDhhmmssxx) of the case's intake.json, which sits beside the `qa/` folder of qa.json
(without it, the first irradiation qa.json's `fraction_assessed` records for the case). A
plan-based case delivered nothing: its points are ordered by the time its QA was written (they
are a stratum of their own). A point whose stratum or time cannot be told goes to the stratum
"unknown", which is shown but never judged, and never mixed with the others.
"""

from __future__ import annotations

import datetime
import glob
import json
from pathlib import Path
from typing import Any

from mqi_communicator.errors import InputError
from mqi_communicator.files import write_atomic

UNKNOWN = "unknown"
PLAN_BASED_LABEL = "PLAN-BASED"
STRATUM_FIELDS = ("room", "engine", "mode", "comparison", "criteria")


def irradiation_time(name: str | None) -> datetime.datetime | None:
    """The time a delivery folder's 16-digit name (YYYYMMDDhhmmssxx) gives, or None."""
    if not name or len(name) != 16 or not name.isdigit():
        return None
    try:
        return datetime.datetime.strptime(name[:14], "%Y%m%d%H%M%S")
    except ValueError:
        return None


def fraction_times(manifest: dict[str, Any]) -> dict[int, str]:
    """Per beam number, the 16-digit irradiation time of the fraction simulated and assessed (its
    first delivery: an interrupted fraction resumed later is one fraction)."""
    by_folder = {d.get("folder"): d.get("irradiation_time") for d in manifest.get("deliveries", [])}
    out = {}
    for beam in manifest.get("beams", []):
        times = [by_folder.get(folder) for folder in beam.get("simulated_deliveries", [])]
        valid = sorted(str(t) for t in times if irradiation_time(t))
        if valid:
            out[int(beam["number"])] = valid[0]
    return out


def _stamp(written: str) -> str | None:
    """A QA write time (ISO 8601) in the 16-digit form the delivery times have."""
    try:
        return datetime.datetime.fromisoformat(written).strftime("%Y%m%d%H%M%S") + "00"
    except (TypeError, ValueError):
        return None


def stratum_name(point: dict[str, Any]) -> str:
    return " | ".join(str(point[k]) for k in STRATUM_FIELDS)


def _engine(qa: dict[str, Any]) -> str | None:
    return qa.get("engine") or (qa.get("provenance") or {}).get("engine")


def beam_points(qa: dict[str, Any], manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The points of one case's qa.json (assessed beams only), `manifest` its intake.json."""
    labels = qa.get("labels", []) or []
    assessed = qa.get("fraction_assessed") or {}  # the case's deliveries as QA recorded them, if it did
    plan_case = PLAN_BASED_LABEL in labels or "plan" in ((manifest or {}).get("mode"), assessed.get("source"))
    times = fraction_times(manifest) if manifest else {}
    case_time = assessed.get("first_irradiation") if irradiation_time(assessed.get("first_irradiation")) else None
    written = (qa.get("provenance") or {}).get("written")
    out = []
    for beam in qa["beams"]:
        dose = beam.get("dose") or {}
        primary = dose.get("gamma_primary") or {}
        rate = primary.get("pass_rate_percent")
        if rate is None:
            continue
        plan_beam = plan_case or (beam.get("delivery") or {}).get("verdict") == "NOT APPLICABLE"
        point: dict[str, Any] = {
            "case_id": qa["case_id"],
            "beam": beam["name"],
            "pass_rate_percent": float(rate),
            "written": written,
            "room": qa.get("room"),
            "engine": _engine(qa),
            "mode": "plan-based" if plan_beam else "log-based",
            "comparison": dose.get("comparison"),
            "criteria": (
                f"{primary['criteria']}, cutoff {primary['cutoff_percent']:g} %"
                if primary.get("criteria") and primary.get("cutoff_percent") is not None
                else None
            ),
        }
        if plan_beam:
            point["time"], point["time_source"] = _stamp(written or ""), "qa written (plan-based: nothing delivered)"
        else:
            point["time"], point["time_source"] = times.get(beam.get("number", -1)) or case_time, "delivery"
        missing = [k for k in (*STRATUM_FIELDS, "time") if not point.get(k)]
        point["stratum"] = UNKNOWN if missing else stratum_name(point)
        if missing:
            point["unknown_because"] = "no " + ", ".join(missing)
        out.append(point)
    return out


def order(point: dict[str, Any]) -> tuple[str, str, str, str]:
    return (point["stratum"], point.get("time") or "", point["case_id"], point["beam"])


def points(qa_files: list[Path]) -> list[dict[str, Any]]:
    """Every point of some cases' qa.json files (their intake.json beside `qa/`), in ledger order."""
    out = []
    for path in qa_files:
        try:
            qa = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: unreadable QA result ({exc})") from exc
        intake = path.parent.parent / "intake.json"
        try:
            manifest = json.loads(intake.read_text()) if intake.is_file() else None
        except (OSError, ValueError) as exc:
            raise InputError(f"{intake}: unreadable intake manifest ({exc})") from exc
        try:
            out.extend(beam_points(qa, manifest))
        except (KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a QA result ({type(exc).__name__}: {exc})") from exc
    return sorted(out, key=order)


def _old_line(point: dict[str, Any]) -> dict[str, Any]:
    """A ledger line written before strata: kept, in the unknown stratum."""
    return point | {"stratum": UNKNOWN, "unknown_because": "an old ledger line without stratum and delivery time"}


def _line(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True) + "\n"


def read_ledger(ledger: Path, history: str | None) -> list[tuple[dict[str, Any], str]]:
    """The ledger's points, each with its line; without a ledger, or with one written before
    strata, they are derived (once) from every case's qa.json (`history`, a glob), and old lines
    of cases no longer found there go to the unknown stratum."""
    lines = [line + "\n" for line in ledger.read_text().splitlines() if line.strip()] if ledger.exists() else []
    known = [(json.loads(line), line) for line in lines]
    if ledger.exists() and all("stratum" in p for p, _ in known):
        return known
    derived = points([Path(p) for p in sorted(glob.glob(history or ""))])
    found = {p["case_id"] for p in derived}
    kept = [_old_line(p) for p, _ in known if "stratum" not in p and p["case_id"] not in found]
    return [(p, _line(p)) for p in derived + kept]


def update_ledger(ledger: Path, qa_files: list[Path], history: str | None) -> list[dict[str, Any]]:
    """Every point: the ledger's, with the cases of `qa_files` replaced by their current points;
    rewritten atomically (unchanged lines as they were). A run reads the ledger and its own cases
    only, so its cost does not grow with the number of finished cases' files."""
    known = read_ledger(ledger, history)
    fresh = points(qa_files)
    renewed = {p["case_id"] for p in fresh} | {json.loads(f.read_text())["case_id"] for f in qa_files}
    merged = [entry for entry in known if entry[0]["case_id"] not in renewed] + [(p, _line(p)) for p in fresh]
    merged.sort(key=lambda entry: order(entry[0]))
    write_atomic(ledger, "".join(line for _, line in merged).encode())
    return [p for p, _ in merged]
