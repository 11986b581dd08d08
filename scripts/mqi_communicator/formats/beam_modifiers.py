"""Beam modifiers an RT Ion Plan declares (PS3.3 C.8.8.25 Ion Beams, C.8.8.26 control points):
range shifters with their settings, and every other modifier by name (docs/beam-modifiers.md).

A range shifter is modelled by the built-in engine from its settings in the first control point
(RangeShifterWaterEquivalentThickness, IsocenterToRangeShifterDistance); real MOQUI reads the
same plan itself. Blocks, compensators, range modulators, boli and scattering lateral
spreading devices are named so that the case is refused, never silently computed without them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from mqi_communicator.errors import InputError

# (count attribute, sequence, what a person calls it); PS3.3 C.8.8.25.
OTHER_MODIFIERS = (
    ("NumberOfBlocks", "IonBlockSequence", "block"),
    ("NumberOfCompensators", "IonRangeCompensatorSequence", "range compensator"),
    ("NumberOfRangeModulators", "RangeModulatorSequence", "range modulator"),
    ("NumberOfBoli", "ReferencedBolusSequence", "bolus"),
)
# LateralSpreadingDeviceType MAGNET is a scanning beam's own magnet (some exports declare it);
# only a SCATTERER is a modifier in the beam's path.
SCATTERER = "SCATTERER"


@dataclass(frozen=True)
class RangeShifter:
    """One item of RangeShifterSequence with its settings from the first control point."""

    number: int
    shifter_id: str
    accessory_code: str
    shifter_type: str  # ANALOG or BINARY
    setting: str  # RangeShifterSetting: machine specific; OUT is taken as out of the beam
    isocenter_distance_mm: float | None  # to the shifter's downstream face
    wet_mm: float | None  # RangeShifterWaterEquivalentThickness

    @property
    def name(self) -> str:
        return self.shifter_id or f"#{self.number}"

    @property
    def inserted(self) -> bool:
        return self.setting.strip().upper() != "OUT"

    def summary(self) -> str:
        if not self.inserted:
            return f"range shifter {self.name}: setting OUT, not in the beam"
        wet = "no WET" if self.wet_mm is None else f"WET {self.wet_mm:g} mm"
        where = "no distance" if self.isocenter_distance_mm is None else f"{self.isocenter_distance_mm:g} mm"
        return f"range shifter {self.name} ({self.shifter_type or 'type ?'}): {wet}, at {where} from the isocentre"


def _number(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    return None if value is None or value == "" else float(value)  # type: ignore[arg-type]


def _settings(cp: Dataset) -> dict[int | None, tuple[str, float | None, float | None]]:
    return {
        _number(s.get("ReferencedRangeShifterNumber")): (
            str(s.get("RangeShifterSetting", "")),
            _float(s.get("IsocenterToRangeShifterDistance")),
            _float(s.get("RangeShifterWaterEquivalentThickness")),
        )
        for s in cp.get("RangeShifterSettingsSequence", [])
    }


def read_range_shifters(beam: Dataset) -> list[RangeShifter]:
    """The beam's range shifters; ValueError for a declaration the plan does not keep. Settings
    are in the first control point and repeated only where they change (PS3.3 C.8.8.26): a
    change inside the beam is not something either engine is told, so it is refused."""
    label = f"beam {beam.get('BeamNumber')} ({beam.get('BeamName', '')!r})"
    items = list(beam.get("RangeShifterSequence", []))
    declared = _number(beam.get("NumberOfRangeShifters")) or 0
    if declared != len(items):
        raise InputError(f"{label}: NumberOfRangeShifters is {declared} but RangeShifterSequence holds {len(items)}")
    cps = list(beam.get("IonControlPointSequence", []))
    first = _settings(cps[0]) if cps else {}
    for cp in cps[1:]:
        for number, values in _settings(cp).items():
            if number in first and values != first[number]:
                raise InputError(
                    f"{label}: range shifter {number} settings change at control point "
                    f"{cp.get('ControlPointIndex')}; only settings fixed for the whole beam are supported"
                )
    shifters = []
    for item in items:
        number = _number(item.get("RangeShifterNumber"))
        if number is None:
            raise InputError(f"{label}: a RangeShifterSequence item has no RangeShifterNumber")
        setting, distance, wet = first.get(number, ("", None, None))
        shifters.append(
            RangeShifter(
                number=number,
                shifter_id=str(item.get("RangeShifterID", "")).strip(),
                accessory_code=str(item.get("AccessoryCode", "")).strip(),
                shifter_type=str(item.get("RangeShifterType", "")).strip().upper(),
                setting=setting,
                isocenter_distance_mm=distance,
                wet_mm=wet,
            )
        )
    return shifters


def other_modifiers(beam: Dataset) -> list[str]:
    """Every modifier other than a range shifter the beam declares, named for a person."""
    found = []
    for count_key, sequence_key, what in OTHER_MODIFIERS:
        items = list(beam.get(sequence_key, []))
        count = max(_number(beam.get(count_key)) or 0, len(items))
        if count:
            ids = [str(i.get("BlockName") or i.get("CompensatorID") or i.get("RangeModulatorID") or "") for i in items]
            named = ", ".join(repr(i) for i in ids if i)
            found.append(f"{count} {what}(s) ({count_key} {count}{'; ' + named if named else ''})")
    for item in beam.get("LateralSpreadingDeviceSequence", []):
        if str(item.get("LateralSpreadingDeviceType", "")).strip().upper() == SCATTERER:
            found.append(
                f"lateral spreading device {str(item.get('LateralSpreadingDeviceID', '')).strip()!r} (SCATTERER)"
            )
    return found


def builtin_engine_problems(modifiers: list[str], shifters: list[RangeShifter]) -> list[str]:
    """Why the built-in engine cannot compute this beam faithfully (empty: it can)."""
    problems = [f"{m} in the beam: beam modifiers other than range shifters are not modelled" for m in modifiers]
    for s in shifters:
        if not s.inserted:
            continue
        missing = [
            key
            for key, value in (
                ("RangeShifterWaterEquivalentThickness (300A,0366)", s.wet_mm),
                ("IsocenterToRangeShifterDistance (300A,0364)", s.isocenter_distance_mm),
            )
            if value is None
        ]
        if missing:
            problems.append(f"range shifter {s.name} has no {' and no '.join(missing)}: it cannot be modelled")
        elif s.wet_mm is not None and s.wet_mm < 0:
            problems.append(f"range shifter {s.name}: negative water-equivalent thickness {s.wet_mm:g} mm")
    return problems


def shifters_in_beam(shifters: list[RangeShifter]) -> list[tuple[float, float]]:
    """(WET mm, isocentre distance mm) of each inserted shifter, as the engine's physics takes them."""
    return [
        (s.wet_mm, s.isocenter_distance_mm)
        for s in shifters
        if s.inserted and s.wet_mm is not None and s.isocenter_distance_mm is not None
    ]


def shifter_labels(shifters: list[RangeShifter], builtin: bool) -> list[str]:
    """The case labels that say a range shifter shaped the dose (shown wherever the result is)."""
    how = "modelled" if builtin else "modelled by MOQUI"
    return [
        f"RANGE SHIFTER {s.name} {s.wet_mm:g} mm {how}" if s.wet_mm is not None else f"RANGE SHIFTER {s.name} {how}"
        for s in shifters
        if s.inserted
    ]
