"""Plan shapes with beam modifiers: rewrite a plan written by casegen (or a test's own writer)
in place with pydicom, adding what PS3.3 C.8.8.25/C.8.8.26 says a modifier looks like.

A range shifter is a RangeShifterSequence item (RangeShifterNumber, RangeShifterID,
AccessoryCode, RangeShifterType ANALOG|BINARY) with NumberOfRangeShifters counting them, and its
settings in the first control point's RangeShifterSettingsSequence (ReferencedRangeShifterNumber,
RangeShifterSetting, IsocenterToRangeShifterDistance, RangeShifterWaterEquivalentThickness).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset


def _edit_beam(plan_path: Path, beam_number: int, edit: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(plan_path)
    beams = [b for b in ds.IonBeamSequence if int(b.BeamNumber) == beam_number]
    assert len(beams) == 1, f"{plan_path}: no single beam {beam_number}"
    edit(beams[0])
    ds.save_as(plan_path, enforce_file_format=True)


def add_range_shifter(
    plan_path: Path,
    beam_number: int,
    *,
    shifter_id: str = "RS30",
    wet_mm: float | None = 30.0,
    isocenter_distance_mm: float | None = 300.0,
    setting: str = "IN",
    number: int = 1,
) -> None:
    """Add one range shifter to the beam; wet_mm / isocenter_distance_mm None leave the
    (Type 3) attribute out, as some exports do."""

    def edit(beam: Dataset) -> None:
        item = Dataset()
        item.RangeShifterNumber = number
        item.RangeShifterID = shifter_id
        item.AccessoryCode = f"AC-{shifter_id}"
        item.RangeShifterType = "BINARY"
        beam.RangeShifterSequence = [*beam.get("RangeShifterSequence", []), item]
        beam.NumberOfRangeShifters = len(beam.RangeShifterSequence)
        settings = Dataset()
        settings.RangeShifterSetting = setting
        settings.ReferencedRangeShifterNumber = number
        if isocenter_distance_mm is not None:
            settings.IsocenterToRangeShifterDistance = isocenter_distance_mm
        if wet_mm is not None:
            settings.RangeShifterWaterEquivalentThickness = wet_mm
        first = beam.IonControlPointSequence[0]
        first.RangeShifterSettingsSequence = [*first.get("RangeShifterSettingsSequence", []), settings]

    _edit_beam(plan_path, beam_number, edit)


def change_range_shifter_at(plan_path: Path, beam_number: int, control_point: int, wet_mm: float) -> None:
    """Repeat the first shifter's settings at a later control point with another WET."""

    def edit(beam: Dataset) -> None:
        first = beam.IonControlPointSequence[0].RangeShifterSettingsSequence[0]
        changed = Dataset()
        changed.RangeShifterSetting = first.RangeShifterSetting
        changed.ReferencedRangeShifterNumber = first.ReferencedRangeShifterNumber
        changed.IsocenterToRangeShifterDistance = first.IsocenterToRangeShifterDistance
        changed.RangeShifterWaterEquivalentThickness = wet_mm
        beam.IonControlPointSequence[control_point].RangeShifterSettingsSequence = [changed]

    _edit_beam(plan_path, beam_number, edit)


def add_block(plan_path: Path, beam_number: int, name: str = "APERTURE1") -> None:
    """An aperture block (IonBlockSequence, NumberOfBlocks)."""

    def edit(beam: Dataset) -> None:
        block = Dataset()
        block.BlockNumber = 1
        block.BlockName = name
        block.BlockType = "APERTURE"
        block.BlockDivergence = "ABSENT"
        block.MaterialID = "BRASS"
        block.BlockThickness = 65.0
        block.IsocenterToBlockTrayDistance = 250.0
        block.BlockNumberOfPoints = 4
        block.BlockData = [-30.0, -30.0, 30.0, -30.0, 30.0, 30.0, -30.0, 30.0]
        beam.IonBlockSequence = [block]
        beam.NumberOfBlocks = 1

    _edit_beam(plan_path, beam_number, edit)


def add_lateral_spreading_device(plan_path: Path, beam_number: int, device_type: str, device_id: str) -> None:
    """A LateralSpreadingDeviceSequence item of the given type (MAGNET or SCATTERER)."""

    def edit(beam: Dataset) -> None:
        device = Dataset()
        device.LateralSpreadingDeviceNumber = len(beam.get("LateralSpreadingDeviceSequence", [])) + 1
        device.LateralSpreadingDeviceID = device_id
        device.LateralSpreadingDeviceType = device_type
        beam.LateralSpreadingDeviceSequence = [*beam.get("LateralSpreadingDeviceSequence", []), device]
        beam.NumberOfLateralSpreadingDevices = len(beam.LateralSpreadingDeviceSequence)

    _edit_beam(plan_path, beam_number, edit)
