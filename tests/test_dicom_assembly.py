"""Case assembly (docs/dicom-network.md#case-assembly) with real peers and real files: the plan and
TPS doses of the bundled sample case (written by tests/casegen.py and the independent TPS stand-in
tests/qa_gen.py) sent by dcmtk's storescu to our receiver, the delivery folders dropped in a logs
inbox; one workflow run over the assembled case and the same case dropped as files gives the same
RT Doses and verdicts. Waiting, an incomplete or ambiguous delivery, the inbox left unchanged and a
build killed before its rename, each on real processes and files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from mqi_communicator.dicomnet import staging
from tests import casegen, qa_gen
from tests.dicom_peers import running_receiver, storescu
from tests.workflow import REPO, snakemake, write_config

SAMPLE = REPO / "sample_cases" / "case001_G2"
# A workflow that records the scan folder as Snakemake found it when it read the Snakefile.
SEEN_SNAKEFILE = r"""
import os

SEEN = " ".join(sorted(os.listdir(config["paths"]["local"]["scan_directory"])))

rule all:
    output: "seen.txt"
    params: seen=SEEN
    shell: "echo '{params.seen}' > {output}"
"""
DELIVERIES = ("2026110209000000", "2026110209050000")


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def assemble(work: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mqi_communicator.dicomnet.assembly", "--configfile", "test-config.yaml"]
    run = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    return run


def site(work: Path, scan: Path, inbox: Path, stage: Path, **assembly: object) -> None:
    work.mkdir(parents=True, exist_ok=True)
    scan.mkdir(parents=True, exist_ok=True)
    network = {
        "receiver": {"staging_directory": str(stage)},
        "assembly": {"enabled": True, "logs_inbox": str(inbox), **assembly},
    }
    write_config(work, scan, dicom_network=network)


def state_of(work: Path) -> dict:
    return json.loads((work / ".mqi" / "dicom_assembly.json").read_text())


def stage_file(stage: Path, path: Path) -> Path:
    """Put a file where the receiver stages it (its own layout function), as if it was received."""
    target = staging.staged_path(stage, pydicom.dcmread(path, stop_before_pixels=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, target)
    return target


def test_a_case_assembled_from_the_network_computes_like_the_case_dropped_as_files(tmp_path: Path) -> None:
    work, scan, inbox, stage = tmp_path / "work", tmp_path / "scan", tmp_path / "inbox", tmp_path / "staging"
    (tmp_path / "receiver").mkdir()
    with running_receiver(tmp_path / "receiver", stage) as receiver:
        objects = [SAMPLE / "RP.case001_G2.dcm", SAMPLE / "RD_TPS_2.dcm", SAMPLE / "RD_TPS_3.dcm"]
        sent = storescu(int(receiver["port"]), str(receiver["ae_title"]), objects)  # type: ignore[call-overload]
        assert sent.returncode == 0, sent.stderr
    for name in DELIVERIES:
        shutil.copytree(SAMPLE / name, inbox / name)
    before, staged = digests(inbox), digests(stage)
    site(work, scan, inbox, stage)
    shutil.copytree(SAMPLE, scan / "case001_G2")  # the same case, dropped by hand as today

    assemble(work)
    plan = pydicom.dcmread(SAMPLE / "RP.case001_G2.dcm", stop_before_pixels=True)
    case = f"PSEUDO001_{plan.SOPInstanceUID[-16:].lstrip('.')}"
    (record,) = state_of(work)["plans"].values()
    assert (record["state"], record["case"], record["beams_delivered"]) == ("assembled", case, [2, 3])
    built = scan / case
    assert sorted(p.name for p in built.iterdir()) == sorted(
        [*DELIVERIES, "_CASE_READY", f"RP.{plan.SOPInstanceUID}.dcm"]
        + [f"RD.{pydicom.dcmread(SAMPLE / f'RD_TPS_{n}.dcm').SOPInstanceUID}.dcm" for n in (2, 3)]
    )
    assert digests(built / DELIVERIES[0]) == digests(SAMPLE / DELIVERIES[0])
    assert digests(inbox) == before and digests(stage) == staged  # copied, never moved or changed
    assert not list(building_leftovers(scan))

    run = snakemake(work)
    assert run.returncode == 0, run.stderr[-3000:]
    cases = work / "data" / "cases"
    by_hand, assembled = cases / "case001_G2", cases / case
    names = sorted(p.name for p in (by_hand / "dicom").glob("RD_*.dcm"))
    assert names == sorted(p.name for p in (assembled / "dicom").glob("RD_*.dcm")) == ["RD_1G180_TX.dcm", "RD_2G90.dcm"]
    for name in names:
        ours, theirs = pydicom.dcmread(assembled / "dicom" / name), pydicom.dcmread(by_hand / "dicom" / name)
        assert ours.PixelData == theirs.PixelData and ours.DoseGridScaling == theirs.DoseGridScaling, name
    qa = [json.loads((c / "intermediate" / "qa" / "qa.json").read_text()) for c in (assembled, by_hand)]
    assert qa[0]["verdict"] == qa[1]["verdict"]
    assert [(b["number"], b["verdict"]) for b in qa[0]["beams"]] == [
        (b["number"], b["verdict"]) for b in qa[1]["beams"]
    ]
    assert digests(inbox) == before

    # Nothing new: the next assembly reads no plan again and builds nothing.
    again = assemble(work)
    assert f"-> {case}: assembled" in again.stdout
    assert digests(inbox) == before


def building_leftovers(scan: Path) -> list[Path]:
    area = scan.parent / f".{scan.name}.assembling"
    return list(area.iterdir()) if area.is_dir() else []


@pytest.fixture
def two_beam_case(tmp_path: Path) -> tuple[casegen.CaseSpec, Path]:
    """A plan (setup beam 1, treatment beams 2 and 3) and its TPS doses, written outside the site."""
    spec = casegen.standard_case("PATIENT_A", layers=2)
    source = casegen.write_case(tmp_path / "source", "A", spec, deliveries=False, ready=False, plan_mode=False)
    qa_gen.write_case_tps_doses(source, spec.room)
    return spec, source


def test_waiting_is_reported_and_an_ambiguous_delivery_is_not_guessed(
    tmp_path: Path, two_beam_case: tuple[casegen.CaseSpec, Path]
) -> None:
    spec, source = two_beam_case
    work, scan, inbox, stage = tmp_path / "work", tmp_path / "scan", tmp_path / "inbox", tmp_path / "staging"
    site(work, scan, inbox, stage)
    stage_file(stage, source / "RP.A.dcm")
    stage_file(stage, source / "RD_TPS_2.dcm")  # beam 3's TPS dose not received
    casegen.write_delivery(inbox, spec, 2, "2026120109000000")
    beam3 = casegen.write_delivery(inbox, spec, 3, "2026120109050000")
    (beam3 / "2026120109050000_002.ptn").unlink()  # layer 2's log still being written
    before = digests(inbox)

    assemble(work)
    (record,) = state_of(work)["plans"].values()
    assert record["state"] == "waiting" and record["beams_delivered"] == [2]
    assert record["missing_deliveries"] == ["beam 3 ('2G90'): no delivery"]
    (dose,) = record["missing_doses"]
    assert dose.startswith("beam 3 ('2G90'): no TPS RT Dose for beam 3")
    (note,) = record["notes"]
    assert note.startswith("delivery 2026120109050000 (beam 3):") and "1 PTN files for 2 delivered layers" in note
    assert list(scan.iterdir()) == []
    status = subprocess.run(
        [str(REPO / "bin" / "mqi"), "status", "--json", "--configfile", "test-config.yaml"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    line = json.loads(status.stdout)["dicom_assembly"]
    assert line.startswith("DICOM case assembly: 0 assembled, 1 waiting; PATIENT_A_") and "beam 3 ('2G90')" in line

    # Beam 3's log and dose arrive, and so does a second plan of the patient with the same beams and
    # energies: every delivery fits both plans, so none is placed and nothing is built.
    casegen.write_delivery(inbox, spec, 3, "2026120109050000")
    stage_file(stage, source / "RD_TPS_3.dcm")
    other = casegen.write_case(tmp_path / "source", "B", spec, deliveries=False, ready=False, plan_mode=False)
    stage_file(stage, other / "RP.B.dcm")
    before = digests(inbox)
    assemble(work)
    plans = state_of(work)["plans"]
    assert [p["state"] for p in plans.values()] == ["waiting", "waiting"]
    first = plans[pydicom.dcmread(source / "RP.A.dcm").SOPInstanceUID]
    assert first["beams_delivered"] == [] and len(first["notes"]) == 2
    assert all("is ambiguous: its patient and beam fit plans" in n for n in first["notes"])
    assert list(scan.iterdir()) == []
    assert digests(inbox) == before


def test_a_build_killed_before_its_rename_leaves_no_case(
    tmp_path: Path, two_beam_case: tuple[casegen.CaseSpec, Path]
) -> None:
    spec, source = two_beam_case
    work, scan, inbox, stage = tmp_path / "work", tmp_path / "scan", tmp_path / "inbox", tmp_path / "staging"
    site(work, scan, inbox, stage)
    stage_file(stage, source / "RP.A.dcm")
    stage_file(stage, source / "RD_TPS_2.dcm")
    # Beam 3's TPS dose made large (a volume's size), so that copying it takes a while.
    big = pydicom.dcmread(source / "RD_TPS_3.dcm")
    big.PixelData = bytes(150_000_000)
    big.save_as(tmp_path / "big.dcm")
    stage_file(stage, tmp_path / "big.dcm")
    for beam, time in ((2, "2026120109000000"), (3, "2026120109050000")):
        casegen.write_delivery(inbox, spec, beam, time)

    command = [sys.executable, "-m", "mqi_communicator.dicomnet.assembly", "--configfile", "test-config.yaml"]
    process = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    area = scan.parent / f".{scan.name}.assembling"
    while not building_leftovers(scan) and process.poll() is None:
        pass
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert process.returncode == -signal.SIGKILL, "the build ended before it was killed"
    assert list(scan.iterdir()) == []  # nothing half-built where the workflow looks
    (leftover,) = list(area.iterdir())
    assert not (leftover / "_CASE_READY").exists()

    assemble(work)  # the next assembly starts the build again and finishes it
    (case,) = list(scan.iterdir())
    assert (case / "_CASE_READY").is_file() and (case / "2026120109050000").is_dir()
    assert list(area.iterdir()) == []

    # A later fraction of beam 2 arrives: copied into the case folder as later fractions arrive today.
    casegen.write_delivery(inbox, spec, 2, "2026120209000000", seed=7)
    assemble(work)
    assert digests(case / "2026120209000000") == digests(inbox / "2026120209000000")
    (record,) = state_of(work)["plans"].values()
    assert record["deliveries"] == ["2026120109000000", "2026120109050000", "2026120209000000"]
    assert list(area.iterdir()) == []


def test_plan_mode_sites_build_the_case_from_plan_and_doses(
    tmp_path: Path, two_beam_case: tuple[casegen.CaseSpec, Path]
) -> None:
    _, source = two_beam_case
    work, scan, inbox, stage = tmp_path / "work", tmp_path / "scan", tmp_path / "inbox", tmp_path / "staging"
    site(work, scan, inbox, stage, ready_when="plan_and_doses")
    stage_file(stage, source / "RP.A.dcm")
    stage_file(stage, source / "RD_TPS_2.dcm")
    assemble(work)
    assert list(scan.iterdir()) == []  # beam 3's TPS dose still missing
    stage_file(stage, source / "RD_TPS_3.dcm")
    assemble(work)
    (case,) = list(scan.iterdir())
    assert sorted(p.name for p in case.iterdir() if p.suffix != ".dcm") == ["_CASE_READY", "_PLAN_MODE"]
    assert len(list(case.glob("RD.*.dcm"))) == 2


def test_the_timer_run_assembles_before_snakemake_reads_the_scan_folder(
    tmp_path: Path, two_beam_case: tuple[casegen.CaseSpec, Path]
) -> None:
    spec, source = two_beam_case
    work, scan, inbox, stage = tmp_path / "work", tmp_path / "scan", tmp_path / "inbox", tmp_path / "staging"
    site(work, scan, inbox, stage)
    (work / "Snakefile").write_text(SEEN_SNAKEFILE)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.yaml").write_text("executor: local\ncores: 1\n")
    for name in ("RP.A.dcm", "RD_TPS_2.dcm", "RD_TPS_3.dcm"):
        stage_file(stage, source / name)
    for beam, time in ((2, "2026120109000000"), (3, "2026120109050000")):
        casegen.write_delivery(inbox, spec, beam, time)
    env = {**os.environ, "MQI_WORKDIR": str(work), "MQI_PROFILE": str(tmp_path / "local")}
    run = subprocess.run(
        [str(REPO / "bin" / "mqi-run"), "--configfile", "test-config.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (case,) = [p.name for p in scan.iterdir()]
    assert case.startswith("PATIENT_A_") and (work / "seen.txt").read_text().split() == [case]
