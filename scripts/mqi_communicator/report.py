"""Figures and tables for `snakemake --report`: a dose map and isocentre profiles per beam, and
a per-case table of the beams with their maximum dose and output files."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mqi_communicator import cli
from mqi_communicator.files import write_atomic
from mqi_communicator.formats import contracts
from mqi_communicator.formats.contracts import IntakeManifest
from mqi_communicator.formats.rtdose_read import read_rtdose_dose


def dose_figure(rtdose_path: Path, title: str, output: Path) -> dict[str, float]:
    """Dose map (central frame) and profiles through the isocentre from an RT Dose file."""
    # Imported here: matplotlib costs a second of start-up that the table and summary don't need.
    import matplotlib

    matplotlib.use("Agg")  # headless: cron, SLURM login nodes
    import matplotlib.pyplot as plt

    image = read_rtdose_dose(rtdose_path)
    dose = image.dose
    frame = dose[dose.shape[0] // 2] if dose.shape[0] > 1 else dose[0]
    cols, rows = image.col_mm, image.row_mm
    units = image.units
    peak = float(frame.max())
    fig, (ax_map, ax_x, ax_r) = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.1, 1, 1]})
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
    # Profiles through the pixel nearest the isocentre (the centre of the plane), one panel per
    # direction so that neither hides the other when the field is symmetric.
    r0, c0 = int(np.argmin(np.abs(rows - rows.mean()))), int(np.argmin(np.abs(cols - cols.mean())))
    for ax, positions, line, name, at in (
        (ax_x, cols, frame[r0, :], "x", f"{row_axis} = {rows[r0]:.1f} mm"),
        (ax_r, rows, frame[:, c0], row_axis, f"x = {cols[c0]:.1f} mm"),
    ):
        ax.plot(positions, line, color="tab:blue" if name == "x" else "tab:red")
        ax.set_xlabel(f"patient {name} (mm)")
        ax.set_ylabel(f"dose ({units})")
        ax.set_title(f"profile along {name} at {at}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    write_atomic(output, buffer.getvalue())
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


def beam_table(records: list[Path], rtdoses: list[Path], output: Path, labels: list[str] | None = None) -> None:
    """One row per beam: number, name, max dose and units, engine, run time, files; with the
    case's labels (PLAN-BASED, FLAGGED) in a last column, when given."""
    rows = [row | {"max_dose": f"{row['max_dose']:.6g}"} for row in beam_rows(records, rtdoses)]
    if labels is not None:
        rows = [row | {"labels": " ".join(labels)} for row in rows]
    for row in rows:
        del row["raw_sha256"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["beam"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(output, text.getvalue().encode())


def qa_summary(qa_path: Path) -> dict[str, Any]:
    """The case's QA verdict and each beam's (dose, delivery) verdicts from its qa.json."""
    qa = contracts.read_qa(qa_path)
    scale = qa.get("calibration") or {}
    return {
        "verdict": qa["verdict"],
        "qa_json": str(qa_path),
        "sheet": str(qa_path.with_name("qa_sheet.html")),
        "labels": qa.get("labels", []),
        "engine": qa.get("engine"),
        "dose_scale": {"state": scale.get("state"), "reason": scale.get("reason")},
        "fraction_assessed": qa.get("fraction_assessed"),
        "beams": {
            b["name"]: {"verdict": b["verdict"], "dose": b["dose"]["verdict"], "delivery": b["delivery"]["verdict"]}
            for b in qa["beams"]
        },
    }


def case_summary(
    case_id: str,
    records: list[Path],
    rtdoses: list[Path],
    plan_dose: Path | None,
    output: Path,
    qa: Path | None = None,
    manifest: IntakeManifest | None = None,
) -> None:
    """The case's end state in one file: every beam's run and RT Dose, the plan dose (when the
    beams share one geometry), the QA verdict; with the intake manifest, also the mode
    (logs | plan) and the labels (PLAN-BASED, FLAGGED)."""
    beams = beam_rows(records, rtdoses)
    plan_entry: dict[str, Any] = {"rt_dose": None, "note": "no plan sum: the beams do not share one geometry"}
    if plan_dose is not None:
        plan = read_rtdose_dose(plan_dose)
        plan_entry = {"rt_dose": str(plan_dose), "max_dose": float(plan.dose.max()), "units": plan.units}
    summary: dict[str, Any] = {"case_id": case_id}
    if manifest is not None:
        summary |= {
            "mode": manifest.get("mode"),
            "labels": manifest.get("labels", []),
            "flags": manifest.get("flags", []),
            "warnings": manifest.get("warnings", []),
        }
    qa_entry = qa_summary(qa) if qa is not None else None
    if qa_entry is not None:  # QA's labels: intake's, and whether the dose scale is verified
        summary["labels"] = list(dict.fromkeys([*summary.get("labels", []), *qa_entry["labels"]]))
    summary |= {
        "qa": qa_entry,
        "beams": beams,
        "plan_dose": plan_entry,
    }
    contracts.write("case_summary", output, summary)


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
    table.add_argument("--manifest", type=Path, help="the case's intake.json (labels column)")
    summary = sub.add_parser("summary", help="case summary (JSON)")
    summary.add_argument("--case", required=True)
    summary.add_argument("--records", type=Path, nargs="+", required=True)
    summary.add_argument("--rtdoses", type=Path, nargs="+", required=True)
    summary.add_argument("--plan-dose", type=Path, help="the plan sum RT Dose, when one was written")
    summary.add_argument("--qa", type=Path, help="the case's qa.json (its verdict goes into the summary)")
    summary.add_argument("--manifest", type=Path, help="the case's intake.json (mode and labels)")
    summary.add_argument("--output", type=Path, required=True)
    return cli.run(parser, _report, argv, step="report", label="REPORT", subject=lambda a: a.command)


def _report(args: argparse.Namespace) -> int:
    if args.command == "figure":
        dose_figure(args.rtdose, args.title, args.output)
    elif args.command == "table":
        labels = contracts.read_manifest(args.manifest).get("labels", []) if args.manifest else None
        beam_table(args.records, args.rtdoses, args.output, labels)
    else:
        manifest = contracts.read_manifest(args.manifest) if args.manifest else None
        case_summary(args.case, args.records, args.rtdoses, args.plan_dose, args.output, args.qa, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
