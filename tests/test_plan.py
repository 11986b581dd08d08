from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_communicator.errors import CaseError
from mqi_communicator.formats.plan import find_plan, read_plan, room_of_machine, sanitize_beam_name
from tests import casegen


def test_reference_plan_private_tags(reference_data: Path) -> None:
    """The clinic's RayStation export carries the spots only in the SHI private tags."""
    plan = read_plan(reference_data / "RP_G2_9spots_phantom.dcm")
    assert plan.room == "G2"
    assert plan.patient_id == "202005QA"
    assert [b.name for b in plan.treatment_beams] == ["1S070", "2S110", "3S150", "4S190", "5S230"]
    assert [b.layers[0].energy_mev for b in plan.beams] == [70.0, 110.0, 150.0, 190.0, 230.0]
    for beam in plan.beams:
        assert len(beam.layers) == 1
        layer = beam.layers[0]
        assert layer.mu == pytest.approx(9.0)
        assert layer.spot_mu == pytest.approx([1.0] * 9)
        xs, ys = zip(*layer.spot_xy_mm, strict=True)
        assert sorted(set(xs)) == [-50.0, 0.0, 50.0]
        assert sorted(set(ys)) == [-50.0, 0.0, 50.0]
        assert beam.isocenter_mm[1] == pytest.approx(30.0)


def test_standard_tags_win_and_match_private(tmp_path: Path) -> None:
    spec = casegen.standard_case(layers=3)
    casegen.write_plan(tmp_path / "RP.dcm", spec, private_tags=True)
    with_private = read_plan(tmp_path / "RP.dcm")
    # Drop the standard tags: the private mirror alone must give the same spots.
    ds = pydicom.dcmread(tmp_path / "RP.dcm")
    for beam in ds.IonBeamSequence:
        for cp in beam.IonControlPointSequence:
            for keyword in ("ScanSpotPositionMap", "ScanSpotMetersetWeights", "NumberOfScanSpotPositions"):
                if keyword in cp:
                    delattr(cp, keyword)
    ds.save_as(tmp_path / "RP_private.dcm")
    private_only = read_plan(tmp_path / "RP_private.dcm")
    for a, b in zip(with_private.beams, private_only.beams, strict=True):
        assert [layer.energy_mev for layer in a.layers] == [layer.energy_mev for layer in b.layers]
        for la, lb in zip(a.layers, b.layers, strict=True):
            np.testing.assert_allclose(la.spot_xy_mm, lb.spot_xy_mm, atol=1e-4)
            np.testing.assert_allclose(la.spot_mu, lb.spot_mu, rtol=1e-6)
            assert la.mu == pytest.approx(sum(la.spot_mu))


def test_setup_beam_and_layers(tmp_path: Path) -> None:
    spec = casegen.standard_case(layers=4)
    casegen.write_plan(tmp_path / "RP.dcm", spec)
    plan = read_plan(tmp_path / "RP.dcm")
    assert [b.number for b in plan.treatment_beams] == [2, 3]
    assert plan.beam(1) is not None and plan.beam(1).is_setup  # type: ignore[union-attr]
    beam = plan.beam(2)
    assert beam is not None and beam.name == "1G180:TX" and beam.sanitized_name == "1G180_TX"
    assert [layer.energy_mev for layer in beam.layers] == [150.0, 145.0, 140.0, 135.0]
    assert [len(layer.spot_mu) for layer in beam.layers] == [25, 16, 16, 9]


def test_room_and_sanitizing() -> None:
    assert room_of_machine("G2") == "G2"
    assert room_of_machine("Gantry 1") == "G1"
    assert room_of_machine("G12") is None
    assert room_of_machine("TR3") is None
    assert sanitize_beam_name("1G180:TX") == "1G180_TX"
    assert sanitize_beam_name("a b/c-d_e") == "a_b_c-d_e"


def test_find_plan_by_modality_one_level_down(tmp_path: Path) -> None:
    case = casegen.write_case(tmp_path, "c1", plan_subfolder=True)
    found = find_plan(case)
    assert found.parent.parent.name == "PSEUDO001"


def test_find_plan_errors(tmp_path: Path) -> None:
    case = casegen.write_case(tmp_path, "c1")
    plan_path = find_plan(case)
    shutil.copy(plan_path, case / "RP.copy.dcm")
    with pytest.raises(CaseError, match="more than one RT Ion Plan"):
        find_plan(case)
    (case / "RP.copy.dcm").unlink()
    plan_path.unlink()
    with pytest.raises(CaseError, match="no RT Ion Plan"):
        find_plan(case)


def test_photon_plan_is_refused(tmp_path: Path) -> None:
    case = casegen.write_case(tmp_path, "c1")
    plan_path = find_plan(case)
    ds = pydicom.dcmread(plan_path)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan (photon)
    ds.save_as(plan_path)
    with pytest.raises(CaseError, match="not an RT Ion Plan") as info:
        find_plan(case)
    assert info.value.path == plan_path


def test_mixed_rooms_refused(tmp_path: Path) -> None:
    spec = casegen.standard_case()
    casegen.write_plan(tmp_path / "RP.dcm", spec)
    ds = pydicom.dcmread(tmp_path / "RP.dcm")
    ds.IonBeamSequence[2].TreatmentMachineName = "G1"
    ds.save_as(tmp_path / "RP.dcm")
    with pytest.raises(CaseError, match="mixed rooms"):
        read_plan(tmp_path / "RP.dcm")
    ds.IonBeamSequence[2].TreatmentMachineName = "TR9"
    ds.IonBeamSequence[1].TreatmentMachineName = "TR9"
    ds.save_as(tmp_path / "RP.dcm")
    with pytest.raises(CaseError, match="unknown room"):
        read_plan(tmp_path / "RP.dcm")
