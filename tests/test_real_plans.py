"""RT Ion Plans as real planning systems write them (issue 19, docs/real-plans.md): Eclipse and
RayStation exports from open projects (tests/data/real_plans/SOURCES.md) and photon RT Plans
from pydicom and pymedphys. Each either runs through intake and P2, its beams, spots and MU
equal to what pydicom reads from the file here by hand, or is refused with a message naming
what is not supported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pymedphys
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError

from mqi_communicator.errors import CaseError
from mqi_communicator.formats import moqui_csv, ptn
from mqi_communicator.formats.plan import RT_ION_PLAN_SOP_CLASS, find_plan
from mqi_communicator.intake.case import PLAN_BASED_LABEL, build_manifest
from mqi_communicator.interpret import interpret_case
from tests import dciodvfy
from tests.dciodvfy import needs_dciodvfy
from tests.real_exports import CLINIC_ROOM, EXPORTS, REAL_PLANS, beams_by_hand, write_case, write_logs


def _everything_but_the_machine(ds: Dataset) -> list[str]:
    return [
        repr(element) for element in ds.iterall() if element.keyword != "TreatmentMachineName" and element.VR != "SQ"
    ]


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_real_export_as_written_is_refused_naming_its_machine(tmp_path: Path, config: dict, name: str) -> None:
    case = write_case(tmp_path, REAL_PLANS / name, plan_mode=True)
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    # Refused for the machine it was planned for, not a room of this clinic; nothing else.
    assert str(info.value) == (
        f"{find_plan(case)}: beam 1: unknown room in TreatmentMachineName {EXPORTS[name]!r} (expected G1 or G2)"
    )


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_real_export_for_a_clinic_room_runs_in_plan_mode(tmp_path: Path, config: dict, name: str) -> None:
    case = write_case(tmp_path, REAL_PLANS / name, plan_mode=True, machine=CLINIC_ROOM)
    plan_path = find_plan(case)
    edited, exported = pydicom.dcmread(plan_path), pydicom.dcmread(REAL_PLANS / name)
    assert _everything_but_the_machine(edited) == _everything_but_the_machine(exported)
    by_hand = beams_by_hand(REAL_PLANS / name)

    manifest = build_manifest(case, config)
    assert manifest["room"] == CLINIC_ROOM and manifest["labels"] == [PLAN_BASED_LABEL]
    assert manifest["warnings"] == [] and manifest["setup_beams"] == []
    assert [b["number"] for b in manifest["beams"]] == [b.number for b in by_hand]
    assert [b["energies_mev"] for b in manifest["beams"]] == [[e for e, _, _ in b.layers] for b in by_hand]

    # These plans' spots carry 2 to 180 MU (the clinic's: about 0.02 MU): at the shipped
    # plan_dose_rate_mu_per_s one spot would be 10^4 to 10^6 samples (docs/real-plans.md). A dose
    # rate giving each spot a handful of samples changes only the sampling, never a spot's MU or
    # position.
    timegain_ms = float(config["rooms"][CLINIC_ROOM]["timegain_ms"])
    largest = max(mu for beam in by_hand for _, _, mus in beam.layers for mu in mus)
    config["interpreter"]["plan_dose_rate_mu_per_s"] = largest / (4 * timegain_ms / 1000.0)
    summary = interpret_case(manifest, config, tmp_path / "p2")
    calibration = ptn.RoomCalibration.from_config(config["rooms"][CLINIC_ROOM])
    divide = float(config["interpreter"]["dose_dividing_factor"])
    assert [b["number"] for b in summary["beams"]] == [b.number for b in by_hand]
    for beam, written in zip(by_hand, summary["beams"], strict=True):
        assert len(written["layers"]) == len(beam.layers)
        beam_mu = 0.0
        for (energy, spots, mus), layer in zip(beam.layers, written["layers"], strict=True):
            samples = moqui_csv.read_layer(tmp_path / "p2" / "log" / written["folder"] / layer["file"])
            # Every spot, at its position (float32 in the CSV), with its MU.
            positions = {(round(x, 3), round(y, 3)) for x, y in samples[:, 1:3]}
            assert positions == {(round(float(np.float32(x)), 3), round(float(np.float32(y)), 3)) for x, y in spots}
            mu = samples[:, 3].sum() * calibration.mu_per_count(energy) * divide
            assert mu == pytest.approx(sum(mus), rel=1e-6)
            beam_mu += mu
        assert beam_mu == pytest.approx(beam.meterset, rel=1e-6)


def test_real_export_with_delivery_logs_runs_on_its_logs(tmp_path: Path, config: dict) -> None:
    """The Eclipse QA plan with PTN logs made from its own spots and MU (as tests/casegen.py
    makes them), one delivery per field: intake's log checks pass and P2 gives each field's MU.
    (The other exports' spots of 180 MU, or 7 708 spots a field, would make logs of tens of MB.)"""
    name = "eclipse_qa_pattern_4fields.dcm"
    case = write_case(tmp_path, REAL_PLANS / name, plan_mode=False, machine=CLINIC_ROOM)
    by_hand = write_logs(case, REAL_PLANS / name, CLINIC_ROOM)

    manifest = build_manifest(case, config)
    assert manifest["mode"] == "logs" and manifest["flags"] == [] and manifest["labels"] == []
    assert [b["number"] for b in manifest["beams"]] == [1, 2, 3, 4]
    assert [len(b["simulated_deliveries"]) for b in manifest["beams"]] == [1, 1, 1, 1]
    summary = interpret_case(manifest, config, tmp_path / "p2")
    calibration = ptn.RoomCalibration.from_config(config["rooms"][CLINIC_ROOM])
    for beam, written in zip(by_hand, summary["beams"], strict=True):
        (energy, _, _), (layer,) = beam.layers[0], written["layers"]
        samples = moqui_csv.read_layer(tmp_path / "p2" / "log" / written["folder"] / layer["file"])
        assert len(samples) == layer["samples"]
        mu = (
            samples[:, 3].sum()
            * calibration.mu_per_count(energy)
            * float(config["interpreter"]["dose_dividing_factor"])
        )
        # The logs' counts are whole numbers at one of five monitor ranges: MU within 0.01 %.
        assert mu == pytest.approx(beam.meterset, rel=1e-4)


def _photon_plans() -> list[Path]:
    return [
        Path(get_testdata_file("rtplan.dcm")),  # type: ignore[arg-type]
        Path(pymedphys.__file__).parent / "tests" / "dicom" / "data" / "rtplan" / "06MV_plan.dcm",
    ]


@pytest.mark.parametrize("plan", _photon_plans(), ids=["pydicom_rtplan", "pymedphys_06MV"])
def test_photon_rt_plan_is_refused_as_not_an_rt_ion_plan(tmp_path: Path, config: dict, plan: Path) -> None:
    assert pydicom.dcmread(plan, force=True).SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan
    case = write_case(tmp_path, plan, plan_mode=True)
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    assert str(info.value) == f"{next(case.glob('RP.*.dcm'))}: RTPLAN is not an RT Ion Plan (wrong SOP class)"


def test_rt_ion_plan_without_file_meta_is_refused_naming_it(tmp_path: Path, config: dict) -> None:
    """A real Eclipse export written as a bare data set, the way pymedphys's CMS plan is: intake
    names the file and the missing meta header instead of finding no plan at all."""
    case = write_case(tmp_path, REAL_PLANS / "eclipse_qa_pattern_4fields.dcm", plan_mode=True, machine=CLINIC_ROOM)
    plan = find_plan(case)
    ds = pydicom.dcmread(plan)
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    ds.save_as(plan, implicit_vr=False, little_endian=True)
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(plan)
    assert pydicom.dcmread(plan, force=True).SOPClassUID == RT_ION_PLAN_SOP_CLASS
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    assert str(info.value).startswith(f"{plan}: an RT Ion Plan without the DICOM file meta information (PS3.10")


@needs_dciodvfy
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_real_exports_dciodvfy_findings_are_known(name: str) -> None:
    """None of the exports writes ModulatedScanModeType (300A,0309, Type 1C for a MODULATED beam
    in today's PS3.3): dciodvfy's one error, once per beam; intake does not need it (a MODULATED
    beam's spots are read as spots). They are kept as written, outside tests/test_conformance.py."""
    verdict = dciodvfy.check(REAL_PLANS / name)
    beams = len(pydicom.dcmread(REAL_PLANS / name).IonBeamSequence)
    missing = "Error - Missing attribute Type 1C Conditional Element=<ModulatedScanModeType> Module=<RTIonBeams>"
    assert len(verdict.errors) == beams * len(dciodvfy.tools()), verdict.message()
    assert all(error.endswith(missing) for error in verdict.errors), verdict.message()


def test_a_plan_on_another_mu_scale_is_refused_in_plan_mode_before_any_csv(tmp_path: Path, config: dict) -> None:
    """The Eclipse 160 MeV export's spots carry tens of MU where the clinic's carry hundredths: at
    the shipped plan dose rate its one field would be gigabytes of CSV. P2 refuses it by name
    before writing a layer."""
    name = "eclipse_mono_160MeV.dcm"
    case = write_case(tmp_path, REAL_PLANS / name, plan_mode=True, machine=CLINIC_ROOM)
    manifest = build_manifest(case, config)
    (beam,) = beams_by_hand(REAL_PLANS / name)
    timegain_s = float(config["rooms"][CLINIC_ROOM]["timegain_ms"]) / 1000.0
    mu_per_sample = float(config["interpreter"]["plan_dose_rate_mu_per_s"]) * timegain_s
    expected = sum(max(1, int(np.ceil(mu / mu_per_sample))) for _, _, mus in beam.layers for mu in mus)
    assert expected > config["interpreter"]["plan_max_samples_per_beam"]
    with pytest.raises(CaseError) as info:
        interpret_case(manifest, config, tmp_path / "p2")
    message = str(info.value)
    assert message.startswith(f"{find_plan(case)}: beam {beam.number} (")
    assert f"plan mode would write {expected:,} samples" in message
    assert "interpreter.plan_max_samples_per_beam (20,000,000)" in message
    assert not list((tmp_path / "p2").rglob("*.csv"))
