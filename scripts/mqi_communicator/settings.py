"""The workflow configuration as the CLIs see it: validated by the same JSON schema, with defaults.

Rules pass the exact configuration Snakemake resolved as inline JSON (`--settings '{...}'`).
A person running a CLI by hand, from any folder, gets this project's `config/config.yaml`
(found next to the package, not in the current folder); `--config my-site.yaml` overrides it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mqi_communicator.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = PROJECT_ROOT / "config" / "schema" / "config.schema.yaml"
# What the CLIs use without --config: the project's own configuration, whatever the current folder.
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "config.yaml"
# Validated configurations remembered (`validated`), at most this many.
VALIDATED_KEPT = 64


def _extend_with_defaults(validator_class: Any) -> Any:
    """A validator that fills in each property's `default`, like snakemake.utils.validate."""
    import jsonschema

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: dict[str, Any], instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


@functools.cache
def _schema_text() -> str:
    return SCHEMA_PATH.read_text()


def load_schema() -> dict[str, Any]:
    """The configuration schema (a fresh copy: the validator fills defaults from it)."""
    import yaml

    # libyaml's parser where PyYAML has it: the pure-Python one takes ~0.1 s for the schema.
    schema: dict[str, Any] = yaml.load(_schema_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return schema


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Validate in place and fill defaults; raises ValueError naming the offending key."""
    # jsonschema and yaml are imported here, not with the module: together ~0.1 s of start-up
    # that a CLI whose configuration was validated before need not pay (`validated`).
    import jsonschema

    schema = load_schema()
    validator = _extend_with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
            lines.append(f"config key '{key}': {error.message}")
        raise InputError("invalid configuration:\n  " + "\n  ".join(lines))
    return config


def path_problems(config: dict[str, Any]) -> list[str]:
    """Path settings that cannot work: an empty scan folder setting (it would scan the working
    folder), or an output folder inside the scan folder (outputs would look like case files)."""
    local = config["paths"]["local"]
    scan_text = str(local["scan_directory"]).strip()
    if not scan_text:
        return ["paths.local.scan_directory is empty; name the folder the cases arrive in"]
    scan = Path(scan_text).expanduser().resolve()
    problems = []
    for key in ("processing_directory", "raw_output_directory", "final_dicom_directory"):
        # The part before {case_id} is the folder every case's output goes under.
        root = Path(str(local[key]).split("{case_id}", 1)[0] or ".").expanduser().resolve()
        if root == scan or scan in root.parents or root in scan.parents:
            problems.append(
                f"paths.local.{key} ({local[key]}) and paths.local.scan_directory ({scan_text}) overlap; "
                "outputs must be outside the scan folder"
            )
    return problems


def template_problems(config: dict[str, Any]) -> list[str]:
    """A MOQUI template that would scale the dose a second time: the calibration (section
    `calibration`) is applied once, when P3 writes the RT Dose (docs/qa.md, Calibration)."""
    template = config["simulation"]["template"]
    scaled = [key for key in template if key.lower() == "dosescalefactor"]
    return [
        f"simulation.template.{key} would scale the dose a second time; the dose scale comes from the calibration "
        "record (bin/mqi calibrate) and is applied once, in the RT Dose"
        for key in scaled
    ]


def load_yaml(path: Path) -> Any:
    """A YAML file; a syntax error is a ValueError naming the file, line and column."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise InputError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from exc


def yaml_problem(path: str | Path) -> str | None:
    """The syntax error of a YAML file, naming file and line; None when it parses or is absent."""
    try:
        if Path(path).is_file():
            load_yaml(Path(path))
    except ValueError as exc:
        return str(exc)
    return None


RUNTIME_VARIABLE = "MQI_RUNTIME_SETTINGS"
# The schema's mark of an operational setting: one whose change must never rerun a step
# (docs/development.md#configuration). Declared there once; everything else derives from it.
OPERATIONAL_KEYWORD = "x-operational"


def operational_keys(schema: dict[str, Any] | None = None) -> list[tuple[str, ...]]:
    """The key paths the schema marks operational (`x-operational: true`), e.g.
    ("simulation", "timeout_seconds"), or ("application",) for a whole section."""
    found: list[tuple[str, ...]] = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for name, sub in node.get("properties", {}).items():
            if sub.get(OPERATIONAL_KEYWORD) is True:
                found.append((*path, name))
            else:
                walk(sub, (*path, name))

    walk(schema if schema is not None else load_schema(), ())
    return found


def operational_part(config: dict[str, Any], keys: list[tuple[str, ...]]) -> dict[str, Any]:
    """Only the operational settings of a config (what reaches the steps in RUNTIME_VARIABLE)."""
    part: dict[str, Any] = {}
    for path in keys:
        value: Any = config
        for name in path:
            if not isinstance(value, dict) or name not in value:
                break
            value = value[name]
        else:
            target = part
            for name in path[:-1]:
                target = target.setdefault(name, {})
            target[path[-1]] = value
    return part


def result_part(value: Any, path: tuple[str, ...], keys: list[tuple[str, ...]]) -> Any:
    """A config value (at key path `path`) without its operational settings: what a step's
    params carry, so that only a change of a result setting reruns it. A wholly operational
    section gives {}."""
    if path in keys:
        return {}
    if not isinstance(value, dict):
        return value
    return {name: result_part(sub, (*path, name), keys) for name, sub in value.items() if (*path, name) not in keys}


def load(value: str) -> dict[str, Any]:
    """Inline JSON (starts with `{`) or a YAML/JSON file path; validated, defaults filled.
    Under the workflow, the operational settings (timeouts, connection, alerts: what never
    changes a result, so never a rule's params) arrive in MQI_RUNTIME_SETTINGS and are merged on top."""
    inline = value.lstrip().startswith("{")
    if not inline and not Path(value).is_file():
        raise InputError(f"configuration file {Path(value).resolve()} not found (--config names another one)")
    loaded = json.loads(value) if inline else load_yaml(Path(value))
    if not isinstance(loaded, dict):
        raise InputError(f"{value}: configuration must be a mapping")
    runtime = os.environ.get(RUNTIME_VARIABLE)
    if runtime:
        _merge(loaded, json.loads(runtime))
    return validated(loaded)


def validated_cache() -> Path:
    """Where `validated` keeps what it validated: this user's cache folder."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mqi_communicator" / "validated-settings"


def validated(config: dict[str, Any]) -> dict[str, Any]:
    """`validate(config)`, remembered: the result for a configuration and schema validated
    before is read back instead (a rule passes the same settings for every case, and importing
    the validator is ~0.1 s of every CLI's start-up; docs/p2-speed.md). Only a valid configuration
    is remembered, and only one that JSON keeps exactly; the key is the sha256 of the schema file
    and of the configuration, so a change to either is validated again. The folder keeps the
    `VALIDATED_KEPT` latest; anything unreadable there is validated again, and a folder that
    cannot be written only means nothing is remembered."""
    try:
        text = json.dumps(config, sort_keys=True)
        exact = json.loads(text) == config
    except (TypeError, ValueError):
        exact = False
    try:
        folder = validated_cache()
    except RuntimeError:  # no home folder to keep it in
        exact = False
    if not exact:
        return validate(config)
    path = folder / (hashlib.sha256(_schema_text().encode() + b"\0" + text.encode()).hexdigest() + ".json")
    with contextlib.suppress(OSError, ValueError):
        remembered = json.loads(path.read_text())
        if isinstance(remembered, dict):
            return remembered
    result = validate(config)
    with contextlib.suppress(OSError, TypeError, ValueError):
        result_text = json.dumps(result, sort_keys=True)
        if json.loads(result_text) == result:
            from mqi_communicator.files import write_atomic

            write_atomic(path, result_text.encode())
            _forget_oldest(folder)
    return result


def _forget_oldest(folder: Path) -> None:
    entries = []
    for entry in folder.glob("*.json"):
        with contextlib.suppress(OSError):
            entries.append((entry.stat().st_mtime, entry))
    for _, entry in sorted(entries, reverse=True)[VALIDATED_KEPT:]:
        with contextlib.suppress(OSError):
            entry.unlink()


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def site_config(configfile: str | Path | None, workdir: Path) -> str | Path | None:
    """The site config a housekeeping CLI run by bin/mqi-run reads: the one named, else the
    working folder's own config/config.yaml if it has one (else the project's, by load_site)."""
    local = workdir / "config" / "config.yaml"
    return configfile or (local if local.is_file() else None)


def load_site(configfile: str | Path | None, workdir: Path | None = None) -> dict[str, Any]:
    """The configuration a workflow run uses: config/config.yaml, updated by the site's
    `--configfile` (merged key by key, as Snakemake does); relative paths from workdir."""
    import yaml

    config = yaml.safe_load(DEFAULT_CONFIG.read_text()) or {}
    if configfile:
        path = Path(configfile)
        path = path if path.is_absolute() or workdir is None else workdir / path
        site = yaml.safe_load(path.read_text()) or {}
        if not isinstance(site, dict):
            raise InputError(f"{path}: configuration must be a mapping")
        _merge(config, site)
    return validate(config)


def add_site_arguments(parser: argparse.ArgumentParser, *, beside_workdir: bool = False) -> None:
    """The operator commands' `--configfile` and `--workdir` (`bin/mqi ...`). `beside_workdir`:
    the default config is the work folder's own, else the project's (the runner's housekeeping)."""
    default = "WORKDIR/config/config.yaml, else the project's" if beside_workdir else "config/config.yaml"
    parser.add_argument("--configfile", default=None, help=f"the site's config (default: {default})")
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="where the workflow runs (default: here)")


def add_argument(parser: argparse.ArgumentParser) -> None:
    """The CLIs' `--config` option (`--settings`, as the rules pass it, is the same option)."""
    parser.add_argument(
        "--config",
        "--settings",
        dest="settings",
        metavar="YAML|JSON",
        default=str(DEFAULT_CONFIG),
        help="workflow configuration: a YAML file or inline JSON (default: %(default)s, from any folder)",
    )
