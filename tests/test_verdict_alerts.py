"""Alerts on QA verdicts, by the command line and the run recorder's hook, to a real SMTP server and
a real webhook (tests/alert_servers.py): each new non-PASS verdict once, with its beams, reasons,
labels and QA sheet; the same verdict never again, a changed one again; one no channel took is
tried again. The qa.json files come from the real QA (qa.run.assess) on cases of tests/casegen.py
against TPS doses of the independent tests/qa_gen.py."""

from __future__ import annotations

import json
import subprocess
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from mqi_communicator import settings
from mqi_communicator.ops import state, verdict_alerts
from tests.alert_servers import Inbox, alerts_section
from tests.test_qa_verdict import assess, delivered_doses, make_case
from tests.workflow import REPO, write_config

CASE = "qa_case"


@pytest.fixture
def site(tmp_path: Path, smtp: tuple[Inbox, int], webhook: ThreadingHTTPServer) -> tuple[Path, Path]:
    """A working folder whose config sends alerts to the test servers, and the case's processing folder."""
    case = make_case(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, case.parent, alerts=alerts_section(smtp[1], webhook.server_port))
    return work, work / "data" / "cases" / CASE / "intermediate"


def write_qa(
    tmp_path: Path, processing: Path, config: dict, labels: list[str] | None = None, **perturb: object
) -> dict:
    """The real QA of the case against deliveries perturbed by `perturb`, as qa.json."""
    case = tmp_path / "scan" / CASE
    result = assess(case, delivered_doses(case, tmp_path / "out", **perturb), config)
    if labels is not None:
        result["labels"] = labels
    (processing / "qa").mkdir(parents=True, exist_ok=True)
    (processing / "qa" / "qa.json").write_text(json.dumps(result))
    return result


