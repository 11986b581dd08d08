"""MOQUI parameter files (`moqui_tps_<beam>.in`) and the per-beam log folder MOQUI reads.

A parameter file is `Key value` per line with `#` comments; MOQUI compares keys without
regard to case (docs/design.md#moqui-engine-contract). `parse_parameter_file` returns a `Parameters` mapping that keeps
each key as written (iteration, `items()`) and looks keys up case-insensitively
(`params["gpuid"]` finds `GPUID`). The value is the rest of the line after the key, minus an
inline comment that starts with whitespace and `#`.

The full key set differs between MOQUI builds, so the template lives in config and
`render_parameter_file` only fills in / overrides the per-beam keys.

Log folder layout (docs/design.md#moqui-engine-contract engine quirk): the SMC fork of MOQUI lists every entry of
`logFilePath`, sorts the paths as strings and reads the entry at index BeamNumber - 1, not
the folder with the beam's name. `prepare_beam_logdir` builds one `logFilePath` per beam in
which the beam's CSV folder is at exactly that index ("index" selection), or just the folder
under its sanitized name for builds that select by name ("name").
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

from mqi_communicator.errors import InputError
from mqi_communicator.formats.plan import sanitize_beam_name

SELECTIONS = ("index", "name")
BOOLEAN_KEYS = ("UsingPhantomGeo", "TwoCentimeterMode", "OverwriteResults")
REQUIRED_KEYS = ("GPUID", "BeamNumbers", "GantryNum", "logFilePath", "OutputDir", "OutputFormat")
SANITIZED_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
# Padding folders start with '+' (0x2B), which sorts before every character a sanitized beam
# name can hold ('-' 0x2D, digits, letters, '_'), so they sort before the beam's folder.
PADDING_PREFIX = "+padding_"
_KEY = re.compile(r"^[^\s#]+$")
_INLINE_COMMENT = re.compile(r"\s#.*$")


class Parameters(MutableMapping[str, str]):
    """Parameter values by key, keys kept as written, looked up case-insensitively."""

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._data: dict[str, tuple[str, str]] = {}
        for key, value in (items or {}).items():
            self[key] = value

    def __getitem__(self, key: str) -> str:
        return self._data[key.lower()][1]

    def __setitem__(self, key: str, value: str) -> None:
        old = self._data.get(key.lower())
        # An existing key keeps its spelling, like a template key overridden per beam.
        self._data[key.lower()] = (old[0] if old else key, value)

    def __delitem__(self, key: str) -> None:
        del self._data[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return (written for written, _ in self._data.values())

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Parameters({dict(self.items())!r})"


def parse_parameters(text: str, source: str = "<parameters>") -> Parameters:
    """Parse parameter-file text; a key given twice (in any case) or without a value is an error."""
    params = Parameters()
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _INLINE_COMMENT.sub("", raw).strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise InputError(f"{source}:{number}: key {parts[0]!r} has no value")
        key, value = parts[0], parts[1].strip()
        if key.lower() in seen:
            raise InputError(f"{source}:{number}: key {key!r} already set on line {seen[key.lower()]}")
        seen[key.lower()] = number
        params[key] = value
    return params


def parse_parameter_file(path: Path) -> Parameters:
    """Read a MOQUI parameter file; see the module docstring for the mapping's behaviour."""
    return parse_parameters(Path(path).read_text(), str(path))


