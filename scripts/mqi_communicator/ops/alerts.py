"""Alerts: one e-mail and/or JSON webhook message per new failure, and one when it is over.

A ledger (a small JSON file: per case `<processing dir>/state/alerts.json`, per workdir
`.mqi/alerts.json` for run failures) records the key of every alert delivered and still open, so
the same failure seen by every timer run is reported once; `resolve` sends the "recovered"
message once and closes those keys. A key is recorded only after a channel delivered it, so an
alert no channel took is tried again by the next run. Sending uses the standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import yaml

from mqi_communicator import settings
from mqi_communicator.files import write_json_atomic

PROG = "python -m mqi_communicator.ops.alerts"
KINDS = (
    "case_failed",
    "case_recovered",
    "case_verdict",
    "fraction_delivery",
    "case_changed",
    "dicom_send_failed",
    "run_failed",
    "run_recovered",
    "disk_low",
    "disk_recovered",
    "test",
)
RUN_PREFIX = "run_failed:"
REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Alert:
    kind: str
    subject: str  # the human part; delivered as "[mqi_communicator] <site>: <subject>"
    body: str
    case_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown alert kind {self.kind!r}; one of {', '.join(KINDS)}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _alert(kind: str, subject: str, what: str, todo: str, case_id: str | None = None, **details: Any) -> Alert:
    """Body: what happened, the facts (reason, log, time, host...), what to do."""
    details = {**{k: str(v) if isinstance(v, Path) else v for k, v in details.items()}, "time": _now()}
    details["host"] = socket.gethostname()
    facts = [f"{k.capitalize()}: {v}".replace("\n", "\n    ") for k, v in details.items() if v not in (None, "")]
    return Alert(kind, subject, "\n".join([what, "", *facts, "", f"What to do: {todo}", ""]), case_id, details)


def case_failed(case_id: str, step: str, reason: str, log: str | Path | None, *, software: bool = False) -> Alert:
    """`software`: a bug in mqi_communicator, not the case's fault (docs/failures.md)."""
    what = (
        f"Case {case_id} failed at step {step}. It is not retried until a file of the case changes or a retry is asked."
    )
    todo = f"read the log; fix the case folder (or the cause, e.g. the cluster), then run `bin/mqi retry {case_id}`."
    if software:
        what = f"Case {case_id} met a software fault (a bug, not the case's fault) at step {step}; the log has the traceback."
        todo = f"report the traceback; after the fix the next runs retry it (or run `bin/mqi retry {case_id}`)."
    return _alert(
        "case_failed", f"case {case_id} failed at {step}", what, todo, case_id, step=step, reason=reason, log=log
    )


def case_recovered(case_id: str, verdict: str | None = None, sheet: str | Path | None = None) -> Alert:
    """`verdict`: the QA verdict it finished with, as shown (`FAIL [PLAN-BASED]`); a case that
    completes is not necessarily fine, so only a PASS (or no QA at all) leaves nothing to do."""
    what = f"Case {case_id} completed after the failure reported earlier" + (
        f", with QA verdict {verdict}." if verdict else "."
    )
    todo = (
        "nothing."
        if not verdict or verdict.split()[0] == "PASS"
        else f"read the QA sheet ({sheet}): it finished with QA {verdict} (its own alert names the beams and reasons)."
    )
    subject = f"case {case_id} recovered" + (f", QA {verdict}" if verdict else "")
    return _alert("case_recovered", subject, what, todo, case_id, verdict=verdict, sheet=sheet)


def case_changed(case_id: str, changed_files: list[str]) -> Alert:
    what = f"Files of case {case_id} changed after it finished; its results were NOT recomputed."
    todo = f"if the change is intended, run `bin/mqi reprocess {case_id}` (the previous results are kept)."
    more = [f"... and {len(changed_files) - 20} more"] if len(changed_files) > 20 else []
    changed = ", ".join([*changed_files[:20], *more])
    return _alert("case_changed", f"case {case_id} changed after it finished", what, todo, case_id, changed=changed)


