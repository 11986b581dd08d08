"""The one exception type a case can fail with, so rules report a readable reason."""

from __future__ import annotations

from pathlib import Path


class CaseError(Exception):
    """A problem with a case's input files; the message names the file and the problem."""

    def __init__(self, path: Path | str | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)
