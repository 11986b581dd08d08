"""Which deliveries make one fraction, and a layer logged in two deliveries read as one log.

The grouping rule (docs/fractions.md): per treatment beam, deliveries in irradiation-time order
(the 16-digit folder names); a delivery continues the beam's current fraction when it resumes
where that fraction stopped, at the next layer (START_LAYER_NUMBER = last + 1) or inside the
interrupted layer itself (START_LAYER_NUMBER = last: the partial layer is logged in both
deliveries, and its log is the union of both); anything else, a restart at layer 1 above all,
starts the beam's next fraction. The case's fraction n is every beam's n-th fraction, however far
apart in time they were delivered (beams 1-2 in the evening, beam 3 after midnight), so no date
or time gap ever splits or joins fractions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mqi_communicator.errors import CaseError
from mqi_communicator.formats import ptn

if TYPE_CHECKING:
    # Types only: P2 uses layer_parts, and reading plans (pydicom) costs its start-up ~0.1 s.
    from mqi_communicator.formats.plan import Plan
    from mqi_communicator.intake.delivery_folders import Delivery


def continues(fraction_last_layer: int, start_layer: int, layer_count: int) -> bool:
    """Whether a delivery starting at `start_layer` resumes a fraction whose last delivered layer
    is `fraction_last_layer`. A beam of one layer cannot tell a resumption inside its only layer
    from the next fraction (both start at layer 1): it is taken as the next fraction."""
    return start_layer == fraction_last_layer + 1 or (start_layer == fraction_last_layer and layer_count > 1)


def fractions_of(deliveries: Sequence[Delivery], layer_count: int) -> list[list[Delivery]]:
    """One beam's deliveries (in time order) grouped into fractions (see the module's rule)."""
    fractions: list[list[Delivery]] = []
    for delivery in deliveries:
        if fractions and continues(fractions[-1][-1].stop_layer, delivery.start_layer, layer_count):
            fractions[-1].append(delivery)
        else:
            fractions.append([delivery])
    return fractions


def in_time_order(deliveries: Iterable[Delivery]) -> list[Delivery]:
    return sorted(deliveries, key=lambda d: (d.irradiation_time or "", d.folder))


@dataclass
class CaseFraction:
    """The case's fraction `number`: per treatment beam number, its deliveries (maybe none yet)."""

    number: int
    beams: dict[int, list[Delivery]] = field(default_factory=dict)
    layer_counts: dict[int, int] = field(default_factory=dict)

    def missing(self) -> dict[int, list[int]]:
        """Per beam, the plan layers this fraction has not delivered (empty when complete)."""
        gaps: dict[int, list[int]] = {}
        for beam, deliveries in self.beams.items():
            covered = {k for d in deliveries for k in range(d.start_layer, d.stop_layer + 1)}
            absent = [k for k in range(1, self.layer_counts[beam] + 1) if k not in covered]
            if absent:
                gaps[beam] = absent
        return gaps

    @property
    def complete(self) -> bool:
        return not self.missing()

    @property
    def folders(self) -> list[str]:
        return sorted(d.folder for deliveries in self.beams.values() for d in deliveries)


def case_fractions(plan: Plan, deliveries: Iterable[Delivery]) -> list[CaseFraction]:
    """The case's fractions 1..n: fraction n holds each treatment beam's n-th fraction."""
    per_beam = {
        beam.number: fractions_of(
            in_time_order(d for d in deliveries if d.beam_number == beam.number), len(beam.layers)
        )
        for beam in plan.treatment_beams
    }
    count = max((len(f) for f in per_beam.values()), default=0)
    return [
        CaseFraction(
            number=n + 1,
            beams={beam: (groups[n] if n < len(groups) else []) for beam, groups in per_beam.items()},
            layer_counts={beam.number: len(beam.layers) for beam in plan.treatment_beams},
        )
        for n in range(count)
    ]


@dataclass(frozen=True)
class LayerPart:
    """One delivery's log of a layer: the folder (relative to the case), the PTN file, its
    DOSE1_RANGE code, the manifest's entry for the file and for its delivery."""

    folder: str
    file: str
    range_code: int
    entry: Mapping[str, Any]
    delivery: Mapping[str, Any]


def layer_parts(deliveries: Iterable[Mapping[str, Any]]) -> dict[int, list[LayerPart]]:
    """Per plan layer, its logs in delivery order, from manifest delivery entries (`folder`,
    `start_layer`, `dose1_range_codes`, `ptn` with `file` and `layer`). A layer interrupted and
    resumed has two parts."""
    parts: dict[int, list[LayerPart]] = {}
    for delivery in deliveries:
        for entry in delivery["ptn"]:
            layer = int(entry["layer"])
            code = int(delivery["dose1_range_codes"][layer - int(delivery["start_layer"])])
            parts.setdefault(layer, []).append(LayerPart(delivery["folder"], entry["file"], code, entry, delivery))
    return dict(sorted(parts.items()))


def union_log(case_dir: Path, layer: int, parts: Sequence[LayerPart]) -> tuple[np.ndarray, int]:
    """The layer's log rows, every part's rows in delivery order (what the monitor counted adds
    up), and its DOSE1_RANGE code. Parts logged with different monitor ranges cannot be summed
    count by count: that is an error naming the files."""
    codes = sorted({part.range_code for part in parts})
    if len(codes) > 1:
        names = ", ".join(f"{p.folder}/{p.file} (DOSE1_RANGE {p.range_code})" for p in parts)
        raise CaseError(
            case_dir / parts[0].folder,
            f"layer {layer} was resumed with another monitor range ({names}): its logs cannot be summed",
        )
    rows = [ptn.read_ptn(case_dir / part.folder / part.file) for part in parts]
    return (rows[0] if len(rows) == 1 else np.concatenate(rows)), codes[0]


def log_problems(
    case_dir: Path, plan: Plan, beam_number: int, deliveries: Sequence[Delivery], config: dict[str, Any]
) -> list[str]:
    """Implausible layer logs of one beam's fraction (ptn.layer_problems, log_checks), each layer
    judged on its whole log: a resumed layer on the union of its parts."""
    beam = plan.beam(beam_number)
    assert beam is not None
    calibration = ptn.RoomCalibration.from_config(config["rooms"][plan.room])
    problems = []
    for number, parts in layer_parts(asdict(d) for d in deliveries).items():
        rows, code = union_log(case_dir, number, parts)
        layer = beam.layers[number - 1]
        found = ptn.layer_problems(
            rows,
            calibration,
            config["monitor_range_factors"][code - 1],
            # Without BeamMeterset the plan's MU are unknown (0: not compared), the logs' are not.
            layer.mu if beam.mu_known else 0.0,
            layer.spot_xy_mm,
            config["log_checks"],
            energy_mev=layer.energy_mev,
        )
        where = " + ".join(str(case_dir / p.folder / p.file) for p in parts)
        problems += [
            f"{where}: layer {number} ({layer.energy_mev:g} MeV) of beam {beam.number} ({beam.name!r}): {p}"
            for p in found
        ]
    return problems