def dicom_send_failed(case_id: str, destination: str, reason: str, runs: int) -> Alert:
    what = f"Case {case_id}'s RT Doses were not accepted by DICOM destination {destination} on {runs} sending runs in a row."
    todo = (
        f"check the destination (`bin/mqi echo HOST PORT AET`) and what it logged; later runs keep trying "
        f"(docs/dicom-network.md); `bin/mqi send --case {case_id}` tries now."
    )
    subject = f"case {case_id}: DICOM destination {destination} keeps refusing"
    return _alert("dicom_send_failed", subject, what, todo, case_id, destination=destination, reason=reason, runs=runs)


def run_failed(reason: str, log: str | Path | None = None) -> Alert:
    what = "A run of the pipeline failed. Runs go on; you get one message per new failure and one when runs work again."
    todo = "read the reason and the log; check the configuration with `bin/mqi-run --dry-run`, cases with `bin/mqi status`."
    return _alert("run_failed", "a pipeline run failed", what, todo, reason=reason, log=log)


def run_recovered() -> Alert:
    what = "A pipeline run succeeded after the failure reported earlier."
    return _alert("run_recovered", "pipeline runs work again", what, "nothing.")


def disk_low(reason: str) -> Alert:
    what = "Free disk space is below the configured floor: no new case starts until space is freed."
    todo = "free space on the filesystem named (or lower disk_guard.min_free_gb); held-back cases start by themselves."
    return _alert("disk_low", "disk space low, new cases held back", what, todo, reason=reason)


def disk_recovered() -> Alert:
    what = "Free disk space is above the floor again: held-back cases start with the next run."
    return _alert("disk_recovered", "disk space sufficient again", what, "nothing.")


