"""Reading an RT Dose back: the dose array and the patient coordinate of every pixel.

Owns `DoseImage` and `read_rtdose_dose`, used by QA (the TPS's RT Doses and ours) and the
report; it reads any axis-aligned RT Dose, not only those `rtdose` writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom

from mqi_communicator.errors import InputError


class DoseImage(NamedTuple):
    """An RT Dose read back: dose[frame, row, col] and the patient coordinate of each index.

    `axes` names the patient axis along columns, rows and frames ("xzy" for a coronal plane,
    "xyz" for an axial volume); coordinates are those of pixel centres in mm.
    """

    dose: np.ndarray
    col_mm: np.ndarray
    row_mm: np.ndarray
    frame_mm: np.ndarray
    axes: str
    units: str


def _axis_coordinates(origin: Sequence[float], direction: np.ndarray, steps: np.ndarray) -> tuple[str, np.ndarray]:
    axis = int(np.argmax(np.abs(direction)))
    if not np.isclose(abs(direction[axis]), 1.0, atol=1e-6):
        raise InputError(f"orientation {direction.tolist()} is not along a patient axis")
    return "xyz"[axis], float(origin[axis]) + direction[axis] * steps


def _numbers(value: object) -> list[float]:
    """A DS element's value as a list, whether pydicom gives one number (VM 1) or several."""
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return [float(value)]  # type: ignore[arg-type]
    return [float(v) for v in value]


def read_rtdose_dose(path: Path | str) -> DoseImage:
    """Read an axis-aligned RT Dose: dose = pixel_array x DoseGridScaling as (frames, rows, cols)."""
    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    pixels = pixels.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    dose = pixels * float(ds.get("DoseGridScaling") or 1.0)
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    origin = [float(v) for v in ds.ImagePositionPatient]
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    col_axis, col_mm = _axis_coordinates(origin, row_dir, col_spacing * np.arange(pixels.shape[2]))
    row_axis, row_mm = _axis_coordinates(origin, col_dir, row_spacing * np.arange(pixels.shape[1]))
    offsets = np.asarray(_numbers(ds.get("GridFrameOffsetVector")) or [0.0])
    if offsets.size != n_frames:
        raise InputError(f"{path}: {offsets.size} frame offsets for {n_frames} frames")
    frame_axis, frame_mm = _axis_coordinates(origin, normal, offsets)
    if offsets[0] != 0.0:  # absolute offsets (allowed for axial images only): the z of each frame
        if frame_axis != "z" or normal[2] < 0:
            raise InputError(f"{path}: absolute GridFrameOffsetVector on a non-axial image")
        frame_mm = offsets
    return DoseImage(dose, col_mm, row_mm, frame_mm, col_axis + row_axis + frame_axis, str(ds.get("DoseUnits", "")))
