"""Across cases: the primary gamma pass rate over delivery time, one series per stratum (room,
engine, mode, comparison, gamma criteria: trend_points), with TG-218's process-based limits (an
individuals control chart of the site's own history: centre = mean, limits = mean -/+ 2.66 x mean
moving range). Each point is judged against the limits of the points of its stratum delivered
before it (at least `min_cases`, at most `window`; never itself): below the lower limit it is out
of control even when it passes the universal 95 %. Writes a figure and a JSON table
(docs/alerts-and-trend.md).

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
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mqi_communicator import cli
from mqi_communicator.files import write_atomic, write_json_atomic
from mqi_communicator.qa.trend_points import STRATUM_FIELDS, UNKNOWN, order, points, update_ledger

MOVING_RANGE_FACTOR = 2.66  # 3 / d2 with d2 = 1.128 for moving ranges of two points
MIN_CASES = 20  # default baseline: TG-218 asks for at least 20 earlier results of the same process


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


def _limits_note(baseline: int, min_cases: int) -> str:
    return f"{baseline} beams; a beam is judged once {min_cases} beams of its stratum were delivered before it"


def judge(series: list[dict[str, Any]], min_cases: int, window: int) -> dict[str, Any]:
    """One stratum, in delivery order: the latest `window` points, each judged against the limits
    of up to `window` points delivered before it (none with fewer than `min_cases`), and the limits
    the next point will be judged against."""
    rates = [p["pass_rate_percent"] for p in series]
    shown = []
    for index in range(max(0, len(series) - window), len(series)):
        baseline = rates[max(0, index - window) : index]
        limits = control_limits(baseline) if len(baseline) >= min_cases else None
        point = series[index] | {"baseline_points": len(baseline), "limits": limits}
        point["out_of_control"] = bool(limits and point["pass_rate_percent"] < limits["lower"])
        shown.append(point)
    latest = rates[-window:]
    limits = control_limits(latest) if len(latest) >= min_cases else None
    first = series[0]
    return {
        **{k: first.get(k) for k in STRATUM_FIELDS},
        "points": shown,
        "beams_in_history": len(series),
        "limits": limits,
        "note": None if limits else _limits_note(len(latest), min_cases),
    }


def trend(all_points: list[dict[str, Any]], min_cases: int = MIN_CASES, window: int | None = None) -> dict[str, Any]:
    """Per stratum, the points in delivery order and their judgements; the unknown stratum is
    shown as it is, never judged."""
    window = window or max(len(all_points), 1)
    series: dict[str, list[dict[str, Any]]] = {}
    for point in all_points:
        series.setdefault(point["stratum"], []).append(point)
    strata = {}
    for name, members in sorted(series.items()):
        members.sort(key=order)  # the ledger's order already: a pass of timsort
        if name == UNKNOWN:
            shown = [p | {"limits": None, "out_of_control": False} for p in members[-window:]]
            reasons = sorted({p.get("unknown_because", "") for p in members})
            note = "not judged: " + "; ".join(r for r in reasons if r)
            strata[name] = {"points": shown, "beams_in_history": len(members), "limits": None, "note": note}
        else:
            strata[name] = judge(members, min_cases, window)
    return {"strata": strata, "min_cases": min_cases, "window": window}


def figure(result: dict[str, Any]) -> bytes:
    strata = result["strata"]
    # The unknown stratum last: it is shown for completeness, not judged.
    names = sorted(strata, key=lambda name: (name == UNKNOWN, name))
    fig, axes = plt.subplots(max(1, len(names)), 1, figsize=(9, 3.2 * max(1, len(names))), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=False):
        stratum = strata[name]
        shown = stratum["points"]
        x = np.arange(1, len(shown) + 1)
        rates = [p["pass_rate_percent"] for p in shown]
        ax.plot(x, rates, "o-", label="primary gamma pass rate")
        out = [(k, p["pass_rate_percent"]) for k, p in zip(x, shown, strict=True) if p["out_of_control"]]
        if out:
            ax.plot(*zip(*out, strict=True), "rx", markersize=10, label="below its process limit")
        lower = [p["limits"]["lower"] if p.get("limits") else np.nan for p in shown]
        if not np.isnan(lower).all():
            ax.step(x, lower, "k--", where="mid", label="process lower limit (earlier beams)")
        ax.axhline(95, color="tab:green", linestyle=":", label="TG-218 universal tolerance 95 %")
        ax.axhline(90, color="tab:red", linestyle=":", label="TG-218 universal action 90 %")
        if stratum["limits"]:
            ax.axhline(stratum["limits"]["centre"], color="k", linestyle="-", linewidth=0.8, label="process centre")
        ax.set_title(name + (f"\n({stratum['note']})" if stratum["note"] else ""), fontsize=9)
        ax.set_xlabel(f"beam, in delivery order (latest {len(shown)} of {stratum['beams_in_history']})")
        ax.set_ylabel("pass rate (%)")
        ax.legend(fontsize=7)
    if not names:
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
    parser.add_argument(
        "--min-cases", type=int, default=MIN_CASES, help="control limits need this many earlier beams of the stratum"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=250,
        help="show the latest this many beams per stratum; limits from at most as many",
    )
    parser.add_argument("--figure", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)  # checked first: a usage error (exit 2), as argparse's own
    if args.min_cases < 2 or args.window < args.min_cases:
        parser.error(f"--min-cases {args.min_cases} must be >= 2 and <= --window {args.window}")
    return cli.run(parser, _trend, argv, step="qa.trend", label="TREND")


def _trend(args: argparse.Namespace) -> int:
    if args.ledger:
        all_points = update_ledger(args.ledger, args.qa, args.history)
    else:
        all_points = points(sorted({*args.qa, *(Path(p) for p in glob.glob(args.history or ""))}))
    result = trend(all_points, args.min_cases, args.window)
    write_json_atomic(args.json, result)
    write_atomic(args.figure, figure(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
