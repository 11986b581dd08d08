"""C-STORE of finished cases' RT Doses to the configured DICOM destinations (PACS, OIS, TPS).

Per case and destination a record, `<processing dir>/sent/<destination>.json`, lists every SOP
instance the destination confirmed (Success or a Warning status, PS3.4 B.2.3); a confirmed object
is never sent to it again. What is not confirmed is tried by the next sending runs; after
`alert_after_failures` runs in a row without every object confirmed, one alert (ops/alerts.py)
names the case and the destination. With the RT Doses goes the case's PDF QA report as an
Encapsulated PDF (`<processing dir>/sent/qa_report.dcm`, made from `qa/qa_report.pdf` and the plan;
docs/qa-report-pdf.md).

    python -m mqi_communicator.dicomnet.sender [--configfile SITE.yaml] [--workdir DIR] --case CASE...
    python -m mqi_communicator.dicomnet.sender ... --pending     the outbox (outbox.py)
    (bin/mqi send)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

from mqi_communicator import settings
from mqi_communicator.dicomnet import outbox
from mqi_communicator.files import only_one, write_json_atomic
from mqi_communicator.formats import encapsulated_pdf
from mqi_communicator.ops import alerts, state

LOCK = Path(".mqi") / "dicom-send.lock"
ALERT_PREFIX = "dicom_send:"


def _confirmed(status: Any) -> bool:
    # PS3.4 B.2.3: Success 0x0000 and the Warnings 0xB000, 0xB006, 0xB007 mean the SCP stored it.
    return bool(status) and int(status.Status) in (0x0000, 0xB000, 0xB006, 0xB007)


def case_doses(layout: state.Layout, case_id: str) -> list[Path]:
    """The case's RT Doses, as the pipeline wrote them (`final_dicom_directory`)."""
    folder = Path(layout.dicom_template.replace("{case_id}", case_id))
    return sorted(folder.glob("*.dcm"))


def case_report(layout: state.Layout, case_id: str) -> Path | None:
    """The case's PDF QA report as an Encapsulated PDF, made once per PDF from `qa/qa_report.pdf`
    and the plan its intake.json names; None where the case's QA wrote no PDF."""
    processing = layout.processing(case_id)
    pdf = processing / "qa" / "qa_report.pdf"
    if not pdf.is_file():
        return None
    target = processing / "sent" / "qa_report.dcm"
    if target.is_file() and target.stat().st_mtime_ns >= pdf.stat().st_mtime_ns:
        return target
    manifest = state.read_json(processing / "intake.json")
    if manifest is None or "plan" not in manifest:
        raise ValueError(f"{processing / 'intake.json'}: missing or unreadable, so no plan for the QA report")
    verdict = (state.read_json(processing / "qa" / "qa.json") or {}).get("verdict", "?")
    plan = Path(manifest["case_dir"]) / manifest["plan"]["path"]
    encapsulated_pdf.write_for_plan(pdf, plan, target, f"QA report {case_id}: {verdict}")
    return target


def record_path(layout: state.Layout, case_id: str, destination: str) -> Path:
    return layout.processing(case_id) / "sent" / f"{destination}.json"


