"""Realistic synthetic cases: an RT Ion Plan (setup beam + treatment beams) and delivery folders
with PlanInfo.txt, PlanRange.txt and PTN logs as the Sumitomo machine writes them, beam-off
samples included. Used by the tests, the benchmarks and to make the bundled sample cases.

    python -m tests.casegen --out sample_cases --sample
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mqi_communicator.formats import ptn
from mqi_communicator.formats.plan import RT_ION_PLAN_SOP_CLASS
from tests.plan_shapes_geometry import first_control_point_geometry

RT_STRUCTURE_SET_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# Virtual source-axis distances (mm, x then y) of the scanning magnets, as the clinic's G2 plan
# declares them (tests/data/reference/RP_G2_9spots_phantom.dcm).
VIRTUAL_SOURCE_AXIS_MM = (2597.0, 2223.0)

# The clinic's room calibrations (docs/design.md#ptn-log), used to turn positions and MU into raw values,
# with the log<->plan frame of docs/log-plan-frame.md: G2 logs x mirrored, and the MU per count
# grows with energy (MOQUI's machine tables, factor 1 at 70 MeV).
G1_MU_FACTOR = (
    (70, 76, 84, 92, 100, 106, 112, 118, 126, 134, 142, 146, 150, 154, 158,
     162, 170, 174, 178, 182, 186, 190, 198, 202, 206, 214, 218, 222, 226, 230),
    (1.0, 1.065790, 1.157943, 1.241156, 1.322954, 1.395086, 1.458739, 1.513004, 1.588552, 1.662067,
     1.740579, 1.780360, 1.814340, 1.848969, 1.878348, 1.911310, 1.971904, 2.003357, 2.028110, 2.058108,
     2.082444, 2.108758, 2.168636, 2.204804, 2.229880, 2.308058, 2.342323, 2.381755, 2.447586, 2.511319),
)  # fmt: skip
G2_MU_FACTOR = (
    (70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190, 200, 210, 220, 230),
    (1.0, 1.102074, 1.210096, 1.304516, 1.394865, 1.496286, 1.581836, 1.671167, 1.75764, 1.834841,
     1.903617, 1.959624, 2.030313, 2.112479, 2.203953, 2.29313, 2.377892),
)  # fmt: skip
ROOMS = {
    "G1": ptn.RoomCalibration(0.0600745, 16384, 16384, 0.010959, 0.0116412, 2.1125e-8, 1.0, *G1_MU_FACTOR),
    "G2": ptn.RoomCalibration(0.06, 24580, 32772, 0.0072600, 0.0071411, 2.12e-8, -1.0, *G2_MU_FACTOR),
}
RANGE_FACTORS = (0.3404, 1.0, 2.978723404255319, 8.936170212765957, 26.80851063829787)
# Where the machine parks the beam between spots, in the log's own frame (reference data).
PARKED_LOG_MM = (295.0, -233.0)


@dataclass
class BeamSpec:
    number: int
    name: str
    energies_mev: Sequence[float]
    spots_xy_mm: Sequence[Sequence[tuple[float, float]]]  # per layer
    spot_mu: float = 0.02
    gantry_angle: float = 0.0
    setup: bool = False


@dataclass
class CaseSpec:
    patient_id: str = "PSEUDO001"
    room: str = "G2"
    machine: str | None = None
    beams: list[BeamSpec] = field(default_factory=list)
    isocenter_mm: tuple[float, float, float] = (0.0, 30.0, 0.0)
    # SpecificCharacterSet of the plan (e.g. "ISO_IR 192" for Hangul names); None: ASCII only.
    character_set: str | list[str] | None = None


def grid_spots(half_width_mm: float, step_mm: float) -> list[tuple[float, float]]:
    """A serpentine spot grid like a line-scanning layer."""
    coords = np.arange(-half_width_mm, half_width_mm + 1e-9, step_mm)
    spots = []
    for row, y in enumerate(coords):
        xs = coords if row % 2 == 0 else coords[::-1]
        spots.extend((float(x), float(y)) for x in xs)
    return spots


def standard_case(
    patient_id: str = "PSEUDO001", room: str = "G2", layers: int = 4, half_width_mm: float = 20.0
) -> CaseSpec:
    """Setup beam 1 plus two treatment beams (one with ':' in its name), a few layers each."""
    spots = [grid_spots(half_width_mm - 2 * k, 10.0) for k in range(layers)]
    return CaseSpec(
        patient_id=patient_id,
        room=room,
        beams=[
            BeamSpec(1, "SETUP", [], [], setup=True),
            BeamSpec(2, "1G180:TX", [150.0 - 5 * k for k in range(layers)], spots, gantry_angle=180.0),
            BeamSpec(3, "2G90", [140.0 - 5 * k for k in range(layers)], spots, gantry_angle=90.0),
        ],
    )


def _float32_bytes(values: Sequence[float]) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def write_plan(path: Path, spec: CaseSpec, private_tags: bool = True) -> Dataset:
    """Write an RT Ion Plan with standard ScanSpot tags (and the SHI private mirror tags)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_ION_PLAN_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if spec.character_set is not None:
        ds.SpecificCharacterSet = spec.character_set
    ds.SOPClassUID = RT_ION_PLAN_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTPLAN"
    ds.PatientName = f"{spec.patient_id}^SYNTHETIC"
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.StudyDate = ds.RTPlanDate = "20261101"
    ds.StudyTime = ds.RTPlanTime = "120000"
    ds.StudyID = "1"
    # Type 2 (present, may be empty) in General Study, RT Series and Frame of Reference (PS3.3).
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.OperatorsName = ""
    ds.PositionReferenceIndicator = ""
    ds.SeriesNumber = 1
    ds.RTPlanLabel = "SYNTH"
    ds.RTPlanGeometry = "PATIENT"
    # Type 1C with a PATIENT geometry: the structure set the plan was made on. None is shipped
    # (nothing reads it); the reference names one as the clinic's exported plans do.
    structure_set = Dataset()
    structure_set.ReferencedSOPClassUID = RT_STRUCTURE_SET_SOP_CLASS
    structure_set.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=["structure set", ds.StudyInstanceUID])
    ds.ReferencedStructureSetSequence = DicomSequence([structure_set])
    ds.Manufacturer = "mqi_communicator test generator"
    machine = spec.machine or spec.room
    setup_item = Dataset()
    setup_item.PatientPosition = "HFS"
    setup_item.PatientSetupNumber = 1
    ds.PatientSetupSequence = DicomSequence([setup_item])
    fraction = Dataset()
    fraction.FractionGroupNumber = 1
    fraction.NumberOfFractionsPlanned = 1
    fraction.NumberOfBeams = len(spec.beams)
    fraction.NumberOfBrachyApplicationSetups = 0
    refs = []
    beams = []
    for beam_spec in spec.beams:
        total_mu = sum(beam_spec.spot_mu * len(layer) for layer in beam_spec.spots_xy_mm)
        ref = Dataset()
        ref.ReferencedBeamNumber = beam_spec.number
        ref.BeamMeterset = round(total_mu, 6)
        refs.append(ref)
        beams.append(_beam(beam_spec, machine, spec.isocenter_mm, private_tags, total_mu))
    fraction.ReferencedBeamSequence = DicomSequence(refs)
    ds.FractionGroupSequence = DicomSequence([fraction])
    ds.IonBeamSequence = DicomSequence(beams)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _beam(
    spec: BeamSpec, machine: str, iso: tuple[float, float, float], private_tags: bool, total_mu: float
) -> Dataset:
    beam = Dataset()
    beam.BeamNumber = spec.number
    beam.BeamName = spec.name
    beam.BeamDescription = "Site Setup" if spec.setup else spec.name
    beam.TreatmentMachineName = machine
    beam.BeamType = "STATIC"
    beam.RadiationType = "PROTON"
    beam.ScanMode = "NONE" if spec.setup else "MODULATED"  # spots, as the logs deliver them
    beam.TreatmentDeliveryType = "SETUP" if spec.setup else "TREATMENT"
    if not spec.setup:
        # Type 1C for MODULATED: each spot is delivered with the beam held at its position.
        beam.ModulatedScanModeType = "STATIONARY"
    beam.PrimaryDosimeterUnit = "MU"
    # Type 1 in the RT Ion Beams Module: no beam modifier of any kind (0 declares "none").
    beam.NumberOfWedges = 0
    beam.NumberOfCompensators = 0
    beam.NumberOfBoli = 0
    beam.NumberOfBlocks = 0
    beam.NumberOfRangeShifters = 0
    beam.NumberOfLateralSpreadingDevices = 0
    beam.NumberOfRangeModulators = 0
    beam.VirtualSourceAxisDistances = list(VIRTUAL_SOURCE_AXIS_MM)
    beam.PatientSupportType = "TABLE"
    beam.ReferencedPatientSetupNumber = 1  # write_plan's only patient setup (HFS)
    cps = []
    cumulative = 0.0
    layers = [(0.0, [])] if spec.setup else list(zip(spec.energies_mev, spec.spots_xy_mm, strict=True))
    for energy, spots in layers:
        for second in (False, True):
            cp = Dataset()
            cp.ControlPointIndex = len(cps)
            cp.NominalBeamEnergy = energy if not spec.setup else 100.0
            cp.CumulativeMetersetWeight = round(cumulative, 6)
            if not spec.setup:
                positions = [c for xy in spots for c in xy]
                weights = [0.0 if second else spec.spot_mu] * len(spots)
                cp.NumberOfScanSpotPositions = len(spots)
                cp.ScanSpotTuneID = "3.0"
                cp.ScanSpotPositionMap = positions
                cp.ScanSpotMetersetWeights = weights
                cp.NumberOfPaintings = 1  # Type 1C for MODULATED: no repainting planned
                if private_tags:
                    cp.add_new((0x300B, 0x0010), "LO", "IMPAC")
                    cp.add_new((0x300B, 0x1094), "OB", _float32_bytes(positions))
                    cp.add_new((0x300B, 0x1096), "OB", _float32_bytes(weights))
                if not second:
                    cumulative += spec.spot_mu * len(spots)
            if len(cps) == 0:  # Type 1C/2C: written in the first control point only
                first_control_point_geometry(cp, spec.gantry_angle, iso)
            cps.append(cp)
    # The second control point of each pair carries the layer's cumulative weight.
    for index in range(1, len(cps), 2):
        cps[index].CumulativeMetersetWeight = round(
            float(cps[index + 1].CumulativeMetersetWeight) if index + 1 < len(cps) else cumulative, 6
        )
    beam.NumberOfControlPoints = len(cps)
    beam.FinalCumulativeMetersetWeight = round(cumulative, 6)
    beam.IonControlPointSequence = DicomSequence(cps)
    return beam


