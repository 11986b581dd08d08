"""MOQUI parameter files and the per-beam log folder layout (docs/design.md#moqui-engine-contract)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mqi_communicator.formats.moqui_parameters import (
    PADDING_PREFIX,
    parameter_problems,
    parse_parameter_file,
    parse_parameters,
    prepare_beam_logdir,
    render_parameter_file,
    select_beam_logdir,
    validate_parameters,
)

GOOD = {
    "GPUID": "0",
    "BeamNumbers": "2",
    "GantryNum": "2",
    "DicomDir": "/data/plan",
    "logFilePath": "/data/log_beam2",
    "OutputDir": "/data/out",
    "OutputFormat": "raw",
    "TwoCentimeterMode": "true",
}


def test_parse_keeps_keys_as_written_and_looks_up_case_insensitively(tmp_path: Path) -> None:
    path = tmp_path / "beam.in"
    path.write_text(
        "# MOQUI input\n\nGPUID 0\nlogFilePath /data/log dir   # inline comment\n"
        "  TwoCentimeterMode\ttrue\n#Scorer Energy\nScorer Dose\n"
    )
    params = parse_parameter_file(path)
    assert list(params) == ["GPUID", "logFilePath", "TwoCentimeterMode", "Scorer"]
    assert params["gpuid"] == "0"
    assert params["LOGFILEPATH"] == "/data/log dir"
    assert params["twocentimetermode"] == "true"
    assert params["Scorer"] == "Dose"
    assert "scorer" in params and "Energy" not in params.values()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("GPUID 0\ngpuid 1\n", "'gpuid' already set on line 1"),
        ("GPUID 0\nOutputDir\n", ":2: key 'OutputDir' has no value"),
    ],
)
def test_parse_rejects_duplicates_and_missing_values(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_parameters(text, "beam.in")


def test_render_fills_template_and_overrides_case_insensitively() -> None:
    template = {
        "GPUID": 0,
        "UsingPhantomGeo": True,
        "TwoCentimeterMode": True,
        "OverwriteResults": False,
        "BeamNumbers": 1,
    }
    text = render_parameter_file(template, {"beamnumbers": 3, "gpuid": 1, "OutputDir": Path("/out/b3"), "Scale": 0.5})
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "GPUID 1",
        "UsingPhantomGeo true",
        "TwoCentimeterMode true",
        "OverwriteResults false",
        "BeamNumbers 3",
        "OutputDir /out/b3",
        "Scale 0.5",
    ]
    assert parse_parameters(text)["beamnumbers"] == "3"


def test_render_drops_none_and_rejects_bad_values() -> None:
    assert "Seed" not in render_parameter_file({"GPUID": 0, "Seed": 5}, {"seed": None})
    with pytest.raises(ValueError, match="'OutputDir'"):
        render_parameter_file({"GPUID": 0}, {"OutputDir": "/a\n/b"})
    with pytest.raises(ValueError, match="'Beams'"):
        render_parameter_file({"GPUID": 0}, {"Beams": [1, 2]})
    with pytest.raises(ValueError, match="given twice"):
        render_parameter_file({"GPUID": 0, "gpuid": 1}, {})


def test_validate_accepts_a_complete_beam_and_dicompath() -> None:
    assert parameter_problems(GOOD) == []
    alt = {k: v for k, v in GOOD.items() if k != "DicomDir"} | {"DicomPath": "/data/plan"}
    validate_parameters(alt)
    validate_parameters({k.lower(): v for k, v in GOOD.items()})  # keys are case-insensitive
    validate_parameters({"GPUID": 0, "BeamNumbers": 1, "GantryNum": 1} | {k: GOOD[k] for k in list(GOOD)[3:]})


@pytest.mark.parametrize(
    "key", ["GPUID", "BeamNumbers", "GantryNum", "logFilePath", "OutputDir", "OutputFormat", "DicomDir"]
)
def test_validate_names_each_missing_required_key(key: str) -> None:
    params = {k: v for k, v in GOOD.items() if k != key}
    with pytest.raises(ValueError, match=f"missing required key {key}"):
        validate_parameters(params)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("GPUID", "-1", "GPUID must be an integer >= 0"),
        ("GPUID", "zero", "GPUID must be an integer >= 0"),
        ("GantryNum", "3", "GantryNum must be 1 or 2 .MOQUI silently turns"),
        ("GantryNum", "G2", "GantryNum must be 1 or 2"),
        ("BeamNumbers", "0", "BeamNumbers must be one integer >= 1"),
        ("BeamNumbers", "1 2", "BeamNumbers must be one integer >= 1"),
        ("OutputFormat", "dcm", "OutputFormat must be raw"),
        ("TwoCentimeterMode", "True", "TwoCentimeterMode must be true or false"),
        ("LogFileSelection", "sorted", "LogFileSelection must be one of index, name"),
        ("DoseScaleFactor", "-2", "DoseScaleFactor must be a number > 0"),
    ],
)
def test_validate_rejects_bad_values_naming_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_parameters(GOOD | {key: value}, "beam.in")


def _csv_folder(root: Path, name: str, files: int = 2) -> Path:
    folder = root / "log" / name
    folder.mkdir(parents=True)
    for i in range(files):
        (folder / f"{i + 1:02d}_{100 + i:.2f}MeV.csv").write_bytes(f"0.0,{i}.0,0.0,5\r\n".encode())
    return folder


@pytest.mark.parametrize("name", ["1G180_TX", "abc", "Zed", "-x", "_a", "0", "9Z_b"])
@pytest.mark.parametrize("beam_number", [1, 3, 12])
def test_index_layout_puts_the_beam_at_index_beam_number_minus_one(tmp_path: Path, name: str, beam_number: int) -> None:
    source = _csv_folder(tmp_path, name)
    dest = tmp_path / "run" / "log"
    folder = prepare_beam_logdir(source, beam_number, dest, "index")
    entries = sorted(str(p) for p in dest.iterdir())
    assert len(entries) == beam_number
    assert entries[beam_number - 1] == str(folder) == str(dest / name)
    assert all(Path(e).name.startswith(PADDING_PREFIX) and not any(Path(e).iterdir()) for e in entries[:-1])
    # A real directory holding the same files (hard links), so any listing sees a directory.
    assert folder.is_dir() and not folder.is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (folder / "01_100.00MeV.csv").read_bytes() == b"0.0,0.0,0.0,5\r\n"
    assert select_beam_logdir(dest, beam_number, name, "index") == folder


def test_index_layout_is_idempotent_and_picks_up_rewritten_csvs(tmp_path: Path) -> None:
    source = _csv_folder(tmp_path, "2S110")
    dest = tmp_path / "run" / "log"
    prepare_beam_logdir(source, 3, dest, "index")
    # P2 rewrites a layer atomically (new inode) and drops one; re-preparing follows.
    tmp = source / "tmp"
    tmp.write_bytes(b"1.0,1.0,1.0,1\r\n")
    os.replace(tmp, source / "01_100.00MeV.csv")
    (source / "02_101.00MeV.csv").unlink()
    folder = prepare_beam_logdir(source, 3, dest, "index")
    assert [p.name for p in folder.iterdir()] == ["01_100.00MeV.csv"]
    assert (folder / "01_100.00MeV.csv").read_bytes() == b"1.0,1.0,1.0,1\r\n"
    assert len(list(dest.iterdir())) == 3
    assert sorted(p.name for p in dest.parent.iterdir()) == ["log"]  # no build/old leftovers
    assert (source / "01_100.00MeV.csv").exists()  # the source is never touched


def test_name_layout_and_selection(tmp_path: Path) -> None:
    source = _csv_folder(tmp_path, "whatever")
    dest = tmp_path / "run" / "log"
    folder = prepare_beam_logdir(source, 4, dest, "name", beam_name="1G180:TX")
    assert [p.name for p in dest.iterdir()] == ["1G180_TX"] and folder == dest / "1G180_TX"
    assert select_beam_logdir(dest, 4, "1G180:TX", "name") == folder
    with pytest.raises(ValueError, match=r"BeamNumbers 4 selects sorted entry index 3, but the folder has 1 entries"):
        select_beam_logdir(dest, 4, "1G180:TX", "index")
    with pytest.raises(ValueError, match="no folder 'OTHER'"):
        select_beam_logdir(dest, 4, "OTHER", "name")


def test_naive_layout_gives_the_neighbours_folder(tmp_path: Path) -> None:
    """The fork's quirk itself: plan beams 1 = setup, 2, 3 and folders only for 2 and 3."""
    log = tmp_path / "log"
    _csv_folder(tmp_path, "B2")
    _csv_folder(tmp_path, "B3")
    assert select_beam_logdir(log, 2, "B2", "index").name == "B3"  # beam 2 reads beam 3's logs
    with pytest.raises(ValueError, match="index 2, but the folder has 2 entries"):
        select_beam_logdir(log, 3, "B3", "index")


def test_prepare_refuses_unsafe_requests(tmp_path: Path) -> None:
    source = _csv_folder(tmp_path, "B1")
    with pytest.raises(ValueError, match="must not contain"):
        prepare_beam_logdir(source, 1, tmp_path / "log", "index")
    with pytest.raises(ValueError, match="selection 'sorted'"):
        prepare_beam_logdir(source, 1, tmp_path / "x", "sorted")
    with pytest.raises(ValueError, match="does not exist"):
        prepare_beam_logdir(tmp_path / "missing", 1, tmp_path / "x", "index")
    odd = tmp_path / "odd name"
    odd.mkdir()
    with pytest.raises(ValueError, match="not a sanitized beam name"):
        prepare_beam_logdir(odd, 1, tmp_path / "x", "index")
