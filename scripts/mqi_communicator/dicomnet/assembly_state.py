"""The case assembly's state file as `bin/mqi status` reads it (standard library only: status
reads it at every refresh). Written by `assembly.Assembler` (docs/dicom-network.md#case-assembly)."""

from __future__ import annotations

import json
from pathlib import Path

ASSEMBLED, WAITING = "assembled", "waiting"


def summary(state_file: Path) -> str:
    """The assembly in one line for `bin/mqi status`: how many plans wait, and for what."""
    try:
        plans = json.loads(state_file.read_text()).get("plans", {})
    except (OSError, ValueError):
        return "DICOM case assembly: nothing assembled yet"
    waiting = [p for p in plans.values() if p.get("state") != ASSEMBLED]
    assembled = len(plans) - len(waiting)
    line = f"DICOM case assembly: {assembled} assembled, {len(waiting)} waiting"
    details = [f"{p.get('case', '?')}: {p.get('reason', '')}" for p in waiting[:3]]
    return line + ("; " + "; ".join(details) if details else "")
