"""Patient QA of one case: per beam the dose line (delivered RT Dose vs the TPS dose) and the
delivery line (PTN logs vs plan), the beam's worst, the case's worst; `qa.json` and the QA sheet.

    python -m mqi_communicator.qa.run --manifest intake.json --rtdoses RD_*.dcm \
        --settings config/config.yaml --calibration '{...}' --json qa.json --sheet qa_sheet.html

Everything a person needs to read the verdict travels with it (docs/qa.md, "Labels"): the case's
labels (PLAN-BASED, FLAGGED, and DOSE SCALE NOT VERIFIED when the dose scale is not a current
calibration), the engine, the calibration used and the fraction assessed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pydicom
import scipy

from mqi_communicator import __version__, cli, settings
from mqi_communicator.files import sha256_of, write_atomic
from mqi_communicator.formats import contracts
from mqi_communicator.formats.contracts import IntakeManifest, ManifestBeam
from mqi_communicator.formats.plan import Plan, read_plan
from mqi_communicator.qa import calibration as dose_calibration
from mqi_communicator.qa import delivery, report_pdf, resumed, sheet, signoff_record, verdict, volume
from mqi_communicator.qa.tps_dose import (
    TpsDoseProblem,
    beam_dose_check,
    find_tps_doses,
    load_delivered_plane,
    load_tps_plane,
    match,
)

UNVERIFIED_LABEL = dose_calibration.UNVERIFIED_LABEL


def _referenced_beam(path: Path) -> int | None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for ref in ds.get("ReferencedRTPlanSequence") or []:
        for group in ref.get("ReferencedFractionGroupSequence") or []:
            for beam in group.get("ReferencedBeamSequence") or []:
                return int(beam.ReferencedBeamNumber)
    return None


def fraction_group(plan_ds: pydicom.Dataset, beam_number: int) -> tuple[int | None, float | None]:
    """(NumberOfFractionsPlanned, BeamDose in Gy) of the first fraction group that references the
    beam (a beam in several groups is warned about or refused by plan.read_plan, docs/plan-support.md)."""
    for group in plan_ds.get("FractionGroupSequence") or []:
        for ref in group.get("ReferencedBeamSequence") or []:
            if int(ref.ReferencedBeamNumber) == beam_number:
                fractions = group.get("NumberOfFractionsPlanned")
                dose = ref.get("BeamDose")
                return (
                    int(fractions) if fractions not in (None, "") else None,
                    float(dose) if dose not in (None, "") else None,
                )
    return None, None


def fraction_assessed(manifest: IntakeManifest, beams: list[ManifestBeam]) -> dict[str, Any]:
    """Which delivery the verdict is about: the deliveries simulated, with their irradiation times."""
    by_folder = {d["folder"]: d for d in manifest["deliveries"]}
    used = [by_folder[f] for b in beams if b["simulate"] for f in b.get("simulated_deliveries", []) if f in by_folder]
    times = sorted(time for d in used if (time := d.get("irradiation_time")))
    delivered = max((len(b.get("fractions", [])) for b in beams if b["simulate"]), default=0)
    return {
        "source": manifest.get("mode", "logs"),
        # The latest complete fraction is the one simulated; earlier ones get the delivery check.
        "fraction": delivered or None,
        "fractions_delivered": delivered,
        "deliveries": sorted(d["folder"] for d in used),
        "first_irradiation": times[0] if times else None,
        "last_irradiation": times[-1] if times else None,
    }


def tps_folder(manifest: IntakeManifest, qa: dict[str, Any]) -> Path:
    configured = qa["tps_dose_directory"]
    return Path(configured.replace("{case_id}", manifest["case_id"])) if configured else Path(manifest["case_dir"])


def assess(
    manifest: IntakeManifest,
    rtdoses: list[Path],
    config: dict[str, Any],
    engine: str,
    calibration_entry: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    qa = config["qa"]
    case_dir = Path(manifest["case_dir"])
    plan_path = case_dir / manifest["plan"]["path"]
    plan: Plan = read_plan(plan_path)
    plan_ds = pydicom.dcmread(plan_path, stop_before_pixels=True)
    plan_frame = str(plan_ds.get("FrameOfReferenceUID") or "")
    dose_scale = dose_calibration.status(calibration_entry, float(config["calibration"]["max_age_days"]))
    labels = list(manifest.get("labels", []))
    if dose_scale["state"] != "current":
        labels.append(UNVERIFIED_LABEL)
    folder = tps_folder(manifest, qa)
    candidates = find_tps_doses(folder) if folder.is_dir() else []
    delivered_by_beam = {_referenced_beam(p): p for p in rtdoses}
    room = delivery.RoomCheck.from_config(config, manifest["room"])
    deliveries = {d["folder"]: d for d in manifest["deliveries"]}
    inputs = {str(plan_path): sha256_of(plan_path)}
    beams, figures = [], {}
    for entry in manifest["beams"]:
        if not entry["simulate"]:
            continue
        beam = plan.beam(entry["number"])
        assert beam is not None
        record: dict[str, Any] = {"number": beam.number, "name": beam.name, "gantry_angle": beam.gantry_angle}
        if "geometry" in entry:  # as the plan writes it (docs/plan-geometry.md); older manifests lack it
            record["geometry"] = entry["geometry"]
        try:
            rd = delivered_by_beam.get(beam.number)
            if rd is None:
                raise TpsDoseProblem("ERROR", f"no delivered RT Dose references beam {beam.number}")
            inputs[str(rd)] = sha256_of(rd)
            tps_path = match(candidates, plan.sop_instance_uid, beam.number, len(plan.treatment_beams))
            inputs[str(tps_path)] = sha256_of(tps_path)
            record["tps_dose"] = str(tps_path)
            fractions, beam_dose = fraction_group(plan_ds, beam.number)
            if volume.is_volume(rd) and volume.is_volume(tps_path):  # 3-D gamma where there is volume
                tps_volume = volume.load_tps_volume(tps_path, qa, fractions, plan_frame)
                dose = volume.compare_volume(tps_volume, volume.load_delivered_volume(rd), qa, dose_scale)
            else:
                tps = load_tps_plane(tps_path, beam.isocenter_mm[1], qa, fractions, plan_frame)
                scaling = beam_dose_check(tps, beam.isocenter_mm, beam_dose, fractions)
                if scaling is not None:
                    raise TpsDoseProblem("ERROR", f"{tps_path.name}: {scaling}")
                delivered = load_delivered_plane(rd, float(qa["plane_depth_mm"]))
                dose = verdict.compare(tps, delivered, qa, dose_scale)
        except TpsDoseProblem as problem:
            dose = verdict.error(problem.reason, problem.kind)
        arrays = dose.pop("_arrays", None)
        if arrays is not None:
            iso = (beam.isocenter_mm[0], beam.isocenter_mm[2])
            tags = "".join(f" [{label}]" for label in labels)
            figures[beam.name] = sheet.beam_figure(
                arrays, f"{manifest['case_id']} beam {beam.number} {beam.name}: {dose['verdict']}{tags}", iso
            )
        mine = [deliveries[f] for f in entry["simulated_deliveries"]]
        for d in mine:
            for p in d["ptn"]:
                inputs[str(case_dir / d["folder"] / p["file"])] = p["sha256"]
        record["dose"] = dose
        # A layer interrupted and resumed is checked whole (docs/fractions.md).
        record["delivery"] = resumed.check_beam(beam, mine, case_dir, room)
        record["verdict"] = verdict.worst([dose["verdict"], record["delivery"]["verdict"]])
        beams.append(record)
    result = {
        "case_id": manifest["case_id"],
        "room": manifest["room"],
        "plan_sop_instance_uid": plan.sop_instance_uid,
        "verdict": verdict.worst([b["verdict"] for b in beams]),
        "labels": labels,
        "engine": engine,
        "calibration": dose_scale,
        "fraction_assessed": fraction_assessed(manifest, manifest["beams"]),
        "beams": beams,
        "criteria": {k: v for k, v in qa.items() if k != "trend"},
        "provenance": {
            "engine": engine,
            "inputs": inputs,
            "software": {
                "mqi_communicator": __version__,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "scipy": scipy.__version__,
                "pydicom": pydicom.__version__,
                "matplotlib": matplotlib.__version__,
            },
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }
    return result, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi_communicator.qa.run", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="the case's intake.json")
    parser.add_argument("--rtdoses", type=Path, nargs="*", default=[], help="the pipeline's RT Dose per beam")
    parser.add_argument("--settings", default="config/config.yaml", help="config YAML path or inline JSON")
    parser.add_argument("--engine", default="unknown", help="engine named in the provenance")
    parser.add_argument(
        "--calibration",
        default="null",
        help="the current calibration entry of the engine and room as JSON (null: none; see qa.calibration)",
    )
    parser.add_argument("--json", type=Path, required=True, help="qa.json to write")
    parser.add_argument("--sheet", type=Path, required=True, help="QA sheet (HTML) to write")
    parser.add_argument("--pdf", type=Path, help="also write the PDF QA report here (docs/qa-report-pdf.md)")
    parser.add_argument("--figures", type=Path, help="also write qa_<beam>.png here (for the Snakemake report)")
    return cli.run(parser, _qa, argv, step="qa.run", label="QA")


def _qa(args: argparse.Namespace) -> int:
    config = settings.load(args.settings)
    manifest = contracts.read_manifest(args.manifest)
    result, figures = assess(manifest, args.rtdoses, config, args.engine, json.loads(args.calibration))
    if args.figures is not None:
        for beam in manifest["beams"]:
            if beam["name"] in figures:
                write_atomic(args.figures / f"qa_{beam['sanitized_name']}.png", figures[beam["name"]])
    try:
        contracts.write("qa", args.json, result)
    except contracts.ContractError as exc:
        print(f"QA failed: {exc}", file=sys.stderr)
        return 1
    # Signatures of earlier results of the case (kept by a reprocess) show as VOID (docs/sign-off.md).
    records = signoff_record.read_records(signoff_record.folder_for(args.json) / signoff_record.RECORD)
    signoff_lines = signoff_record.block_lines(records, sha256_of(args.json))
    sheet.write_sheet(args.sheet, result, figures, signoff_lines)
    if args.pdf is not None:
        report_pdf.write_pdf(args.pdf, result, figures, signoff_lines)
    print(f"{result['case_id']}: {result['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
