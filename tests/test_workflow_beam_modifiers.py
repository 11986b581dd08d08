"""Beam modifiers through a real Snakemake run (docs/beam-modifiers.md): a range shifter is
modelled and says so in every place a person reads (RT Dose, case summary, qa.json, QA sheet,
beam table); a block fails its case naming it, and the other case is not held up."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from mqi_communicator.formats.plan import find_plan
from tests import casegen, qa_gen
from tests.plan_shapes_modifiers import add_block, add_range_shifter
from tests.workflow import full_log, snakemake, write_config

LABEL = "RANGE SHIFTER RS30 30 mm modelled"


def _small_spec(patient_id: str) -> casegen.CaseSpec:
    spots = [casegen.grid_spots(10.0, 10.0), casegen.grid_spots(5.0, 5.0)]
    return casegen.CaseSpec(
        patient_id=patient_id,
        beams=[
            casegen.BeamSpec(2, "1G180:TX", [150.0, 145.0], spots, gantry_angle=180.0),
            casegen.BeamSpec(3, "2G90", [140.0, 135.0], spots, gantry_angle=180.0),
        ],
    )


def test_range_shifter_labelled_everywhere_and_block_refused(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    shifted = casegen.write_case(scan, "shifted", _small_spec("SHIFTED"))
    add_range_shifter(find_plan(shifted), 2, shifter_id="RS30", wet_mm=30.0)
    qa_gen.write_case_tps_doses(shifted, "G2")
    blocked = casegen.write_case(scan, "blocked", _small_spec("BLOCKED"))
    add_block(find_plan(blocked), 3, "APERTURE1")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)

    run = snakemake(work, timeout=600)
    output = run.stdout + run.stderr
    cases = work / "data" / "cases"
    # The blocked case fails, naming the plan, the beam and the block; nothing of it is computed.
    assert run.returncode != 0
    assert "beam 3 ('2G90'): 1 block(s) (NumberOfBlocks 1; 'APERTURE1')" in output + full_log(run)
    assert not (cases / "blocked" / "dicom").exists()

    # The shifted case is computed and labelled wherever its result is shown.
    summary = json.loads((cases / "shifted" / "intermediate" / "case_summary.json").read_text())
    assert LABEL in summary["labels"]
    for name in ("RD_PLAN.dcm", "RD_1G180_TX.dcm", "RD_2G90.dcm"):
        ds = pydicom.dcmread(cases / "shifted" / "dicom" / name)
        assert f"[{LABEL}]" in ds.DoseComment and f"[{LABEL}]" in ds.SeriesDescription
    qa = json.loads((cases / "shifted" / "intermediate" / "qa" / "qa.json").read_text())
    assert LABEL in qa["labels"]
    assert LABEL in (cases / "shifted" / "intermediate" / "qa" / "qa_sheet.html").read_text()
    table = (cases / "shifted" / "intermediate" / "report" / "beams.csv").read_text().splitlines()
    assert all(LABEL in row for row in table[1:])
    # The engine's own log of the beam says what it modelled.
    logs = [q.read_text(errors="replace") for q in (work / "logs" / "shifted").rglob("*") if q.is_file()]
    modelled = [text for text in logs if "Range shifter: range shifter RS30 (BINARY): WET 30 mm" in text]
    assert len(modelled) == 1 and "Beam: 2 '1G180:TX'" in modelled[0]
