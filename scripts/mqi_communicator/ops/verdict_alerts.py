"""Alerts on QA verdicts: every new non-PASS verdict of a case (REVIEW, FAIL, ERROR, NOT ASSESSED)
is sent once, by the channels of `alerts` (docs/alerts-and-trend.md).

The run recorder calls `alert_verdict` when a case finishes; `python -m
mqi_communicator.ops.verdict_alerts CASE...` does the same by hand. The key in the case's alert
ledger (`state/alerts.json`) is a digest of what the verdict says (case verdict, labels, each
beam's verdicts and reasons), not of the whole qa.json (whose write time changes with every QA
run): the same verdict is never sent twice, a different one is sent and replaces the earlier key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.files import write_json_atomic
from mqi_communicator.formats import contracts
from mqi_communicator.ops import alerts, state

PREFIX = "verdict:"
QA_JSON = "qa/qa.json"
QA_SHEET = "qa/qa_sheet.html"
PROG = "python -m mqi_communicator.ops.verdict_alerts"


def read_qa(path: Path) -> dict[str, Any]:
    """A case's qa.json, or a ValueError naming the file and what is wrong with it."""
    try:
        qa = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable QA result ({exc})") from exc
    contracts.check("qa", qa, path)
    return qa


def labels_of(qa: dict[str, Any]) -> list[str]:
    return [str(label) for label in qa.get("labels", []) or []]


def shown_verdict(qa: dict[str, Any]) -> str:
    """The verdict as every view shows it: `FAIL [PLAN-BASED]`."""
    return " ".join([qa["verdict"], *(f"[{label}]" for label in labels_of(qa))])


def _line_reasons(line: dict[str, Any] | None) -> list[str]:
    return [str(r) for r in (line or {}).get("reasons", []) or []]


def beam_lines(qa: dict[str, Any]) -> list[str]:
    """One paragraph per beam that did not pass: its verdict, then each line's verdict and reasons."""
    out = []
    for beam in qa["beams"]:
        if beam.get("verdict") == "PASS":
            continue
        parts = [f"beam {beam.get('number', '?')} {beam.get('name', '')}: {beam.get('verdict')}"]
        for name in ("dose", "delivery"):
            line = beam.get(name) or {}
            if line.get("verdict") not in (None, "PASS", "NOT APPLICABLE"):
                parts.append(f"  {name} {line['verdict']}: " + "; ".join(_line_reasons(line) or ["(no reason given)"]))
        out.append("\n".join(parts))
    return out


def verdict_key(qa: dict[str, Any]) -> str:
    """`verdict:<VERDICT>:<digest>` of what the verdict says; the same for a rerun with the same result."""
    said = {
        "verdict": qa["verdict"],
        "labels": labels_of(qa),
        "beams": [
            [
                beam.get("number"),
                beam.get("name"),
                beam.get("verdict"),
                *[[(beam.get(n) or {}).get("verdict"), _line_reasons(beam.get(n))] for n in ("dose", "delivery")],
            ]
            for beam in qa["beams"]
        ],
    }
    digest = hashlib.sha256(json.dumps(said, sort_keys=True).encode()).hexdigest()[:16]
    return f"{PREFIX}{qa['verdict'].replace(' ', '_')}:{digest}"


def case_verdict(case_id: str, qa: dict[str, Any], sheet: Path) -> alerts.Alert:
    verdict = shown_verdict(qa)
    what = f"Case {case_id} finished with QA verdict {verdict}."
    todo = f"read the QA sheet ({sheet}) and decide on the case; this verdict is not sent again."
    return alerts._alert(
        "case_verdict",
        f"case {case_id} QA {verdict}",
        what,
        todo,
        case_id,
        verdict=qa["verdict"],
        labels=" ".join(labels_of(qa)),
        engine=qa.get("engine") or (qa.get("provenance") or {}).get("engine"),
        beams="\n".join(beam_lines(qa)),
        sheet=sheet,
    )


