"""Which deliveries make one fraction (docs/fractions.md), on PTN logs of real interruptions as the
machine writes them: the interrupted layer logged in both deliveries, the resumed delivery's
PlanInfo starting at that layer."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from mqi_communicator import settings
from mqi_communicator.errors import CaseError
from mqi_communicator.formats import ptn
from mqi_communicator.formats.plan import find_plan, read_plan
from mqi_communicator.intake.case import build_manifest, case_readiness
from mqi_communicator.intake.case_inputs import content_record
from mqi_communicator.intake.delivery_folders import find_delivery_folders, read_delivery
from mqi_communicator.intake.fraction_watch import needs_scan, record_path, write_seen
from mqi_communicator.intake.fractions import case_fractions
from mqi_communicator.interpret import interpret_case
from mqi_communicator.ops import state, verify
from mqi_communicator.qa.fraction_records import pending, record_fraction, scan_finished
from tests import casegen

DAY1_EVENING = "2026110223500000"
AFTER_MIDNIGHT = "2026110300100000"


def interrupted_case(root: Path, share: float = 0.4) -> tuple[Path, casegen.CaseSpec]:
    """Beam 3 normal; beam 2 interrupted inside layer 3 (spot 4 at `share` of its MU), resumed
    at layer 3 twenty minutes later."""
    spec = casegen.standard_case()
    case = casegen.write_case(root, "resumed", spec, ready=False)
    for folder in find_delivery_folders(case):
        if "DICOM_BEAM_NUMBER,2" in (folder / "PlanInfo.txt").read_text():
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
    casegen.write_interrupted(case, spec, 2, ("2026110209000000", "2026110209200000"), layer=3, spot=4, share=share)
    (case / "_CASE_READY").write_text("")
    return case, spec


def settle(case: Path) -> None:
    """The case folder last changed a minute ago (a time within the file system clock's tick of
    now is never trusted: fraction_watch.seen_now)."""
    past = time.time_ns() - 60_000_000_000
    os.utime(case, ns=(past, past))


def dose1_counts(case: Path, relative: str) -> int:
    return int(ptn.read_ptn(case / relative)[:, 4].astype(np.int64).sum())


def test_a_delivery_resumed_inside_a_layer_is_one_fraction(tmp_path: Path, config: dict) -> None:
    case, spec = interrupted_case(tmp_path)
    # Before: the resumed delivery was a "new fraction" missing layers 1-2; the case waited, then failed.
    assert case_readiness(case, config) == ("ready", "every treatment beam delivered")
    manifest = build_manifest(case, config)
    beam2 = next(b for b in manifest["beams"] if b["number"] == 2)
    assert beam2["simulated_deliveries"] == ["2026110209000000", "2026110209200000"]
    assert beam2["fractions"] == [["2026110209000000", "2026110209200000"]]
    assert [f["number"] for f in manifest["fractions"]] == [1] and manifest["fractions"][0]["complete"]
    # Each part alone is far from the layer's plan MU (log_checks would fail it); the union is not.
    assert manifest["flags"] == [] and manifest["labels"] == []
    # Layer 3 has 16 spots; interrupted at 40 % of its 5th: the parts hold 4.4 and 11.6 spots' counts.
    first = dose1_counts(case, "2026110209000000/2026110209000000_003.ptn")
    second = dose1_counts(case, "2026110209200000/2026110209200000_003.ptn")
    assert len(spec.beams[1].spots_xy_mm[2]) == 16
    assert first / (first + second) == pytest.approx(4.4 / 16, abs=0.002)

    # P2 writes layer 3 from both logs, rows numbered on: the engine sees the whole layer's MU.
    out = tmp_path / "p2"
    summary = interpret_case(manifest, config, out)
    layers = {entry["layer"]: entry for entry in summary["beams"][0]["layers"]}
    assert sorted(layers) == [1, 2, 3, 4]
    assert layers[3]["ptn"] == "2026110209000000/2026110209000000_003.ptn + 2026110209200000/2026110209200000_003.ptn"
    rows = [line.split(",") for line in (out / "log" / "1G180_TX" / layers[3]["file"]).read_text().splitlines()]
    parts = [ptn.read_ptn(case / p) for p in layers[3]["ptn"].split(" + ")]
    assert len(rows) == sum(len(p) for p in parts) == layers[3]["samples"]
    counts = sum(int(r[3]) for r in rows)
    assert counts == sum(int(p[:, 4].astype(np.int64).sum()) for p in parts)
    times = [float(r[0]) for r in rows]
    assert times == sorted(times) and times[len(parts[0])] > times[len(parts[0]) - 1]


def test_single_line_layout_joins_the_parts_into_one_line(tmp_path: Path, config: dict) -> None:
    case, _spec = interrupted_case(tmp_path)
    config["interpreter"]["csv_layout"] = "single_line"
    manifest = build_manifest(case, config)
    summary = interpret_case(manifest, config, tmp_path / "p2")
    entry = next(e for e in summary["beams"][0]["layers"] if e["layer"] == 3)
    text = (tmp_path / "p2" / "log" / "1G180_TX" / entry["file"]).read_text()
    assert text.count("\n") == 1 and text.endswith("\n") and ",," not in text
    assert len(text.strip().split(",")) == 4 * entry["samples"]


def test_deliveries_split_over_days_and_later_fractions(tmp_path: Path, config: dict) -> None:
    spec = casegen.standard_case()
    case = tmp_path / "course"
    casegen.write_plan(case / "RP.course.dcm", spec)
    # Fraction 1: beam 2 in the evening, beam 3 after midnight.
    casegen.write_delivery(case, spec, 2, DAY1_EVENING)
    casegen.write_delivery(case, spec, 3, AFTER_MIDNIGHT)
    # Fraction 2, a day later: beam 3 first, then beam 2 interrupted after layer 2 and resumed at layer 3.
    casegen.write_delivery(case, spec, 3, "2026110309000000")
    casegen.write_delivery(case, spec, 2, "2026110309050000", stop_layer=2)
    casegen.write_delivery(case, spec, 2, "2026110309300000", start_layer=3)
    # Fraction 3 has begun: beam 2 restarts at layer 1 (its fraction 2 was complete).
    casegen.write_delivery(case, spec, 2, "2026110409000000", stop_layer=1)
    (case / "_CASE_READY").write_text("")
    plan = read_plan(find_plan(case))
    deliveries = [read_delivery(case, folder, plan) for folder in find_delivery_folders(case)]
    fractions = case_fractions(plan, deliveries)
    assert [f.number for f in fractions] == [1, 2, 3]
    assert fractions[0].folders == [DAY1_EVENING, AFTER_MIDNIGHT]
    assert fractions[1].folders == ["2026110309000000", "2026110309050000", "2026110309300000"]
    assert fractions[0].complete and fractions[1].complete
    assert fractions[2].missing() == {2: [2, 3, 4], 3: [1, 2, 3, 4]}
    # The case waits for fraction 3 to complete: the latest fraction is the one simulated.
    state, reason = case_readiness(case, config)
    assert state == "waiting" and "beam 2 ('1G180:TX'): layers 2-4 of 4 not delivered" in reason


def test_a_one_layer_beam_delivered_again_is_the_next_fraction(tmp_path: Path, config: dict) -> None:
    spec = casegen.CaseSpec(beams=[casegen.BeamSpec(1, "ONE", [120.0], [[(0.0, 0.0), (10.0, 0.0)]])])
    case = casegen.write_case(tmp_path, "one", spec)
    casegen.write_delivery(case, spec, 1, "2026110409000000")
    plan = read_plan(find_plan(case))
    deliveries = [read_delivery(case, folder, plan) for folder in find_delivery_folders(case)]
    fractions = case_fractions(plan, deliveries)
    assert [f.complete for f in fractions] == [True, True]


def test_a_fraction_record_checks_the_resumed_layer_whole(tmp_path: Path, config: dict) -> None:
    case, spec = interrupted_case(tmp_path, share=0.4)
    processing = tmp_path / "processing"
    assert pending(case, processing, config) == [1]
    assert not needs_scan(case, processing)  # not watched before its first record
    settle(case)
    record = record_fraction(case, record_path(processing, 1), 1, config)
    beam2 = next(b for b in record["beams"] if b["number"] == 2)
    assert beam2["deliveries"] == ["2026110209000000", "2026110209200000"] and beam2["resumed_layers"] == [3]
    layer3 = next(layer for layer in beam2["delivery"]["layers"] if layer["layer"] == 3)
    assert layer3["ptn"] == "2026110209000000/2026110209000000_003.ptn + 2026110209200000/2026110209200000_003.ptn"
    # What the monitor counted in both parts adds up to the layer's planned MU.
    assert layer3["layer_mu_planned"] == pytest.approx(len(spec.beams[1].spots_xy_mm[2]) * spec.beams[1].spot_mu)
    assert abs(layer3["layer_mu_diff_percent"]) < 0.5
    assert [entry["layer"] for entry in beam2["delivery"]["layers"]] == [1, 2, 3, 4]
    assert set(record["inputs"]) >= {"2026110209000000/2026110209000000_003.ptn", "RP.resumed.dcm"}
    # Append-only: never written again; nothing pending; the case folder as seen is remembered.
    written = record_path(processing, 1).read_bytes()
    with pytest.raises(CaseError, match="never rewritten"):
        record_fraction(case, record_path(processing, 1), 1, config)
    assert record_path(processing, 1).read_bytes() == written
    assert pending(case, processing, config) == [] and not needs_scan(case, processing)
    # The next fraction arrives: the case folder changed; fraction 2 is pending once complete.
    casegen.write_delivery(case, spec, 3, "2026110309000000")
    assert needs_scan(case, processing) and pending(case, processing, config) == []
    casegen.write_delivery(case, spec, 2, "2026110309100000", mu_scale=1.05)
    assert pending(case, processing, config) == [2]
    second = record_fraction(case, record_path(processing, 2), 2, config)
    assert second["verdict"] == "FAIL" and second["deliveries"] == ["2026110309000000", "2026110309100000"]
    failed = next(b for b in second["beams"] if b["number"] == 2)
    assert failed["verdict"] == "FAIL" and all("+5.0" in reason for reason in failed["delivery"]["reasons"])
    assert next(b for b in second["beams"] if b["number"] == 3)["verdict"] == "PASS"


def test_a_recorded_fraction_grouped_otherwise_later_is_an_error_not_a_rewrite(tmp_path: Path, config: dict) -> None:
    spec = casegen.standard_case()
    case = casegen.write_case(tmp_path, "late", spec)
    processing = tmp_path / "processing"
    record_fraction(case, record_path(processing, 1), 1, config)
    casegen.write_delivery(case, spec, 2, "2026110309000000")
    casegen.write_delivery(case, spec, 3, "2026110309050000")
    # An earlier delivery of beam 2 arrives late: fraction 1 would now be another delivery.
    casegen.write_delivery(case, spec, 2, "2026110108000000")
    with pytest.raises(CaseError, match="fraction 1 was recorded with deliveries"):
        record_fraction(case, record_path(processing, 2), 2, config)
    assert not record_path(processing, 2).exists()


def test_verify_reports_changed_files_but_not_a_later_fraction(tmp_path: Path, config: dict) -> None:
    spec = casegen.standard_case()
    scan = tmp_path / "scan"
    case = casegen.write_case(scan, "done", spec)
    site = settings.validate({"paths": {"local": {"scan_directory": str(scan)}}})
    layout = state.Layout.from_config(site, tmp_path / "work")
    processing = layout.processing("done")
    processing.mkdir(parents=True)
    manifest = build_manifest(case, config) | {"inputs": content_record(case)}
    (processing / "intake.json").write_text(json.dumps(manifest))
    (processing / state.SUMMARY).write_text(json.dumps({"case_id": "done"}))
    casegen.write_delivery(case, spec, 2, "2026110309000000")
    assert verify.verify_case(layout, "done", None) == []
    assert not (processing / state.CHANGED).exists()
    # A file the finished result used, replaced, still is a change; so is a stray file.
    ptn_file = sorted((case / manifest["deliveries"][0]["folder"]).glob("*.ptn"))[0]
    ptn_file.write_bytes(ptn_file.read_bytes()[::-1])
    (case / "note.txt").write_text("added later")
    assert verify.verify_case(layout, "done", None) == ["note.txt", str(ptn_file.relative_to(case))]
    # A plan-based result gets no fraction records: logs arriving later are a change.
    (processing / "intake.json").write_text(json.dumps(manifest | {"mode": "plan", "deliveries": []}))
    assert "2026110309000000/PlanInfo.txt" in verify.verify_case(layout, "done", None)


def test_a_case_folder_changed_just_now_is_looked_at_again(tmp_path: Path, config: dict) -> None:
    case = casegen.write_case(tmp_path, "fresh")
    processing = tmp_path / "processing"
    record_fraction(case, record_path(processing, 1), 1, config)
    # Changed within a coarse file-system clock's tick: another folder could still arrive unseen.
    assert needs_scan(case, processing)
    settle(case)
    numbers, seen = scan_finished(case, processing, config)
    assert numbers == [] and seen is not None
    write_seen(processing, seen)
    assert not needs_scan(case, processing)


def test_delivery_folders_beside_a_plan_two_levels_down_are_watched(tmp_path: Path, config: dict) -> None:
    spec = casegen.standard_case()
    case = casegen.write_case(tmp_path, "nested", spec, deliveries=False, plan_mode=False, plan_subfolder=True)
    study = case / spec.patient_id / "1.2.3.4"  # the clinic's sender: <PatientID>/<StudyUID>/RP*.dcm
    casegen.write_delivery(study, spec, 2, "2026110209000000")
    casegen.write_delivery(study, spec, 3, "2026110209050000")
    processing = tmp_path / "processing"
    for folder in (case, study):
        settle(folder)
    record_fraction(case, record_path(processing, 1), 1, config)
    assert not needs_scan(case, processing)
    casegen.write_delivery(study, spec, 2, "2026110309000000")  # the case folder's own time is unchanged
    assert needs_scan(case, processing)