def layer_log(
    spots: Sequence[tuple[float, float]],
    spot_mu: float | Sequence[float],
    calibration: ptn.RoomCalibration,
    range_code: int,
    samples_per_spot: int,
    off_samples: int,
    rng: np.random.Generator,
    *,
    energy_mev: float,
    repaint: int = 1,
) -> np.ndarray:
    """PTN rows for one layer: parked beam-off samples, then each spot's beam-on samples (with
    position jitter) separated by beam-off transit samples; dose1 sums to the spot's MU (one MU
    per spot, or one each). Positions are plan-frame mm, written in the log's frame."""
    rows: list[np.ndarray] = []

    def raw_xy(x_mm: float, y_mm: float, n: int, jitter: float) -> tuple[np.ndarray, np.ndarray]:
        x = np.rint(calibration.raw_x(np.full(n, x_mm)) + rng.normal(0, jitter, n))
        y = np.rint(calibration.raw_y(np.full(n, y_mm)) + rng.normal(0, jitter, n))
        return np.clip(x, 0, 65535), np.clip(y, 0, 65535)

    def block(x: np.ndarray, y: np.ndarray, dose1: np.ndarray, on: bool) -> np.ndarray:
        n = len(x)
        out = np.zeros((n, 8), dtype=np.int64)
        out[:, 0], out[:, 1] = x, y
        out[:, 2] = out[:, 3] = 1200
        out[:, 4] = dose1
        out[:, 5] = np.rint(dose1 * 0.98)
        out[:, 7] = (ptn.FLAG_PLANNED_BEAM_ON | ptn.FLAG_ACTUAL_BEAM_ON | repaint) if on else 0
        return out

    parked_x = np.full(
        off_samples, np.clip(round(calibration.x_offset + PARKED_LOG_MM[0] / calibration.x_gain_mm), 0, 65535)
    )
    parked_y = np.full(
        off_samples, np.clip(round(calibration.y_offset + PARKED_LOG_MM[1] / calibration.y_gain_mm), 0, 65535)
    )
    rows.append(block(parked_x, parked_y, rng.integers(0, 3, off_samples), on=False))
    mu_per_count = calibration.mu_per_count(energy_mev) * RANGE_FACTORS[range_code - 1]
    spot_mus = np.broadcast_to(np.asarray(spot_mu, dtype=np.float64), (len(spots),))
    for (sx, sy), mu in zip(spots, spot_mus, strict=True):
        x, y = raw_xy(sx, sy, samples_per_spot, 3.0)
        per_sample = rng.multinomial(round(mu / mu_per_count), np.full(samples_per_spot, 1.0 / samples_per_spot))
        if per_sample.max() > 65535:
            raise ValueError("dose1 overflow: raise samples_per_spot or the range code")
        rows.append(block(x, y, per_sample, on=True))
        x, y = raw_xy(sx, sy, 3, 1.0)
        rows.append(block(x, y, np.zeros(3, dtype=np.int64), on=False))
    return np.concatenate(rows)


