"""What bin/mqi-run does after every run, in one Python process (one start-up per timer run, not
one per task): the disk guard's alert (not after a dry run), then the run-log retention
(docs/disk-guard.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mqi_communicator import settings
from mqi_communicator.ops import disk_guard, retention_logs

PROG = "python -m mqi_communicator.ops.housekeeping"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    settings.add_site_arguments(parser, beside_workdir=True)
    parser.add_argument("--dry-run", action="store_true", help="the run was a dry run: no disk guard alert")
    parser.add_argument("--failed-log", type=Path, help="this run's Snakemake log, of a failed run (kept longer)")
    parser.add_argument("--runner-log", type=Path, help="the file the runner's output is appended to (rotated)")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    try:
        config = settings.load_site(settings.site_config(args.configfile, workdir), workdir)
    except (OSError, ValueError) as exc:
        print(f"housekeeping: {exc}", file=sys.stderr)
        return 1
    status = 0
    if not args.dry_run:
        try:
            said = disk_guard.alert(config, workdir)
        except (OSError, ValueError) as exc:
            said, status = f"disk guard: {exc}", 1
        if said:
            print(said)
    try:
        print(
            retention_logs.prune(workdir, retention_logs.Policy.from_config(config), args.failed_log, args.runner_log)
        )
    except (OSError, ValueError) as exc:
        print(f"run-log retention: {exc}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
