"""A finished case's QA results as the workflow leaves them, without a workflow run: the case of
tests/test_qa_verdict.py (PTN logs from casegen, TPS doses from the independent qa_gen), its QA
computed by the qa rule's own command (`python -m mqi_communicator.qa.run`) into the case's
processing folder, and the case summary that marks it finished. Plus the poppler tools the PDF
tests read the reports with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mqi_communicator import settings
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.ops import state
from tests import test_qa_verdict

REPO = Path(__file__).resolve().parents[1]
CASE = "qa_case"


def site(root: Path, **signoff: object) -> tuple[Path, Path, state.Layout]:
    """(workdir, its site config, layout) with the scan folder under root/scan."""
    workdir = root / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"paths": {"local": {"scan_directory": str(root / "scan")}}}
    if signoff:
        config["signoff"] = signoff
    configfile = workdir / "site.yaml"
    configfile.write_text(json.dumps(config))
    return workdir, configfile, state.Layout.from_config(settings.load_site(configfile, workdir), workdir)


def write_qa(
    case: Path, processing: Path, *, calibrated: bool = True, finished: bool = True, **perturb: object
) -> dict:
    """Run the qa rule's command for the case (delivered doses perturbed as test_qa_verdict's are)
    into processing/qa/ (qa.json, qa_sheet.html, qa_report.pdf); returns qa.json."""
    config = settings.load(str(REPO / "config" / "config.yaml"))
    processing.mkdir(parents=True, exist_ok=True)
    manifest = processing / "intake.json"
    manifest.write_text(json.dumps(build_manifest(case, config)))
    rtdoses = test_qa_verdict.delivered_doses(case, processing / "dicom", **perturb)  # type: ignore[arg-type]
    calibration = test_qa_verdict.current_calibration() if calibrated else None
    qa = processing / "qa"
    command = [sys.executable, "-m", "mqi_communicator.qa.run", "--manifest", str(manifest), "--rtdoses"]
    command += [*map(str, rtdoses), "--settings", str(REPO / "config" / "config.yaml"), "--engine", "test engine"]
    command += ["--calibration", json.dumps(calibration), "--json", str(qa / "qa.json")]
    command += ["--sheet", str(qa / "qa_sheet.html"), "--pdf", str(qa / "qa_report.pdf")]
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads((qa / "qa.json").read_text())
    if finished:
        (processing / state.SUMMARY).write_text(
            json.dumps({"case_id": case.name, "qa": {"verdict": result["verdict"]}})
        )
    return result


def pdf_pages(path: Path) -> list[str]:
    """The text of each page of a PDF (pdftotext, page by page)."""
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True).stdout
    count = int(next(line.split()[1] for line in info.splitlines() if line.startswith("Pages:")))
    return [
        subprocess.run(
            ["pdftotext", "-layout", "-f", str(n), "-l", str(n), str(path), "-"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for n in range(1, count + 1)
    ]
