"""Real RT Ion Plan exports (tests/data/real_plans/SOURCES.md) as test cases: the plan read by
hand with pydicom (without the package), a case folder holding it, and PTN delivery logs made
from its own spots and MU the way tests/casegen.py makes them (docs/real-plans.md)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from tests import casegen
from tests.conftest import REPO

REAL_PLANS = REPO / "tests" / "data" / "real_plans"
# File -> the TreatmentMachineName it was exported for (SOURCES.md).
EXPORTS = {
    "eclipse_qa_pattern_4fields.dcm": "TR3",
    "eclipse_mono_160MeV.dcm": "TR2",
    "raystation_ramp_2fields.dcm": "TR3",
}
CLINIC_ROOM = "G2"


@dataclass
class BeamByHand:
    """A treatment beam as pydicom gives it, without the package: its energy layers (runs of
    equal NominalBeamEnergy), each layer's spots with a weight > 0 and their MU."""

    number: int
    meterset: float
    layers: list[tuple[float, list[tuple[float, float]], list[float]]]


def beams_by_hand(path: Path) -> list[BeamByHand]:
    ds = pydicom.dcmread(path)
    metersets = {
        int(ref.ReferencedBeamNumber): float(ref.BeamMeterset)
        for group in ds.FractionGroupSequence
        for ref in group.ReferencedBeamSequence
    }
    beams = []
    for beam in ds.IonBeamSequence:
        mu_per_weight = metersets[int(beam.BeamNumber)] / float(beam.FinalCumulativeMetersetWeight)
        layers: list[tuple[float, list[tuple[float, float]], list[float]]] = []
        for cp in beam.IonControlPointSequence:
            energy = float(cp.get("NominalBeamEnergy", layers[-1][0] if layers else 0.0))
            if not layers or energy != layers[-1][0]:
                layers.append((energy, [], []))
            xy = np.asarray(cp.ScanSpotPositionMap, dtype=float).reshape(-1, 2)
            weights = np.atleast_1d(np.asarray(cp.ScanSpotMetersetWeights, dtype=float))
            for (x, y), w in zip(xy, weights, strict=True):
                if w > 0:
                    layers[-1][1].append((float(x), float(y)))
                    layers[-1][2].append(float(w) * mu_per_weight)
        beams.append(BeamByHand(int(beam.BeamNumber), metersets[int(beam.BeamNumber)], layers))
    return beams


def write_case(root: Path, plan: Path, *, plan_mode: bool, machine: str | None = None, case_id: str = "case") -> Path:
    """A case folder holding the plan as exported; with `machine`, the one edit made to it is
    every beam's TreatmentMachineName (the room is read from it)."""
    case = root / case_id
    case.mkdir(parents=True)
    copied = case / f"RP.{plan.stem}.dcm"
    shutil.copyfile(plan, copied)
    if machine is not None:
        ds = pydicom.dcmread(copied)
        for beam in ds.IonBeamSequence:
            beam.TreatmentMachineName = machine
        ds.save_as(copied)
    if plan_mode:
        (case / "_PLAN_MODE").write_text("")
    (case / "_CASE_READY").write_text("")
    return case


def write_logs(case: Path, plan: Path, room: str) -> list[BeamByHand]:
    """One delivery per treatment beam, every layer logged with the plan's own spots and MU, at
    the largest monitor range (the exports' spots carry up to 20 MU) with 600 samples a spot to
    stay within the logs' uint16 counts. Returns the beams as read by hand."""
    by_hand = beams_by_hand(plan)
    spec = casegen.CaseSpec(
        patient_id=str(pydicom.dcmread(plan).PatientID),
        room=room,
        beams=[
            casegen.BeamSpec(b.number, f"Field_{b.number}", [e for e, _, _ in b.layers], [s for _, s, _ in b.layers])
            for b in by_hand
        ],
    )
    for order, beam in enumerate(by_hand):
        casegen.write_delivery(
            case,
            spec,
            beam.number,
            f"202611020{order}000000",
            range_codes=[5] * len(beam.layers),
            samples_per_spot=600,
            partial_layers={k: (spots, mus) for k, (_, spots, mus) in enumerate(beam.layers, start=1)},
        )
    return by_hand
