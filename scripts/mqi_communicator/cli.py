"""The one runner of every step's command line: how a step ends, and what it leaves in its log
for the run recorder (docs/failures.md).

A step's `main(argv)` hands its parser and its body to `run`. The body returns the exit status.
What it raises decides the rest:

- an `MqiError` (the case's files, the settings, the network, ...): one line
  `<STEP> FAILED for <what>: <message>` (`WAITING` for a case still waiting) and one marker line
  `mqi-failure {"kind": ..., ...}`, exit status 1;
- an `OSError` that no parser turned into an `MqiError`: the same; kind `transient` where the
  machine failed (`MACHINE_ERRNOS`: a full disk, an I/O error, a stale mount, a file-size limit),
  `permanent` where a path cannot be read or written (missing, a folder, no permission);
- anything else is a bug in this package: Python's traceback, then the marker with kind
  `software`, exit status 1. It is never recorded as the case's permanent fault.

The marker is data: the recorder reads the kind from it (`read_marker`), not from the prose.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mqi_communicator.errors import PERMANENT, SOFTWARE, TRANSIENT, WAITING, MqiError
from mqi_communicator.files import is_stream_of

MARKER = "mqi-failure "
# What the machine, not a path the step was given, says: the same step may pass on a later run.
MACHINE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.ESTALE,
        errno.EFBIG,
        errno.ENOMEM,
        errno.EAGAIN,
        errno.EMFILE,
        errno.ENFILE,
        errno.EROFS,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EINTR,
    }
)


def marker_line(kind: str, step: str, error: str, message: str) -> str:
    """The line the recorder reads: the failure's kind, the step, the error's class and message, as JSON."""
    record = {"kind": kind, "step": step, "error": error, "message": message}
    return MARKER + json.dumps(record, ensure_ascii=True)


def read_marker(text: str) -> dict[str, Any] | None:
    """The last failure marker in a log's text (a step says it once, as its last word), or None
    where the step never got to say anything (killed, or it failed before the runner ran)."""
    for line in reversed(text.splitlines()):
        if line.startswith(MARKER):
            try:
                record = json.loads(line[len(MARKER) :])
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("kind"), str):
                return record
    return None


def is_marker(line: str) -> bool:
    return line.startswith(MARKER)


def run(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int],
    argv: list[str] | None,
    *,
    step: str,
    label: str,
    subject: Callable[[argparse.Namespace], str] | None = None,
    log_of: Callable[[argparse.Namespace], Path | None] | None = None,
) -> int:
    """Parse `argv`, run `body`, and end as the module docstring says.

    `step`: the module as run, `python -m mqi_communicator.<step>` (in the marker); `label`: how the one line starts (`INTAKE`);
    `subject`: what failed, from the arguments (`case X`); `log_of`: a log file the step writes
    itself, which gets the lines too where stderr does not go there already (simulate).
    """
    args = parser.parse_args(argv)
    log = log_of(args) if log_of is not None else None
    try:
        return body(args)
    except MqiError as exc:
        kind, error, name = exc.failure_kind, str(exc), type(exc).__name__
    except OSError as exc:
        kind = TRANSIENT if exc.errno in MACHINE_ERRNOS else PERMANENT
        error, name = str(exc), type(exc).__name__
    except Exception as exc:
        traceback.print_exc()
        line = f"{label} FAILED{_for(subject, args)}: software fault, not the case's: {type(exc).__name__}: {exc}"
        _say([line, marker_line(SOFTWARE, step, type(exc).__name__, str(exc))], log)
        return 1
    verb = "WAITING" if kind == WAITING else "FAILED"
    _say([f"{label} {verb}{_for(subject, args)}: {error}", marker_line(kind, step, name, error)], log)
    return 1


def _for(subject: Callable[[argparse.Namespace], str] | None, args: argparse.Namespace) -> str:
    return f" for {subject(args)}" if subject is not None else ""


def _say(lines: list[str], log: Path | None = None) -> None:
    text = "".join(line + "\n" for line in lines)
    sys.stdout.flush()  # what the step printed comes first where both go to one log
    sys.stderr.write(text)
    sys.stderr.flush()
    if log is not None and not is_stream_of(sys.stderr, log):  # under the workflow stderr is the log
        with contextlib.suppress(OSError), open(log, "a") as handle:
            handle.write(text)
