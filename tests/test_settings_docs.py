"""Which settings rerun a step is declared once, in the config schema (`x-operational: true`);
the newcomer's page (docs/development.md#which-settings-rerun-a-step) lists the same keys, and
the same sections per rule as rules/ passes, and the workflow keeps no list of its own."""

from __future__ import annotations

import re
from pathlib import Path

from mqi_communicator import settings

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "development.md").read_text()


def _between(marker: str) -> str:
    return DOC.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]


def test_the_page_lists_exactly_the_schema_operational_settings() -> None:
    listed = re.findall(r"`([\w.]+)`", _between("operational-settings"))
    assert listed == [".".join(path) for path in settings.operational_keys()]


def test_every_schema_description_that_says_operational_carries_the_mark() -> None:
    """A description saying 'Operational' without the keyword would be the list said twice."""
    schema = settings.load_schema()
    marked = set(settings.operational_keys(schema))
    said = []

    def walk(node: dict, path: tuple[str, ...]) -> None:
        for name, sub in node.get("properties", {}).items():
            if re.search(r"\bOperational\b", str(sub.get("description", ""))):
                said.append((*path, name))
            walk(sub, (*path, name))

    walk(schema, ())
    assert said and set(said) <= marked


def test_the_page_lists_the_sections_each_rule_passes() -> None:
    passed = {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        for rule, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", path.read_text(), re.S | re.M):
            found = re.search(r"settings_for\((.*?)\)", body, re.S)
            if found:
                passed[rule] = re.findall(r'"(\w+)"', found.group(1))
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", _between("settings-per-rule"), re.M)
    assert {rule: re.findall(r"`(\w+)`", sections) for rule, sections in rows} == passed


def test_the_workflow_keeps_no_list_of_its_own() -> None:
    """No section or key list in the rules, and simulate's operational settings come one way."""
    rules = "".join(p.read_text() for p in sorted((REPO / "rules").glob("*.smk")))
    assert "operational_keys()" in rules
    for gone in ("MQI_TIMEOUT_SECONDS", "MQI_GPU_DEVICES", "MQI_GPU_LOCK_DIR", '"gpu_lock_dir"', '"pseudonym_salt"'):
        assert gone not in rules
