"""Plans shaped as Eclipse, RayStation and MOSAIQ write them (issue 19), through the real
workflow: the setup beam outside the fraction group, no BeamMeterset, two fraction groups."""

from __future__ import annotations

import json
from pathlib import Path

from tests import casegen
from tests import plan_shapes_fraction as shapes
from tests import plan_shapes_geometry as geometry_shapes
from tests.workflow import case_summaries, snakemake, write_config


def _qa(work: Path, case: str) -> dict:
    return json.loads((work / "data" / "cases" / case / "intermediate" / "qa" / "qa.json").read_text())


def test_plan_shapes_through_the_workflow(tmp_path: Path) -> None:
    scan = tmp_path / "new_cases"
    eclipse = casegen.write_case(scan, "eclipse_nometer")
    shapes.setup_beam_unreferenced(shapes.plan_of(eclipse))
    shapes.weights_normalised(shapes.plan_of(eclipse))
    shapes.without_beam_meterset(shapes.plan_of(eclipse))
    boost = casegen.write_case(scan, "boost")
    shapes.two_fraction_groups(shapes.plan_of(boost), fractions=(25, 5))
    aria = casegen.write_case(scan, "aria_couch", geometry_shapes.aria_three_fields())
    geometry_shapes.couch_angles(shapes.plan_of(aria), geometry_shapes.ARIA_COUCH_ANGLES)
    plan_mode = casegen.write_case(scan, "nometer_plan", deliveries=False)
    shapes.without_beam_meterset(shapes.plan_of(plan_mode))
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)

    run = snakemake(work, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode != 0  # the plan-mode case is refused, and Snakemake says so
    summaries = case_summaries(work)
    assert sorted(summaries) == ["aria_couch", "boost", "eclipse_nometer"], output[-3000:]
    for case in ("boost", "eclipse_nometer"):
        csvs = work / "data" / "cases" / case / "intermediate" / "moqui_csv" / "log"
        assert sorted(p.name for p in csvs.iterdir()) == ["1G180_TX", "2G90"]
        assert len(list(csvs.rglob("*.csv"))) == 8
    intake = json.loads((work / "data" / "cases" / "eclipse_nometer" / "intermediate" / "intake.json").read_text())
    assert intake["setup_beams"] == [1] and [b["number"] for b in intake["beams"]] == [2, 3]
    assert any("no BeamMeterset for beam(s) [2, 3]" in w for w in intake["warnings"])
    # No planned MU: the delivery check says so instead of judging weights as MU.
    for beam in _qa(work, "eclipse_nometer")["beams"]:
        assert beam["delivery"]["verdict"] == "NOT ASSESSED"
        assert "no BeamMeterset" in beam["delivery"]["reasons"][0]
    # Two fraction groups: each beam's MU from its own group, so its logs check against them.
    assert [b["delivery"]["verdict"] for b in _qa(work, "boost")["beams"]] == ["PASS", "PASS"]
    # Three fields at couch 30/0/330 run in the beam frame, each couch recorded as written.
    aria_qa = _qa(work, "aria_couch")["beams"]
    assert [b["geometry"]["patient_support_angle_deg"] for b in aria_qa] == list(geometry_shapes.ARIA_COUCH_ANGLES)
    assert [b["geometry"]["gantry_angle_deg"] for b in aria_qa] == [90.0, 0.0, 270.0]
    assert [b["delivery"]["verdict"] for b in aria_qa] == ["PASS"] * 3
    dicom = work / "data" / "cases" / "aria_couch" / "dicom"
    assert sorted(p.name for p in dicom.iterdir()) == ["RD_F1.dcm", "RD_F2.dcm", "RD_F3.dcm"]  # no plan sum
    refused = (work / "logs" / "nometer_plan" / "intake.log").read_text()
    assert "INTAKE FAILED for case nometer_plan" in refused
    assert "plan mode needs each treatment beam's MU" in refused and "BeamMeterset" in refused
    assert any(line.startswith("case nometer_plan FAILED at intake: ") for line in output.splitlines()), output
