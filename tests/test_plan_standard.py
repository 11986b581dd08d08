"""The plan self-check judges what PS3.3 C.8.8.13 requires, not our samples' habits (issue 19):
plans shaped the way Eclipse, RayStation and MOSAIQ write them run, several fraction groups are
read per group, a missing BeamMeterset (Type 3) takes the MU from the logs or is refused by name
in plan mode, and a cut or beam-less file is still caught."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from mqi_communicator.errors import CaseError
from mqi_communicator.formats.plan import find_plan, read_plan
from mqi_communicator.intake.case import build_manifest
from mqi_communicator.interpret import interpret_case
from mqi_communicator.qa.run import fraction_group
from tests import casegen
from tests import plan_shapes_fraction as shapes

# Every 23rd byte in the suite (4 s a shape); MQI_PLAN_CUT_STEP=1 tries every byte (docs/plan-support.md).
CUT_STEP = int(os.environ.get("MQI_PLAN_CUT_STEP", "23"))


def _csv_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "log").rglob("*.csv"))}


@pytest.mark.parametrize("mode", ["logs", "plan"])
def test_setup_beam_left_out_of_the_fraction_group_runs(tmp_path: Path, config: dict, mode: str) -> None:
    case = casegen.write_case(tmp_path, "eclipse", deliveries=mode == "logs")
    plan = shapes.plan_of(case)
    shapes.setup_beam_unreferenced(plan)
    shapes.weights_normalised(plan)
    ds = pydicom.dcmread(plan)
    # The shape of issue 19: three beams in IonBeamSequence, NumberOfBeams counts the two treated.
    assert len(ds.IonBeamSequence) == 3
    assert ds.FractionGroupSequence[0].NumberOfBeams == 2
    assert [int(r.ReferencedBeamNumber) for r in ds.FractionGroupSequence[0].ReferencedBeamSequence] == [2, 3]

    manifest = build_manifest(case, config)
    assert [b["number"] for b in manifest["beams"]] == [2, 3]
    assert manifest["setup_beams"] == [1]
    assert manifest["mode"] == mode
    # MU still from BeamMeterset: each layer's MU is its spots' MU as casegen planned them.
    for beam in read_plan(plan).treatment_beams:
        assert beam.mu_known
        assert sum(layer.mu for layer in beam.layers) == pytest.approx(
            float(
                next(
                    r.BeamMeterset
                    for r in ds.FractionGroupSequence[0].ReferencedBeamSequence
                    if r.ReferencedBeamNumber == beam.number
                )
            )
        )
    summary = interpret_case(manifest, config, tmp_path / "p2")
    assert len(_csv_bytes(tmp_path / "p2")) == 8 and summary["mode"] == mode


def test_no_beam_meterset_with_logs_runs_on_the_logs_mu(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "nometer")
    plan = shapes.plan_of(case)
    shapes.setup_beam_unreferenced(plan)
    shapes.weights_normalised(plan)
    interpret_case(build_manifest(case, config), config, tmp_path / "with")
    shapes.without_beam_meterset(plan)
    refs = pydicom.dcmread(plan).FractionGroupSequence[0].ReferencedBeamSequence
    assert not any("BeamMeterset" in r for r in refs)

    read = read_plan(plan)
    assert [b.number for b in read.beams_without_mu] == [2, 3]
    # The wrong result this guards against: each beam's relative weights (1 in all) judged as
    # its MU against the logs' 1.32 MU, beyond log_checks.mu_tolerance (0.25) in every layer.
    assert all(sum(layer.mu for layer in b.layers) == pytest.approx(1.0) for b in read.treatment_beams)
    manifest = build_manifest(case, config)
    assert manifest["flags"] == [] and manifest["labels"] == []
    assert any("no BeamMeterset for beam(s) [2, 3]" in w and "delivery logs" in w for w in manifest["warnings"])
    interpret_case(manifest, config, tmp_path / "without")
    # The simulation input, made from the logs, is the same byte for byte.
    assert _csv_bytes(tmp_path / "without") == _csv_bytes(tmp_path / "with")


def test_no_beam_meterset_in_plan_mode_is_refused_by_name(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "nometer_plan", deliveries=False)
    plan = shapes.plan_of(case)
    shapes.weights_normalised(plan)
    planned = [layer.mu for layer in read_plan(plan).treatment_beams[0].layers]
    shapes.without_beam_meterset(plan)
    # The wrong result this guards against: the relative meterset weights taken as MU.
    weights = read_plan(plan).treatment_beams[0]
    assert not weights.mu_known
    assert sum(layer.mu for layer in weights.layers) == pytest.approx(1.0)
    assert sum(planned) == pytest.approx(1.32) != 1.0  # casegen: 66 spots of 0.02 MU

    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    message = str(info.value)
    assert message.startswith(f"{plan}: plan mode needs each treatment beam's MU")
    assert "BeamMeterset" in message and "2 ('1G180:TX'), 3 ('2G90')" in message


@pytest.mark.parametrize("mode", ["logs", "plan"])
def test_two_fraction_groups_each_from_its_own_group(tmp_path: Path, config: dict, mode: str) -> None:
    case = casegen.write_case(tmp_path, "boost", deliveries=mode == "logs")
    plan = shapes.plan_of(case)
    planned = {b.number: [layer.mu for layer in b.layers] for b in read_plan(plan).treatment_beams}
    groups = shapes.two_fraction_groups(plan, fractions=(25, 5))
    assert groups == {2: 1, 3: 2}
    ds = pydicom.dcmread(plan)
    assert [g.NumberOfBeams for g in ds.FractionGroupSequence] == [1, 1]

    read = read_plan(plan)
    assert read.warnings == []
    # Each beam's MU from its own group's BeamMeterset, its fractions from its own group.
    assert {b.number: [layer.mu for layer in b.layers] for b in read.treatment_beams} == pytest.approx(planned)
    assert fraction_group(ds, 2)[0] == 25 and fraction_group(ds, 3)[0] == 5
    manifest = build_manifest(case, config)
    assert [b["number"] for b in manifest["beams"]] == [2, 3]
    interpret_case(manifest, config, tmp_path / "p2")
    assert len(_csv_bytes(tmp_path / "p2")) == 8


def test_one_beam_in_two_groups(tmp_path: Path, config: dict) -> None:
    """Different MU: refused by name. The same MU (1.32 = casegen's): read, the group whose
    NumberOfFractionsPlanned it gets named in a warning, never taken silently."""
    case = casegen.write_case(tmp_path, "twice")
    plan = shapes.plan_of(case)
    original = plan.read_bytes()
    shapes.beam_in_two_groups(plan, 2, other_meterset=1.5)
    ds = pydicom.dcmread(plan)
    assert [int(r.ReferencedBeamNumber) for g in ds.FractionGroupSequence for r in g.ReferencedBeamSequence].count(
        2
    ) == 2
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    message = str(info.value)
    assert message.startswith(f"{plan}: the plan uses what is not supported")
    assert (
        "beam 2 is in several fraction groups with different BeamMeterset "
        "(1.32 MU in fraction group 1, 1.5 MU in fraction group 2): not supported" in message
    )

    plan.write_bytes(original)
    shapes.beam_in_two_groups(plan, 2, other_meterset=1.32)
    manifest = build_manifest(case, config)
    assert any(
        "beam 2 is in several fraction groups (1.32 MU in fraction group 1, 1.32 MU in fraction group 2): "
        "its NumberOfFractionsPlanned and BeamDose are those of fraction group 1" in w
        for w in manifest["warnings"]
    )
    assert fraction_group(pydicom.dcmread(plan), 2)[0] == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # UIDs cut mid-value
@pytest.mark.parametrize("shape", ["ours", "eclipse"])
def test_plan_cut_anywhere_is_still_caught(tmp_path: Path, config: dict, shape: str) -> None:
    """Cut after every CUT_STEP-th byte (MQI_PLAN_CUT_STEP=1: every byte): each cut file is refused naming the plan (or, cut inside its
    header, no plan is found), none is read as a plan, none escapes as a raw parser error."""
    case = casegen.write_case(tmp_path, "cut")
    plan = shapes.plan_of(case)
    if shape == "eclipse":
        shapes.setup_beam_unreferenced(plan)
    whole = plan.read_bytes()
    assert read_plan(find_plan(case)).beams
    reasons: dict[str, int] = {}
    for size in range(0, len(whole), CUT_STEP):
        plan.write_bytes(whole[:size])
        with pytest.raises(CaseError) as info:
            read_plan(find_plan(case))
        where, reason = str(info.value).split(": ", 1)
        assert where in (str(plan), str(case))
        reasons[reason.split(":")[0]] = reasons.get(reason.split(":")[0], 0) + 1
    # A cut inside an element whose declared length runs past the file's end is caught as it is
    # read (most cuts); the self-check catches what still parses.
    assert set(reasons) <= {
        "cannot read DICOM (cut short or damaged?)",
        "the plan contradicts its own declarations (a truncated or damaged file?)",
        "no RT Ion Plan (Modality RTPLAN, SOP class RT Ion Plan) found",
        "plan has no treatment beam",  # cut before the first beam: nothing to read as a plan
    }, reasons
    assert reasons["cannot read DICOM (cut short or damaged?)"] > len(whole) // CUT_STEP // 2
    # And through intake, the case's manifest is refused naming the plan.
    plan.write_bytes(whole[: int(len(whole) * 0.75)])
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    assert str(info.value).startswith(f"{plan}: cannot read DICOM (cut short or damaged?)")


@pytest.mark.parametrize("shape", ["ours", "eclipse"])
@pytest.mark.parametrize("lost", [2, 3])
def test_plan_that_lost_a_treatment_beam_is_still_caught(tmp_path: Path, config: dict, shape: str, lost: int) -> None:
    case = casegen.write_case(tmp_path, "lost")
    plan = shapes.plan_of(case)
    if shape == "eclipse":
        shapes.setup_beam_unreferenced(plan)
    shapes.treatment_beam_lost(plan, lost)
    assert lost not in [int(b.BeamNumber) for b in pydicom.dcmread(plan).IonBeamSequence]
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    message = str(info.value)
    assert message.startswith(f"{plan}: the plan contradicts its own declarations")
    assert f"references beam(s) [{lost}] that are not in IonBeamSequence" in message


def test_reference_plan_numbering_slip_is_tolerated(reference_data: Path) -> None:
    """The clinic's real export references beams 1, 6, 7, 8, 9 for beams 1 to 5: as many orphan
    references as unreferenced beams, a numbering slip; its weights are MU (BeamMeterset 9 = 9)."""
    ds = pydicom.dcmread(reference_data / "RP_G2_9spots_phantom.dcm")
    group = ds.FractionGroupSequence[0]
    assert [int(r.ReferencedBeamNumber) for r in group.ReferencedBeamSequence] == [1, 6, 7, 8, 9]
    assert int(group.NumberOfBeams) == 5
    plan = read_plan(reference_data / "RP_G2_9spots_phantom.dcm")
    assert plan.beams_without_mu == []
    assert any("[6, 7, 8, 9]" in w and "[2, 3, 4, 5]" in w for w in plan.warnings)


@pytest.mark.parametrize("mode", ["logs", "plan"])
def test_plan_without_fraction_scheme(tmp_path: Path, config: dict, mode: str) -> None:
    """The RT Fraction Scheme module is optional in the RT Ion Plan IOD: without it no beam's MU is known."""
    case = casegen.write_case(tmp_path, "noscheme", deliveries=mode == "logs")
    shapes.without_fraction_scheme(shapes.plan_of(case))
    assert "FractionGroupSequence" not in pydicom.dcmread(shapes.plan_of(case))
    if mode == "plan":
        with pytest.raises(CaseError, match="no fraction group gives a BeamMeterset for beam"):
            build_manifest(case, config)
        return
    manifest = build_manifest(case, config)
    assert any("no FractionGroupSequence" in w for w in manifest["warnings"])
    assert any("no BeamMeterset for beam(s) [2, 3]" in w for w in manifest["warnings"])
    interpret_case(manifest, config, tmp_path / "p2")
    assert len(_csv_bytes(tmp_path / "p2")) == 8


def test_number_of_beams_against_its_own_group(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "count")
    plan = shapes.plan_of(case)
    shapes.setup_beam_unreferenced(plan)
    ds = pydicom.dcmread(plan)
    ds.FractionGroupSequence[0].NumberOfBeams = 3  # what our samples' habit would have wanted
    ds.save_as(plan)
    with pytest.raises(CaseError) as info:
        build_manifest(case, config)
    assert "fraction group 1: NumberOfBeams is 3 but ReferencedBeamSequence lists 2 beams" in str(info.value)


@pytest.mark.parametrize("mode", ["logs", "plan"])
def test_treatment_beam_in_no_fraction_group(tmp_path: Path, config: dict, mode: str) -> None:
    case = casegen.write_case(tmp_path, "unreferenced", deliveries=mode == "logs")
    plan = shapes.plan_of(case)
    ds = pydicom.dcmread(plan)
    group = ds.FractionGroupSequence[0]
    group.ReferencedBeamSequence = [r for r in group.ReferencedBeamSequence if int(r.ReferencedBeamNumber) != 3]
    group.NumberOfBeams = len(group.ReferencedBeamSequence)
    ds.save_as(plan)
    if mode == "plan":
        with pytest.raises(CaseError, match=r"no fraction group gives a BeamMeterset for beam\(s\) 3 \('2G90'\)"):
            build_manifest(case, config)
        return
    manifest = build_manifest(case, config)
    assert any("treatment beam(s) [3] are in no fraction group" in w for w in manifest["warnings"])
    assert [b["number"] for b in manifest["beams"]] == [2, 3]