def write_delivery(
    case_dir: Path,
    spec: CaseSpec,
    beam_number: int,
    irradiation_time: str,
    *,
    start_layer: int = 1,
    stop_layer: int | None = None,
    range_codes: Sequence[int] | None = None,
    samples_per_spot: int = 40,
    off_samples: int = 200,
    seed: int = 0,
    mu_scale: float = 1.0,
    partial_layers: dict[int, tuple[Sequence[tuple[float, float]], Sequence[float]]] | None = None,
) -> Path:
    """One delivery folder (16-digit irradiation time) for layers start..stop of a beam, every
    spot's MU times `mu_scale`; `partial_layers` gives a layer's (spots, MU per spot) as the
    machine logged them when the layer was interrupted or resumed (`write_interrupted`)."""
    beam = next(b for b in spec.beams if b.number == beam_number)
    stop = len(beam.energies_mev) if stop_layer is None else stop_layer
    codes = list(range_codes) if range_codes is not None else [2] * len(beam.energies_mev)
    calibration = ROOMS[spec.room]
    folder = case_dir / irradiation_time
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "PlanInfo.txt").write_text(
        f"DICOM_PATIENT_ID,{spec.patient_id}\nDICOM_BEAM_NUMBER,{beam_number}\n"
        f"START_LAYER_NUMBER,{start_layer}\nSTOP_LAYER_NUMBER,{stop}\nTREATMENT_ROOM,{spec.room}\n"
    )
    lines = ["LAYER_NUMBER,ENERGY,DOSE1_RANGE,DOSE2_RANGE"]
    lines += [
        f"{k},{beam.energies_mev[k - 1]:.2f},{codes[k - 1]},{codes[k - 1]}"
        for k in range(1, len(beam.energies_mev) + 1)
    ]
    (folder / "PlanRange.txt").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(seed + 1000 * beam_number + start_layer)
    for k in range(start_layer, stop + 1):
        spots, mus = (partial_layers or {}).get(
            k, (beam.spots_xy_mm[k - 1], [beam.spot_mu] * len(beam.spots_xy_mm[k - 1]))
        )
        log = layer_log(
            spots,
            [m * mu_scale for m in mus],
            calibration,
            codes[k - 1],
            samples_per_spot,
            off_samples,
            rng,
            energy_mev=beam.energies_mev[k - 1],
        )
        ptn.write_ptn(folder / f"{irradiation_time}_{k:03d}.ptn", log)
        (folder / f"{irradiation_time}_{k:03d}.mgn").write_bytes(b"\x00" * 32)  # planned pattern, ignored
    return folder


