"""Plan shapes other systems write (issue 19), made by rewriting a plan written by
casegen.write_plan / write_case with pydicom and saving it in place.

The shapes follow PS3.3 C.8.8.13 (RT Fraction Scheme), not our samples' habits: Eclipse, RayStation
and MOSAIQ reference only the treatment beams in the fraction group (NumberOfBeams counts those),
BeamMeterset is Type 3, and a plan may hold several fraction groups (a sequential boost)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from mqi_communicator.formats.plan_check import PRIVATE_SPOT_WEIGHTS, float32_array, is_setup_beam


def plan_of(case_dir: Path) -> Path:
    """The RP*.dcm that casegen.write_case put at the top of the case folder."""
    return next(case_dir.glob("RP*.dcm"))


def _setup_numbers(ds: Dataset) -> set[int]:
    return {int(b.BeamNumber) for b in ds.IonBeamSequence if is_setup_beam(b)}


def setup_beam_unreferenced(path: Path) -> None:
    """The Eclipse/RayStation shape: the setup beam stays in IonBeamSequence, the fraction group
    references the treatment beams only and NumberOfBeams counts them."""
    ds = pydicom.dcmread(path)
    setup = _setup_numbers(ds)
    for group in ds.FractionGroupSequence:
        refs = [r for r in group.ReferencedBeamSequence if int(r.ReferencedBeamNumber) not in setup]
        group.ReferencedBeamSequence = DicomSequence(refs)
        group.NumberOfBeams = len(refs)
    ds.save_as(path)


def without_beam_meterset(path: Path) -> None:
    """BeamMeterset (Type 3) left out of every ReferencedBeamSequence item."""
    ds = pydicom.dcmread(path)
    for group in ds.FractionGroupSequence:
        for ref in group.ReferencedBeamSequence:
            if "BeamMeterset" in ref:
                del ref.BeamMeterset
    ds.save_as(path)


def without_fraction_scheme(path: Path) -> None:
    """No FractionGroupSequence at all (the RT Fraction Scheme module is U in the RT Ion Plan IOD)."""
    ds = pydicom.dcmread(path)
    del ds.FractionGroupSequence
    ds.save_as(path)


def two_fraction_groups(path: Path, fractions: tuple[int, int] = (25, 5)) -> dict[int, int]:
    """A sequential boost: group 1 delivers the first treatment beam, group 2 the others, each
    with its own NumberOfFractionsPlanned, NumberOfBeams and BeamMeterset; the setup beam is in
    neither. Returns {beam number: its fraction group number}."""
    ds = pydicom.dcmread(path)
    setup = _setup_numbers(ds)
    first = ds.FractionGroupSequence[0]
    refs = [r for r in first.ReferencedBeamSequence if int(r.ReferencedBeamNumber) not in setup]
    groups = []
    for number, (mine, planned) in enumerate(zip((refs[:1], refs[1:]), fractions, strict=True), start=1):
        group = Dataset()
        group.FractionGroupNumber = number
        group.NumberOfFractionsPlanned = planned
        group.NumberOfBeams = len(mine)
        group.NumberOfBrachyApplicationSetups = 0
        group.ReferencedBeamSequence = DicomSequence(mine)
        groups.append(group)
    ds.FractionGroupSequence = DicomSequence(groups)
    ds.save_as(path)
    return {int(r.ReferencedBeamNumber): g.FractionGroupNumber for g in groups for r in g.ReferencedBeamSequence}


def beam_in_two_groups(path: Path, beam_number: int, other_meterset: float) -> None:
    """A second fraction group that delivers `beam_number` again (a boost reusing a beam) with
    `other_meterset` MU."""
    ds = pydicom.dcmread(path)
    ref = Dataset()
    ref.ReferencedBeamNumber = beam_number
    ref.BeamMeterset = other_meterset
    group = Dataset()
    group.FractionGroupNumber = len(ds.FractionGroupSequence) + 1
    group.NumberOfFractionsPlanned = 3
    group.NumberOfBeams = 1
    group.NumberOfBrachyApplicationSetups = 0
    group.ReferencedBeamSequence = DicomSequence([ref])
    ds.FractionGroupSequence.append(group)
    ds.save_as(path)


def treatment_beam_lost(path: Path, beam_number: int) -> None:
    """IonBeamSequence loses a treatment beam whole; everything else (the fraction group) stays."""
    ds = pydicom.dcmread(path)
    ds.IonBeamSequence = DicomSequence([b for b in ds.IonBeamSequence if int(b.BeamNumber) != beam_number])
    ds.save_as(path)


def cut(path: Path, fraction: float) -> None:
    """The file cut short after `fraction` of its bytes, as an interrupted transfer leaves it."""
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def weights_normalised(path: Path) -> None:
    """Meterset weights on a scale of 1 per beam (FinalCumulativeMetersetWeight 1, as Eclipse
    writes them) instead of casegen's MU: only BeamMeterset then says the MU."""
    ds = pydicom.dcmread(path)
    for beam in ds.IonBeamSequence:
        final = float(beam.get("FinalCumulativeMetersetWeight") or 0)
        if not final:
            continue
        beam.FinalCumulativeMetersetWeight = 1.0
        for cp in beam.IonControlPointSequence:
            cp.CumulativeMetersetWeight = float(cp.CumulativeMetersetWeight) / final
            if "ScanSpotMetersetWeights" in cp:
                cp.ScanSpotMetersetWeights = [float(w) / final for w in cp.ScanSpotMetersetWeights]
            if PRIVATE_SPOT_WEIGHTS in cp:
                scaled = (float32_array(cp[PRIVATE_SPOT_WEIGHTS]) / final).astype("<f4")
                cp[PRIVATE_SPOT_WEIGHTS].value = scaled.tobytes()
    ds.save_as(path)
