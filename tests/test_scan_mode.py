"""An ion beam that is not spot scanned is refused naming its ScanMode (issue 19): before, a
passively scattered (NONE) or uniformly scanned (UNIFORM) treatment beam was accepted, and plan
mode wrote layer CSVs of no samples, a dose of nothing (docs/real-plans.md)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from mqi_communicator.errors import CaseError
from mqi_communicator.formats.plan import find_plan
from mqi_communicator.intake.case import build_manifest
from tests import casegen
from tests.plan_shapes_scan import without_spot_scanning


@pytest.mark.parametrize(
    ("scan_mode", "what"),
    [
        ("NONE", "no beam scanning (a passively scattered beam)"),
        ("UNIFORM", "a beam scanned to a uniform lateral fluence (wobbling), without spots"),
    ],
)
@pytest.mark.parametrize("mode", ["logs", "plan"])
def test_beam_not_spot_scanned_is_refused_naming_its_scan_mode(
    tmp_path: Path, config: dict, scan_mode: str, what: str, mode: str
) -> None:
    case = casegen.write_case(tmp_path, "scattered", deliveries=mode == "logs")
    plan = find_plan(case)
    without_spot_scanning(plan, scan_mode)
    ds = pydicom.dcmread(plan)
    treatment = [b for b in ds.IonBeamSequence if b.TreatmentDeliveryType == "TREATMENT"]
    assert {b.ScanMode for b in treatment} == {scan_mode}
    assert not any("ScanSpotPositionMap" in cp for b in treatment for cp in b.IonControlPointSequence)

    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    tail = ": only spot scanning (MODULATED) and line scanning (LINE) are computed"
    assert str(info.value) == (
        f"{plan}: the plan uses what is not supported:\n"
        f"    beam 2 ('1G180:TX'): ScanMode {scan_mode}, {what}{tail}\n"
        f"    beam 3 ('2G90'): ScanMode {scan_mode}, {what}{tail}"
    )


def test_setup_beam_without_scanning_is_not_refused(tmp_path: Path, config: dict) -> None:
    """casegen's setup beam has ScanMode NONE, as exports write it: not a treatment beam."""
    case = casegen.write_case(tmp_path, "setup", deliveries=False)
    setup = pydicom.dcmread(find_plan(case)).IonBeamSequence[0]
    assert setup.TreatmentDeliveryType == "SETUP" and setup.ScanMode == "NONE"
    assert build_manifest(case, config)["setup_beams"] == [1]
