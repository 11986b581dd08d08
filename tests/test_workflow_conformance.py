"""The DICOM files of a real workflow run are PS3.3-conformant: dciodvfy (tests/dciodvfy.py)
finds no error in any RT Dose the pipeline writes (per beam, and the plan sum of a one-beam plan)
nor in the plan copies it stages (docs/conformance.md).

The pipeline writes uint32 pixels, on which both dicom3tools builds stop on an assertion: each
32-bit RT Dose is checked as its 16-bit variant (`dciodvfy.sixteen_bit_variant`), every other
attribute as the pipeline wrote it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from tests import casegen, dciodvfy
from tests.dciodvfy import assert_conformant, is_dicom_file, needs_dciodvfy
from tests.workflow import REPO, snakemake, write_config

pytestmark = needs_dciodvfy


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log-based sample case (two beams, setup beam) and a one-beam plan-based case (plan sum)."""
    root = tmp_path_factory.mktemp("conformance")
    scan = root / "new_cases"
    shutil.copytree(REPO / "sample_cases" / "case001_G2", scan / "case001_G2")
    spec = casegen.CaseSpec(
        patient_id="ONEBEAM",
        beams=[casegen.BeamSpec(1, "1G270:A", [150.0, 140.0], [casegen.grid_spots(10.0, 10.0)] * 2)],
    )
    casegen.write_case(scan, "one_beam", spec, deliveries=False)
    work = root / "work"
    work.mkdir()
    write_config(work, scan)
    run = snakemake(work, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work


def test_every_rt_dose_of_the_run_has_no_error(finished_run: Path, tmp_path: Path) -> None:
    written = sorted(p for p in (finished_run / "data").rglob("*") if p.is_file() and is_dicom_file(p))
    doses = [p for p in written if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTDOSE"]
    assert sorted(p.name for p in doses) == ["RD_1G180_TX.dcm", "RD_1G270_A.dcm", "RD_2G90.dcm", "RD_PLAN.dcm"]
    for path in doses:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.BitsAllocated == 32  # the pipeline's default (docs/rtdose-frames.md)
        variant = dciodvfy.sixteen_bit_variant(path, tmp_path / path.parents[1].name / path.name)
        assert_conformant(variant)


def test_the_plan_copies_of_the_run_have_no_error(finished_run: Path) -> None:
    written = sorted(p for p in (finished_run / "data").rglob("*") if p.is_file() and is_dicom_file(p))
    plans = [p for p in written if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTPLAN"]
    assert plans, "the run staged no plan"
    for path in plans:
        assert_conformant(path)
