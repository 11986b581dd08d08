"""The cases whose RT Doses still have to reach a DICOM destination (`.mqi/dicom_outbox.json`),
and the start of the sender that works through them (docs/dicom-network.md#sender).

The run recorder adds a case when it finishes and starts the sender, detached, at the start and
end of every run that executes jobs; the sender removes a case once every destination confirmed
every RT Dose. A sending run so touches only the cases not yet confirmed, never the history.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mqi_communicator.files import write_json_atomic

OUTBOX = Path(".mqi") / "dicom_outbox.json"
SEND_LOG = Path("logs") / "dicom-send.log"


def pending(workdir: Path) -> list[str]:
    try:
        cases = json.loads((workdir / OUTBOX).read_text()).get("cases", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [str(c) for c in cases]


def _set(workdir: Path, case_id: str, waiting: bool) -> None:
    cases = set(pending(workdir))
    if (case_id in cases) == waiting:
        return
    cases = cases | {case_id} if waiting else cases - {case_id}
    write_json_atomic(workdir / OUTBOX, {"cases": sorted(cases)}, durable=True)


def add(workdir: Path, case_id: str) -> None:
    _set(workdir, case_id, True)


def remove(workdir: Path, case_id: str) -> None:
    _set(workdir, case_id, False)


def start_sender(config: dict[str, Any], workdir: Path) -> bool:
    """Start `python -m mqi_communicator.dicomnet.sender --pending` in the background (its own
    session: a run that ends or is stopped does not cut it) when cases wait and destinations are
    configured; True if started. A sender still running from before makes the new one exit."""
    if not config["dicom_network"]["sender"]["destinations"] or not pending(workdir):
        return False
    log = workdir / SEND_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mqi_communicator.dicomnet.sender", "--pending", "--workdir", str(workdir)]
    try:
        with log.open("ab") as output:
            subprocess.Popen(
                [*command, "--config-json", json.dumps(config, default=str)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=workdir,
            )
    except OSError as exc:  # the run goes on; the next one tries again
        print(f"mqi: DICOM sender not started: {exc}", file=sys.stderr)
        return False
    return True
