"""`bin/mqi sign` on finished cases whose QA the qa rule's own command computed: the append-only
record (who, when, verdict, decision, comment, sha256 of qa.json), a new signed PDF per signature,
two signers, a reject, the comment rule, and a signature voided by a reprocess or an edited
qa.json, as `bin/mqi status` and the regenerated sheet and PDF show it (docs/sign-off.md)."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import qa_results, test_qa_verdict
from tests.qa_results import CASE, REPO

MQI = str(REPO / "bin" / "mqi")


@pytest.fixture(scope="module")
def computed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The case and two finished results of it: PASS, and FAIL (5 % MU error)."""
    root = tmp_path_factory.mktemp("signoff")
    case = test_qa_verdict.make_case(root)
    assert qa_results.write_qa(case, root / "pass")["verdict"] == "PASS"
    assert qa_results.write_qa(case, root / "fail", mu_scale=1.05)["verdict"] == "FAIL"
    return root


def finished(computed: Path, tmp_path: Path, result: str = "pass", **signoff: object) -> tuple[Path, Path, Path]:
    """(workdir, site config, processing folder) of a site with the case finished with `result`."""
    shutil.copytree(computed / "scan", tmp_path / "scan")
    workdir, configfile, layout = qa_results.site(tmp_path, **signoff)
    shutil.copytree(computed / result, layout.processing(CASE))
    return workdir, configfile, layout.processing(CASE)


def mqi(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MQI, *args, "--workdir", str(workdir), "--configfile", str(configfile)],
        capture_output=True,
        text=True,
        check=False,
    )


def records(processing: Path) -> list[dict]:
    return [json.loads(line) for line in (processing / "signoff" / "signoff.jsonl").read_text().splitlines()]


def status_of(workdir: Path, configfile: Path, *flags: str) -> dict[str, dict]:
    run = mqi(workdir, configfile, "status", "--json", "--all", *flags)
    assert run.returncode == 0, run.stderr
    return {c["case_id"]: c for c in json.loads(run.stdout)["cases"]}


def test_signing_records_who_when_what_and_the_hash_and_writes_a_signed_pdf(computed: Path, tmp_path: Path) -> None:
    workdir, configfile, processing = finished(computed, tmp_path)
    assert status_of(workdir, configfile)[CASE]["signoff"] == "unsigned"
    assert CASE in status_of(workdir, configfile, "--unsigned")
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    run = mqi(workdir, configfile, "sign", CASE, "--by", "Dr Ada Physicist", "--comment", "reviewed")
    assert run.returncode == 0, run.stderr
    [entry] = records(processing)
    assert entry["signed_by"] == "Dr Ada Physicist" and entry["decision"] == "accept"
    assert entry["verdict"] == "PASS" and entry["comment"] == "reviewed"
    assert entry["qa_sha256"] == hashlib.sha256((processing / "qa" / "qa.json").read_bytes()).hexdigest()
    when = datetime.datetime.fromisoformat(entry["time"])
    assert when.utcoffset() == datetime.timedelta(0) and before <= when <= datetime.datetime.now(datetime.UTC)
    signed = processing / "signoff" / "qa_report_signed_1.pdf"
    page1 = qa_results.pdf_pages(signed)[0]
    assert "Sign-off: signed by Dr Ada Physicist" in page1 and "ACCEPTED by Dr Ada Physicist" in page1
    assert entry["qa_sha256"] in page1
    # The signed version carries the sheet's figures (one per beam), not just the text.
    images = subprocess.run(["pdfimages", "-list", str(signed)], capture_output=True, text=True, check=True).stdout
    assert len(images.splitlines()) - 2 == 2
    # The workflow's outputs are left as they were written.
    assert "Sign-off: unsigned" in qa_results.pdf_pages(processing / "qa" / "qa_report.pdf")[0]
    shown = status_of(workdir, configfile)[CASE]
    assert shown["signoff"] == "signed" and "Dr Ada Physicist" in shown["signoff_summary"]
    assert CASE not in status_of(workdir, configfile, "--unsigned")


def test_two_people_sign_the_same_case(computed: Path, tmp_path: Path) -> None:
    workdir, configfile, processing = finished(computed, tmp_path)
    assert mqi(workdir, configfile, "sign", CASE, "--by", "First Reviewer").returncode == 0
    assert mqi(workdir, configfile, "sign", CASE, "--by", "Second Reviewer").returncode == 0
    assert [r["signed_by"] for r in records(processing)] == ["First Reviewer", "Second Reviewer"]
    assert records(processing)[0]["report"] == "qa_report_signed_1.pdf"
    second = qa_results.pdf_pages(processing / "signoff" / "qa_report_signed_2.pdf")[0]
    assert "ACCEPTED by First Reviewer" in second and "ACCEPTED by Second Reviewer" in second
    summary = status_of(workdir, configfile)[CASE]["signoff_summary"]
    assert "First Reviewer" in summary and "Second Reviewer" in summary