def _read_record(path: Path, destination: dict[str, Any]) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        record = {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable send record ({exc}); move it aside to send the case again") from exc
    record.setdefault("confirmed", {})
    record.setdefault("failed_runs", 0)
    record["destination"] = {k: destination[k] for k in ("name", "host", "port", "ae_title")}
    return record


def send_to(
    destination: dict[str, Any], files: list[Path], record: dict[str, Any], path: Path, section: dict[str, Any]
) -> str | None:
    """Send the files the destination has not confirmed yet, in one association; every confirmation
    is written to ``record`` at ``path`` at once (durably). Returns why not all were confirmed."""
    todo = []
    for file in files:
        try:
            header = dcmread(file, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            return f"{file}: cannot be read ({exc})"
        if str(header.SOPInstanceUID) not in record["confirmed"]:
            todo.append((file, header))
    if not todo:
        return None
    ae = AE(ae_title=section["ae_title"])
    timeout = float(section["timeout_seconds"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, syntax in sorted({(h.SOPClassUID, h.file_meta.TransferSyntaxUID) for _, h in todo}):
        ae.add_requested_context(sop_class, syntax)
    where = f"{destination['ae_title']}@{destination['host']}:{destination['port']}"
    assoc = ae.associate(destination["host"], int(destination["port"]), ae_title=destination["ae_title"])
    if assoc.is_rejected:
        return f"association rejected by {where} (is {section['ae_title']} known there?)"
    if not assoc.is_established:
        return f"no association with {where} (not listening, unreachable, or aborted)"
    problem = None
    try:
        for file, header in todo:
            try:
                status = assoc.send_c_store(file)
            except (ValueError, OSError) as exc:  # e.g. the destination accepted no context for RT Dose
                problem = problem or f"{file.name} not sent to {where}: {exc}"
                continue
            if not _confirmed(status):
                code = f"status 0x{int(status.Status):04X}" if status else "no answer"
                problem = problem or f"{file.name} not stored by {where}: {code}"
                if not assoc.is_established:
                    break
                continue
            record["confirmed"][str(header.SOPInstanceUID)] = {"file": file.name, "time": time.time()}
            write_json_atomic(path, record, durable=True)
    finally:
        if assoc.is_established:
            assoc.release()
    return problem


def send_case(case_id: str, config: dict[str, Any], workdir: Path) -> bool:
    """Send one finished case to every destination; True when every destination confirmed every
    RT Dose. A destination failing on `alert_after_failures` runs in a row is alerted once."""
    layout = state.Layout.from_config(config, workdir)
    section = config["dicom_network"]["sender"]
    files = case_doses(layout, case_id)
    if not files:
        print(f"case {case_id}: no RT Dose in {layout.dicom_template.replace('{case_id}', case_id)}", file=sys.stderr)
        return False
    ledger = layout.processing(case_id) / state.ALERTS
    done = True
    try:
        report = case_report(layout, case_id)
    except ValueError as exc:  # the RT Doses still go; the case is not complete without its report
        print(f"case {case_id}: QA report not sent: {exc}", file=sys.stderr)
        done, report = False, None
    doses, files = len(files), files + ([report] if report is not None else [])
    for destination in section["destinations"]:
        path = record_path(layout, case_id, destination["name"])
        record = _read_record(path, destination)
        problem = send_to(destination, files, record, path, section)
        key = f"{ALERT_PREFIX}{destination['name']}"
        if problem is None:
            record.update(failed_runs=0, last_error=None)
            alerts.clear(ledger, key)
            print(
                f"case {case_id}: {destination['name']} confirmed all {doses} RT Doses"
                + (" and the QA report" if report is not None else "")
            )
        else:
            done = False
            record.update(failed_runs=record["failed_runs"] + 1, last_error=problem, last_attempt=time.time())
            print(f"case {case_id}: {destination['name']}: {problem} (run {record['failed_runs']})", file=sys.stderr)
            if record["failed_runs"] >= section["alert_after_failures"]:
                alert = alerts.dicom_send_failed(case_id, destination["name"], problem, record["failed_runs"])
                alerts.notify_once(alert, ledger, key, config["alerts"])
        write_json_atomic(path, record, durable=True)
    return done


def send_pending(config: dict[str, Any], workdir: Path) -> int:
    """Work through the outbox once; returns the number of cases still waiting."""
    with only_one(workdir / LOCK) as alone:
        if not alone:
            print("another sender is running; it takes the outbox", file=sys.stderr)
            return len(outbox.pending(workdir))
        for case_id in outbox.pending(workdir):
            try:
                if send_case(case_id, config, workdir):
                    outbox.remove(workdir, case_id)
            except ValueError as exc:
                print(f"case {case_id}: {exc}", file=sys.stderr)
        return len(outbox.pending(workdir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.dicomnet.sender", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--configfile", default=None, help="the site's config (default: config/config.yaml)")
    parser.add_argument("--config-json", default=None, help="the whole configuration as JSON (the run recorder's)")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="the project folder (default: here)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--case", nargs="+", default=[], help="send these finished cases now")
    which.add_argument("--pending", action="store_true", help="the cases of the outbox (what runs start)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    try:
        if args.config_json:
            config = settings.validate(json.loads(args.config_json))
        else:
            config = settings.load_site(args.configfile, workdir)
    except (OSError, ValueError) as exc:
        print(f"mqi send: {exc}", file=sys.stderr)
        return 2
    if not config["dicom_network"]["sender"]["destinations"]:
        print("mqi send: no destination configured (dicom_network.sender.destinations): nothing is sent")
        return 0
    if args.pending:
        return 1 if send_pending(config, workdir) else 0
    status = 0
    for case_id in args.case:
        try:
            if send_case(case_id, config, workdir):
                outbox.remove(workdir, case_id)
            else:
                outbox.add(workdir, case_id)  # the next runs try again
                status = 1
        except ValueError as exc:
            print(f"case {case_id}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
