"""A case's sign-off record: who reviewed its QA result, when, and what they decided
(docs/sign-off.md).

    <processing>/signoff/signoff.jsonl           one JSON line per signature, only ever appended
    <processing>/signoff/qa_report_signed_<n>.pdf the PDF QA report with the n-th signature

Each line holds the sha256 of the `qa.json` it signs. A signature whose hash is not that of the
case's current `qa.json` (reprocessed, or edited) is VOID: it signed results that are not these.
This module reads and judges the record; `bin/mqi sign` (ops/signoff.py) appends to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqi_communicator.errors import InputError

FOLDER = "signoff"
RECORD = "signoff.jsonl"
ACCEPT, REJECT = "accept", "reject"


def folder_for(qa_json: Path) -> Path:
    """The sign-off folder of the case whose results are `<processing>/qa/qa.json`."""
    return qa_json.resolve().parent.parent / FOLDER


def read_records(record: Path) -> list[dict[str, Any]]:
    """Every signature in the record, oldest first (none when there is no record)."""
    try:
        text = record.read_text()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{record}: line {number} is not JSON ({exc})") from exc
        if not isinstance(entry, dict) or entry.get("decision") not in (ACCEPT, REJECT) or "qa_sha256" not in entry:
            raise InputError(f"{record}: line {number} is not a sign-off entry")
        records.append(entry)
    return records


@dataclass(frozen=True)
class SignOff:
    """The sign-off state of a case's current results.

    state: "unsigned" (nobody signed), "void" (every signature is of other results), "signed"
    (accepted by everyone who signed these results), "rejected" (someone rejected these results:
    a reject stands until the results change)."""

    state: str
    valid: tuple[dict[str, Any], ...]
    void: tuple[dict[str, Any], ...]

    def summary(self) -> str:
        """One line for `bin/mqi status`, the sheet and the PDF."""
        if self.state == "unsigned":
            return "unsigned"
        if self.state == "void":
            names = ", ".join(sorted({r["signed_by"] for r in self.void}))
            return f"VOID (signed by {names} for earlier results; sign again)"
        if self.state == "rejected":
            names = ", ".join(r["signed_by"] for r in self.valid if r["decision"] == REJECT)
            return f"rejected by {names}"
        return "signed by " + ", ".join(
            f"{r['signed_by']} ({r['time'][:16].replace('T', ' ')} UTC)" for r in self.valid
        )


def evaluate(records: list[dict[str, Any]], qa_sha256: str) -> SignOff:
    """The state of the results whose `qa.json` has this sha256."""
    valid = tuple(r for r in records if r["qa_sha256"] == qa_sha256)
    void = tuple(r for r in records if r["qa_sha256"] != qa_sha256)
    if any(r["decision"] == REJECT for r in valid):
        state = "rejected"
    elif valid:
        state = "signed"
    else:
        state = "void" if void else "unsigned"
    return SignOff(state, valid, void)


def block_lines(records: list[dict[str, Any]], qa_sha256: str) -> list[str]:
    """The sign-off block of the sheet and the PDF: the state, then every signature (VOID ones
    marked), then the sha256 of the qa.json these results are."""
    signoff = evaluate(records, qa_sha256)
    lines = [f"Sign-off: {signoff.summary()}"]
    for entry in records:
        mark = "" if entry["qa_sha256"] == qa_sha256 else "VOID - "
        decision = "ACCEPTED" if entry["decision"] == ACCEPT else "REJECTED"
        comment = f': "{entry["comment"]}"' if entry.get("comment") else ""
        lines.append(
            f"{mark}{decision} by {entry['signed_by']} at {entry['time']} (verdict {entry['verdict']}){comment}"
        )
    if not records:
        lines.append("Not yet reviewed. Sign with: bin/mqi sign CASE --by NAME [--comment TEXT] [--reject]")
    lines.append(f"qa.json sha256: {qa_sha256}")
    return lines
