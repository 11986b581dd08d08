"""P3: turn a MOQUI raw dose (plane or volume) into a DICOM RT Dose that references the plan.

Where the dose is placed (the beam or patient frame, a plane or a volume; see
`raw_dose.beam_axes`) and when a plan sum is allowed are decided in `dose_frame`; which frame of
reference it carries (a PHANTOM frame of its own in the beam frame) and its DoseSummationType
(one delivered session: BEAM_SESSION / FRACTION_SESSION) in `dose_reference` (see
docs/rtdose-frames.md); reading an RT Dose back is `rtdose_read`.

A single plane is a single-frame image: no Multi-frame Module (NumberOfFrames,
FrameIncrementPointer, GridFrameOffsetVector, whose VM is 2-n in PS3.6), so that dciodvfy
finds it conformant; a volume carries them (PS3.3 C.8.8.3.2).

Pixels are unsigned integers with DoseGridScaling = max / (2^n - 1). The default is n = 32
(uint32): the dose is kept to 2.3e-10 of its maximum, so the long low-dose tail of a Monte
Carlo dose (what a gamma low-dose threshold and profiles look at) is not quantized away, at the
price of files twice the size of uint16 (1/65535 of max, 7.6e-6 relative rounding), which is
available with `bits=16` / `--bits 16`. An all-zero dose is written with scaling 1.0.

Output file name (CLI, or `write_rtdose` given a directory): `RD_<sanitized beam name>.dcm`
for one beam (the name as `plan.sanitize_beam_name` makes it, `1G180:TX` -> `RD_1G180_TX.dcm`)
and `RD_PLAN.dcm` for the plan sum. Files are written to a temporary name in the target
folder and renamed into place.
"""

from __future__ import annotations

import argparse
import datetime
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NotRequired, TypedDict, Unpack

import numpy as np
import pydicom
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import format_number_as_ds

from mqi_communicator import __version__, cli
from mqi_communicator.errors import CaseError, InputError
from mqi_communicator.files import atomic_output
from mqi_communicator.formats import beam_geometry, dose_reference, raw_dose
from mqi_communicator.formats.dicom_output import copy_patient_study, new_instance
from mqi_communicator.formats.plan import Beam, Plan, read_plan, sanitize_beam_name
from mqi_communicator.rtdose.dose_frame import frame_comment, image_geometry, plan_sum_refusal_for

RT_DOSE_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.481.2")
MANUFACTURER = "mqi_communicator"
DEFAULT_ENGINE_LABEL = "MOQUI Monte Carlo"
PLAN_SUM_NAME = "PLAN"
PLAN_SUM_SERIES_NUMBER = 999
SUPPORTED_BITS = (16, 32)
GRID_FRAME_OFFSET_VECTOR_TAG = 0x3004000C
_LO_MAX = 64  # characters in a DICOM LO value
UTF8_CHARACTER_SET = "ISO_IR 192"  # PS3.3 C.12.1.1.2: Unicode in UTF-8, holds any text


def output_name(beam_name: str | None) -> str:
    """File name of the RT Dose of one beam (its plan name), or of the plan sum for None."""
    return f"RD_{PLAN_SUM_NAME if beam_name is None else sanitize_beam_name(beam_name)}.dcm"


def sum_doses(paths: Iterable[Path | str], grid: raw_dose.Grid) -> np.ndarray:
    """Sum raw dose files of one grid (e.g. all beams of a plan), in MOQUI raw order."""
    total: np.ndarray | None = None
    for path in paths:
        dose = raw_dose.read_raw(str(path), grid)
        total = dose.copy() if total is None else total + dose
    if total is None:
        raise InputError("no raw dose files to sum")
    return total


def _quantize(dose: np.ndarray, bits: int) -> tuple[np.ndarray, str]:
    """Unsigned pixels and DoseGridScaling = max / (2^n - 1) as stored (a DS of 16 characters).

    Pixels are computed from the stored scaling, rounded to nearest and capped at 2^n - 1, so
    pixel x DoseGridScaling reproduces the dose; an all-zero dose gets scaling 1.0.
    """
    top = 2**bits - 1
    peak = float(dose.max()) if dose.size else 0.0
    scaling_text = format_number_as_ds(peak / top) if peak > 0.0 else "1.0"
    pixels = np.clip(np.rint(dose / float(scaling_text)), 0, top)
    return pixels.astype(f"<u{bits // 8}"), scaling_text


