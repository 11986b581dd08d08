"""Every fraction checked, through real Snakemake runs and real SMTP and webhook servers: a case
whose beam was interrupted inside a layer and resumed completes; a second fraction with +5 % MU
arriving in the finished case gets a FAIL record and exactly one alert, is not reported as a
change, leaves the finished results untouched; a rerun sends nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

from mqi_communicator.intake.fraction_watch import needs_scan
from tests import casegen
from tests.alert_servers import Inbox, alerts_section
from tests.test_fractions import interrupted_case, settle
from tests.workflow import full_log, snakemake, tree_digest, write_config

FRACTION_KIND = "fraction_delivery"


def fraction_alerts(inbox: Inbox, webhook: ThreadingHTTPServer) -> tuple[list[str], list[dict]]:
    """The e-mail subjects and webhook posts of fraction alerts received so far."""
    subjects = [str(m["Subject"]) for _, m in inbox.messages if "fraction" in str(m["Subject"])]
    posts = [body for _, body in webhook.posts if body["kind"] == FRACTION_KIND]  # type: ignore[attr-defined]
    return subjects, posts


def test_later_fraction_in_a_finished_case_is_checked_and_alerted_once(
    tmp_path: Path, smtp: tuple[Inbox, int], webhook: ThreadingHTTPServer
) -> None:
    inbox, smtp_port = smtp
    scan = tmp_path / "scan"
    # Beam 2 interrupted inside layer 3 (after its 5th spot) and resumed at layer 3.
    case, spec = interrupted_case(scan, share=1.0)
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, scan, alerts=alerts_section(smtp_port, webhook.server_port))

    first = snakemake(work)
    assert first.returncode == 0, first.stderr[-3000:]
    processing = work / "data" / "cases" / "resumed" / "intermediate"
    assert (processing / "case_summary.json").is_file()  # completes: no wait, no failure
    one = json.loads((processing / "fractions" / "1.json").read_text())
    assert one["verdict"] == "PASS", one
    assert next(b for b in one["beams"] if b["number"] == 2)["resumed_layers"] == [3]
    assert fraction_alerts(inbox, webhook) == ([], [])
    finished = {name: tree_digest(work / "data" / "cases" / "resumed" / name) for name in ("dicom", "raw")}
    final_files = {
        name: (processing / name).read_bytes() for name in ("case_summary.json", "intake.json", "qa/qa.json")
    }

    # Fraction 2 arrives in the finished case: beam 2 with 5 % more MU on every spot.
    casegen.write_delivery(case, spec, 2, "2026110309000000", mu_scale=1.05)
    casegen.write_delivery(case, spec, 3, "2026110309050000")
    assert needs_scan(case, processing)
    dry = snakemake(work, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    planned = dry.stdout + dry.stderr
    assert "rule fraction_check:" in planned and "fractions/2.json" in planned
    for other in ("rule intake:", "rule interpret:", "rule simulate:", "rule qa_case:", "rule case_summary:"):
        assert other not in planned

    second = snakemake(work)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "case resumed: fraction 2 delivery check FAIL" in second.stderr
    assert "fraction checks not PASS: resumed 2 FAIL." in second.stderr.splitlines()[-1]
    two = json.loads((processing / "fractions" / "2.json").read_text())
    assert two["verdict"] == "FAIL" and two["fraction"] == 2
    assert two["deliveries"] == ["2026110309000000", "2026110309050000"]
    beam2 = next(b for b in two["beams"] if b["number"] == 2)
    reasons = " ".join(beam2["delivery"]["reasons"])
    assert beam2["verdict"] == "FAIL" and "MU" in reasons and "+5.0" in reasons, reasons
    subjects, posts = fraction_alerts(inbox, webhook)
    assert len(subjects) == 1 and "resumed fraction 2 delivery FAIL" in subjects[0]
    assert len(posts) == 1 and posts[0]["case_id"] == "resumed" and posts[0]["details"]["fraction"] == 2
    assert "beam 2 (1G180:TX): FAIL" in posts[0]["body"]
    body = next(m for _, m in inbox.messages if "fraction" in str(m["Subject"])).get_content()
    assert "fractions/2.json" in body
    # The finished result is final: no file of it was rewritten.
    assert {name: tree_digest(work / "data" / "cases" / "resumed" / name) for name in finished} == finished
    assert {name: (processing / name).read_bytes() for name in final_files} == final_files
    # A later fraction is not a change of the finished case's inputs.
    verify = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.ops.verify", "resumed", "--configfile", "test-config.yaml"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not (processing / "state" / "changed.json").exists()
    assert not any(p["kind"] == "case_changed" for _, p in webhook.posts)  # type: ignore[attr-defined]
    shown = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.ops.status", "--configfile", "test-config.yaml", "--json", "--all"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    entry = next(c for c in json.loads(shown.stdout)["cases"] if c["case_id"] == "resumed")
    assert entry["state"] == "finished" and entry["verdict"].endswith("; fractions 1-2: 2 FAIL"), entry

    # A rerun: nothing to do, nothing sent, no record rewritten.
    records = {p.name: p.read_bytes() for p in (processing / "fractions").glob("*.json")}
    again = snakemake(work)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "rule fraction_check" not in full_log(again)
    assert fraction_alerts(inbox, webhook) == (subjects, posts)
    assert {p.name: p.read_bytes() for p in (processing / "fractions").glob("*.json")} == records

    # Fraction 3 begins (beam 2 only): nothing to record yet; the run remembers the folder as seen,
    # so later DAG builds do not read the case again; beam 3's delivery makes it pending.
    casegen.write_delivery(case, spec, 2, "2026110409000000")
    assert needs_scan(case, processing)
    settle(case)
    partial = snakemake(work)
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert "rule fraction_check" not in full_log(partial)
    assert not needs_scan(case, processing)
    casegen.write_delivery(case, spec, 3, "2026110409050000")
    assert needs_scan(case, processing)
    dry = snakemake(work, "--dry-run")
    assert "fractions/3.json" in dry.stdout + dry.stderr
