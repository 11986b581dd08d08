"""The PDF QA report the qa rule's command writes beside the sheet, read back page by page with
poppler's pdftotext/pdfinfo/pdftoppm (docs/qa-report-pdf.md); a dry run showing that a case
finished before the PDF existed is not run again for it; the report as an Encapsulated PDF judged
by dciodvfy and stored by the sender into Orthanc beside the RT Doses."""

from __future__ import annotations

import json
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pydicom
import pytest
from matplotlib.colors import to_rgb

from mqi_communicator.formats import encapsulated_pdf
from mqi_communicator.qa.sheet import COLOURS
from tests import dciodvfy, qa_results, test_qa_verdict, workflow
from tests.dciodvfy import in_ci
from tests.dicom_peers import orthanc, orthanc_get, python_module, running_orthanc
from tests.qa_results import CASE


@pytest.fixture(scope="module")
def failed_uncalibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A FAIL (5 % MU error) without a calibration: the DOSE SCALE NOT VERIFIED label."""
    root = tmp_path_factory.mktemp("qa_pdf")
    case = test_qa_verdict.make_case(root)
    qa = qa_results.write_qa(case, root / "processing", calibrated=False, mu_scale=1.05)
    return root, qa


def test_every_page_says_what_the_sheet_says(failed_uncalibrated: tuple[Path, dict]) -> None:
    root, qa = failed_uncalibrated
    pdf = root / "processing" / "qa" / "qa_report.pdf"
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert "(A4)" in info
    pages = qa_results.pdf_pages(pdf)
    assert qa["verdict"] == "FAIL" and "DOSE SCALE NOT VERIFIED" in qa["labels"]
    banner = f"Case {CASE}: {qa['verdict']}" + "".join(f" [{label}]" for label in qa["labels"])
    assert banner in pages[0]
    assert "Sign-off: unsigned" in pages[0] and "Reviewed by (name, signature)" in pages[0]
    for beam in qa["beams"]:
        title = f"Beam {beam['number']} {beam['name']}: {beam['verdict']}"
        [page] = [p for p in pages if title in p and "Dose (delivered vs TPS)" in p]
        dose = beam["dose"]
        for key in ("gamma_primary", "gamma_secondary"):
            g = dose[key]
            assert f"gamma {g['criteria']}" in page
            assert f"pass rate {g['pass_rate_percent']} % of {g['points_evaluated']} points" in page
        assert f"{dose['mean_dose_difference_percent']:+.2f} %" in page
        assert f"Dose (delivered vs TPS): {dose['verdict']}" in page
        assert f"Delivery (log vs plan): {beam['delivery']['verdict']}" in page
        assert all(reason in " ".join(page.split()) for reason in dose["reasons"])
        layer_rows = [line for line in page.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
        assert len(layer_rows) == len(beam["delivery"]["layers"])
    text = "\n".join(pages)
    for digest in qa["provenance"]["inputs"].values():
        assert f"sha256 {digest}" in text
    for name, version in qa["provenance"]["software"].items():
        assert f"{name} {version}" in text
    assert qa["calibration"]["state"] in text


def test_page_one_renders_as_a_printable_a4_image(failed_uncalibrated: tuple[Path, dict]) -> None:
    root, qa = failed_uncalibrated
    pdf = root / "processing" / "qa" / "qa_report.pdf"
    subprocess.run(["pdftoppm", "-r", "50", "-f", "1", "-l", "1", "-png", str(pdf), str(root / "page")], check=True)
    picture = mpimg.imread(root / "page-1.png")[..., :3]
    assert picture.shape[:2] == (585, 414)  # 8.27 x 11.69 in at 50 dpi
    # The banner across the top carries the verdict's colour; the page below it is white paper.
    banner = picture[int(585 * 0.085), int(414 * 0.5)]
    assert np.allclose(banner, to_rgb(COLOURS[qa["verdict"]]), atol=0.02)
    assert np.allclose(picture[int(585 * 0.7), int(414 * 0.5)], 1.0)


def test_a_case_finished_before_the_pdf_existed_is_not_run_again(tmp_path: Path) -> None:
    case = test_qa_verdict.make_case(tmp_path)
    workdir, _, layout = qa_results.site(tmp_path)
    processing = layout.processing(CASE)
    qa_results.write_qa(case, processing)
    (processing / "qa" / "qa_report.pdf").unlink()  # as a case finished by an older version
    workflow.write_config(workdir, tmp_path / "scan")
    dry = workflow.snakemake(workdir, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "qa_case" not in dry.stdout + dry.stderr
    # The same results without the finished mark: the case is in work, and its QA is (re)planned.
    (processing / "case_summary.json").unlink()
    dry = workflow.snakemake(workdir, "--dry-run", "--printshellcmds")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "qa_case" in dry.stdout + dry.stderr
    assert f"--pdf {(processing / 'qa' / 'qa_report.pdf').relative_to(workdir)}" in dry.stdout
    assert json.loads((processing / "qa" / "qa.json").read_text())["case_id"] == CASE


def test_the_report_as_an_encapsulated_pdf_is_conformant_and_files_under_the_plans_study(
    failed_uncalibrated: tuple[Path, dict],
) -> None:
    root, qa = failed_uncalibrated
    pdf = root / "processing" / "qa" / "qa_report.pdf"
    plan_path = root / "scan" / CASE / "RP.qa_case.dcm"
    target = root / "qa_report.dcm"
    written = encapsulated_pdf.write_for_plan(pdf, plan_path, target, f"QA report {CASE}: {qa['verdict']}")
    dciodvfy.assert_conformant(target)
    back, plan = pydicom.dcmread(target), pydicom.dcmread(plan_path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and back.Modality == "DOC"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID"):
        assert back.get(keyword) == plan.get(keyword), keyword
    document = bytes(back.EncapsulatedDocument)[: int(back.EncapsulatedDocumentLength)]
    assert document == pdf.read_bytes()
    (root / "back.pdf").write_bytes(document)
    assert f"Case {CASE}: {qa['verdict']}" in qa_results.pdf_pages(root / "back.pdf")[0]
    # The same report is the same instance (a destination that has it is not sent it again).
    again = encapsulated_pdf.write_for_plan(pdf, plan_path, root / "again.dcm", "QA report")
    assert again.SOPInstanceUID == written.SOPInstanceUID
    with pytest.raises(ValueError, match="not a PDF"):
        encapsulated_pdf.write_for_plan(plan_path, plan_path, root / "bad.dcm", "QA report")


@pytest.mark.skipif(orthanc() is None and not in_ci(), reason="Orthanc not installed (envs/setup.sh --dev)")
def test_the_sender_stores_the_report_with_the_rt_doses(tmp_path: Path) -> None:
    case = test_qa_verdict.make_case(tmp_path)
    workdir, _, layout = qa_results.site(tmp_path)
    processing = layout.processing(CASE)
    qa_results.write_qa(case, processing)
    final = Path(layout.dicom_template.replace("{case_id}", CASE))
    shutil.copytree(processing / "dicom", final)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        site = {"paths": {"local": {"scan_directory": str(tmp_path / "scan")}}}
        destination = {"name": "pacs", "host": "127.0.0.1", "port": orthanc["dicom_port"], "ae_title": "ORTHANC"}
        site["dicom_network"] = {"sender": {"destinations": [destination], "timeout_seconds": 10}}
        configfile = workdir / "send.yaml"
        configfile.write_text(json.dumps(site))
        sent = python_module(
            "mqi_communicator.dicomnet.sender",
            "--configfile",
            str(configfile),
            "--workdir",
            str(workdir),
            "--case",
            CASE,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "confirmed all 2 RT Doses and the QA report" in sent.stdout
        base = str(orthanc["http"])
        held = {}
        for instance in json.loads(orthanc_get(base, "/instances")):
            data = orthanc_get(base, f"/instances/{instance}/file")
            held[str(pydicom.dcmread(BytesIO(data)).SOPClassUID)] = pydicom.dcmread(BytesIO(data))
    report = held["1.2.840.10008.5.1.4.1.1.104.1"]
    assert bytes(report.EncapsulatedDocument).startswith((processing / "qa" / "qa_report.pdf").read_bytes())
    assert report.StudyInstanceUID == held["1.2.840.10008.5.1.4.1.1.481.2"].StudyInstanceUID
