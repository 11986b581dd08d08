"""A QA verdict that is not PASS reaches someone, once, through real Snakemake runs and real SMTP
and HTTP servers (tests/alert_servers.py); a case that failed and then finishes with QA FAIL says
so in its "recovered" message instead of "nothing to do"."""

from __future__ import annotations

import json
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom

from tests import casegen, qa_gen
from tests.alert_servers import Inbox, alerts_section
from tests.workflow import snakemake, write_config

QA_JSON = "data/cases/qafail/intermediate/qa/qa.json"


def write_failing_tps_doses(case: Path) -> None:
    """The independent TPS doses of tests/qa_gen.py with every spot 12 mm off in x: the built-in
    engine's dose is RELATIVE (scaled to the TPS before the gamma, so a uniformly scaled TPS dose
    would pass), a displaced field is a FAIL whatever the scale."""
    plan = pydicom.dcmread(next(case.glob("RP.*.dcm")))
    x_rel, z_rel, x_abs, z_abs = qa_gen.tps_grid(plan)
    for beam in plan.IonBeamSequence:
        if beam.get("TreatmentDeliveryType") == "SETUP" or beam.BeamName == "SETUP":
            continue
        number = int(beam.BeamNumber)
        layers = [(energy, xy + np.array([12.0, 0.0]), mu) for energy, xy, mu in qa_gen.plan_spots(plan, number)]
        plane = qa_gen.tps_plane(layers, "G2", x_rel, z_rel)
        qa_gen.write_tps_dose(case / f"RD_TPS_{number}.dcm", plan, plane, x_abs, z_abs, beam_number=number)


def received(inbox: Inbox, webhook: ThreadingHTTPServer) -> tuple[list[str], list[dict]]:
    return [str(message["Subject"]) for _, message in inbox.messages], [body for _, body in webhook.posts]  # type: ignore[attr-defined]


def test_a_qa_fail_alerts_once_and_recovered_says_the_verdict(
    tmp_path: Path, smtp: tuple[Inbox, int], webhook: ThreadingHTTPServer
) -> None:
    inbox, smtp_port = smtp
    scan = tmp_path / "scan"
    # First the case cannot be computed (a PTN file is missing): it fails at intake.
    broken = casegen.write_case(scan, "qafail")
    sorted(next(p for p in sorted(broken.iterdir()) if p.is_dir()).glob("*.ptn"))[1].unlink()
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan, alerts=alerts_section(smtp_port, webhook.server_port))
    first = snakemake(work)
    assert first.returncode != 0
    subjects, posts = received(inbox, webhook)
    assert [p["kind"] for p in posts] == ["case_failed"] and len(subjects) == 1

    # The sender completes the case, with a TPS dose that does not match what was delivered.
    write_failing_tps_doses(casegen.write_case(scan, "qafail"))
    second = snakemake(work)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "QA FAIL" in second.stderr
    subjects, posts = received(inbox, webhook)
    assert [p["kind"] for p in posts] == ["case_failed", "case_recovered", "case_verdict"]
    # The verdict as shown everywhere: FAIL, followed by the case's labels if it has any.
    labels = "".join(f" [{label}]" for label in json.loads((work / QA_JSON).read_text()).get("labels", []))
    assert subjects[1:] == [
        f"[mqi_communicator] Test site: case qafail recovered, QA FAIL{labels}",
        f"[mqi_communicator] Test site: case qafail QA FAIL{labels}",
    ]
    recovered = inbox.messages[1][1].get_content()
    assert f"with QA verdict FAIL{labels}." in recovered and "What to do: nothing" not in recovered
    assert "qa_sheet.html" in recovered
    verdict = inbox.messages[2][1].get_content()
    sheet = work / "data" / "cases" / "qafail" / "intermediate" / "qa" / "qa_sheet.html"
    assert sheet.is_file() and str(sheet) in verdict
    # Each beam that failed, with the reasons of its dose line.
    for beam in ("1G180:TX", "2G90"):
        assert f"{beam}: FAIL" in verdict
    assert verdict.count("dose FAIL: ") == 2 and verdict.count("3%/2mm global pass rate") >= 2
    assert posts[2]["case_id"] == "qafail" and posts[2]["details"]["verdict"] == "FAIL"
    assert posts[2]["details"]["sheet"] == str(sheet)

    # The trend of the same run: the built-in engine's RELATIVE, log-based points in their own
    # stratum, at the irradiation times of the delivery folders (tests/casegen.py: 09:00, 09:05).
    [(name, stratum)] = json.loads((work / "results" / "qa_trend.json").read_text())["strata"].items()
    assert name.startswith("G2 | built-in") and "| log-based | absolute | 3%/2mm global, cutoff 10 %" in name
    assert [p["time"] for p in stratum["points"]] == ["2026110209000000", "2026110209050000"]

    # Later runs (the case is final) and a rerun of the alert by hand send nothing more.
    third = snakemake(work)
    assert third.returncode == 0, third.stderr[-3000:]
    assert len(received(inbox, webhook)[1]) == 3 and len(inbox.messages) == 3
