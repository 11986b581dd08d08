"""docs/plan-support.md's tables (plan feature -> supported / refused, with which message) cannot
rot: every row names a backing test, and every test it names is a test function of the file it
names. The convention, stated in the document: `test_name` (`tests/file.py`), or `test_name`
alone for the file a section names in a sentence "Tests are in `tests/file.py` ..." before its
table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOC = REPO / "docs" / "plan-support.md"
DEFAULT_FILE = re.compile(r"Tests are in `(tests/[\w/]+\.py)`")
NAMED_TEST = re.compile(r"`(test_\w+)`(?:\s*\(`(tests/[\w/]+\.py)`\))?")
NAMED_FILE = re.compile(r"`(tests/[\w/]+\.py)`")


def table_rows(text: str) -> list[tuple[int, str | None, str]]:
    """(line number, the section's default test file, Test cell) of every row of every table
    whose last column is headed Test."""
    rows: list[tuple[int, str | None, str]] = []
    default: str | None = None
    in_table = False
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if line.startswith("#"):
            default, in_table = None, False
        if match := DEFAULT_FILE.search(line):
            default = match.group(1)
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not in_table:
            in_table = cells[-1] == "Test"
            continue
        if set(line) <= set("|-: "):
            continue
        rows.append((number, default, cells[-1]))
    return rows


def named_tests(default: str | None, cell: str) -> list[tuple[str, str | None]]:
    return [(name, file or default) for name, file in NAMED_TEST.findall(cell)]


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    }


ROWS = table_rows(DOC.read_text())


def test_the_document_has_its_tables() -> None:
    # The feature table of issue 19 and the real exports' table, at least.
    assert len(ROWS) >= 20


@pytest.mark.parametrize(("line", "default", "cell"), ROWS, ids=[f"line{line}" for line, _, _ in ROWS])
def test_every_row_names_tests_that_exist(line: int, default: str | None, cell: str) -> None:
    tests = named_tests(default, cell)
    assert tests, f"docs/plan-support.md:{line}: the row names no test: {cell!r}"
    for name, file in tests:
        assert file is not None, f"docs/plan-support.md:{line}: {name} names no file and its section none"
        path = REPO / file
        assert path.is_file(), f"docs/plan-support.md:{line}: {file} does not exist"
        assert name in defined_tests(path), f"docs/plan-support.md:{line}: no test function {name} in {file}"
    for file in NAMED_FILE.findall(cell):
        assert (REPO / file).is_file(), f"docs/plan-support.md:{line}: {file} does not exist"


def test_a_row_naming_a_missing_test_is_caught() -> None:
    """The check itself, on a table like the document's, fails where it should."""
    text = (
        "## Section\n\nTests are in `tests/test_plan_standard.py` unless named otherwise.\n\n"
        "| Plan feature | What happens | Test |\n|---|---|---|\n"
        "| a | supported | `test_one_beam_in_two_groups` |\n"
        "| b | refused | `test_photon_plan_is_refused` (`tests/test_plan.py`) |\n"
        "| c | refused | `test_no_such_test` |\n"
        "| d | refused | by hand |\n"
    )
    rows = table_rows(text)
    assert [named_tests(default, cell) for _, default, cell in rows] == [
        [("test_one_beam_in_two_groups", "tests/test_plan_standard.py")],
        [("test_photon_plan_is_refused", "tests/test_plan.py")],
        [("test_no_such_test", "tests/test_plan_standard.py")],
        [],
    ]
    for line, default, cell in rows[:2]:
        test_every_row_names_tests_that_exist(line, default, cell)
    for line, default, cell in rows[2:]:
        with pytest.raises(AssertionError):
            test_every_row_names_tests_that_exist(line, default, cell)
