from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqi_communicator.errors import CaseError
from mqi_communicator.files import sha256_of
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.intake.case_inputs import (
    changed_files,
    content_digest,
    content_record,
    is_ready,
    stat_fingerprint,
)
from tests import casegen


def test_manifest_of_good_case(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "good", reversed_order=True)
    manifest = build_manifest(case, config)
    assert manifest["room"] == "G2"
    assert manifest["mode"] == "logs"
    assert manifest["setup_beams"] == [1]
    assert [b["number"] for b in manifest["beams"]] == [2, 3]
    by_folder = {d["folder"]: d for d in manifest["deliveries"]}
    # Reversed order: beam 3 was delivered first; the pairing still follows PlanInfo.
    first, second = sorted(by_folder)
    assert by_folder[first]["beam_number"] == 3 and by_folder[second]["beam_number"] == 2
    for delivery in manifest["deliveries"]:
        assert delivery["layer_count"] == 4 == len(delivery["ptn"])
        for entry in delivery["ptn"]:
            path = case / delivery["folder"] / entry["file"]
            assert entry["size"] == path.stat().st_size == 16 * entry["rows"]
            assert len(entry["sha256"]) == 64
    assert manifest["beams"][0]["simulated_deliveries"] == [second]


def _break(case: Path, how: str) -> None:
    folders = sorted(p for p in case.iterdir() if p.is_dir())
    info = folders[0] / "PlanInfo.txt"
    if how == "missing_ptn":
        sorted(folders[0].glob("*.ptn"))[1].unlink()
    elif how == "odd_ptn":
        ptn = sorted(folders[0].glob("*.ptn"))[0]
        ptn.write_bytes(ptn.read_bytes()[:-3])
    elif how == "wrong_patient":
        info.write_text(info.read_text().replace("PSEUDO001", "SOMEONE_ELSE"))
    elif how == "unknown_beam":
        info.write_text(info.read_text().replace("DICOM_BEAM_NUMBER,2", "DICOM_BEAM_NUMBER,7"))
    elif how == "setup_beam":
        info.write_text(info.read_text().replace("DICOM_BEAM_NUMBER,2", "DICOM_BEAM_NUMBER,1"))
    elif how == "bad_range_code":
        planrange = folders[0] / "PlanRange.txt"
        planrange.write_text(planrange.read_text().replace(",2,2\n", ",9,9\n", 1))


@pytest.mark.parametrize(
    ("how", "file_part", "message"),
    [
        ("missing_ptn", "", "3 PTN files for 4 delivered layers"),
        ("odd_ptn", "_001.ptn", "not a multiple of 16"),
        ("wrong_patient", "PlanInfo.txt", "differs from the plan's PatientID"),
        ("unknown_beam", "PlanInfo.txt", "DICOM_BEAM_NUMBER 7 is not a beam of the plan"),
        ("setup_beam", "PlanInfo.txt", "is the setup beam 'SETUP'"),
        ("bad_range_code", "PlanRange.txt", "DOSE1_RANGE 9 is not a monitor range code"),
    ],
)
def test_broken_cases_name_file_and_problem(
    tmp_path: Path, config: dict, how: str, file_part: str, message: str
) -> None:
    case = casegen.write_case(tmp_path, "broken")
    _break(case, how)
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    text = str(info.value)
    assert message in text
    folder = sorted(p for p in case.iterdir() if p.is_dir())[0]
    assert str(folder) in text  # the delivery folder (and file) is named
    assert file_part in text


def test_cli_failure_names_the_file_and_writes_no_manifest(tmp_path: Path) -> None:
    case = casegen.write_case(tmp_path / "scan", "c1")
    _break(case, "wrong_patient")
    output = tmp_path / "out" / "intake.json"
    command = [sys.executable, "-m", "mqi_communicator.intake", "--case", str(case), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "INTAKE FAILED for case c1" in result.stderr and "PlanInfo.txt" in result.stderr
    assert not output.exists()
    # The sender fixes the case: a rerun succeeds and records what the case is made of.
    info = sorted(p for p in case.iterdir() if p.is_dir())[0] / "PlanInfo.txt"
    info.write_text(info.read_text().replace("SOMEONE_ELSE", "PSEUDO001"))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(output.read_text())
    assert manifest["case_id"] == "c1"
    assert manifest["inputs"]["files"][str(info.relative_to(case))] == sha256_of(info)
    assert manifest["inputs"]["digest"] == content_digest(case)


def test_readiness(tmp_path: Path) -> None:
    case = casegen.write_case(tmp_path, "c1", ready=False)
    assert not is_ready(case, "_CASE_READY", 0)
    (case / "_CASE_READY").write_text("")
    assert is_ready(case, "_CASE_READY", 0)
    assert not is_ready(case, "_CASE_READY", 3600)
    assert is_ready(case, "_CASE_READY", 3600, now=time.time() + 7200)


def test_fingerprint_sees_a_replaced_file_even_with_its_old_mtime(tmp_path: Path) -> None:
    case = casegen.write_case(tmp_path, "c1")
    before = stat_fingerprint(case)
    digest = content_digest(case)
    assert stat_fingerprint(case) == before
    ptn = next(case.rglob("*.ptn"))
    old = ptn.stat()
    data = bytearray(ptn.read_bytes())
    data[0] ^= 0xFF
    ptn.write_bytes(bytes(data))
    os.utime(ptn, ns=(old.st_atime_ns, old.st_mtime_ns))  # as `cp -p` / `rsync -a` leave it
    assert stat_fingerprint(case) != before  # the change time moved
    assert content_digest(case) != digest  # and the content decides
    # Touching a file without changing it: the fingerprint moves, the content digest does not.
    record = content_record(case)
    info = next(case.rglob("PlanInfo.txt"))
    os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 5_000_000_000))
    assert stat_fingerprint(case) != record["fingerprint"]
    assert content_digest(case, record) == record["digest"]
    assert changed_files(case, record["files"]) == []
