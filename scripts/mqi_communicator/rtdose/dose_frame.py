"""Where an RT Dose sits in the patient: a beam's geometry, its frame, and the plan-sum rule.

Owns the decisions `rtdose` (the writer) relies on: a beam's gantry/couch/patient position from
the plan (`beam_geometry.read`), whether a plan's beams may be summed (`plan_sum_refusal_for`), how
MOQUI's dose grid is placed as DICOM image planes (`image_geometry`) and the ImageComments
sentence naming the frame (`frame_comment`).

Geometry (see `raw_dose.beam_axes`). In the default "beam" frame, the frame in which each beam's
dose is compared with the TPS's QA plane, every beam is placed as at gantry 0, head-first supine,
whatever its gantry angle (the RT Dose's ImageComments say so):
MOQUI x -> patient x, MOQUI y -> patient z, depth d -> patient y = iso_y - PLANE_DEPTH_MM + d
(the phantom surface sits PLANE_DEPTH_MM = 20 mm before the isocentre). Lateral positions are
taken relative to the isocentre: patient x = iso_x + x, patient z = iso_z + y. For the clinic's
QA plans the isocentre lies on x = z = 0, so a 2 cm plane lands at ImagePositionPatient
[-199.5, iso_y, -199.5] exactly as the TPS exports it. Positions are rounded to 0.1 um.

- A grid with one depth voxel (2 cm mode) becomes one coronal plane like the TPS export:
  ImageOrientationPatient [1,0,0, 0,0,1], columns = MOQUI x, rows = MOQUI y, so
  pixel_array[row, col] == raw_plane[row, col] (no flip, no transpose); one frame, offset [0].
- A volume becomes an axial multi-frame RT Dose: ImageOrientationPatient [1,0,0, 0,1,0],
  columns = MOQUI x (patient x), rows = depth (patient y, increasing depth downwards),
  frames = MOQUI y (patient z, increasing), GridFrameOffsetVector relative to the first frame.
- The "patient" frame (`--frame patient`) turns the same pixels by the beam's gantry angle
  (0/90/180/270, couch, table-top pitch and roll 0, HFS, one isocentre and snout position for the
  whole beam; anything else is refused, naming the beam: docs/plan-geometry.md): e.g. at gantry 90 the plane is
  sagittal (columns patient +y, rows +z), at 180 coronal with columns along patient -x.
- A plan sum (RD_PLAN) is written only when the treatment beams share one geometry (gantry,
  couch, table-top pitch and roll angle, isocentre, patient position, none changing within a beam)
  and one fraction group; beams in different beam frames, or of different
  fraction groups (not one session), are not summed (a clear error).
- Which FrameOfReferenceUID each frame carries (a phantom frame of its own in the "beam" frame)
  is `dose_reference`'s decision; docs/rtdose-frames.md describes both frames for viewers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from mqi_communicator.formats import beam_geometry, dose_reference, raw_dose
from mqi_communicator.formats.plan import Plan, read_plan


def _ds(value: float) -> str:
    """A position for a DS element: rounded to 0.1 um, no float noise, at most 16 characters."""
    text = f"{round(float(value), 4):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def plan_sum_refusal_for(
    plan_path: Path | str, beam_numbers: Sequence[int] | None = None, plan: Plan | None = None
) -> str | None:
    """Why the plan's beams (default: every treatment beam) may not be summed, or None. `plan`:
    the file already read with `read_plan`, so it is not parsed twice."""
    plan = plan or read_plan(Path(plan_path))
    plan_ds = pydicom.dcmread(plan_path, stop_before_pixels=True)
    numbers = [b.number for b in plan.treatment_beams] if beam_numbers is None else list(beam_numbers)
    beams = [beam_geometry.read(plan_ds, number) for number in numbers]
    return beam_geometry.plan_sum_refusal(beams) or dose_reference.fraction_group_refusal(plan_ds, numbers)


def image_geometry(
    dose: np.ndarray, grid: raw_dose.Grid, iso: tuple[float, float, float], axes: np.ndarray
) -> tuple[np.ndarray, dict[str, object]]:
    """Dose as (frames, rows, cols) and the Image Plane / Multi-frame attributes (DS strings).

    `axes` (see `raw_dose.beam_axes`) holds the patient directions of MOQUI x, y and depth; the
    pixels are never resampled, only placed: columns run along MOQUI x, rows along MOQUI y (a
    plane) or depth (a volume, whose frames run along MOQUI y)."""
    dx, dy, dz = grid.spacing_mm
    x0, y0, d0 = grid.first_centre_mm
    along_x, along_y, along_depth = (axes[:, k].astype(float) for k in range(3))
    first = np.asarray(iso, dtype=float) + x0 * along_x + y0 * along_y + (d0 - raw_dose.PLANE_DEPTH_MM) * along_depth

    def orientation(rows: np.ndarray) -> list[str]:
        return [_ds(v) for v in (*along_x, *rows)]

    if grid.nz == 1:
        return dose[0][np.newaxis], {
            "ImageOrientationPatient": orientation(along_y),
            "ImagePositionPatient": [_ds(v) for v in first],
            "PixelSpacing": [_ds(dy), _ds(dx)],
            "SliceThickness": _ds(dz),
            "GridFrameOffsetVector": ["0"],
        }
    frames = np.ascontiguousarray(dose.transpose(1, 0, 2))  # (MOQUI y, depth, x)
    normal = np.cross(along_x, along_depth)
    if float(normal @ along_y) < 0:  # frames must advance along the image normal: start at the far end
        frames = frames[::-1]
        first = first + (grid.ny - 1) * dy * along_y
    return np.ascontiguousarray(frames), {
        "ImageOrientationPatient": orientation(along_depth),
        "ImagePositionPatient": [_ds(v) for v in first],
        "PixelSpacing": [_ds(dz), _ds(dx)],
        "SliceThickness": _ds(dy),
        "GridFrameOffsetVector": [_ds(dy * k) for k in range(grid.ny)],
    }


def frame_comment(frame: str, beam: beam_geometry.BeamGeometry) -> str:
    """The ImageComments clause saying in which frame the dose is placed and what was applied."""
    gantry, couch = (beam_geometry.shown(v) for v in (beam.gantry, beam.couch))
    if frame == "beam":
        return (
            f"{dose_reference.PHANTOM} frame, not the patient's: placed in a water phantom in the beam's own "
            f"frame as a TPS QA plane (gantry 0 geometry; the beam's gantry {gantry} deg and couch {couch} deg "
            "are not applied), with a FrameOfReferenceUID of its own"
        )
    return (
        f"placed in the patient frame (gantry {gantry} deg, couch {couch} deg applied, HFS), "
        "in the plan's FrameOfReferenceUID"
    )
