"""The workflow configuration as the CLIs see it: validated by the same JSON schema, with defaults.

Rules pass the exact configuration Snakemake resolved as inline JSON (`--settings '{...}'`).
A person running a CLI by hand, from any folder, gets this project's `config/config.yaml`
(found next to the package, not in the current folder); `--config my-site.yaml` overrides it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = PROJECT_ROOT / "config" / "schema" / "config.schema.yaml"
# What the CLIs use without --config: the project's own configuration, whatever the current folder.
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "config.yaml"


def _extend_with_defaults(validator_class: Any) -> Any:
    """A validator that fills in each property's `default`, like snakemake.utils.validate."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: dict[str, Any], instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Validate in place and fill defaults; raises ValueError naming the offending key."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = _extend_with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
            lines.append(f"config key '{key}': {error.message}")
        raise ValueError("invalid configuration:\n  " + "\n  ".join(lines))
    return config


def load(value: str) -> dict[str, Any]:
    """Inline JSON (starts with `{`) or a YAML/JSON file path; validated, defaults filled."""
    inline = value.lstrip().startswith("{")
    if not inline and not Path(value).is_file():
        raise ValueError(f"configuration file {Path(value).resolve()} not found (--config names another one)")
    text = value if inline else Path(value).read_text()
    loaded = json.loads(text) if inline else yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"{value}: configuration must be a mapping")
    return validate(loaded)


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