def write_interrupted(
    case_dir: Path,
    spec: CaseSpec,
    beam_number: int,
    times: tuple[str, str],
    layer: int,
    spot: int,
    share: float,
    **options: object,
) -> tuple[Path, Path]:
    """A beam's delivery interrupted inside `layer` and resumed at that layer, as the machine logs
    it: the first delivery (layers 1..layer) stops after `share` of spot `spot`'s MU (spots before
    it complete); the resumed delivery (PlanInfo START_LAYER_NUMBER = layer) logs the rest of that
    spot, unless share is 1, then the remaining spots of the layer, then the later layers."""
    beam = next(b for b in spec.beams if b.number == beam_number)
    spots, mu = list(beam.spots_xy_mm[layer - 1]), beam.spot_mu
    first = (spots[: spot + 1], [mu] * spot + [mu * share])
    rest = spot + 1 if share >= 1.0 else spot
    second = (spots[rest:], ([] if share >= 1.0 else [mu * (1.0 - share)]) + [mu] * (len(spots) - spot - 1))
    interrupted = write_delivery(
        case_dir,
        spec,
        beam_number,
        times[0],
        stop_layer=layer,
        partial_layers={layer: first},
        **options,  # type: ignore[arg-type]
    )
    resumed = write_delivery(
        case_dir,
        spec,
        beam_number,
        times[1],
        start_layer=layer,
        partial_layers={layer: second},
        **options,  # type: ignore[arg-type]
    )
    return interrupted, resumed


