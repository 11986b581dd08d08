"""The package's one exception root, and the kind of failure each error is (docs/failures.md).

Every exception class of the package derives from `MqiError`. Its `failure_kind` says what the run
recorder does with a step that ends on it: `waiting` (the case is not complete yet; run again),
`transient` (the network, the scheduler, the machine: run again, a few times), `permanent` (the
case's own files or the site's settings: wait for a change). Anything else a step raises is a
bug in this package (a software fault), never a case's fault (`mqi_communicator.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

WAITING, TRANSIENT, PERMANENT = "waiting", "transient", "permanent"
SOFTWARE = "software"  # not an MqiError: an exception the package did not mean to raise
KINDS = (WAITING, TRANSIENT, PERMANENT, SOFTWARE)


class MqiError(Exception):
    """An expected failure; the message says what went wrong and where, for a person to read.

    ``failure_kind`` is the class's; an instance may say otherwise (``kind=``) where the same
    error is transient one time and permanent another (a transfer, an engine run).
    """

    failure_kind: ClassVar[str] = PERMANENT  # an instance's own, where given, is in its __dict__

    def __init__(self, *args: object, kind: str | None = None) -> None:
        super().__init__(*args)
        if kind is not None:
            if kind not in KINDS[:3]:
                raise TypeError(f"failure kind must be one of {KINDS[:3]}, not {kind!r}")
            self.__dict__["failure_kind"] = kind


class InputError(MqiError, ValueError):
    """An input file or setting cannot be used; the message names it and the problem. A
    ValueError too, so the callers that catch ValueError around a parser still do."""


class CaseError(MqiError):
    """A problem with a case's input files; the message names the file and the problem."""

    def __init__(self, path: Path | str | None, problem: str, *, kind: str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem, kind=kind)


class CaseWaiting(CaseError):
    """The case is incomplete but still within its wait: not a failure to remember."""

    failure_kind = WAITING