def format_value(key: str, value: object) -> str:
    """A parameter value as MOQUI reads it: booleans `true`/`false`, numbers and paths as text."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float | str | os.PathLike):
        text = str(value)
    else:
        raise InputError(f"parameter {key!r}: cannot write a {type(value).__name__} value ({value!r})")
    if not text.strip() or "\n" in text or "\r" in text:
        raise InputError(f"parameter {key!r}: value must be non-empty text on one line, got {text!r}")
    return text.strip()


def render_parameter_file(
    template: Mapping[str, object], per_beam: Mapping[str, object], header: str | None = None
) -> str:
    """Template keys in template order, per-beam keys filling in or overriding them
    case-insensitively (the template's spelling is kept), new per-beam keys appended.

    A value of None drops the key (lets a beam remove a template key).
    """
    merged = Parameters()
    for source, mapping in (("template", template), ("per-beam", per_beam)):
        seen: set[str] = set()
        for key, value in mapping.items():
            if not isinstance(key, str) or not _KEY.match(key):
                raise InputError(f"{source} key {key!r}: keys are single words without '#'")
            if key.lower() in seen:
                raise InputError(f"{source} key {key!r} given twice (keys are case-insensitive)")
            seen.add(key.lower())
            merged[key] = "" if value is None else format_value(key, value)
    lines = [f"# {line}" for line in (header or "MOQUI parameters written by mqi_communicator").splitlines()]
    lines += [f"{key} {value}" for key, value in merged.items() if value != ""]
    return "\n".join(lines) + "\n"


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    return None


def parameter_problems(params: Mapping[str, object]) -> list[str]:
    """Everything wrong with a beam's parameters, one message per problem naming the key."""
    p = Parameters(
        {k: "" if v is None else (format_value(k, v) if not isinstance(v, str) else v) for k, v in params.items()}
    )
    problems = [f"missing required key {key}" for key in REQUIRED_KEYS if not p.get(key, "").strip()]
    if not (p.get("DicomDir", "").strip() or p.get("DicomPath", "").strip()):
        problems.append("missing required key DicomDir (or DicomPath)")
    gpu = _as_int(p.get("GPUID"))
    if "GPUID" in p and (gpu is None or gpu < 0):
        problems.append(f"GPUID must be an integer >= 0, got {p['GPUID']!r}")
    gantry = _as_int(p.get("GantryNum"))
    if "GantryNum" in p and gantry not in (1, 2):
        problems.append(
            f"GantryNum must be 1 or 2 (MOQUI silently turns any other value into 2), got {p['GantryNum']!r}"
        )
    beam = _as_int(p.get("BeamNumbers"))
    if "BeamNumbers" in p and (beam is None or beam < 1):
        problems.append(f"BeamNumbers must be one integer >= 1 (the DICOM BeamNumber), got {p['BeamNumbers']!r}")
    if "OutputFormat" in p and p["OutputFormat"].strip().lower() != "raw":
        problems.append(f"OutputFormat must be raw (the pipeline reads raw dose), got {p['OutputFormat']!r}")
    for key in BOOLEAN_KEYS:
        if key in p and p[key] not in ("true", "false"):
            problems.append(f"{key} must be true or false (lower case), got {p[key]!r}")
    if "LogFileSelection" in p and p["LogFileSelection"] not in SELECTIONS:
        problems.append(f"LogFileSelection must be one of {', '.join(SELECTIONS)}, got {p['LogFileSelection']!r}")
    if "DoseScaleFactor" in p:
        try:
            factor = float(p["DoseScaleFactor"])
        except ValueError:
            factor = float("nan")
        if not factor > 0 or factor == float("inf"):
            problems.append(f"DoseScaleFactor must be a number > 0, got {p['DoseScaleFactor']!r}")
    return problems


def validate_parameters(params: Mapping[str, object], source: str = "parameters") -> None:
    """Raise ValueError listing every problem (each naming its key); return quietly when fine."""
    problems = parameter_problems(params)
    if problems:
        raise InputError(f"{source}: " + "; ".join(problems))


def _beam_folder_name(beam_csv_dir: Path, beam_name: str | None) -> str:
    name = sanitize_beam_name(beam_name) if beam_name is not None else beam_csv_dir.name
    if not SANITIZED_NAME.match(name):
        raise InputError(f"{beam_csv_dir}: folder name {name!r} is not a sanitized beam name ([A-Za-z0-9_-])")
    return name


def _link_or_copy_files(source: Path, target: Path) -> None:
    target.mkdir()
    for entry in sorted(source.iterdir()):
        if not entry.is_file():
            raise InputError(f"{entry}: the beam's CSV folder must hold files only")
        try:
            os.link(entry, target / entry.name)
        except OSError:
            shutil.copy2(entry, target / entry.name)


def prepare_beam_logdir(
    beam_csv_dir: Path, beam_number: int, dest: Path, selection: str, beam_name: str | None = None
) -> Path:
    """Make `dest` the `logFilePath` of one beam run; returns the beam's folder inside it.

    "index": BeamNumber - 1 empty padding folders (named `+padding_<i>`, which sort before any
    sanitized beam name) and the beam's folder, which therefore sits at exactly index
    BeamNumber - 1 of the string-sorted entries. "name": only the beam's folder. The folder is
    named by the sanitized beam name (`beam_name`, or `beam_csv_dir`'s own name).

    The beam's folder is a real directory whose files are hard links to the CSVs (a copy where
    hard links are impossible, e.g. across file systems), not a symlink: every way of listing
    a directory (readdir d_type included) sees a directory, staging over SFTP or rsync copies
    plain files, and no extra disk space is used. Re-running replaces `dest` as a whole (built
    beside it, then swapped in), so it also picks up rewritten CSVs.
    """
    if selection not in SELECTIONS:
        raise InputError(f"log folder selection {selection!r}; expected one of {', '.join(SELECTIONS)}")
    if beam_number < 1:
        raise InputError(f"BeamNumber {beam_number}: must be >= 1")
    source = Path(beam_csv_dir)
    if not source.is_dir():
        raise InputError(f"{source}: beam CSV folder does not exist")
    dest = Path(dest)
    if dest.resolve() == source.resolve() or dest.resolve() in source.resolve().parents:
        raise InputError(f"{dest}: the prepared log folder must not contain the beam's CSV folder {source}")
    name = _beam_folder_name(source, beam_name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = dest.with_name(f".{dest.name}.build-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    for leftover in (build, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    build.mkdir()
    if selection == "index":
        width = len(str(beam_number))
        for i in range(beam_number - 1):
            (build / f"{PADDING_PREFIX}{i:0{width}d}").mkdir()
    _link_or_copy_files(source, build / name)
    if dest.exists() or dest.is_symlink():
        dest.rename(old)
    build.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return dest / name


def _sorted_entries(folder: Path) -> list[Path]:
    """Entries sorted as the fork sorts them: full path strings, byte-wise."""
    return sorted(folder.iterdir(), key=lambda p: os.fsencode(str(p)))


def select_beam_logdir(log_file_path: Path, beam_number: int, beam_name: str, selection: str) -> Path:
    """The CSV folder the engine reads for a beam: what the SMC fork does ("index": the sorted
    entry at BeamNumber - 1) or a by-name build ("name": the sanitized beam name)."""
    folder = Path(log_file_path)
    if not folder.is_dir():
        raise InputError(f"logFilePath {folder}: not a directory")
    if selection == "index":
        entries = _sorted_entries(folder)
        if not 1 <= beam_number <= len(entries):
            raise InputError(
                f"logFilePath {folder}: BeamNumbers {beam_number} selects sorted entry index {beam_number - 1}, "
                f"but the folder has {len(entries)} entries (the engine picks by index, not by name; "
                "prepare the folder with moqui_input.prepare_beam_logdir)"
            )
        chosen = entries[beam_number - 1]
    elif selection == "name":
        chosen = folder / sanitize_beam_name(beam_name)
        if not chosen.exists():
            raise InputError(f"logFilePath {folder}: no folder {chosen.name!r} for beam {beam_name!r}")
    else:
        raise InputError(f"LogFileSelection {selection!r}; expected one of {', '.join(SELECTIONS)}")
    if not chosen.is_dir():
        raise InputError(f"logFilePath {folder}: selected entry {chosen.name!r} is not a directory")
    return chosen
