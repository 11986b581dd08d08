"""Alerts against a real SMTP server (aiosmtpd) and a real HTTP server, both on 127.0.0.1 with
ephemeral ports: what arrives, once per key, retried when no channel delivered, the run-level
incident (failed once, recovered once) through the CLI and through bin/mqi-run itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mqi_communicator import settings
from mqi_communicator.ops import alerts
from tests.alert_servers import EphemeralController, Inbox, alerts_section, closed_port

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "mqi_communicator.ops.alerts"]


def config(smtp_port: int, hook_port: int, token_file: Path | None = None) -> dict[str, Any]:
    return settings.validate({"alerts": alerts_section(smtp_port, hook_port, token_file)})["alerts"]


def subjects(inbox: Inbox) -> list[str]:
    return [message["Subject"] for _, message in inbox.messages]


def test_an_alert_arrives_by_email_and_webhook(smtp, webhook, tmp_path):
    inbox, smtp_port = smtp
    token = tmp_path / "token"
    token.write_text("Bearer abc123\n")
    alert = alerts.case_failed("C42", "simulate", "engine exited with status 3", Path("logs/C42/simulate_B1.log"))

    assert alerts.send(alert, config(smtp_port, webhook.server_port, token)) == []

    [(recipients, message)] = inbox.messages
    assert recipients == ["physics@example.org", "oncall@example.org"]
    assert message["Subject"] == "[mqi_communicator] Test site: case C42 failed at simulate"
    assert message["From"] == "mqi@example.org"
    body = message.get_content().replace("\r\n", "\n")
    for text in ("Step: simulate", "Reason: engine exited with status 3", "Log: logs/C42/simulate_B1.log"):
        assert text in body
    assert "`bin/mqi retry C42`" in body
    [(headers, payload)] = webhook.posts
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Site"] == "test" and headers["Authorization"] == "Bearer abc123"
    assert set(payload) == {"kind", "subject", "body", "case_id", "details", "time", "host"}
    assert payload["kind"] == "case_failed" and payload["case_id"] == "C42"
    assert payload["subject"] == message["Subject"] and payload["body"] == body
    assert payload["details"]["step"] == "simulate" and payload["details"]["log"] == "logs/C42/simulate_B1.log"
    assert payload["host"] == socket.gethostname()


def test_same_key_is_sent_once_and_a_new_key_again(smtp, webhook, tmp_path):
    inbox, smtp_port = smtp
    cfg = config(smtp_port, webhook.server_port)
    ledger = tmp_path / "case" / "state" / "alerts.json"
    alert = alerts.case_failed("C1", "intake", "no RT Plan in the case folder", "logs/C1/intake.log")
    key = f"failed:intake:{alerts.fingerprint('no RT Plan in the case folder')}"

    assert alerts.notify_once(alert, ledger, key, cfg) is True
    assert alerts.notify_once(alert, ledger, key, cfg) is False
    assert len(inbox.messages) == 1 and len(webhook.posts) == 1
    recorded = json.loads(ledger.read_text())["sent"][key]
    assert recorded["channels"] == ["email", "webhook"] and recorded["kind"] == "case_failed"

    changed = alerts.case_changed("C1", ["RTPLAN.dcm"])
    assert alerts.notify_once(changed, ledger, "changed:1", cfg) is True
    assert subjects(inbox)[-1] == "[mqi_communicator] Test site: case C1 changed after it finished"
    assert len(webhook.posts) == 2

    # The case completes later: one "recovered" closes its failure keys, a second finds none open.
    assert alerts.resolve(alerts.case_recovered("C1"), ledger, "failed:", cfg) is True
    assert alerts.resolve(alerts.case_recovered("C1"), ledger, "failed:", cfg) is False
    assert subjects(inbox)[-1] == "[mqi_communicator] Test site: case C1 recovered"
    assert alerts.open_keys(ledger) == ["changed:1"]


def test_a_channel_down_is_reported_and_retried(smtp, webhook, tmp_path):
    inbox, smtp_port = smtp
    ledger = tmp_path / "alerts.json"
    alert = alerts.run_failed("Snakemake exited with status 1")
    down = closed_port()

    errors = alerts.send(alert, config(down, webhook.server_port))
    assert len(errors) == 1 and errors[0].startswith(f"email via 127.0.0.1:{down}: ConnectionRefusedError")
    assert len(webhook.posts) == 1

    # No channel delivers: nothing is recorded, so the next call (servers back) sends it.
    webhook.status = 500
    assert alerts.notify_once(alert, ledger, "run_failed:x", config(down, webhook.server_port)) is False
    assert not ledger.exists()
    webhook.status = 204
    assert alerts.notify_once(alert, ledger, "run_failed:x", config(smtp_port, webhook.server_port)) is True
    assert len(inbox.messages) == 1 and alerts.open_keys(ledger) == ["run_failed:x"]


def test_no_channel_configured_sends_nothing(tmp_path):
    cfg = settings.validate({})["alerts"]
    assert alerts.channels(cfg) == []
    assert alerts.notify_once(alerts.run_recovered(), tmp_path / "l.json", "k", cfg) is False


def test_login_reads_the_password_file(webhook, tmp_path):
    from aiosmtpd.smtp import AuthResult, LoginPassword

    def authenticate(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"mqi", b"s3cret")
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself

    inbox = Inbox()
    controller = EphemeralController(
        inbox, hostname="127.0.0.1", port=0, authenticator=authenticate, auth_require_tls=False
    )
    controller.start()
    try:
        (tmp_path / "pw").write_text("s3cret\n")
        (tmp_path / "bad").write_text("guess\n")
        cfg = config(controller.port, webhook.server_port)
        cfg["webhook"]["url"] = ""
        cfg["email"].update(username="mqi", password_file=str(tmp_path / "bad"))
        [error] = alerts.send(alerts.run_recovered(), cfg)
        assert "SMTPAuthenticationError" in error
        cfg["email"]["password_file"] = str(tmp_path / "pw")
        assert alerts.send(alerts.run_recovered(), cfg) == []
        assert len(inbox.messages) == 1
    finally:
        controller.stop()


def write_workdir(tmp_path: Path, smtp_port: int, hook_port: int, **extra: Any) -> Path:
    workdir = tmp_path / "wf"
    (workdir / "config").mkdir(parents=True)
    (workdir / "config" / "config.yaml").write_text(
        yaml.safe_dump({"alerts": alerts_section(smtp_port, hook_port), **extra})
    )
    return workdir


def cli(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [*CLI, "--workdir", str(workdir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_cli_help():
    run = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m mqi_communicator.ops.alerts")


def test_cli_test_names_the_failing_channel(smtp, webhook, tmp_path):
    inbox, smtp_port = smtp
    ok = cli(write_workdir(tmp_path / "a", smtp_port, webhook.server_port), "test")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split("\n")[:2] == ["sent by email", "sent by webhook"]
    assert subjects(inbox) == ["[mqi_communicator] Test site: test alert"] and len(webhook.posts) == 1

    down = closed_port()
    failed = cli(write_workdir(tmp_path / "b", smtp_port, down), "test")
    assert failed.returncode == 1
    assert f"FAILED webhook via http://127.0.0.1:{down}/hook" in failed.stderr
    none = cli(write_workdir(tmp_path / "c", smtp_port, 1, alerts={}), "test")
    assert none.returncode == 1 and "no alert channel: set alerts.email.to or alerts.webhook.url" in none.stderr


def test_run_failure_once_then_recovered_once(smtp, webhook, tmp_path):
    inbox, smtp_port = smtp
    workdir = write_workdir(tmp_path, smtp_port, webhook.server_port)
    # As bin/mqi-run calls it: a reason and the run's Snakemake log; the same error in the next
    # run's log (other job id, times) is the same failure.
    logs = workdir / ".snakemake" / "log"
    logs.mkdir(parents=True)
    for n, jobid in ((1, 12), (2, 37)):
        (logs / f"2026-11-30T12{n}000.0{n}.snakemake.log").write_text(
            f"[Mon Nov 30 12:{n}0:00 2026]\nError in rule simulate:\n    jobid: {jobid}\n"
            "    log: logs/C7/simulate_B1.log (check log file(s) for error details)\n"
            f"Complete log: .snakemake/log/2026-11-30T12{n}000.0{n}.snakemake.log\n"
        )
    reason = ["--reason", "Snakemake exited with status 1"]
    first = cli(workdir, "run-failed", *reason, "--log", str(sorted(logs.iterdir())[0]))
    second = cli(workdir, "run-failed", *reason, "--log", str(sorted(logs.iterdir())[1]))
    assert (first.returncode, first.stdout) == (0, "run failure alert sent\n"), first.stderr
    assert second.stdout == "run failure already reported\n"
    assert subjects(inbox) == ["[mqi_communicator] Test site: a pipeline run failed"]
    body = inbox.messages[0][1].get_content()
    assert "Error in rule simulate:" in body and "logs/C7/simulate_B1.log" in body
    assert "Complete log" not in body

    assert cli(workdir, "run-ok").stdout == "run recovered alert sent\n"
    assert cli(workdir, "run-ok").stdout == "no open run failure\n"
    assert subjects(inbox)[1:] == ["[mqi_communicator] Test site: pipeline runs work again"]
    assert [post["kind"] for _, post in webhook.posts] == ["run_failed", "run_recovered"]

    # A new failure after the recovery is a new incident.
    assert cli(workdir, "run-failed", *reason, "--log", str(sorted(logs.iterdir())[0])).returncode == 0
    assert len(inbox.messages) == 3


def test_an_invalid_config_still_reports_itself(smtp, webhook, tmp_path):
    inbox, smtp_port = smtp
    workdir = write_workdir(tmp_path, smtp_port, webhook.server_port, application={"max_workers": -1})
    for _ in range(2):
        run = cli(workdir, "run-failed", "--reason", "Snakemake exited with status 1")
    assert run.stdout == "run failure already reported\n"
    [(_, message)] = inbox.messages
    assert "The configuration is invalid" in message.get_content() and "max_workers" in message.get_content()


def test_a_failed_systemd_unit_is_reported(smtp, webhook, tmp_path):
    inbox, smtp_port = smtp
    run = cli(
        write_workdir(tmp_path, smtp_port, webhook.server_port), "run-failed", "--unit", "mqi-communicator.service"
    )
    assert run.returncode == 0, run.stderr
    assert "Reason: systemd unit mqi-communicator.service failed" in inbox.messages[0][1].get_content()


def test_onfailure_is_quiet_when_the_runner_reported_its_run(smtp, webhook, tmp_path):
    """The OnFailure= unit after a failed run: nothing if bin/mqi-run reported that run (a report
    after the unit started), the journal's tail if the runner died without reporting. There is no
    systemd here: two scripts on PATH answer as systemctl (the unit's start time) and journalctl."""
    inbox, smtp_port = smtp
    workdir = write_workdir(tmp_path, smtp_port, webhook.server_port)
    fake = tmp_path / "fake-systemd"
    fake.mkdir()
    (fake / "journalctl").write_text("#!/bin/sh\necho 'mqi-run: Killed (signal 9)'\n")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}

    def unit_started(at: float) -> None:
        (fake / "systemctl").write_text(f"#!/bin/sh\necho @{int(at)}\n")
        for tool in fake.iterdir():
            tool.chmod(0o755)

    unit_started(time.time() - 1)
    assert cli(workdir, "run-failed", "--reason", "Snakemake exited with status 1").returncode == 0
    quiet = cli(workdir, "run-failed", "--unit", "mqi-communicator.service", env=env)
    assert "already reported" in quiet.stdout and len(inbox.messages) == 1

    time.sleep(1.1)
    unit_started(time.time())  # a later run that reported nothing before it died
    crashed = cli(workdir, "run-failed", "--unit", "mqi-communicator.service", env=env)
    assert crashed.stdout == "run failure alert sent\n", crashed.stderr
    body = inbox.messages[1][1].get_content()
    assert "systemd unit mqi-communicator.service failed" in body and "Killed (signal 9)" in body


