"""Plan shapes of ion beams that are not spot scanned (PS3.3 C.8.8.25 ScanMode NONE: passive
scattering; UNIFORM: uniform scanning): a plan written by tests/casegen.py rewritten in place,
each treatment beam's ScanMode changed and its spot arrays (standard and SHI private) removed, as
such a beam's control points hold none."""

from __future__ import annotations

from pathlib import Path

import pydicom

from mqi_communicator.formats.plan_check import PRIVATE_SPOT_POSITIONS, PRIVATE_SPOT_WEIGHTS, is_setup_beam

SPOT_ATTRIBUTES = (
    "NumberOfScanSpotPositions",
    "ScanSpotTuneID",
    "ScanSpotPositionMap",
    "ScanSpotMetersetWeights",
    "NumberOfPaintings",
)


def without_spot_scanning(path: Path, scan_mode: str) -> None:
    ds = pydicom.dcmread(path)
    for beam in ds.IonBeamSequence:
        if is_setup_beam(beam):
            continue
        beam.ScanMode = scan_mode
        if "ModulatedScanModeType" in beam:  # Type 1C only for MODULATED
            del beam.ModulatedScanModeType
        for cp in beam.IonControlPointSequence:
            for keyword in SPOT_ATTRIBUTES:
                if keyword in cp:
                    delattr(cp, keyword)
            for tag in (PRIVATE_SPOT_POSITIONS, PRIVATE_SPOT_WEIGHTS, (0x300B, 0x0010)):
                if tag in cp:
                    del cp[tag]
    ds.save_as(path, enforce_file_format=True)