def alert_cli(work: Path, *cases: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mqi_communicator.ops.verdict_alerts", "--configfile", "test-config.yaml"]
    return subprocess.run([*command, *cases], cwd=work, capture_output=True, text=True, check=False, timeout=120)


def test_each_new_non_pass_verdict_is_sent_once(
    tmp_path: Path, site: tuple[Path, Path], smtp: tuple[Inbox, int], webhook: ThreadingHTTPServer, config: dict
) -> None:
    inbox, _ = smtp
    work, processing = site
    # All MU 10 % high, absolute doses: the mean dose difference fails both beams.
    qa = write_qa(tmp_path, processing, config, labels=["FLAGGED"], mu_scale=1.1)
    assert qa["verdict"] == "FAIL"
    first = alert_cli(work, CASE)
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"case {CASE}: QA FAIL [FLAGGED] alert sent\n"
    [(recipients, message)] = inbox.messages
    assert recipients == ["physics@example.org", "oncall@example.org"]
    assert message["Subject"] == f"[mqi_communicator] Test site: case {CASE} QA FAIL [FLAGGED]"
    body = message.get_content()
    for beam in qa["beams"]:
        assert f"beam {beam['number']} {beam['name']}: FAIL" in body
        for reason in beam["dose"]["reasons"]:
            assert reason in body
    assert "mean dose difference +9." in body
    assert "Labels: FLAGGED" in body and str(processing / "qa" / "qa_sheet.html") in body
    [(_, post)] = webhook.posts  # type: ignore[attr-defined]
    assert (post["kind"], post["case_id"], post["details"]["verdict"]) == ("case_verdict", CASE, "FAIL")

    # Again, and after the QA ran again with the same result (a new qa.json, new write time): nothing.
    assert alert_cli(work, CASE).stdout == f"case {CASE}: QA FAIL [FLAGGED] already sent\n"
    write_qa(tmp_path, processing, config, labels=["FLAGGED"], mu_scale=1.1)
    assert alert_cli(work, CASE).stdout == f"case {CASE}: QA FAIL [FLAGGED] already sent\n"
    assert len(inbox.messages) == 1 and len(webhook.posts) == 1  # type: ignore[attr-defined]

    # A changed verdict (2.5 % high: REVIEW) is sent again; the FAIL key gives way to it.
    assert write_qa(tmp_path, processing, config, mu_scale=1.025)["verdict"] == "REVIEW"
    assert alert_cli(work, CASE).stdout == f"case {CASE}: QA REVIEW alert sent\n"
    assert inbox.messages[-1][1]["Subject"] == f"[mqi_communicator] Test site: case {CASE} QA REVIEW"
    ledger = json.loads((processing / state.ALERTS).read_text())["sent"]
    assert [key.split(":")[1] for key in ledger] == ["REVIEW"]
    # A PASS sends nothing and closes the open verdict; a FAIL after it is new again.
    assert write_qa(tmp_path, processing, config)["verdict"] == "PASS"
    assert alert_cli(work, CASE).stdout == f"case {CASE}: QA PASS, nothing to send\n"
    assert json.loads((processing / state.ALERTS).read_text())["sent"] == {}
    write_qa(tmp_path, processing, config, mu_scale=1.1)
    assert alert_cli(work, CASE).stdout == f"case {CASE}: QA FAIL alert sent\n"
    assert len(inbox.messages) == 3 and len(webhook.posts) == 3  # type: ignore[attr-defined]


def test_no_tps_dose_is_not_assessed_and_alerted(tmp_path: Path, smtp: tuple[Inbox, int], config: dict) -> None:
    inbox, smtp_port = smtp
    case = make_case(tmp_path, tps=False)
    processing = tmp_path / "processing"
    (processing / "qa").mkdir(parents=True)
    qa = assess(case, delivered_doses(case, tmp_path / "out"), config)
    (processing / "qa" / "qa.json").write_text(json.dumps(qa))
    cfg = settings.validate({"alerts": alerts_section(smtp_port, 9)})["alerts"]
    cfg["webhook"]["url"] = ""
    assert verdict_alerts.alert_verdict(CASE, processing, cfg) is True
    assert inbox.messages[0][1]["Subject"] == f"[mqi_communicator] Test site: case {CASE} QA NOT ASSESSED"
    assert "no TPS" in inbox.messages[0][1].get_content()


def test_a_verdict_no_channel_took_is_tried_by_the_next_run(
    tmp_path: Path, site: tuple[Path, Path], smtp: tuple[Inbox, int], webhook: ThreadingHTTPServer, config: dict
) -> None:
    inbox, _ = smtp
    work, processing = site
    write_qa(tmp_path, processing, config, mu_scale=1.1)
    site_config = settings.load(str(work / "test-config.yaml"))
    layout = state.Layout.from_config(site_config, work)
    cfg = site_config["alerts"]
    cfg["email"]["to"] = []
    webhook.status = 500  # type: ignore[attr-defined]
    # The recorder's hook when the case finishes: not delivered, so remembered.
    assert verdict_alerts.on_case_finished(CASE, layout, work, cfg) is False
    assert json.loads(verdict_alerts.pending_path(work).read_text()) == {"cases": [CASE]}
    assert verdict_alerts.retry_pending(layout, work, cfg) == []
    webhook.status = 204  # type: ignore[attr-defined]
    # A later run: sent once, then forgotten.
    assert verdict_alerts.retry_pending(layout, work, cfg) == [CASE]
    assert verdict_alerts.retry_pending(layout, work, cfg) == []
    assert json.loads(verdict_alerts.pending_path(work).read_text()) == {"cases": []}
    assert [body["kind"] for _, body in webhook.posts] == ["case_verdict"] * 3  # type: ignore[attr-defined]
    assert inbox.messages == []


def test_an_unreadable_qa_result_is_named(tmp_path: Path, site: tuple[Path, Path]) -> None:
    work, processing = site
    (processing / "qa").mkdir(parents=True)
    (processing / "qa" / "qa.json").write_text('{"verdict": "FAIL"')
    run = alert_cli(work, CASE)
    assert run.returncode == 1
    assert f"{processing / 'qa' / 'qa.json'}: unreadable QA result" in run.stderr


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.ops.verdict_alerts", "--help"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0 and "usage" in out.stdout
