"""RT Ion Plan reading: beams, room, energy layers and spots (standard and SHI private tags)."""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from mqi_communicator import cli
from mqi_communicator.errors import CaseError, InputError
from mqi_communicator.formats.beam_modifiers import RangeShifter, other_modifiers, read_range_shifters
from mqi_communicator.formats.plan_check import (
    PRIVATE_SPOT_POSITIONS,
    PRIVATE_SPOT_WEIGHTS,
    beam_meterset,
    float32_array,
    is_setup_beam,
    plan_problems,
)

RT_ION_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.8"
ROOM_PATTERN = re.compile(r"G[^0-9]*([12])(?![0-9])")
# What pydicom raises on a damaged or cut file: zlib.error where a Deflated Explicit VR Little
# Endian data set (PS3.5 A.5) ends before its deflate stream does (docs/encodings.md).
READ_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    BytesLengthException,
    struct.error,
    zlib.error,
)


@dataclass
class Layer:
    """One energy layer: a run of consecutive control points with equal NominalBeamEnergy."""

    energy_mev: float
    mu: float
    spot_xy_mm: list[tuple[float, float]] = field(default_factory=list)
    spot_mu: list[float] = field(default_factory=list)
    # ScanMode LINE only: the planned path as segments (x0, y0, x1, y1, MU), in delivery order.
    line_segments: list[tuple[float, float, float, float, float]] = field(default_factory=list)


@dataclass
class Beam:
    number: int
    name: str
    description: str
    machine: str
    delivery_type: str
    is_setup: bool
    gantry_angle: float
    isocenter_mm: tuple[float, float, float]
    snout_position_mm: float | None
    range_shifters: int
    layers: list[Layer]
    scan_mode: str = "MODULATED"  # PS3.3 C.8.8.25 ScanMode (300A,0308): MODULATED, LINE, ...
    # False when no fraction group gives the beam's BeamMeterset (Type 3): its layers' `mu` and
    # `spot_mu` are then relative meterset weights, not MU (docs/plan-support.md).
    mu_known: bool = True
    shifters: list[RangeShifter] = field(default_factory=list)  # docs/beam-modifiers.md
    modifiers: list[str] = field(default_factory=list)  # any other modifier declared, named

    @property
    def sanitized_name(self) -> str:
        return sanitize_beam_name(self.name)


@dataclass
class Plan:
    path: Path
    sop_instance_uid: str
    patient_id: str
    room: str  # "G1" or "G2"
    beams: list[Beam]
    warnings: list[str] = field(default_factory=list)

    @property
    def treatment_beams(self) -> list[Beam]:
        return [b for b in self.beams if not b.is_setup]

    @property
    def beams_without_mu(self) -> list[Beam]:
        """Treatment beams whose MU the plan does not give (no BeamMeterset)."""
        return [b for b in self.treatment_beams if not b.mu_known]

    def beam(self, number: int) -> Beam | None:
        return next((b for b in self.beams if b.number == number), None)


def sanitize_beam_name(name: str) -> str:
    """The folder and file name of a beam: ASCII letters, digits, `_` and `-` kept, any other
    ASCII character `_` (mqi_interpreter's and MOQUI's folder name: `1G180:TX` -> `1G180_TX`),
    and any other character its code point as `u` + at least four upper-case hex digits (`좌측 빔`
    -> `uC88CuCE21_uBE54`), so that names in Hangul or with accents stay distinct and the same
    on every run (docs/encodings.md)."""
    return "".join((c if c.isalnum() or c in "_-" else "_") if c.isascii() else f"u{ord(c):04X}" for c in name)


def room_of_machine(machine_name: str) -> str | None:
    match = ROOM_PATTERN.search(machine_name or "")
    return f"G{match.group(1)}" if match else None


def _plan_header(path: Path) -> tuple[str | None, str, bool]:
    """(Modality, SOPClassUID, has the DICOM file meta header) from the header only; (None, "",
    False) for anything not DICOM. A file without the meta header (PS3.10 7.1: preamble, "DICM",
    group 0002) is read again as a bare data set, only to say what it is: real exporters write
    such files (pymedphys's CMS photon plan, tests/test_real_plans.py)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
        has_meta = True
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"], force=True)
        except (*READ_ERRORS, AttributeError, TypeError):
            return None, "", False
        has_meta = False
    except (*READ_ERRORS, AttributeError, TypeError):
        return None, "", False
    return ds.get("Modality"), str(ds.get("SOPClassUID", "")), has_meta


def find_plan(case_dir: Path) -> Path:
    """The case's single RT Ion Plan, at the top or one/two levels down, found by Modality."""
    candidates: list[Path] = []
    rtplans_other: list[Path] = []
    without_meta: list[Path] = []  # RT Ion Plans without the DICOM file meta header
    for path in sorted(case_dir.rglob("*")):
        depth = len(path.relative_to(case_dir).parts)
        if depth > 3 or not path.is_file() or path.suffix.lower() not in (".dcm", ""):
            continue
        if path.suffix == "" and not path.name.upper().startswith("RP"):
            continue
        modality, sop_class, has_meta = _plan_header(path)
        if modality != "RTPLAN":
            continue
        if sop_class != RT_ION_PLAN_SOP_CLASS:
            rtplans_other.append(path)
        else:
            (candidates if has_meta else without_meta).append(path)
    if not candidates:
        if without_meta:
            raise CaseError(
                without_meta[0],
                "an RT Ion Plan without the DICOM file meta information (PS3.10: 128-byte preamble, 'DICM', "
                "group 0002): export the plan as a DICOM Part 10 file",
            )
        if rtplans_other:
            raise CaseError(rtplans_other[0], "RTPLAN is not an RT Ion Plan (wrong SOP class)")
        raise CaseError(case_dir, "no RT Ion Plan (Modality RTPLAN, SOP class RT Ion Plan) found")
    if len(candidates) > 1:
        names = ", ".join(str(p.relative_to(case_dir)) for p in candidates)
        raise CaseError(case_dir, f"more than one RT Ion Plan found: {names}")
    return candidates[0]