def write_case(
    root: Path,
    case_id: str,
    spec: CaseSpec | None = None,
    *,
    deliveries: bool = True,
    reversed_order: bool = False,
    ready: bool = True,
    plan_subfolder: bool = False,
    plan_mode: bool | None = None,
    **delivery_options: object,
) -> Path:
    """A whole case folder: plan, one delivery per treatment beam, and the ready marker.
    A case without deliveries declares plan mode (_PLAN_MODE) unless plan_mode is False."""
    spec = spec or standard_case()
    case_dir = root / case_id
    if case_dir.exists():
        shutil.rmtree(case_dir)
    plan_dir = case_dir / spec.patient_id / "1.2.3.4" if plan_subfolder else case_dir
    write_plan(plan_dir / f"RP.{case_id}.dcm", spec)
    if deliveries:
        treatment = [b for b in spec.beams if not b.setup]
        base = datetime.datetime(2026, 11, 2, 9, 0, 0)
        for order, beam in enumerate(treatment):
            # Reversed: the later beam number gets the earlier irradiation time.
            slot = len(treatment) - 1 - order if reversed_order else order
            stamp = (base + datetime.timedelta(minutes=5 * slot)).strftime("%Y%m%d%H%M%S") + "00"
            write_delivery(case_dir, spec, beam.number, stamp, **delivery_options)  # type: ignore[arg-type]
    if not deliveries if plan_mode is None else plan_mode:
        (case_dir / "_PLAN_MODE").write_text("")
    if ready:
        (case_dir / "_CASE_READY").write_text("")
    return case_dir


def write_samples(out: Path) -> list[Path]:
    """The bundled sample cases: two log-based cases (G2 and G1) and one plan-based case."""
    g2 = standard_case("PSEUDO001", "G2")
    g1 = standard_case("PSEUDO002", "G1")
    plan_only = standard_case("PSEUDO003", "G2", layers=3)
    return [
        write_case(out, "case001_G2", g2),
        write_case(out, "case002_G1", g1, reversed_order=True, plan_subfolder=True),
        write_case(out, "case003_plan_only", plan_only, deliveries=False),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic MOQUI cases (plan + PTN delivery logs).")
    parser.add_argument("--out", type=Path, required=True, help="scan directory to write cases into")
    parser.add_argument("--sample", action="store_true", help="write the bundled sample cases")
    parser.add_argument("--case-id", default="case001")
    args = parser.parse_args(argv)
    written = write_samples(args.out) if args.sample else [write_case(args.out, args.case_id)]
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
