"""Settings validated once and remembered (settings.validated, docs/p2-speed.md): the same result
as validating, never for an invalid configuration, validated again when the schema changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mqi_communicator import settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "mqi_communicator" / "validated-settings"


def rule_settings(**interpreter: object) -> str:
    """Inline settings as a rule passes them (a few sections; the rest gets the defaults)."""
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    shipped["interpreter"].update(interpreter)
    return json.dumps({name: shipped[name] for name in ("interpreter", "monitor_range_factors", "rooms")})


def test_remembered_result_is_the_validated_one(cache: Path) -> None:
    text = rule_settings()
    first = settings.load(text)
    assert len(list(cache.glob("*.json"))) == 1
    again = settings.load(text)
    assert again == first == settings.validate(json.loads(text))  # defaults filled as validation fills them
    again["interpreter"]["csv_layout"] = "single_line"  # a caller's change is its own
    assert settings.load(text)["interpreter"]["csv_layout"] == "rows"


def test_invalid_settings_are_never_remembered(cache: Path) -> None:
    text = rule_settings(csv_layout="columns")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"config key 'interpreter\.csv_layout'"):
            settings.load(text)
    assert not cache.exists() or not list(cache.iterdir())


def test_a_changed_schema_is_validated_again(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unset = json.loads(rule_settings())
    del unset["interpreter"]["csv_layout"]  # left to the schema's default
    text = json.dumps(unset)
    assert settings.load(text)["interpreter"]["csv_layout"] == "rows"
    schema = yaml.safe_load(settings.SCHEMA_PATH.read_text())
    schema["properties"]["interpreter"]["properties"]["csv_layout"]["default"] = "single_line"
    changed = tmp_path / "schema.yaml"
    changed.write_text(yaml.safe_dump(schema))
    monkeypatch.setattr(settings, "SCHEMA_PATH", changed)
    settings._schema_text.cache_clear()  # read once per process; this test changes it mid-process
    try:
        assert settings.load(text)["interpreter"]["csv_layout"] == "single_line"
    finally:
        monkeypatch.undo()
        settings._schema_text.cache_clear()
    assert len(list(cache.glob("*.json"))) == 2


def test_unreadable_entry_is_validated_again_and_the_folder_stays_small(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = rule_settings()
    expected = settings.load(text)
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json")
    assert settings.load(text) == expected
    monkeypatch.setattr(settings, "VALIDATED_KEPT", 3)
    for rate in (1.0, 2.0, 4.0, 5.0):
        settings.load(rule_settings(plan_dose_rate_mu_per_s=rate))
    assert len(list(cache.glob("*.json"))) == 3
