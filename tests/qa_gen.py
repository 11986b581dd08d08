"""Independent TPS doses for QA tests and the sample cases (no pipeline code is used).

A tiny "TPS": each spot of the plan (read here with pydicom from the control points) is a 2-D
Gaussian of its own beam model (sigma by energy and room), weighted by the spot's MU and the
stopping power (the clinic's MU counts protons); the plane lies in the beam frame of
docs/qa.md (MOQUI x -> x, MOQUI y -> z, the plane through the isocentre, y = iso_y), in the water
phantom's own frame of reference. Written as RT Dose with pydicom directly: a coronal plane, or
an axial volume whose row at iso_y is the plane.

Run `python -m tests.qa_gen sample_cases` to (re)write the sample cases' TPS doses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"
# Patient (Type 2) and General Study (Type 1 and 2) attributes the dose takes from its plan.
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
    "FrameOfReferenceUID",
)
# Gy per MU (per cm^2 of a 1-spot layer-equivalent) at 150 MeV in the entrance plateau. The
# clinic's MU counts protons: a real log gives the planned MU as count x 2.12e-8 x f(E), f being
# MOQUI's protons-per-count table (docs/log-plan-frame.md), so protons per MU do not depend on
# energy, and the entrance dose per MU follows the stopping power, ~ E^-0.77 (Bragg-Kleeman).
GY_PER_MU_150 = 0.01
# The "TPS beam model": in-air sigma at the isocentre (mm) per room, by energy (MeV).
SIGMA_MODEL = {
    "G1": ((70.0, 150.0, 230.0), (10.5, 5.8, 3.7)),
    "G2": ((70.0, 150.0, 230.0), (8.5, 4.5, 2.8)),
}


def plan_spots(plan: Dataset, beam_number: int) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(energy, positions (n, 2) mm, MU (n,)) per layer of a beam, from its control points."""
    beam = next(b for b in plan.IonBeamSequence if int(b.BeamNumber) == beam_number)
    meterset = next(
        float(r.BeamMeterset)
        for r in plan.FractionGroupSequence[0].ReferencedBeamSequence
        if int(r.ReferencedBeamNumber) == beam_number
    )
    total_weight = float(beam.FinalCumulativeMetersetWeight)
    layers = []
    for cp in beam.IonControlPointSequence:
        weights = np.atleast_1d(np.asarray(cp.get("ScanSpotMetersetWeights", []), dtype=float))
        if not weights.size or weights.sum() <= 0:
            continue
        xy = np.asarray(cp.ScanSpotPositionMap, dtype=float).reshape(-1, 2)
        layers.append((float(cp.NominalBeamEnergy), xy, weights * meterset / total_weight))
    return layers


def tps_plane(
    layers: Sequence[tuple[float, np.ndarray, np.ndarray]],
    room: str,
    x_mm: np.ndarray,
    z_mm: np.ndarray,
    *,
    shift_layer: tuple[int, float, float] | None = None,
    mu_scale: float = 1.0,
) -> np.ndarray:
    """Dose (Gy) on z rows x x columns relative to the isocentre; optional perturbations
    (one layer's spots shifted by (dx, dz) mm, all MU scaled) make a 'delivered' plane."""
    energies, sigmas = SIGMA_MODEL[room]
    dose = np.zeros((z_mm.size, x_mm.size))
    for index, (energy, xy, mu) in enumerate(layers):
        sigma = float(np.interp(energy, energies, sigmas))
        stopping = (150.0 / energy) ** 0.77
        for (sx, sz), w in zip(xy, mu, strict=True):
            if shift_layer is not None and shift_layer[0] == index:
                sx, sz = sx + shift_layer[1], sz + shift_layer[2]
            gx = np.exp(-((x_mm - sx) ** 2) / (2 * sigma**2))
            gz = np.exp(-((z_mm - sz) ** 2) / (2 * sigma**2))
            dose += np.outer(gz, gx) * (w * mu_scale * stopping * GY_PER_MU_150 * 100.0 / (2 * np.pi * sigma**2))
    return dose