def _check_dose(dose: np.ndarray, grid: raw_dose.Grid) -> np.ndarray:
    dose = np.asarray(dose, dtype=np.float64)
    if dose.shape != grid.shape:
        raise InputError(f"dose has shape {dose.shape}, expected {grid.shape} (nz, ny, nx) for this grid")
    if not np.all(np.isfinite(dose)):
        raise InputError("dose contains NaN or infinite values")
    if dose.size and float(dose.min()) < 0.0:
        raise InputError(f"dose contains negative values (min {float(dose.min()):g}); RT Dose pixels are unsigned")
    return dose


def _select_beam(plan: Plan, beam_number: int | None) -> Beam:
    """The beam a dose belongs to; for a plan sum the first treatment beam (for its isocentre)."""
    if beam_number is None:
        return plan.treatment_beams[0]
    beam = plan.beam(beam_number)
    if beam is None:
        numbers = ", ".join(str(b.number) for b in plan.beams)
        raise CaseError(plan.path, f"no beam number {beam_number} in the plan (beams: {numbers})")
    if beam.is_setup:
        raise CaseError(plan.path, f"beam {beam_number} ({beam.name}) is a setup beam and has no dose")
    return beam


def _lo(text: str) -> str:
    """Text for a 64-character LO element: whole, or cut at a word boundary and marked "..."."""
    if len(text) <= _LO_MAX:
        return text
    head = text[: _LO_MAX - 3]
    cut = head.rfind(" ")
    return (head[:cut] if cut > 0 else head).rstrip(" ,:;(") + "..."


def _encodable(text: str, character_set: object) -> bool:
    """Whether `text` encodes in a SpecificCharacterSet value (None: the default repertoire,
    ASCII) without pydicom's replacement characters."""
    if character_set is None:
        return text.isascii()
    values = [character_set] if isinstance(character_set, str) else list(character_set)  # type: ignore[call-overload]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns and writes '?' for what it cannot encode
        try:
            encode_string(text, convert_encodings(values))
        except (UserWarning, LookupError, UnicodeError):
            return False
    return True


def _character_set(plan_ds: Dataset, ds: Dataset) -> object:
    """The SpecificCharacterSet of our RT Dose: the plan's (its names then keep their bytes), or
    ISO_IR 192 where a text we composed does not fit it (docs/encodings.md)."""
    declared = plan_ds.get("SpecificCharacterSet")
    texts = [str(e.value) for e in ds.iterall() if e.VR in ("LO", "LT", "SH", "ST", "UT", "PN") and e.value]
    return declared if all(_encodable(t, declared) for t in texts) else UTF8_CHARACTER_SET


class RtDoseOptions(TypedDict):
    """The keyword arguments of `build_rtdose`, which `write_rtdose` hands on (their defaults and
    meaning are `build_rtdose`'s)."""

    beam_number: int | None
    engine_label: str
    calibrated: bool
    dose_scale: NotRequired[float]
    bits: NotRequired[int]
    frame: NotRequired[str]