LOCAL_PROFILE = "executor: local\ncores: 1\nlatency-wait: 1\n"


def test_bin_mqi_run_alerts_once_and_recovers(smtp, webhook, tmp_path):
    """The real runner with a local profile (no SLURM): a failing workflow alerts once over two
    runs, the fixed one sends "recovered"; a dry run sends nothing."""
    inbox, smtp_port = smtp
    workdir = write_workdir(tmp_path, smtp_port, webhook.server_port)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.yaml").write_text(LOCAL_PROFILE)
    env = {**os.environ, "MQI_WORKDIR": str(workdir), "MQI_PROFILE": str(tmp_path / "local")}
    failing = 'rule all:\n    output: "out.txt"\n    shell: "echo broken input >&2; exit 3"\n'
    (workdir / "Snakefile").write_text(failing)

    def mqi_run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(REPO / "bin" / "mqi-run"), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)

    assert [mqi_run().returncode, mqi_run().returncode] == [1, 1]
    assert subjects(inbox) == ["[mqi_communicator] Test site: a pipeline run failed"]
    assert "Error in rule all:" in inbox.messages[0][1].get_content()
    (workdir / "Snakefile").write_text(failing.replace("echo broken input >&2; exit 3", "touch {output}"))
    assert mqi_run("--dry-run").returncode == 0
    assert len(inbox.messages) == 1
    assert mqi_run().returncode == 0
    assert subjects(inbox)[1:] == ["[mqi_communicator] Test site: pipeline runs work again"]
    assert len(webhook.posts) == 2
