"""Operational settings are declared once, by `x-operational: true` in the config schema
(docs/development.md#configuration), and that list is what the workflow obeys: through real
Snakemake runs, a case still in work replans none of its done steps when every operational
setting changes, replans a step when one of its result settings changes, and the steps get the
operational values (simulate's GPU and lock folder) through the runtime settings alone."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from mqi_communicator import settings
from tests import casegen
from tests.workflow import snakemake, write_config


def _node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for name in path:
        node = node["properties"][name]
    return node


def _resolved(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _another(node: dict[str, Any], value: Any) -> Any:
    """A valid value of a leaf setting other than `value`, or None when there is no obvious one."""
    if "enum" in node:
        return next((v for v in node["enum"] if v != value), None)
    kind = node.get("type")
    if kind == "boolean":
        return not value
    if kind in ("integer", "number"):
        return value - 1 if node.get("maximum") == value else value + 1
    if kind == "string":
        text = str(value)
        return (text[: node["maxLength"] - 1] if "maxLength" in node else text) + "x"
    if kind == "array" and node.get("items", {}).get("type") == "integer":
        return [v + 1 for v in value]
    return None


def operational_edits(config: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """For every key path the schema marks operational, one leaf below it with a changed value."""
    schema = settings.load_schema()
    edits = {}
    for path in settings.operational_keys(schema):
        stack = [path]
        while stack:
            here = stack.pop(0)
            node = _resolved(schema, _node(schema, here))
            if "properties" in node:
                stack[:0] = [(*here, name) for name in node["properties"]]
                continue
            value = config
            for name in here:
                value = value[name]
            changed = _another(node, value)
            if changed is not None:
                edits[here] = changed
                break
        assert any(edit[: len(path)] == path for edit in edits), f"no setting below {path} to change"
    return edits


def edited(base: dict[str, Any], edits: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(base))
    for path, value in edits.items():
        target = config
        for name in path[:-1]:
            target = target.setdefault(name, {})
        target[path[-1]] = value
    return config


def planned_rules(work: Path, config: dict[str, Any]) -> dict[str, list[str]]:
    """rule -> reasons of a dry run with this site config."""
    path = work / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    run = snakemake(work, "--dry-run", "--configfile", str(path))
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout + run.stderr
    rules: dict[str, list[str]] = {}
    for rule, reason in re.findall(r"^(?:local)?rule (\w+):\n(?:.*\n)*?\s+reason: (.*)$", text, re.MULTILINE):
        rules.setdefault(rule, []).append(reason)
    return rules


def test_the_schema_list_of_operational_settings_drives_the_reruns(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    casegen.write_case(scan, "alpha")
    work = tmp_path / "work"
    work.mkdir()
    locks = tmp_path / "gpu-locks"
    site = write_config(work, scan, simulation={"gpu_devices": [3], "gpu_lock_dir": str(locks)})
    run = snakemake(work)
    assert run.returncode == 0, run.stderr[-3000:]

    # The simulate step got its GPUs and lock folder through MQI_RUNTIME_SETTINGS only.
    raw = work / "data" / "cases" / "alpha" / "raw"
    records = [json.loads(p.read_text()) for p in sorted(raw.glob("*.simulate.json"))]
    assert records and {r["gpu"] for r in records} == {3}
    assert (locks / "gpu3.lock").is_file()

    # The case back in work (its summary gone): what a dry run plans with the settings as run ...
    processing = work / "data" / "cases" / "alpha" / "intermediate"
    (processing / "case_summary.json").unlink()
    base = yaml.safe_load(site.read_text())
    as_run = planned_rules(work, base)
    assert "case_summary" in as_run and "interpret" not in as_run, as_run

    # ... is all it plans with every operational setting changed at once (none reruns a step) ...
    full = settings.load_site(site, work)
    edits = operational_edits(full)
    assert ("simulation", "timeout_seconds") in edits and ("simulation", "gpu_lock_dir") in edits
    all_changed = edited(base, edits)
    settings.validate(json.loads(json.dumps(all_changed)))
    assert planned_rules(work, all_changed).keys() == as_run.keys(), sorted(edits)

    # ... while a result setting reruns the steps that read its section (intake and interpret
    # read `interpreter`), for that reason, and what follows them.
    layout = planned_rules(work, edited(base, {("interpreter", "csv_layout"): "single_line"}))
    assert any("Params have changed" in reason for reason in layout.get("intake", [])), layout
    assert {"interpret", "moqui_input", "simulate"} <= layout.keys(), layout
    # The engine decides what intake says of range shifters and which modifiers it refuses, so
    # intake reads `executables` too (it once saw the default, the built-in engine, at every site).
    engine = planned_rules(work, edited(base, {("executables", "moqui"): "tps_env"}))
    assert any("Params have changed" in reason for reason in engine.get("intake", [])), engine