def test_a_reject_stands_until_the_results_change(computed: Path, tmp_path: Path) -> None:
    workdir, configfile, processing = finished(computed, tmp_path)
    run = mqi(workdir, configfile, "sign", CASE, "--by", "Dr Reject", "--reject", "--comment", "profile looks shifted")
    assert run.returncode == 0 and "rejected" in run.stdout
    assert mqi(workdir, configfile, "sign", CASE, "--by", "Dr Accept").returncode == 0
    assert [r["decision"] for r in records(processing)] == ["reject", "accept"]
    shown = status_of(workdir, configfile)[CASE]
    assert shown["signoff"] == "rejected" and shown["signoff_summary"] == "rejected by Dr Reject"
    assert CASE not in status_of(workdir, configfile, "--unsigned")  # it waits for a reprocess, not a signature
    page1 = qa_results.pdf_pages(processing / "signoff" / "qa_report_signed_1.pdf")[0]
    assert "REJECTED by Dr Reject" in page1 and "profile looks shifted" in page1


def test_a_non_pass_needs_a_comment_unless_the_site_turns_the_rule_off(computed: Path, tmp_path: Path) -> None:
    workdir, configfile, processing = finished(computed, tmp_path / "ruled", "fail")
    refused = mqi(workdir, configfile, "sign", CASE, "--by", "Dr Hasty")
    assert refused.returncode == 1 and "FAIL" in refused.stderr and "--comment" in refused.stderr
    assert not (processing / "signoff" / "signoff.jsonl").exists()
    refused = mqi(workdir, configfile, "sign", CASE, "--by", "Dr Hasty", "--reject")
    assert refused.returncode == 1
    run = mqi(workdir, configfile, "sign", CASE, "--by", "Dr Careful", "--comment", "MU error known, accepted")
    assert run.returncode == 0, run.stderr
    assert records(processing)[0]["verdict"] == "FAIL"
    workdir, configfile, processing = finished(computed, tmp_path / "free", "fail", comment_required_for_non_pass=False)
    assert mqi(workdir, configfile, "sign", CASE, "--by", "Dr Hasty").returncode == 0


def test_a_reprocess_voids_the_signature(computed: Path, tmp_path: Path) -> None:
    workdir, configfile, processing = finished(computed, tmp_path)
    assert mqi(workdir, configfile, "sign", CASE, "--by", "Dr Ada Physicist").returncode == 0
    assert mqi(workdir, configfile, "reprocess", CASE).returncode == 0
    # The record went with the case; the next run computes new results (here: a 5 % MU error).
    assert [r["signed_by"] for r in records(processing)] == ["Dr Ada Physicist"]
    qa_results.write_qa(tmp_path / "scan" / CASE, processing, mu_scale=1.05)
    shown = status_of(workdir, configfile)[CASE]
    assert shown["signoff"] == "void" and "VOID" in shown["signoff_summary"]
    assert CASE in status_of(workdir, configfile, "--unsigned")
    # The new sheet and PDF show the old signature as VOID (the sign-off when they were written).
    assert "VOID - ACCEPTED by Dr Ada Physicist" in (processing / "qa" / "qa_sheet.html").read_text()
    assert "VOID - ACCEPTED by Dr Ada Physicist" in qa_results.pdf_pages(processing / "qa" / "qa_report.pdf")[0]
    # The superseded results keep their own record and signed report.
    [aside] = processing.parent.glob("intermediate.superseded-*")
    assert (aside / "signoff" / "qa_report_signed_1.pdf").is_file()
    run = mqi(workdir, configfile, "sign", CASE, "--by", "Dr Ada Physicist", "--comment", "re-reviewed")
    assert run.returncode == 0, run.stderr
    assert status_of(workdir, configfile)[CASE]["signoff"] == "signed"
    page1 = qa_results.pdf_pages(processing / "signoff" / "qa_report_signed_2.pdf")[0]
    assert "VOID - ACCEPTED by Dr Ada Physicist" in page1 and "re-reviewed" in page1


def test_an_edited_qa_json_voids_the_signature(computed: Path, tmp_path: Path) -> None:
    workdir, configfile, processing = finished(computed, tmp_path)
    assert mqi(workdir, configfile, "sign", CASE, "--by", "Dr Ada Physicist").returncode == 0
    qa_json = processing / "qa" / "qa.json"
    qa_json.write_text(qa_json.read_text().replace('"verdict": "PASS"', '"verdict": "PASS" '))
    assert status_of(workdir, configfile)[CASE]["signoff"] == "void"


def test_bad_input_is_named(computed: Path, tmp_path: Path) -> None:
    workdir, configfile, processing = finished(computed, tmp_path)
    shutil.rmtree(processing / "qa")
    run = mqi(workdir, configfile, "sign", CASE, "--by", "Dr Ada Physicist")
    assert run.returncode == 1 and str(processing / "qa" / "qa.json") in run.stderr
    shutil.copytree(computed / "pass" / "qa", processing / "qa")
    record = processing / "signoff" / "signoff.jsonl"
    record.parent.mkdir()
    record.write_text("{not json\n")
    run = mqi(workdir, configfile, "sign", CASE, "--by", "Dr Ada Physicist")
    assert run.returncode == 1 and f"{record}: line 1 is not JSON" in run.stderr
    assert record.read_text() == "{not json\n"  # nothing appended to a record it cannot read
