"""Figures and tables for `snakemake --report`: a dose map and isocentre profiles per beam, and
a per-case table of the beams with their maximum dose and output files."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cron, SLURM login nodes
import matplotlib.pyplot as plt
import numpy as np

from .rtdose import read_rtdose_dose


def dose_figure(rtdose_path: Path, title: str, output: Path) -> dict[str, float]:
    """Dose map (central frame) and profiles through the isocentre from an RT Dose file."""
    image = read_rtdose_dose(rtdose_path)
    dose = image.dose
    frame = dose[dose.shape[0] // 2] if dose.shape[0] > 1 else dose[0]
    cols, rows = image.col_mm, image.row_mm
    units = image.units
    peak = float(frame.max())
    fig, (ax_map, ax_prof) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    half = abs(cols[1] - cols[0]) / 2 if len(cols) > 1 else 0.5
    extent = (cols[0] - half, cols[-1] + half, rows[0] - half, rows[-1] + half)
    # origin="lower": patient z (or y) increases upwards, as a physicist reads a coronal plane.
    shown = ax_map.imshow(
        frame, extent=extent, origin="lower", cmap="jet", vmin=0, vmax=peak or 1.0, interpolation="nearest"
    )
    row_axis = image.axes[1]
    ax_map.set_xlabel("patient x (mm)")
    ax_map.set_ylabel(f"patient {row_axis} (mm)")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(shown, ax=ax_map, label=f"dose ({units})")
    # Profiles through the pixel nearest the isocentre: the centre of the plane.
    r0, c0 = int(np.argmin(np.abs(rows - rows.mean()))), int(np.argmin(np.abs(cols - cols.mean())))
    ax_prof.plot(cols, frame[r0, :], label=f"along x at {row_axis} = {rows[r0]:.1f} mm")
    ax_prof.plot(rows, frame[:, c0], label=f"along {row_axis} at x = {cols[c0]:.1f} mm")
    ax_prof.set_xlabel("position (mm)")
    ax_prof.set_ylabel(f"dose ({units})")
    ax_prof.set_title("profiles through the isocentre")
    ax_prof.legend(fontsize=8)
    ax_prof.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return {"max_dose": peak}


def beam_rows(records: list[Path], rtdoses: list[Path]) -> list[dict[str, Any]]:
    """One entry per beam from its simulate record and its RT Dose (same order)."""
    rows = []
    for record_path, rtdose_path in zip(records, rtdoses, strict=True):
        record = json.loads(record_path.read_text())
        image = read_rtdose_dose(rtdose_path)
        rows.append(
            {
                "beam": record["beam_name"],
                "beam_number": record["beam_number"],
                "max_dose": float(image.dose.max()),
                "units": image.units,
                "engine": record["engine"],
                "gpu": record["gpu"],
                "slurm_job": record.get("slurm_job_id") or "",
                "seconds": record["seconds"],
                "raw_dose": record["raw"],
                "raw_sha256": record["sha256"],
                "rt_dose": str(rtdose_path),
            }
        )
    return rows


def beam_table(records: list[Path], rtdoses: list[Path], output: Path) -> None:
    """One row per beam: number, name, max dose and units, engine, run time, files."""
    rows = [row | {"max_dose": f"{row['max_dose']:.6g}"} for row in beam_rows(records, rtdoses)]
    for row in rows:
        del row["raw_sha256"]
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["beam"])
        writer.writeheader()
        writer.writerows(rows)


def case_summary(case_id: str, records: list[Path], rtdoses: list[Path], plan_dose: Path, output: Path) -> None:
    """The case's end state in one file: every beam's run and RT Dose, and the plan dose."""
    beams = beam_rows(records, rtdoses)
    plan = read_rtdose_dose(plan_dose)
    summary = {
        "case_id": case_id,
        "beams": beams,
        "plan_dose": {"rt_dose": str(plan_dose), "max_dose": float(plan.dose.max()), "units": plan.units},
    }
    output.write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.report", description="Report figures and tables for one case."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figure", help="dose map and profiles of one RT Dose")
    fig.add_argument("--rtdose", type=Path, required=True)
    fig.add_argument("--title", required=True)
    fig.add_argument("--output", type=Path, required=True)
    table = sub.add_parser("table", help="beam table of a case (CSV)")
    table.add_argument("--records", type=Path, nargs="+", required=True, help="simulate records, one per beam")
    table.add_argument("--rtdoses", type=Path, nargs="+", required=True, help="RT Doses, same order")
    table.add_argument("--output", type=Path, required=True)
    summary = sub.add_parser("summary", help="case summary (JSON)")
    summary.add_argument("--case", required=True)
    summary.add_argument("--records", type=Path, nargs="+", required=True)
    summary.add_argument("--rtdoses", type=Path, nargs="+", required=True)
    summary.add_argument("--plan-dose", type=Path, required=True)
    summary.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "figure":
            dose_figure(args.rtdose, args.title, args.output)
        elif args.command == "table":
            beam_table(args.records, args.rtdoses, args.output)
        else:
            case_summary(args.case, args.records, args.rtdoses, args.plan_dose, args.output)
    except (OSError, ValueError, KeyError) as exc:
        print(f"report failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
