"""The package's layers (docs/development.md#layout): a module imports only from its own layer
or the ones below it, so a stage can be read, tested and changed without the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scripts" / "mqi_communicator"

# Lowest first; the first part of a module's name below the package decides its layer.
LAYERS: list[set[str]] = [
    {"__init__", "__version__", "errors", "files", "settings", "cli", "step_client"},
    {"formats"},
    {"intake"},
    {"interpret", "moqui_input"},
    {"simulate"},
    {"rtdose"},
    {"qa"},
    {"report"},
    {"remote"},
    {"ops", "dicomnet"},
]


def layer_of(top: str) -> int:
    for number, names in enumerate(LAYERS):
        if top in names:
            return number
    raise AssertionError(f"{top!r} is in no layer: add it to LAYERS and to docs/development.md#layout")


def top_name(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported_tops(path: Path) -> set[tuple[str, int]]:
    """(first part below the package, line) of every import of the package, local ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mqi_communicator"):
            parts = node.module.split(".")
            tops = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
            found.update((top, node.lineno) for top in tops)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; the package imports by full name")
        elif isinstance(node, ast.Import):
            found.update(
                (alias.name.split(".")[1], node.lineno)
                for alias in node.names
                if alias.name.startswith("mqi_communicator.")
            )
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_nothing_from_a_higher_layer(path: Path) -> None:
    own = layer_of(top_name(path))
    upward = [
        f"{path.relative_to(PACKAGE)}:{line} imports mqi_communicator.{top}"
        for top, line in sorted(imported_tops(path))
        if layer_of(top) > own
    ]
    assert not upward, upward


def test_every_subpackage_says_what_it_owns() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"{init}: a one-line docstring saying what it owns"
