"""One alert per fraction record that is not PASS (docs/fractions.md), through the alert channels
and the case's alert ledger of ops/alerts (`notify_once`): a later run sends nothing again."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mqi_communicator.ops import alerts, state

KIND = "fraction_delivery"


def fraction_alert(record: dict[str, Any], record_path: Path) -> alerts.Alert:
    """What happened (case, fraction, verdict), each beam that is not PASS with its reasons, the
    record's path, what to do."""
    case_id, number, verdict = record["case_id"], record["fraction"], record["verdict"]
    what = (
        f"The delivery check of fraction {number} of case {case_id} is {verdict}: "
        "its treatment logs do not match the plan within the delivery tolerances."
    )
    lines = []
    for beam in record["beams"]:
        if beam["verdict"] != "PASS":
            reasons = "; ".join(beam["delivery"].get("reasons", [])) or "no reason given"
            lines.append(f"beam {beam['number']} ({beam['name']}): {beam['verdict']}: {reasons}")
    details = {
        "case": case_id,
        "fraction": number,
        "verdict": verdict,
        "beams": "\n".join(lines),
        "deliveries": ", ".join(record["deliveries"]),
        "record": str(record_path),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
    }
    facts = [f"{k.capitalize()}: {v}".replace("\n", "\n    ") for k, v in details.items() if v not in (None, "")]
    todo = (
        "review the fraction's delivery record (per layer: spot positions and MU against the plan) "
        "and the treatment machine's logs; the case's finished dose is not recomputed."
    )
    body = "\n".join([what, "", *facts, "", f"What to do: {todo}", ""])
    subject = f"case {case_id} fraction {number} delivery {verdict}"
    return alerts.Alert(KIND, subject, body, case_id, details)


def alert_if_not_pass(processing: Path, case_id: str, number: int, config: dict[str, Any]) -> bool:
    """Send the alert of fraction `number`'s record once, when it is not PASS; True if sent now."""
    path = processing / "fractions" / f"{number}.json"
    record = json.loads(path.read_text())
    if record.get("verdict") == "PASS":
        return False
    key = f"fraction:{number}:{record['verdict']}"
    return alerts.notify_once(fraction_alert(record, path), processing / state.ALERTS, key, config)
