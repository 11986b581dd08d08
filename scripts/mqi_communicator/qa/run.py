"""Patient QA of one case: per beam the dose line (delivered RT Dose vs the TPS dose) and the
delivery line (PTN logs vs plan), the beam's worst, the case's worst; `qa.json` and the QA sheet.

    python -m mqi_communicator.qa.run --manifest intake.json --rtdoses RD_*.dcm \
        --settings config/config.yaml --json qa.json --sheet qa_sheet.html --figures report/qa
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

from .. import __version__, ptn, settings
from ..files import sha256_of, write_atomic, write_json_atomic
from ..plan import Plan, read_plan
from . import delivery, sheet, verdict, volume
from .tps_dose import TpsDoseProblem, find_tps_doses, load_delivered_plane, load_tps_plane, match


def _referenced_beam(path: Path) -> int | None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for ref in ds.get("ReferencedRTPlanSequence") or []:
        for group in ref.get("ReferencedFractionGroupSequence") or []:
            for beam in group.get("ReferencedBeamSequence") or []:
                return int(beam.ReferencedBeamNumber)
    return None


def _fractions(plan_path: Path) -> int | None:
    ds = pydicom.dcmread(plan_path, stop_before_pixels=True)
    groups = ds.get("FractionGroupSequence") or []
    value = groups[0].get("NumberOfFractionsPlanned") if groups else None
    return int(value) if value not in (None, "") else None


def tps_folder(manifest: dict[str, Any], qa: dict[str, Any]) -> Path:
    configured = qa["tps_dose_directory"]
    return Path(configured.replace("{case_id}", manifest["case_id"])) if configured else Path(manifest["case_dir"])


def assess(
    manifest: dict[str, Any], rtdoses: list[Path], config: dict[str, Any], engine: str
) -> tuple[dict[str, Any], dict[str, bytes]]:
    qa = config["qa"]
    case_dir = Path(manifest["case_dir"])
    plan_path = case_dir / manifest["plan"]["path"]
    plan: Plan = read_plan(plan_path)
    fractions = _fractions(plan_path)
    folder = tps_folder(manifest, qa)
    candidates = find_tps_doses(folder) if folder.is_dir() else []
    delivered_by_beam = {_referenced_beam(p): p for p in rtdoses}
    calibration = ptn.RoomCalibration.from_config(config["rooms"][manifest["room"]])
    deliveries = {d["folder"]: d for d in manifest["deliveries"]}
    inputs = {str(plan_path): sha256_of(plan_path)}
    beams, figures = [], {}
    for entry in manifest["beams"]:
        if not entry["simulate"]:
            continue
        beam = plan.beam(entry["number"])
        assert beam is not None
        record: dict[str, Any] = {"number": beam.number, "name": beam.name, "gantry_angle": beam.gantry_angle}
        try:
            rd = delivered_by_beam.get(beam.number)
            if rd is None:
                raise TpsDoseProblem("ERROR", f"no delivered RT Dose references beam {beam.number}")
            inputs[str(rd)] = sha256_of(rd)
            tps_path = match(candidates, plan.sop_instance_uid, beam.number, len(plan.treatment_beams))
            inputs[str(tps_path)] = sha256_of(tps_path)
            record["tps_dose"] = str(tps_path)
            if volume.is_volume(rd) and volume.is_volume(tps_path):  # 3-D gamma where there is volume
                dose = volume.compare_volume(
                    volume.load_tps_volume(tps_path, qa, fractions), volume.load_delivered_volume(rd), qa
                )
            else:
                tps = load_tps_plane(tps_path, beam.isocenter_mm[1], qa, fractions)
                dose = verdict.compare(tps, load_delivered_plane(rd), qa)
        except TpsDoseProblem as problem:
            dose = verdict.error(problem.reason, problem.kind)
        arrays = dose.pop("_arrays", None)
        if arrays is not None:
            iso = (beam.isocenter_mm[0], beam.isocenter_mm[2])
            figures[beam.name] = sheet.beam_figure(
                arrays, f"{manifest['case_id']} beam {beam.number} {beam.name}: {dose['verdict']}", iso
            )
        mine = [deliveries[f] for f in entry["simulated_deliveries"]]
        for d in mine:
            for p in d["ptn"]:
                inputs[str(case_dir / d["folder"] / p["file"])] = p["sha256"]
        record["dose"] = dose
        record["delivery"] = delivery.check_beam(
            beam, mine, case_dir, calibration, config["monitor_range_factors"], qa["delivery"]
        )
        record["verdict"] = verdict.worst([dose["verdict"], record["delivery"]["verdict"]])
        beams.append(record)
    result = {
        "case_id": manifest["case_id"],
        "room": manifest["room"],
        "plan_sop_instance_uid": plan.sop_instance_uid,
        "verdict": verdict.worst([b["verdict"] for b in beams]),
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
    parser.add_argument("--json", type=Path, required=True, help="qa.json to write")
    parser.add_argument("--sheet", type=Path, required=True, help="QA sheet (HTML) to write")
    parser.add_argument("--figures", type=Path, help="also write qa_<beam>.png here (for the Snakemake report)")
    args = parser.parse_args(argv)
    try:
        config = settings.load(args.settings)
        manifest = json.loads(args.manifest.read_text())
        result, figures = assess(manifest, args.rtdoses, config, args.engine)
    except (OSError, ValueError, KeyError) as exc:
        print(f"QA failed: {exc}", file=sys.stderr)
        return 1
    if args.figures is not None:
        for beam in manifest["beams"]:
            if beam["name"] in figures:
                write_atomic(args.figures / f"qa_{beam['sanitized_name']}.png", figures[beam["name"]])
    write_json_atomic(args.json, result)
    sheet.write_sheet(args.sheet, result, figures)
    print(f"{result['case_id']}: {result['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
