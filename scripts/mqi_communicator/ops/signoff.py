"""`bin/mqi sign CASE --by NAME [--comment TEXT] [--reject]`: a physicist's review of a case's QA
result, appended to the case's sign-off record (docs/sign-off.md).

The record (`<processing>/signoff/signoff.jsonl`) is only ever appended to, under a lock (two people
signing at once both get their line). Each signature writes a new PDF version,
`qa_report_signed_<n>.pdf`, beside the record: the QA sheet and `qa_report.pdf` are workflow
outputs and are never rewritten (Snakemake would see changed outputs). A signature holds the sha256
of the `qa.json` it signs; when the results change (`bin/mqi reprocess`, which carries the record to
the new results) it shows as VOID.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.files import sha256_of
from mqi_communicator.formats import contracts
from mqi_communicator.ops import state
from mqi_communicator.qa import report_pdf, sheet, signoff_record

QA_JSON = "qa/qa.json"
QA_SHEET = "qa/qa_sheet.html"


def sign(
    processing: Path,
    signed_by: str,
    *,
    comment: str = "",
    reject: bool = False,
    comment_required_for_non_pass: bool = True,
    now: datetime.datetime | None = None,
) -> tuple[dict[str, Any], Path]:
    """Append a signature of the case's current results; returns (the entry, the signed PDF)."""
    qa_path = processing / QA_JSON
    try:
        qa = json.loads(qa_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{qa_path}: no QA result to sign (is the case finished? bin/mqi status)") from None
    except ValueError as exc:
        raise ValueError(f"{qa_path}: not a QA result ({exc})") from exc
    contracts.check("qa", qa, qa_path)
    signed_by, comment = signed_by.strip(), comment.strip()
    if not signed_by:
        raise ValueError("--by must name who signs")
    if comment_required_for_non_pass and qa["verdict"] != "PASS" and not comment:
        raise ValueError(
            f"case {qa.get('case_id')}: the verdict is {qa['verdict']}; signing a non-PASS needs --comment "
            "(signoff.comment_required_for_non_pass)"
        )
    digest = sha256_of(qa_path)
    folder = processing / signoff_record.FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / signoff_record.RECORD
    with open(record, "a") as handle:
        # One signer at a time: the number of the signature names its PDF.
        fcntl.flock(handle, fcntl.LOCK_EX)
        records = signoff_record.read_records(record)
        number = len(records) + 1
        pdf = folder / f"qa_report_signed_{number}.pdf"
        entry = {
            "signed_by": signed_by,
            "time": (now or datetime.datetime.now(datetime.UTC)).isoformat(timespec="seconds"),
            "decision": signoff_record.REJECT if reject else signoff_record.ACCEPT,
            "verdict": qa["verdict"],
            "labels": qa.get("labels", []),
            "comment": comment,
            "qa_json": str(qa_path),
            "qa_sha256": digest,
            "report": pdf.name,
        }
        try:
            figures = sheet.embedded_figures((processing / QA_SHEET).read_text())
        except FileNotFoundError:
            figures = {}
        report_pdf.write_pdf(pdf, qa, figures, signoff_record.block_lines([*records, entry], digest))
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return entry, pdf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.ops.signoff",
        description="Sign (accept or reject) a case's QA result; the record is append-only (`bin/mqi sign`).",
    )
    parser.add_argument("case", help="the case id")
    parser.add_argument("--by", required=True, help="who signs (name as it appears on the report)")
    parser.add_argument("--comment", default="", help="the reviewer's comment (needed for a non-PASS, see config)")
    parser.add_argument("--reject", action="store_true", help="reject the result instead of accepting it")
    settings.add_site_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = settings.load_site(args.configfile, args.workdir)
        layout = state.Layout.from_config(config, args.workdir.resolve())
        if not state.CASE_ID_PATTERN.match(args.case):
            raise ValueError(f"{args.case!r} is not a case id")
        entry, pdf = sign(
            layout.processing(args.case),
            args.by,
            comment=args.comment,
            reject=args.reject,
            comment_required_for_non_pass=bool(config["signoff"]["comment_required_for_non_pass"]),
        )
    except (OSError, ValueError) as exc:
        print(f"bin/mqi sign: {exc}", file=sys.stderr)
        return 1
    decision = "rejected" if args.reject else "signed"
    print(f"case {args.case}: {entry['verdict']} {decision} by {entry['signed_by']} at {entry['time']}; report {pdf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
