"""Across cases: the primary gamma pass rate per room over time, with TG-218's process-based
limits (an individuals control chart of the site's own history: centre = mean, limits =
mean -/+ 2.66 x mean moving range; a case below the lower limit is out of control even when it
passes the universal 95 %). Writes a figure and a JSON table.

The points of every assessed beam are kept in a ledger (JSON lines, one per beam): a run reads
the ledger and the `qa.json` of this run's cases only, so its cost does not grow with the number
of finished cases' files (a reprocessed case's lines are replaced). Without a ledger, the first
run builds it from `--history`, a glob of every case's `qa.json`.

    python -m mqi_communicator.qa.trend --qa data/cases/NEW/intermediate/qa/qa.json \
        --ledger results/qa_history.jsonl --history 'data/cases/*/intermediate/qa/qa.json' \
        --figure trend.png --json trend.json
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ..files import write_atomic, write_json_atomic

MOVING_RANGE_FACTOR = 2.66  # 3 / d2 with d2 = 1.128 for moving ranges of two points


def points(qa_files: list[Path]) -> list[dict[str, Any]]:
    """One point per assessed beam: room, date (the qa.json's time), case, beam, pass rate."""
    out = []
    for path in qa_files:
        qa = json.loads(path.read_text())
        for beam in qa["beams"]:
            rate = beam["dose"].get("gamma_primary", {}).get("pass_rate_percent")
            if rate is not None:
                out.append(
                    {
                        "room": qa["room"],
                        "written": qa["provenance"]["written"],
                        "case_id": qa["case_id"],
                        "beam": beam["name"],
                        "pass_rate_percent": float(rate),
                    }
                )
    return sorted(out, key=_order)


def _order(point: dict[str, Any]) -> tuple[str, str, str, str]:
    return (point["room"], point["written"], point["case_id"], point["beam"])


def update_ledger(ledger: Path, qa_files: list[Path], history: str | None) -> list[dict[str, Any]]:
    """Every point: the ledger's (built from `history` when there is none yet), with the cases of
    `qa_files` replaced by their current points; the ledger is rewritten atomically."""
    if ledger.exists():
        known = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    else:
        known = points([Path(p) for p in glob.glob(history or "")])
    fresh = points(qa_files)
    renewed = {p["case_id"] for p in fresh} | {json.loads(f.read_text())["case_id"] for f in qa_files}
    merged = sorted([p for p in known if p["case_id"] not in renewed] + fresh, key=_order)
    write_atomic(ledger, "".join(json.dumps(p, sort_keys=True) + "\n" for p in merged).encode())
    return merged


def control_limits(rates: list[float]) -> dict[str, float] | None:
    """Centre line and limits of an individuals chart (None with fewer than two points)."""
    if len(rates) < 2:
        return None
    values = np.asarray(rates)
    moving_range = float(np.abs(np.diff(values)).mean())
    centre = float(values.mean())
    return {
        "centre": centre,
        "lower": centre - MOVING_RANGE_FACTOR * moving_range,
        "upper": min(100.0, centre + MOVING_RANGE_FACTOR * moving_range),
    }


def trend(all_points: list[dict[str, Any]], min_cases: int, window: int | None = None) -> dict[str, Any]:
    """Per room the latest `window` points in time order, their control limits and which points
    fall below them (the drawing and its cost stay the same size as the history grows)."""
    rooms: dict[str, Any] = {}
    for point in all_points:
        rooms.setdefault(point["room"], {"points": []})["points"].append(point)
    for room in rooms.values():
        room["beams_in_history"] = len(room["points"])
        if window:
            room["points"] = room["points"][-window:]
        rates = [p["pass_rate_percent"] for p in room["points"]]
        limits = control_limits(rates) if len(rates) >= min_cases else None
        room["limits"] = limits
        room["note"] = None if limits else f"{len(rates)} beams; control limits need {min_cases}"
        for p in room["points"]:
            p["out_of_control"] = bool(limits and p["pass_rate_percent"] < limits["lower"])
    return {"rooms": rooms, "min_cases": min_cases, "window": window}


def figure(result: dict[str, Any]) -> bytes:
    rooms = result["rooms"]
    fig, axes = plt.subplots(max(1, len(rooms)), 1, figsize=(9, 3.2 * max(1, len(rooms))), squeeze=False)
    for ax, (name, room) in zip(axes[:, 0], sorted(rooms.items()), strict=False):
        rates = [p["pass_rate_percent"] for p in room["points"]]
        ax.plot(range(1, len(rates) + 1), rates, "o-", label="primary gamma pass rate")
        ax.axhline(95, color="tab:green", linestyle=":", label="TG-218 universal tolerance 95 %")
        ax.axhline(90, color="tab:red", linestyle=":", label="TG-218 universal action 90 %")
        if room["limits"]:
            for key, style in (("centre", "-"), ("lower", "--")):
                ax.axhline(
                    room["limits"][key], color="k", linestyle=style, label=f"process {key} {room['limits'][key]:.1f} %"
                )
        ax.set_title(f"room {name}" + (f" ({room['note']})" if room["note"] else ""))
        ax.set_xlabel(f"beam, in time order (latest {len(rates)} of {room['beams_in_history']})")
        ax.set_ylabel("pass rate (%)")
        ax.legend(fontsize=7)
    if not rooms:
        axes[0, 0].text(0.5, 0.5, "no assessed beams yet", ha="center")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi_communicator.qa.trend", description=__doc__.splitlines()[0])
    parser.add_argument("--qa", type=Path, nargs="*", default=[], help="qa.json of this run's cases")
    parser.add_argument(
        "--ledger", type=Path, help="the points of every assessed beam so far (JSON lines; updated in place)"
    )
    parser.add_argument(
        "--history",
        help="glob of every case's qa.json, read only to build a missing ledger (or, without --ledger, "
        "every run), e.g. 'data/cases/*/intermediate/qa/qa.json'",
    )
    parser.add_argument("--min-cases", type=int, default=5, help="control limits need this many beams")
    parser.add_argument("--window", type=int, default=250, help="show and judge the latest this many beams per room")
    parser.add_argument("--figure", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.ledger:
            all_points = update_ledger(args.ledger, args.qa, args.history)
        else:
            all_points = points(sorted({*args.qa, *(Path(p) for p in glob.glob(args.history or ""))}))
        result = trend(all_points, args.min_cases, args.window)
    except (OSError, ValueError, KeyError) as exc:
        print(f"trend failed: {exc}", file=sys.stderr)
        return 1
    write_json_atomic(args.json, result)
    write_atomic(args.figure, figure(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