def write_tps_dose(
    path: Path,
    plan: Dataset,
    plane: np.ndarray,
    x_mm: np.ndarray,
    z_mm: np.ndarray,
    *,
    beam_number: int | None,
    units: str = "GY",
    dose_type: str = "PHYSICAL",
    volume: bool = False,
    plan_uid: str | None = None,
    frame: str = "phantom",
    plane_y_mm: float | None = None,
) -> Path:
    """An RT Dose the way a TPS exports a beam's verification dose on the water phantom
    (docs/qa.md): coronal plane (or axial volume) in mm, x_mm/z_mm absolute coordinates; the plane
    sits at the plan isocentre's y (or `plane_y_mm`). `frame` "phantom" gives the dose the
    phantom's own frame of reference (as the export must); "plan" puts it in the plan's frame,
    as a dose computed on the patient's images would be."""
    iso = [float(v) for v in plan.IonBeamSequence[0].IonControlPointSequence[0].IsocenterPosition]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_DOSE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if "SpecificCharacterSet" in plan:  # the plan's names, in the plan's character set
        ds.SpecificCharacterSet = plan.SpecificCharacterSet
    ds.SOPClassUID = RT_DOSE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTDOSE"
    ds.Manufacturer = "IndependentTPS"
    for keyword in PATIENT_STUDY_KEYWORDS:  # Type 2 and above: copied, or present and empty
        setattr(ds, keyword, plan.get(keyword, ""))
    ds.PositionReferenceIndicator = ""  # Type 2 (Frame of Reference Module): no anatomical landmark
    if frame == "phantom":  # the same phantom frame for every beam of the plan
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["water phantom", str(plan.SOPInstanceUID)])
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 7
    ds.OperatorsName = ""  # Type 2 (RT Series Module)
    ds.InstanceNumber = 1  # Type 2 (General Image Module)
    ds.DoseUnits = units
    ds.DoseType = dose_type
    ds.DoseSummationType = "PLAN" if beam_number is None else "BEAM"
    ref = Dataset()
    ref.ReferencedSOPClassUID = RT_ION_PLAN
    ref.ReferencedSOPInstanceUID = plan_uid or plan.SOPInstanceUID
    if beam_number is not None:
        group = Dataset()
        group.ReferencedFractionGroupNumber = 1
        beam = Dataset()
        beam.ReferencedBeamNumber = beam_number
        group.ReferencedBeamSequence = DicomSequence([beam])
        ref.ReferencedFractionGroupSequence = DicomSequence([group])
    ds.ReferencedRTPlanSequence = DicomSequence([ref])
    dx, dz = float(x_mm[1] - x_mm[0]), float(z_mm[1] - z_mm[0])
    if volume:
        # Axial frames along z; rows along y: 5 rows 2 mm apart around iso_y, the dose rising
        # 1 %/mm with depth so only the row at iso_y (the middle one) equals the plane.
        ys = iso[1] + 2.0 * np.arange(-2, 3)
        data = np.stack([plane * (1 + 0.01 * (y - iso[1])) for y in ys], axis=0)  # (y, z, x)
        data = np.transpose(data, (1, 0, 2))  # (frames z, rows y, cols x)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = _ds([float(x_mm[0]), float(ys[0]), float(z_mm[0])])
        ds.PixelSpacing = _ds([2.0, dx])
        ds.SliceThickness = _ds([dz])[0]
        ds.NumberOfFrames = z_mm.size
        ds.FrameIncrementPointer = 0x3004000C
        ds.GridFrameOffsetVector = _ds([dz * k for k in range(z_mm.size)])
    else:
        data = plane[np.newaxis]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, 1]
        ds.ImagePositionPatient = _ds([float(x_mm[0]), iso[1] if plane_y_mm is None else plane_y_mm, float(z_mm[0])])
        ds.PixelSpacing = _ds([dz, dx])
        # A single frame: no Multi-frame Module, as GridFrameOffsetVector has VM 2-n (PS3.6)
        # and is required only with several frames (PS3.3 C.8.8.3.2); the plane's thickness
        # is not known to this "TPS" (Type 2: present, empty).
        ds.SliceThickness = None
    scaling = float(data.max()) / 65535 if data.max() > 0 else 1.0
    pixels = np.rint(data / scaling).astype("<u2")
    _, ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.DoseGridScaling = f"{scaling:.10g}"
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ds(values: Sequence[float]) -> list[str]:
    """Decimal strings of at most 16 characters (the DS VR, PS3.5): a plan's isocentre such as
    3.419002E-14 gives corners like -19.999999999999964 otherwise."""
    return [format_number_as_ds(float(v)) for v in values]


def tps_grid(
    plan: Dataset, half_width_mm: float = 80.0, step_mm: float = 2.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x relative, z relative, x absolute, z absolute) pixel centres of a TPS plane."""
    iso = [float(v) for v in plan.IonBeamSequence[0].IonControlPointSequence[0].IsocenterPosition]
    rel = np.arange(-half_width_mm, half_width_mm + 1e-9, step_mm)
    return rel, rel, rel + iso[0], rel + iso[2]


def write_case_tps_doses(case_dir: Path, room: str, **options: object) -> list[Path]:
    """One TPS RT Dose per treatment beam of the case's plan, named RD_TPS_<number>.dcm."""
    plan_path = next(
        p for p in sorted(case_dir.rglob("*.dcm")) if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTPLAN"
    )
    plan = pydicom.dcmread(plan_path)
    x_rel, z_rel, x_abs, z_abs = tps_grid(plan)
    written = []
    for beam in plan.IonBeamSequence:
        if beam.get("TreatmentDeliveryType") == "SETUP" or beam.BeamName == "SETUP":
            continue
        number = int(beam.BeamNumber)
        plane = tps_plane(plan_spots(plan, number), room, x_rel, z_rel)
        written.append(
            write_tps_dose(case_dir / f"RD_TPS_{number}.dcm", plan, plane, x_abs, z_abs, beam_number=number, **options)
        )  # type: ignore[arg-type]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write independent TPS doses into the sample cases.")
    parser.add_argument("scan_dir", type=Path)
    args = parser.parse_args(argv)
    for case_dir in sorted(p for p in args.scan_dir.iterdir() if p.is_dir()):
        room = "G1" if "G1" in case_dir.name else "G2"
        for path in write_case_tps_doses(case_dir, room):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