def fingerprint(text: str) -> str:
    """A short digest of a reason with numbers, dates and hashes ignored, so a failure that
    recurs with a new job id, pid or time keeps the same key."""
    return hashlib.sha256(re.sub(r"[0-9a-f]*[0-9][0-9a-f]*", "#", text.lower()).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ sending ---


def channels(config: dict[str, Any]) -> list[str]:
    """The channels the alerts section enables."""
    return [name for name, on in (("email", config["email"]["to"]), ("webhook", config["webhook"]["url"])) if on]


def subject_line(alert: Alert, config: dict[str, Any]) -> str:
    return f"[mqi_communicator] {config['site_name'] or socket.gethostname()}: {alert.subject}"


def _first_line(path: str) -> str:
    if not path:
        raise ValueError("a login needs the file holding the secret (alerts.email.password_file)")
    text = Path(path).expanduser().read_text().splitlines()
    if not text or not text[0].strip():
        raise ValueError(f"{path} is empty")
    return text[0].strip()


def _send_email(alert: Alert, config: dict[str, Any]) -> None:
    cfg = config["email"]
    msg = EmailMessage()
    msg["Subject"] = subject_line(alert, config)
    msg["From"] = cfg["from"] or f"mqi_communicator@{socket.gethostname()}"
    msg["To"] = ", ".join(cfg["to"])
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("mqi")
    msg.set_content(alert.body)
    with smtplib.SMTP(cfg["smtp_host"], cfg["smtp_port"], timeout=cfg["timeout_seconds"]) as smtp:
        if cfg["starttls"]:
            smtp.starttls(context=ssl.create_default_context())
        if cfg["username"]:
            smtp.login(cfg["username"], _first_line(cfg["password_file"]))
        smtp.send_message(msg)


def _send_webhook(alert: Alert, config: dict[str, Any]) -> None:
    cfg = config["webhook"]
    payload = {
        "kind": alert.kind,
        "subject": subject_line(alert, config),
        "body": alert.body,
        "case_id": alert.case_id,
        "details": alert.details,
        "time": alert.details.get("time", _now()),
        "host": alert.details.get("host", socket.gethostname()),
    }
    headers = {"Content-Type": "application/json", "User-Agent": "mqi_communicator-alerts", **cfg["headers"]}
    if cfg["authorization_file"]:
        headers["Authorization"] = _first_line(cfg["authorization_file"])
    request = urllib.request.Request(cfg["url"], json.dumps(payload).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=cfg["timeout_seconds"]) as response:  # HTTP >= 400 raises
        response.read()


def deliver(alert: Alert, config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Send through every enabled channel: (channels that delivered, errors). Never raises."""
    delivered, errors = [], []
    where = {"email": "{smtp_host}:{smtp_port}".format(**config["email"]), "webhook": config["webhook"]["url"]}
    for name in channels(config):
        try:
            (_send_email if name == "email" else _send_webhook)(alert, config)
            delivered.append(name)
        except Exception as exc:  # any failure of one channel is reported, never raised
            errors.append(f"{name} via {where[name]}: {type(exc).__name__}: {exc}")
    return delivered, errors


def _deliver_logged(alert: Alert, config: dict[str, Any]) -> list[str]:
    delivered, errors = deliver(alert, config)
    for error in errors:
        print(f"alert '{alert.subject}' not delivered: {error}", file=sys.stderr)
    return delivered


def send(alert: Alert, config: dict[str, Any]) -> list[str]:
    """Send `alert` with the `alerts` config section; returns the delivery errors (empty = sent)."""
    return deliver(alert, config)[1]


# ------------------------------------------------------------------------------- ledger ---


def _read(ledger: Path) -> dict[str, Any]:
    try:
        data = json.loads(ledger.read_text())
    except FileNotFoundError:
        return {"sent": {}}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{ledger}: unreadable alert ledger ({exc}); move it aside to reset it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("sent"), dict):
        raise ValueError(f"{ledger}: not an alert ledger (no 'sent' mapping); move it aside to reset it")
    return data


def open_keys(ledger: Path, prefix: str = "") -> list[str]:
    """Keys recorded in the ledger (delivered and not resolved) that start with `prefix`."""
    return sorted(key for key in _read(ledger)["sent"] if key.startswith(prefix))


def notify_once(alert: Alert, ledger: Path, key: str, config: dict[str, Any]) -> bool:
    """Send `alert` unless `key` is recorded; record it once a channel delivered. True if sent now.
    Delivery errors go to stderr (the caller's log)."""
    data = _read(ledger)
    if key in data["sent"]:
        return False
    delivered = _deliver_logged(alert, config)
    if delivered:
        data["sent"][key] = {"kind": alert.kind, "subject": alert.subject, "time": _now(), "channels": delivered}
        write_json_atomic(ledger, data)
    return bool(delivered)


def clear(ledger: Path, prefix: str) -> list[str]:
    """Forget the open keys starting with `prefix` without sending anything; returns them."""
    data = _read(ledger)
    keys = [key for key in data["sent"] if key.startswith(prefix)]
    if keys:
        data["sent"] = {k: v for k, v in data["sent"].items() if k not in keys}
        write_json_atomic(ledger, data)
    return keys


def resolve(alert: Alert, ledger: Path, prefix: str, config: dict[str, Any]) -> bool:
    """If keys starting with `prefix` are open, send `alert` (e.g. recovered) and, once delivered,
    close them; True if sent now. Nothing open: nothing sent."""
    if not open_keys(ledger, prefix):
        return False
    delivered = _deliver_logged(alert, config)
    if delivered:
        clear(ledger, prefix)
    return bool(delivered)


# ---------------------------------------------------------------------------------- CLI ---


def load_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """The `alerts` section of a config file, and the file's problem if it is invalid: a broken
    config must still be able to report itself, so the section is then validated alone."""
    try:
        return settings.load(str(path))["alerts"], None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        problem = f"{path}: {exc}"
    try:
        raw = yaml.safe_load(path.read_text())
        section = raw.get("alerts", {}) if isinstance(raw, dict) else {}
        return settings.validate({"alerts": section})["alerts"], problem
    except (OSError, ValueError, yaml.YAMLError):
        return settings.validate({"alerts": {}})["alerts"], problem


def _log_tail(log: Path, lines: int = 20) -> str:
    kept = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(line for line in kept[-lines:] if not line.startswith("Complete log:"))


def _systemd(unit: str, *command: str) -> str:
    """Output of systemctl/journalctl about `unit`, asked of the user manager, then the system's
    (or the reverse as root); empty when neither answers."""
    scopes: list[list[str]] = [[], ["--user"]] if os.geteuid() == 0 else [["--user"], []]
    for scope in scopes:
        try:
            out = subprocess.run([command[0], *scope, *command[1:], unit], capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.SubprocessError):
            return ""
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return ""


def _run_failed(args: argparse.Namespace, config: dict[str, Any], problem: str | None, ledger: Path) -> int:
    reason = args.reason or (f"systemd unit {args.unit} failed" if args.unit else "the run failed")
    if args.log and Path(args.log).is_file():
        reason += "\n" + _log_tail(Path(args.log))
    elif problem:
        reason += f"\nThe configuration is invalid: {problem}"
    elif args.unit and not args.reason:
        reason += "\n" + _systemd(args.unit, "journalctl", "-q", "-n", "15", "-o", "cat", "--no-pager", "-u")
    if not channels(config):
        print(f"no alert channel configured (alerts section of {args.configfile}): run failure not sent")
        return 0
    data = _read(ledger)
    if args.unit:
        started = re.fullmatch(
            r"@(\d+)",
            _systemd(args.unit, "systemctl", "show", "--timestamp=unix", "--value", "-p", "ExecMainStartTimestamp"),
        )
        if started and data.get("last_run_failure_reported", 0) >= int(started.group(1)):
            print(f"{args.unit}: this run's failure was already reported (bin/mqi-run)")
            return 0
    key = RUN_PREFIX + fingerprint(reason)
    known = key in data["sent"]
    sent = notify_once(run_failed(reason, args.log), ledger, key, config)
    if sent or known:
        data = _read(ledger)
        data["last_run_failure_reported"] = time.time()
        write_json_atomic(ledger, data)
    print("run failure alert sent" if sent else "run failure already reported" if known else "run failure NOT reported")
    return 0 if sent or known else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, help="default: WORKDIR/config/config.yaml, else the repo's")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="run ledger: WORKDIR/.mqi/alerts.json")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("test", help="Send a test alert through every configured channel; exit 1 naming what failed.")
    failed = sub.add_parser("run-failed", help="Report a failed run (once per distinct reason).")
    failed.add_argument("--reason", help="What failed (default: from --unit's journal).")
    failed.add_argument("--log", help="The run's log; its tail is quoted in the message.")
    failed.add_argument("--unit", help="The failed systemd unit (OnFailure=); quiet if bin/mqi-run reported it.")
    sub.add_parser("run-ok", help="A run succeeded: send 'recovered' once if a run failure was reported.")
    args = parser.parse_args(argv)

    if args.configfile is None:
        local = args.workdir / "config" / "config.yaml"
        args.configfile = local if local.is_file() else REPO / "config" / "config.yaml"
    config, problem = load_config(args.configfile)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    ledger = args.workdir / ".mqi" / "alerts.json"
    if args.command == "test":
        if not channels(config):
            print(f"no alert channel: set alerts.email.to or alerts.webhook.url in {args.configfile}", file=sys.stderr)
            return 1
        alert = _alert("test", "test alert", "A test of the alert channels (`alerts test`).", "nothing.")
        delivered, errors = deliver(alert, config)
        for error in errors:
            print(f"FAILED {error}", file=sys.stderr)
        for name in delivered:
            print(f"sent by {name}")
        return 1 if errors else 0
    if args.command == "run-failed":
        return _run_failed(args, config, problem, ledger)
    sent, still_open = resolve(run_recovered(), ledger, RUN_PREFIX, config), open_keys(ledger, RUN_PREFIX)
    print(
        "run recovered alert " + ("sent" if sent else "NOT delivered") if sent or still_open else "no open run failure"
    )
    return 1 if still_open else 0


if __name__ == "__main__":
    sys.exit(main())