def _control_point_spots(cp: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Spot positions (N, 2) and weights (N,) of one control point, standard tags first."""
    if "ScanSpotPositionMap" in cp and "ScanSpotMetersetWeights" in cp:
        positions = np.asarray(cp.ScanSpotPositionMap, dtype=np.float64)
        weights = np.asarray(
            cp.ScanSpotMetersetWeights
            if isinstance(cp.ScanSpotMetersetWeights, list | tuple | pydicom.multival.MultiValue)
            else [cp.ScanSpotMetersetWeights],
            dtype=np.float64,
        )
    elif PRIVATE_SPOT_POSITIONS in cp and PRIVATE_SPOT_WEIGHTS in cp:
        positions = float32_array(cp[PRIVATE_SPOT_POSITIONS])
        weights = float32_array(cp[PRIVATE_SPOT_WEIGHTS])
    else:
        return np.empty((0, 2)), np.empty(0)
    if positions.size != 2 * weights.size:
        raise InputError(
            f"control point {cp.get('ControlPointIndex')}: {positions.size} spot coordinates for {weights.size} weights"
        )
    return positions.reshape(-1, 2), weights


def _layers(beam: Dataset, meterset: float | None) -> list[Layer]:
    cps = list(beam.get("IonControlPointSequence", []))
    if not cps:
        return []
    final = float(beam.get("FinalCumulativeMetersetWeight") or 0) or None
    # Meterset weights are relative; scale to MU when the fraction group gives the beam's MU.
    mu_per_weight = meterset / final if meterset and final else 1.0
    layers: list[Layer] = []
    energy: float | None = None
    start_weight = 0.0
    for cp in cps:
        cp_energy = float(cp.NominalBeamEnergy) if "NominalBeamEnergy" in cp else energy
        if cp_energy is None:
            raise InputError(f"beam {beam.BeamNumber}: first control point has no NominalBeamEnergy")
        weight = float(cp.get("CumulativeMetersetWeight") or 0.0)
        if energy is None or cp_energy != energy:
            layers.append(Layer(energy_mev=cp_energy, mu=0.0))
            energy = cp_energy
            start_weight = weight
        layer = layers[-1]
        layer.mu = (weight - start_weight) * mu_per_weight
        positions, weights = _control_point_spots(cp)
        for (x, y), w in zip(positions, weights, strict=True):
            if w > 0:
                layer.spot_xy_mm.append((float(x), float(y)))
                layer.spot_mu.append(float(w) * mu_per_weight)
        if str(beam.get("ScanMode", "")).upper() == "LINE":
            layer.line_segments += _line_segments(positions, weights * mu_per_weight)
    return layers


def _line_segments(positions: np.ndarray, mu: np.ndarray) -> list[tuple[float, float, float, float, float]]:
    """A LINE control point's path: position j is reached from position j-1 delivering weight j
    (weight 0 is delivered standing at position 0); the machine's checker reads it the same way,
    position linear in cumulative MU between positions (docs/delivery-check.md)."""
    segments = []
    for j, w in enumerate(mu):
        if w > 0:
            (x0, y0), (x1, y1) = positions[max(j - 1, 0)], positions[j]
            segments.append((float(x0), float(y0), float(x1), float(y1), float(w)))
    return segments


def _parsed_size(ds: Dataset, path: Path) -> tuple[int, str]:
    """The size of the byte stream pydicom parsed the data set from, and what it is called: the
    file, or for a deflated data set (PS3.5 A.5) the inflated bytes after the file meta, where
    pydicom's element positions then point (docs/encodings.md)."""
    size = path.stat().st_size
    if ds.file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return size, "the file"
    # The deflated part starts after the preamble, "DICM" and the meta group, whose (0002,0000)
    # element (12 bytes in explicit VR) gives the length of the rest (PS3.10 7.1).
    start = 128 + 4 + 12 + int(ds.file_meta.get("FileMetaInformationGroupLength") or 0)
    with path.open("rb") as handle:
        handle.seek(start)
        return len(zlib.decompress(handle.read(), -zlib.MAX_WBITS)), "the inflated data set"


def _last_element_problem(ds: Dataset, path: Path) -> str | None:
    """Why the bytes do not end where the last element does, or None. pydicom reads without
    complaint a defined-length element cut short (e.g. a trailing ReferencedStructureSetSequence)
    and stops at fewer than 8 bytes left, the start of the next element's header cut off."""
    if not len(ds):
        return None
    last = ds.get_item(list(ds.keys())[-1])
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return None
    size, stream = _parsed_size(ds, path)
    if tell + length > size:
        return f"its last element ({last.tag}) needs {tell + length} bytes but {stream} has {size}"
    if tell + length < size:
        return f"{stream} has {size - tell - length} byte(s) after its last element ({last.tag}), no whole element"
    return None


def read_plan(path: Path) -> Plan:
    """Parse an RT Ion Plan; raises CaseError naming the file for anything unusable."""
    try:
        ds = pydicom.dcmread(path)
        short = _last_element_problem(ds, path)  # before decoding: it needs the raw element
        # Sequences decode lazily: decode them all now, so that a file cut short inside one
        # fails here, naming the file, and not later in whatever first touches it.
        for _ in ds.iterall():
            pass
    except READ_ERRORS as exc:
        raise CaseError(path, f"cannot read DICOM (cut short or damaged?): {exc}") from exc
    if short:
        raise CaseError(path, f"cannot read DICOM (cut short or damaged?): {short}")
    if str(ds.get("SOPClassUID", "")) != RT_ION_PLAN_SOP_CLASS:
        raise CaseError(path, f"not an RT Ion Plan (SOP class {ds.get('SOPClassUID')})")
    check = plan_problems(ds)
    errors, warnings = check.errors, check.warnings
    if check.unsupported:
        raise CaseError(
            path, "the plan uses what is not supported:\n" + "\n".join(f"    {u}" for u in check.unsupported)
        )
    if errors:
        raise CaseError(
            path,
            "the plan contradicts its own declarations (a truncated or damaged file?):\n"
            + "\n".join(f"    {e}" for e in errors),
        )
    beams: list[Beam] = []
    rooms: set[str] = set()
    for beam in ds.get("IonBeamSequence", []):
        machine = str(beam.get("TreatmentMachineName", ""))
        setup = is_setup_beam(beam)
        meterset = beam_meterset(ds, int(beam.BeamNumber))
        try:
            layers = [] if setup else _layers(beam, meterset)
            shifters = [] if setup else read_range_shifters(beam)
        except ValueError as exc:
            raise CaseError(path, str(exc)) from exc
        if not setup:
            room = room_of_machine(machine)
            if room is None:
                raise CaseError(
                    path,
                    f"beam {beam.BeamNumber}: unknown room in TreatmentMachineName {machine!r} (expected G1 or G2)",
                )
            rooms.add(room)
        first_cp = beam.IonControlPointSequence[0] if beam.get("IonControlPointSequence") else Dataset()
        iso = first_cp.get("IsocenterPosition") or [0.0, 0.0, 0.0]
        snout = first_cp.get("SnoutPosition")
        beams.append(
            Beam(
                number=int(beam.BeamNumber),
                name=str(beam.get("BeamName", f"Beam{beam.BeamNumber}")),
                description=str(beam.get("BeamDescription", "")),
                machine=machine,
                delivery_type=str(beam.get("TreatmentDeliveryType", "")),
                is_setup=setup,
                gantry_angle=float(first_cp.get("GantryAngle") or 0.0),
                isocenter_mm=(float(iso[0]), float(iso[1]), float(iso[2])),
                snout_position_mm=None if snout is None else float(snout),
                range_shifters=int(beam.get("NumberOfRangeShifters") or 0),
                layers=layers,
                scan_mode=str(beam.get("ScanMode", "MODULATED")).upper(),
                mu_known=meterset is not None or int(beam.BeamNumber) in check.weights_as_mu,
                shifters=shifters,
                modifiers=[] if setup else other_modifiers(beam),
            )
        )
    if not any(not b.is_setup for b in beams):
        raise CaseError(path, "plan has no treatment beam")
    if len(rooms) > 1:
        raise CaseError(path, f"mixed rooms in one plan: {', '.join(sorted(rooms))}")
    return Plan(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        patient_id=str(ds.get("PatientID", "")),
        room=rooms.pop(),
        beams=beams,
        warnings=warnings,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.formats.plan",
        description="Summarize an RT Ion Plan as JSON (beams, layers, spots).",
    )
    parser.add_argument("plan", type=Path, help="RT Ion Plan file or a case folder holding one")
    return cli.run(parser, _summarize, argv, step="formats.plan", label="PLAN")


def _summarize(args: argparse.Namespace) -> int:
    path = find_plan(args.plan) if args.plan.is_dir() else args.plan
    plan = read_plan(path)
    summary = asdict(plan)
    summary["path"] = str(plan.path)
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