def build_rtdose(
    dose: np.ndarray,
    grid: raw_dose.Grid,
    plan_path: Path,
    *,
    beam_number: int | None,
    engine_label: str,
    calibrated: bool,
    dose_scale: float = 1.0,
    bits: int = 32,
    frame: str = "beam",
) -> Dataset:
    """The RT Dose dataset (with file meta) for `dose` in MOQUI raw order `grid.shape`, placed in
    `frame` ("beam" or "patient", see `raw_dose.beam_axes`); a plan sum is refused (CaseError)
    unless the plan's treatment beams share one geometry."""
    if bits not in SUPPORTED_BITS:
        raise InputError(f"bits must be one of {SUPPORTED_BITS}, not {bits}")
    if not (np.isfinite(dose_scale) and dose_scale > 0):
        raise InputError(f"dose_scale must be a positive number, not {dose_scale}")
    dose = _check_dose(dose, grid) * float(dose_scale)
    plan = read_plan(Path(plan_path))
    plan_ds = pydicom.dcmread(plan_path, stop_before_pixels=True)
    beam = _select_beam(plan, beam_number)
    if beam_number is None:
        refusal = plan_sum_refusal_for(plan_path, plan=plan)
        if refusal is not None:
            raise CaseError(plan.path, f"no plan sum: {refusal}")
    summed = [b.number for b in plan.treatment_beams] if beam_number is None else [beam.number]
    try:
        placement = beam_geometry.read(plan_ds, beam.number)
        axes = raw_dose.beam_axes(frame, placement)
        # The phantom frame's UID names the beam geometry; a gantry or couch angle the plan does
        # not give (only the beam frame accepts that) enters it as 0, the phantom's own placement.
        reference = dose_reference.frame_of_reference(
            frame, plan_ds, placement.gantry or 0.0, placement.couch or 0.0, beam.isocenter_mm
        )
        summation = dose_reference.summation_for(
            plan_ds, summed, plan_sum=beam_number is None, treatment_beams=[b.number for b in plan.treatment_beams]
        )
    except ValueError as exc:  # GeometryError included
        subject = "plan sum" if beam_number is None else f"beam {beam.number} ({beam.name})"
        raise CaseError(plan.path, f"{subject}: {exc}") from exc
    planes, image = image_geometry(dose, grid, beam.isocenter_mm, axes)
    pixels, scaling = _quantize(planes, bits)
    n_frames, rows, cols = pixels.shape

    now = datetime.datetime.now()
    sop_uid = generate_uid()
    ds = new_instance(RT_DOSE_SOP_CLASS, sop_uid)
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.Modality = "RTDOSE"
    copy_patient_study(plan_ds, ds)
    ds.FrameOfReferenceUID = reference.uid
    ds.PositionReferenceIndicator = reference.position_reference_indicator

    what = "plan sum" if beam_number is None else f"beam {beam.number} {beam.name}"
    # Viewers list series by SeriesDescription: a phantom dose says so first.
    shown = f"{dose_reference.PHANTOM} {what}" if reference.phantom else what
    units = "GY" if calibrated else "RELATIVE"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _lo(engine_label)
    ds.SoftwareVersions = f"mqi_communicator {__version__}"
    ds.SeriesInstanceUID = generate_uid()
    # One series per beam: its beam number; the plan sum is series PLAN_SUM_SERIES_NUMBER.
    ds.SeriesNumber = PLAN_SUM_SERIES_NUMBER if beam_number is None else beam.number
    ds.SeriesDescription = _lo(f"{shown}: {engine_label}")
    ds.OperatorsName = ""  # Type 2 in the RT Series Module: no operator runs the pipeline
    ds.InstanceNumber = 1
    ds.ImageComments = (
        f"Dose recomputed by {engine_label} for {what} of plan {plan_ds.SOPInstanceUID}, one delivered "
        f"session ({summation.type}); dose units {units}; {frame_comment(frame, placement)}; "
        f"written by mqi_communicator {__version__}."
    )

    ds.ImagePositionPatient = image["ImagePositionPatient"]
    ds.ImageOrientationPatient = image["ImageOrientationPatient"]
    ds.PixelSpacing = image["PixelSpacing"]
    ds.SliceThickness = image["SliceThickness"]
    if n_frames > 1:
        ds.NumberOfFrames = n_frames
        ds.FrameIncrementPointer = GRID_FRAME_OFFSET_VECTOR_TAG
        ds.GridFrameOffsetVector = image["GridFrameOffsetVector"]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0

    ds.DoseUnits = units
    ds.DoseType = "PHYSICAL"
    ds.DoseComment = _lo(engine_label)
    ds.DoseSummationType = summation.type
    ds.DoseGridScaling = scaling
    ds.TissueHeterogeneityCorrection = "WATER"
    ds.ReferencedRTPlanSequence = dose_reference.referenced_rt_plan(plan_ds, summation)
    # After every text is in: the plan's character set where they all fit it, else UTF-8.
    character_set = _character_set(plan_ds, ds)
    if character_set is not None:
        ds.SpecificCharacterSet = character_set
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _save_atomic(ds: Dataset, target: Path) -> None:
    """Write `target` atomically and durably (`files.atomic_output`)."""
    with atomic_output(target, durable=True) as handle:
        ds.save_as(handle, enforce_file_format=True)


def write_rtdose(
    dose: np.ndarray, grid: raw_dose.Grid, plan_path: Path, output: Path, **options: Unpack[RtDoseOptions]
) -> Path:
    """Write the RT Dose of `dose` (MOQUI raw order) and return its path.

    `output` is the file to write, or an existing directory to write `output_name(...)` into.
    The options are `build_rtdose`'s: `beam_number` None writes a plan sum (one session of the
    treatment beams, `dose_reference`); `dose_scale` multiplies the dose first (e.g. a Gy-per-unit
    calibration); `calibrated` selects DoseUnits GY over RELATIVE.
    """
    ds = build_rtdose(dose, grid, Path(plan_path), **options)
    beam_number = options["beam_number"]
    output = Path(output)
    if output.is_dir():
        name = None
        if beam_number is not None:
            beam = read_plan(Path(plan_path)).beam(beam_number)
            name = beam.name if beam is not None else str(beam_number)
        output = output / output_name(name)
    _save_atomic(ds, output)
    return output


