"""Run-log retention: Snakemake's run logs and the runner's own log stay bounded (docs/disk-guard.md).

Every run, even one with nothing to do, leaves a Snakemake log in `.snakemake/log/` (about
105,000 a year at a 5-minute timer), and cron appends bin/mqi-run's output to one file. After
each run bin/mqi-run calls `prune` here:

- a Snakemake run log is removed once older than `retention.run_logs_days`, or
  `retention.failed_run_logs_days` for a failed run's log; of the rest at most
  `retention.run_logs_keep` stay (beyond that the oldest successful runs' logs go first, then the
  oldest failed runs'). The newest log (this run's) always stays.
- a run is failed when bin/mqi-run saw Snakemake exit non-zero: it names that run's log here
  (`--failed-log`), and the names are kept in `.mqi/failed-run-logs.json`, an entry leaving with
  its file. No log is opened to find out, so pruning costs one directory listing and one unlink
  per removed file, whatever the history.
- the runner's log (the regular file bin/mqi-run's output is appended to, `--runner-log`) is
  rotated when over `retention.runner_log_max_mb`: `<log>.1` ... `<log>.N`, N =
  `retention.runner_log_keep`. The running process keeps appending to `<log>.1`, so nothing is
  lost; the next run starts a new file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqi_communicator import settings
from mqi_communicator.files import write_json_atomic
from mqi_communicator.ops import state

PROG = "python -m mqi_communicator.ops.retention_logs"
RUN_LOG_DIR = Path(".snakemake") / "log"
RUN_LOG_SUFFIX = ".snakemake.log"
FAILED_RECORD = Path(".mqi") / "failed-run-logs.json"
DAY = 86400.0


@dataclass(frozen=True)
class Policy:
    """The `retention` settings for run logs."""

    run_logs_days: float
    failed_run_logs_days: float
    run_logs_keep: int
    runner_log_max_mb: float
    runner_log_keep: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Policy:
        section = config["retention"]
        return cls(
            run_logs_days=float(section["run_logs_days"]),
            failed_run_logs_days=float(section["failed_run_logs_days"]),
            run_logs_keep=int(section["run_logs_keep"]),
            runner_log_max_mb=float(section["runner_log_max_mb"]),
            runner_log_keep=int(section["runner_log_keep"]),
        )


@dataclass(frozen=True)
class Pruned:
    kept: int
    removed: int
    kept_failed: int


def _run_logs(log_dir: Path) -> list[tuple[float, str]]:
    """(mtime, name) of every Snakemake run log, newest first: one directory listing (os.scandir
    gives the names without a shell glob, which past ~32,000 names exceeds ARG_MAX)."""
    found = []
    try:
        with os.scandir(log_dir) as entries:
            for entry in entries:
                if entry.name.endswith(RUN_LOG_SUFFIX) and entry.is_file(follow_symlinks=False):
                    found.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
    except FileNotFoundError:
        return []
    return sorted(found, reverse=True)


def failed_names(workdir: Path) -> set[str]:
    data = state.read_json(workdir / FAILED_RECORD) or {}
    names = data.get("logs", [])
    return {str(n) for n in names} if isinstance(names, list) else set()


def record_failed(workdir: Path, log: Path) -> None:
    """Remember that `log` is a failed run's log (kept `failed_run_logs_days`)."""
    names = failed_names(workdir) | {log.name}
    write_json_atomic(workdir / FAILED_RECORD, {"logs": sorted(names)})


def choose(logs: list[tuple[float, str]], failed: set[str], policy: Policy, now: float) -> set[str]:
    """Names to keep of `logs` ((mtime, name), newest first)."""
    within = [
        name
        for mtime, name in logs
        if now - mtime <= (policy.failed_run_logs_days if name in failed else policy.run_logs_days) * DAY
    ]
    if len(within) > policy.run_logs_keep:
        # Too many: the oldest successful runs' logs go first, then the oldest failed runs'.
        failed_within = [n for n in within if n in failed][: policy.run_logs_keep]
        room = policy.run_logs_keep - len(failed_within)
        ok_within = [n for n in within if n not in failed][:room]
        within = failed_within + ok_within
    keep = set(within)
    if logs:
        keep.add(logs[0][1])  # the newest: this run's own log
    return keep


def prune_run_logs(workdir: Path, policy: Policy, now: float | None = None) -> Pruned:
    log_dir = workdir / RUN_LOG_DIR
    logs = _run_logs(log_dir)
    failed = failed_names(workdir)
    keep = choose(logs, failed, policy, time.time() if now is None else now)
    removed = 0
    for _, name in logs:
        if name not in keep:
            try:
                (log_dir / name).unlink()
                removed += 1
            except FileNotFoundError:
                pass
    still_failed = failed & keep
    if still_failed != failed:
        write_json_atomic(workdir / FAILED_RECORD, {"logs": sorted(still_failed)})
    return Pruned(kept=len(keep), removed=removed, kept_failed=len(still_failed))


def rotate(log: Path, max_bytes: float, keep: int) -> bool:
    """Rotate `log` when bigger than max_bytes: log -> log.1 -> ... -> log.<keep> (the oldest
    dropped). True if rotated. Renames only: a process appending to `log` goes on in `log.1`."""
    try:
        if log.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    log.with_name(f"{log.name}.{keep}").unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        older = log.with_name(f"{log.name}.{n}")
        if older.exists():
            older.rename(log.with_name(f"{log.name}.{n + 1}"))
    log.rename(log.with_name(f"{log.name}.1"))
    return True


def prune(workdir: Path, policy: Policy, failed_log: Path | None = None, runner_log: Path | None = None) -> str:
    """After a run: record its log if it failed, prune the run logs, rotate the runner's log;
    a line for the runner's log."""
    if failed_log:
        record_failed(workdir, failed_log)
    pruned = prune_run_logs(workdir, policy)
    rotated = runner_log is not None and rotate(runner_log, policy.runner_log_max_mb * 1e6, policy.runner_log_keep)
    return f"run logs: {pruned.removed} removed, {pruned.kept} kept ({pruned.kept_failed} of failed runs)" + (
        f"; {runner_log} rotated" if rotated else ""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    settings.add_site_arguments(parser, beside_workdir=True)
    sub = parser.add_subparsers(dest="command", required=True)
    prune_command = sub.add_parser("prune", help="Prune Snakemake's run logs; rotate the runner's log.")
    prune_command.add_argument("--failed-log", type=Path, help="this run's Snakemake log, of a failed run")
    prune_command.add_argument("--runner-log", type=Path, help="the file the runner's output is appended to (rotated)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    try:
        policy = Policy.from_config(settings.load_site(settings.site_config(args.configfile, workdir), workdir))
        print(prune(workdir, policy, args.failed_log, args.runner_log))
    except (OSError, ValueError) as exc:
        print(f"run-log retention: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
