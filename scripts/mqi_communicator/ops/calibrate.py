"""`bin/mqi calibrate`: derive the Gy per raw dose unit of the engine and room from a reference field.

The physicist runs a reference field (e.g. a uniform square field, with its TPS dose exported on
the water phantom as for any QA case) through the pipeline as an ordinary case, then:

    bin/mqi calibrate REFCASE --by "A. Physicist"                       # against the TPS dose
    bin/mqi calibrate REFCASE --by "A. Physicist" --measured-gy 1.987 --beam 2   # a measured point

TPS method: per beam, the factor that brings the engine's raw dose to the TPS dose, averaged over
the TPS >= 90 % region (the same region a relative comparison normalises on); the beams must agree
within --max-spread-percent. Measured method: the measured dose (Gy, one fraction) at the
isocentre of the plane, divided by the raw dose there. Both read the engine's raw dose (not the RT
Dose, which may carry an earlier calibration) and place it with the pipeline's own RT Dose writer,
and take the TPS dose through the same checks as QA. The entry is appended to the calibration
record with its date, method, sources (with sha256) and who set it (docs/qa.md, Calibration).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from mqi_communicator import settings
from mqi_communicator.files import sha256_of
from mqi_communicator.formats import contracts, raw_dose
from mqi_communicator.ops import state
from mqi_communicator.qa import calibration, verdict
from mqi_communicator.qa.run import fraction_group, tps_folder
from mqi_communicator.qa.tps_dose import (
    Plane,
    TpsDoseProblem,
    find_tps_doses,
    load_delivered_plane,
    load_tps_plane,
    match,
    resample_at,
)
from mqi_communicator.rtdose import writer as rtdose


def _unit_plane(raw: Path, grid: raw_dose.Grid, plan_path: Path, beam_number: int, depth_mm: float) -> Plane:
    """The engine's raw dose of one beam (scale 1), placed as the pipeline places it."""
    dose = raw_dose.read_raw(str(raw), grid)
    ds = rtdose.build_rtdose(
        dose, grid, plan_path, beam_number=beam_number, engine_label="calibration", calibrated=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unit.dcm"
        ds.save_as(path, enforce_file_format=True)
        return load_delivered_plane(path, depth_mm)


def derive(
    case_id: str,
    config: dict[str, Any],
    workdir: Path,
    *,
    measured_gy: float | None = None,
    beam: int | None = None,
    max_spread_percent: float = 2.0,
) -> tuple[float, str, str, dict[str, Any]]:
    """(Gy per unit, method, source text, details) from a finished reference case."""
    layout = state.Layout.from_config(config, workdir)
    manifest_path = layout.processing(case_id) / "intake.json"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: no intake record; run the reference case through the pipeline first")
    manifest = contracts.read_manifest(manifest_path)
    case_dir = Path(manifest["case_dir"])
    plan_path = case_dir / manifest["plan"]["path"]
    plan_ds = pydicom.dcmread(plan_path, stop_before_pixels=True)
    raw_dir = Path(layout.raw_template.replace("{case_id}", case_id))
    grid = raw_dose.grid_for(config["simulation"]["dose_type"])
    qa = config["qa"]
    depth = float(qa["plane_depth_mm"])
    beams = [b for b in manifest["beams"] if b["simulate"]]
    if beam is not None:
        beams = [b for b in beams if b["number"] == beam]
        if not beams:
            raise ValueError(f"case {case_id} has no simulated beam number {beam}")
    sources = {str(plan_path): sha256_of(plan_path)}
    factors: dict[str, float] = {}
    for entry in beams:
        raw = raw_dir / f"{entry['sanitized_name']}_Dose.raw"
        if not raw.is_file() and (layout.processing(case_id) / "state" / "pruned.json").exists():
            raise ValueError(
                f"{raw}: removed with the case's other intermediates by retention (docs/retention.md); "
                f"`bin/mqi reprocess {case_id} --from simulate`, a run, then calibrate again"
            )
        if not raw.is_file():
            raise ValueError(f"{raw}: the reference case has no raw dose for beam {entry['number']}")
        sources[str(raw)] = sha256_of(raw)
        unit = _unit_plane(raw, grid, plan_path, entry["number"], depth)
        if measured_gy is not None:
            iso = next(b for b in plan_ds.IonBeamSequence if int(b.BeamNumber) == entry["number"])
            x, _, z = (float(v) for v in iso.IonControlPointSequence[0].IsocenterPosition)
            at_iso = resample_at(unit, z, x)
            if not at_iso > 0:
                raise ValueError(f"beam {entry['number']}: no raw dose at the isocentre ({at_iso})")
            factors[str(entry["number"])] = measured_gy / at_iso
            continue
        folder = tps_folder(manifest, qa)
        tps_path = match(find_tps_doses(folder), str(plan_ds.SOPInstanceUID), entry["number"], len(beams))
        sources[str(tps_path)] = sha256_of(tps_path)
        fractions, _ = fraction_group(plan_ds, entry["number"])
        iso_y = float(plan_ds.IonBeamSequence[0].IonControlPointSequence[0].IsocenterPosition[1])
        tps = load_tps_plane(tps_path, iso_y, qa, fractions, str(plan_ds.get("FrameOfReferenceUID") or ""))
        if tps.units != "GY":
            raise ValueError(f"{tps_path}: a calibration needs a TPS dose in GY, not {tps.units}")
        problem = verdict.geometry_problem(tps, unit, float(qa["gamma"]["cutoff_percent"]))
        if problem:
            raise ValueError(f"{tps_path}: {problem}")
        region = tps.dose >= verdict.NORMALISATION_REGION_PERCENT / 100 * float(tps.dose.max())
        on_tps = verdict.resample(unit, tps.row_mm, tps.col_mm)
        factors[str(entry["number"])] = float(tps.dose[region].mean() / on_tps[region].mean())
    values = np.array(list(factors.values()))
    factor = float(np.mean(values))
    spread = 100.0 * float(values.max() - values.min()) / factor
    if spread > max_spread_percent:
        raise ValueError(
            f"the beams' factors disagree by {spread:.2f} % (> {max_spread_percent:g} %): {factors}; "
            "check the reference field before calibrating"
        )
    method = "measured" if measured_gy is not None else "tps"
    what = f"{measured_gy:g} Gy measured at the isocentre" if measured_gy is not None else "its TPS dose"
    source = (
        f"reference case {case_id} ({what}; factors per beam {', '.join(f'{k}: {v:.6g}' for k, v in factors.items())}); "
        + "; ".join(f"{Path(p).name} sha256 {d}" for p, d in sources.items())
    )
    return factor, method, source, {"factors": factors, "spread_percent": spread, "room": manifest["room"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ops.calibrate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("case", help="the finished reference case (its id)")
    parser.add_argument("--by", required=True, help="who sets this calibration (recorded)")
    parser.add_argument("--measured-gy", type=float, help="measured dose (Gy, one fraction) at the isocentre")
    parser.add_argument("--beam", type=int, help="the beam the measurement is of (with --measured-gy)")
    parser.add_argument("--max-spread-percent", type=float, default=2.0, help="largest disagreement between beams")
    parser.add_argument("--dry-run", action="store_true", help="derive and print, but do not record")
    parser.add_argument("--configfile", help="the site's configuration, as given to snakemake")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="the workflow's working folder")
    args = parser.parse_args(argv)
    if args.measured_gy is not None and args.beam is None:
        parser.error("--measured-gy needs --beam (which beam was measured)")
    if args.measured_gy is not None and not args.measured_gy > 0:
        parser.error(f"--measured-gy must be a dose > 0 Gy, not {args.measured_gy:g}")
    try:
        config = settings.load_site(args.configfile, args.workdir)
        factor, method, source, details = derive(
            args.case,
            config,
            args.workdir,
            measured_gy=args.measured_gy,
            beam=args.beam,
            max_spread_percent=args.max_spread_percent,
        )
        entry = calibration.Calibration(
            engine=calibration.engine_kind(config),
            room=details["room"],
            gy_per_unit=float(f"{factor:.6g}"),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            set_by=args.by,
            method=method,
            source=source,
        )
        record = Path(config["calibration"]["record"])
        record = record if record.is_absolute() else args.workdir / record
        if not args.dry_run:
            calibration.append(record, entry)
    except (OSError, ValueError, TpsDoseProblem) as exc:
        reason = exc.reason if isinstance(exc, TpsDoseProblem) else str(exc)
        print(f"calibrate: {reason}", file=sys.stderr)
        return 1
    print(
        f"{entry.engine} {entry.room}: {entry.gy_per_unit:.6g} Gy per raw unit ({method}; beams agree within "
        f"{details['spread_percent']:.2f} %)" + (" [dry run, not recorded]" if args.dry_run else f" -> {record}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
