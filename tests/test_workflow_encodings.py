"""One case through the real workflow (the embedded default engine) with a big-endian plan in
Korean ISO 2022 IR 149 and deflated TPS doses: every name comes out unchanged in the RT Doses,
qa.json, the QA sheet and the beam folders (docs/encodings.md)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from mqi_communicator.formats.plan import sanitize_beam_name
from tests import qa_gen
from tests.test_encodings import DCMCONV, KOREAN, KOREAN_2022, encoded, write_case
from tests.workflow import case_summaries, full_log, snakemake, write_config


def test_korean_big_endian_plan_and_deflated_tps_doses_through_the_workflow(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    writer = "dcmtk" if DCMCONV else "pydicom"  # someone else's encoder where installed
    case = write_case(scan, KOREAN, KOREAN_2022, ExplicitVRBigEndian, writer, layers=2)
    for tps in qa_gen.write_case_tps_doses(case, "G2"):
        deflated = encoded(tps, tps.with_suffix(".deflated"), DeflatedExplicitVRLittleEndian, writer)
        deflated.replace(tps)
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan)

    run = snakemake(work, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:] + full_log(run)[-3000:]
    assert sorted(case_summaries(work)) == ["enc"]
    out = work / "data" / "cases" / "enc"
    folders = sorted(sanitize_beam_name(name) for name in KOREAN.beams)
    assert sorted(p.name for p in (out / "intermediate" / "moqui_csv" / "log").iterdir()) == folders

    for name in KOREAN.beams:
        ds = pydicom.dcmread(out / "dicom" / f"RD_{sanitize_beam_name(name)}.dcm")
        assert ds.SpecificCharacterSet == KOREAN_2022
        assert str(ds.PatientName) == KOREAN.patient_name and ds.PatientID == KOREAN.patient_id
        assert name in ds.SeriesDescription

    qa_json = out / "intermediate" / "qa" / "qa.json"
    qa = json.loads(qa_json.read_text(encoding="utf-8"))
    assert [b["name"] for b in qa["beams"]] == list(KOREAN.beams)
    # The deflated TPS doses were read and compared, not skipped as unreadable.
    assert all(b["dose"]["verdict"] == "PASS" for b in qa["beams"]), json.dumps(qa["beams"], ensure_ascii=False)[:3000]
    sheet = (out / "intermediate" / "qa" / "qa_sheet.html").read_text(encoding="utf-8")
    assert "<meta charset='utf-8'>" in sheet
    for name in KOREAN.beams:
        assert html.escape(name) in sheet