def alert_verdict(case_id: str, processing: Path, config: dict[str, Any]) -> bool:
    """Send the case's verdict once if it is not PASS (`config`: the `alerts` section); True if
    sent now. A PASS closes earlier verdict keys without a message."""
    qa = read_qa(processing / QA_JSON)
    ledger = processing / state.ALERTS
    earlier = alerts.open_keys(ledger, PREFIX)
    if qa["verdict"] == "PASS":
        alerts.clear(ledger, PREFIX)
        return False
    key = verdict_key(qa)
    if key in earlier:
        return False
    sent = alerts.notify_once(case_verdict(case_id, qa, processing / QA_SHEET), ledger, key, config)
    if sent:
        for old in earlier:  # keys are fixed-length digests: an exact key is only its own prefix
            alerts.clear(ledger, old)
    return sent


def pending_path(workdir: Path) -> Path:
    return workdir / ".mqi" / "verdict_alerts_pending.json"


def _set_pending(workdir: Path, case_id: str, pending: bool) -> None:
    path = pending_path(workdir)
    cases = set((state.read_json(path) or {}).get("cases", []))
    if (case_id in cases) == pending:
        return
    cases = cases | {case_id} if pending else cases - {case_id}
    write_json_atomic(path, {"cases": sorted(cases)})


def on_case_finished(case_id: str, layout: state.Layout, workdir: Path, config: dict[str, Any]) -> bool:
    """The run recorder's hook: alert the verdict; one that a configured channel could not take
    now is remembered in `.mqi/verdict_alerts_pending.json` (a finished case never enters a run
    again, so nothing else would retry it) and tried by `retry_pending` at the next runs."""
    sent = alert_verdict(case_id, layout.processing(case_id), config)
    qa = read_qa(layout.processing(case_id) / QA_JSON)
    undelivered = (
        not sent
        and qa["verdict"] != "PASS"
        and bool(alerts.channels(config))
        and verdict_key(qa) not in alerts.open_keys(layout.processing(case_id) / state.ALERTS, PREFIX)
    )
    _set_pending(workdir, case_id, undelivered)
    return sent


def retry_pending(layout: state.Layout, workdir: Path, config: dict[str, Any]) -> list[str]:
    """Try again the verdict alerts that were not delivered (their number, not the history's,
    is the cost); returns the cases sent now."""
    sent = []
    for case_id in (state.read_json(pending_path(workdir)) or {}).get("cases", []):
        try:
            if on_case_finished(case_id, layout, workdir, config):
                sent.append(case_id)
        except ValueError as exc:  # its qa.json is gone (reprocessed) or broken: stop trying
            print(f"verdict alert of case {case_id} dropped: {exc}", file=sys.stderr)
            _set_pending(workdir, case_id, False)
    return sent


def finished_verdict(processing: Path) -> str | None:
    """A finished case's verdict as shown, for the "recovered" message (None without a QA result)."""
    try:
        return shown_verdict(read_qa(processing / QA_JSON))
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("."), help="the project (working) folder")
    parser.add_argument("cases", nargs="+", help="case ids whose qa.json is to be alerted if not PASS")
    args = parser.parse_args(argv)
    try:
        config = settings.load(str(args.configfile))
    except (OSError, ValueError) as exc:
        print(f"{args.configfile}: {exc}", file=sys.stderr)
        return 2
    layout = state.Layout.from_config(config, args.workdir.resolve())
    status = 0
    for case_id in args.cases:
        processing = layout.processing(case_id)
        try:
            qa = read_qa(processing / QA_JSON)
            sent = alert_verdict(case_id, processing, config["alerts"])
        except ValueError as exc:
            print(f"case {case_id}: {exc}", file=sys.stderr)
            status = 1
            continue
        if sent:
            print(f"case {case_id}: QA {shown_verdict(qa)} alert sent")
        elif qa["verdict"] == "PASS":
            print(f"case {case_id}: QA PASS, nothing to send")
        elif verdict_key(qa) in alerts.open_keys(processing / state.ALERTS, PREFIX):
            print(f"case {case_id}: QA {shown_verdict(qa)} already sent")
        elif not alerts.channels(config["alerts"]):
            print(f"case {case_id}: QA {shown_verdict(qa)} NOT sent: no alert channel configured")
        else:
            print(f"case {case_id}: QA {shown_verdict(qa)} alert NOT delivered (next run tries again)")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
