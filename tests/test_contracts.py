"""The case files the steps hand each other (docs/contracts.md): every intake.json, qa.json and
case_summary.json of a real run of the sample cases holds its contract; a broken one is refused,
by the library and by the steps that read it, naming the file and the key."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_communicator.formats import contracts

FILES = {"intake": "intake.json", "qa": "qa/qa.json", "case_summary": "case_summary.json"}


def case_files(work: Path, contract: str) -> list[Path]:
    found = sorted((work / "data" / "cases").glob(f"*/intermediate/{FILES[contract]}"))
    assert found, f"the run wrote no {FILES[contract]}"
    return found


@pytest.mark.parametrize("contract", sorted(FILES))
def test_every_file_of_a_real_run_holds_its_contract(embedded_default_run: Path, contract: str) -> None:
    for path in case_files(embedded_default_run, contract):
        data = json.loads(path.read_text())
        contracts.validate(contract, data, path)  # the full schema, as where it is written
        assert contracts.read(contract, path) == data  # the cheap check, as where it is read


def test_a_file_of_an_earlier_version_still_reads(embedded_default_run: Path) -> None:
    """Finished cases keep their files forever: a manifest from before labels, flags, fractions,
    inputs and the beams' geometry were added (git log -S of intake/case.py) still holds."""
    path = case_files(embedded_default_run, "intake")[0]
    old = json.loads(path.read_text())
    for key in ("labels", "flags", "fractions", "inputs"):
        old.pop(key)
    for beam in old["beams"]:
        beam.pop("geometry")
    contracts.validate("intake", old, path)
    contracts.check("intake", old, path)


def _broken(tmp_path: Path, source: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    path = tmp_path / source.name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("contract", "edit", "key"),
    [
        ("intake", lambda d: d.pop("room"), "room"),
        ("intake", lambda d: d.update(beams={"1": "A"}), "beams"),
        ("qa", lambda d: d.pop("verdict"), "verdict"),
        ("qa", lambda d: d.update(beams="none"), "beams"),
        ("case_summary", lambda d: d.pop("plan_dose"), "plan_dose"),
        ("case_summary", lambda d: d.update(case_id=7), "case_id"),
    ],
)
def test_a_broken_file_is_refused_naming_file_and_key(
    embedded_default_run: Path, tmp_path: Path, contract: str, edit, key: str
) -> None:
    path = _broken(tmp_path, case_files(embedded_default_run, contract)[0], edit)
    with pytest.raises(contracts.ContractError) as read:
        contracts.read(contract, path)
    assert str(path) in str(read.value) and f"key '{key}'" in str(read.value)
    with pytest.raises(contracts.ContractError) as full:
        contracts.validate(contract, json.loads(path.read_text()), path)
    assert str(path) in str(full.value) and key in str(full.value)


def test_the_full_check_names_a_nested_key(embedded_default_run: Path, tmp_path: Path) -> None:
    source = case_files(embedded_default_run, "qa")[0]
    path = _broken(tmp_path, source, lambda d: d["beams"][1]["dose"].update(verdict="OK"))
    with pytest.raises(contracts.ContractError, match=r"key 'beams\.1\.dose\.verdict': 'OK' is not one of"):
        contracts.validate("qa", json.loads(path.read_text()), path)


def test_not_json_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "intake.json"
    path.write_text('{"case_id": ')
    with pytest.raises(contracts.ContractError, match=f"{path}: not JSON"):
        contracts.read_manifest(path)


def test_the_summary_step_refuses_a_broken_qa_json(embedded_default_run: Path, tmp_path: Path) -> None:
    """The real CLI of rule case_summary, on a real case's files with its qa.json broken: it fails
    naming the file and the key, and writes no summary."""
    case = case_files(embedded_default_run, "case_summary")[0].parents[1]
    summary = json.loads((case / "intermediate" / "case_summary.json").read_text())
    records = [str(Path(b["raw_dose"]).with_name(f"{b['beam']}.simulate.json")) for b in summary["beams"]]
    rtdoses = [b["rt_dose"] for b in summary["beams"]]
    qa = _broken(tmp_path, case / "intermediate" / "qa" / "qa.json", lambda d: d.pop("beams"))
    manifest = shutil.copy(case / "intermediate" / "intake.json", tmp_path / "intake.json")
    output = tmp_path / "case_summary.json"
    command = [sys.executable, "-m", "mqi_communicator.report", "summary", f"--case={summary['case_id']}"]
    command += ["--records", *records, "--rtdoses", *rtdoses, "--qa", str(qa), "--manifest", str(manifest)]
    run = subprocess.run(
        [*command, "--output", str(output)],
        cwd=embedded_default_run,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stderr
    assert f"{qa}: key 'beams' missing" in run.stderr
    assert not output.exists()


def test_a_writer_refuses_to_write_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "case_summary.json"
    with pytest.raises(contracts.ContractError, match=r"key 'beams\.0': 'beam_number' is a required property"):
        contracts.write(
            "case_summary", path, {"case_id": "c", "beams": [{"beam": "A"}], "plan_dose": {"rt_dose": None}}
        )
    assert not path.exists()
