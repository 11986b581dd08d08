"""The lines `bin/mqi status` shows beside its case table: when the timer runs next, the DICOM
receiver and the case assembly (docs/dicom-network.md), and how times are written."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from mqi_communicator.dicomnet import activity, assembly_state


def next_timer_run() -> str:
    if shutil.which("systemctl") is None:
        return "no systemd here (cron: see `crontab -l`)"
    result = subprocess.run(
        ["systemctl", "show", "mqi-communicator.timer", "--property=NextElapseUSecRealtime", "--value"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    value = result.stdout.strip()
    return value if result.returncode == 0 and value and value != "n/a" else "timer not installed"


def ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d"


def when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else ""


def receiver_line(config: dict[str, Any], workdir: Path) -> str | None:
    """The DICOM receiver's state in one line, where the site runs one (docs/dicom-network.md)."""
    section = config["dicom_network"]["receiver"]
    return activity.summary(workdir / section["state_file"]) if section["enabled"] else None


def assembly_line(config: dict[str, Any], workdir: Path) -> str | None:
    """What the case assembly waits for, where the site assembles cases (docs/dicom-network.md)."""
    section = config["dicom_network"]["assembly"]
    return assembly_state.summary(workdir / section["state_file"]) if section["enabled"] else None


def network_lines(config: dict[str, Any], workdir: Path) -> str | None:
    lines = (receiver_line(config, workdir), assembly_line(config, workdir))
    return "\n".join(line for line in lines if line) or None