# --- command line -------------------------------------------------------------------------------

_RAW_NAME = re.compile(r"^(?P<name>.*)_\d+_Dose\.raw$")


def _beam_from_file_name(plan: Plan, raw: Path) -> int:
    """The beam whose MOQUI output name `<BeamName>_<k>_Dose.raw` this file has."""
    match = _RAW_NAME.match(raw.name)
    beams = [b for b in plan.treatment_beams if match and b.name == match.group("name")]
    if len(beams) != 1:
        raise CaseError(raw, "cannot tell the beam from the file name (<BeamName>_<k>_Dose.raw); give --beam-number")
    return beams[0].number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_communicator.rtdose",
        description="Convert MOQUI raw dose (float64, x fastest) into a DICOM RT Dose referencing the plan.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="raw dose of one beam")
    source.add_argument("--sum", type=Path, nargs="+", metavar="RAW", help="raw doses to sum into the plan's dose")
    parser.add_argument("--output", type=Path, required=True, help="output folder (RD_<beam>.dcm / RD_PLAN.dcm)")
    parser.add_argument("--dosetype", choices=("2d", "3d"), required=True, help="2d: 2 cm plane, 3d: phantom volume")
    parser.add_argument("--plan", type=Path, required=True, help="the RT Ion Plan the dose was computed for")
    parser.add_argument("--beam-number", type=int, help="beam of --input (default: from <BeamName>_<k>_Dose.raw)")
    parser.add_argument("--engine-label", default=DEFAULT_ENGINE_LABEL, help="engine named in the RT Dose")
    parser.add_argument("--calibrated", action="store_true", help="dose is in Gy (DoseUnits GY, else RELATIVE)")
    parser.add_argument("--dose-scale", type=float, default=1.0, help="factor applied to the raw dose first")
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=32, help="pixel size (default 32)")
    parser.add_argument(
        "--frame",
        choices=raw_dose.FRAMES,
        default="beam",
        help="beam: the beam's own frame, as a TPS QA plane (default); patient: turned by the gantry angle",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.run(_parser(), _rtdose, argv, step="rtdose", label="RT DOSE", subject=_rtdose_subject)


def _rtdose_subject(args: argparse.Namespace) -> str:
    return "the plan sum" if args.sum is not None else str(args.input.name)


def _rtdose(args: argparse.Namespace) -> int:
    grid = raw_dose.grid_for(args.dosetype)
    plan = read_plan(args.plan)
    if args.sum is not None:
        if args.beam_number is not None:
            raise CaseError(None, "--beam-number applies to --input, not to a --sum plan dose")
        beam_number = None
        dose = _read_all(args.sum, grid, args.dosetype)
    else:
        beam_number = args.beam_number
        if beam_number is None:
            beam_number = _beam_from_file_name(plan, args.input)
        dose = _read_all([args.input], grid, args.dosetype)
    target = args.output / output_name(None if beam_number is None else _select_beam(plan, beam_number).name)
    written = write_rtdose(
        dose,
        grid,
        args.plan,
        target,
        beam_number=beam_number,
        engine_label=args.engine_label,
        calibrated=args.calibrated,
        dose_scale=args.dose_scale,
        bits=args.bits,
        frame=args.frame,
    )
    print(written)
    return 0


def _read_all(paths: Sequence[Path], grid: raw_dose.Grid, dosetype: str) -> np.ndarray:
    """Sum of the raw files, each checked; errors name the file."""
    total = np.zeros(grid.shape)
    for path in paths:
        try:
            dose = raw_dose.read_raw(str(path), grid)
        except FileNotFoundError as exc:
            raise CaseError(path, "raw dose file not found") from exc
        except ValueError as exc:
            raise CaseError(None, f"{exc} (--dosetype {dosetype})") from exc
        if not np.all(np.isfinite(dose)) or float(dose.min(initial=0.0)) < 0.0:
            raise CaseError(path, "raw dose contains NaN, infinite or negative values")
        total += dose
    return total
