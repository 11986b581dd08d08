"""Dose grids shared by the built-in engine (writer) and P3 (reader), in MOQUI's raw order.

A raw dose file is headerless float64 little-endian, x fastest. Axes are MOQUI's beam frame:
x and y lateral (IEC gantry X and Y at the isocentre plane), z along the beam (depth).
At gantry 0 with a head-first-supine patient, MOQUI x -> patient x, MOQUI y -> patient z
and depth -> patient +y (anterior to posterior).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mqi_communicator.errors import InputError, MqiError
from mqi_communicator.formats.beam_geometry import BeamGeometry


@dataclass(frozen=True)
class Grid:
    """A regular grid of voxel centres; `shape` is (nz, ny, nx) as numpy reads the raw file."""

    nx: int
    ny: int
    nz: int
    spacing_mm: tuple[float, float, float]  # (dx, dy, dz)
    first_centre_mm: tuple[float, float, float]  # centre of voxel (0, 0, 0): (x, y, depth)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.nz, self.ny, self.nx)

    @property
    def n_bytes(self) -> int:
        return self.nx * self.ny * self.nz * 8

    def centres(self, axis: str) -> np.ndarray:
        index = "xyz".index(axis)
        count = (self.nx, self.ny, self.nz)[index]
        return self.first_centre_mm[index] + self.spacing_mm[index] * np.arange(count)


# TwoCentimeterMode: one plane at 2 cm depth, 400 x 400 pixels of 1 mm over [-200, 200] mm.
# MOQUI's own output (reference data) puts a spot at x = 0 on the edge between pixels 199
# and 200, i.e. pixel centres at -199.5 + i.
PLANE_2CM = Grid(nx=400, ny=400, nz=1, spacing_mm=(1.0, 1.0, 1.0), first_centre_mm=(-199.5, -199.5, 20.0))
PLANE_DEPTH_MM = 20.0

# The 3-D water phantom: 2 mm voxels, x and y over [-200, 200] mm, depth 0 to 350 mm from the
# phantom surface (which sits 20 mm before the isocentre, as in 2 cm mode).
PHANTOM_3D = Grid(nx=200, ny=200, nz=175, spacing_mm=(2.0, 2.0, 2.0), first_centre_mm=(-199.0, -199.0, 1.0))


# MOQUI names its output `<BeamName>_<k>_Dose.raw`; k is 2 in 2 cm mode, 3 with a range shifter.
def output_index(range_shifters: int) -> int:
    return 3 if range_shifters > 0 else 2


def grid_for(dosetype: str) -> Grid:
    if dosetype == "2d":
        return PLANE_2CM
    if dosetype == "3d":
        return PHANTOM_3D
    raise InputError(f"unknown dose type {dosetype!r}; expected 2d or 3d")


def read_raw(path: str, grid: Grid) -> np.ndarray:
    """Read a raw dose file into an array of `grid.shape`; the size must match exactly."""
    data = np.fromfile(path, dtype="<f8")
    if data.size * 8 != grid.n_bytes:
        raise InputError(
            f"{path}: {data.size * 8} bytes, expected {grid.n_bytes} for a {grid.nx}x{grid.ny}x{grid.nz} float64 grid"
        )
    return data.reshape(grid.shape)


# --- beam frame -> patient frame ----------------------------------------------------------------
#
# Frames (DICOM patient coordinates, head-first supine: +x patient left, +y posterior, +z head):
# - "beam" (default, the frame of the QA comparison): the beam's dose as MOQUI computes it in its
#   water phantom, in the beam's own frame, written the way the TPS exports a QA plane (the beam
#   recomputed at gantry 0 in a phantom): MOQUI x -> patient x, MOQUI y -> patient z, depth ->
#   patient +y, whatever the beam's gantry angle (the RT Dose says so in its comments).
# - "patient": the same dose turned by the beam's gantry angle (IEC 61217, couch 0, HFS): the
#   gantry axes X_g = (cos g, sin g, 0), Y_g = (0, 0, 1), the beam travelling along
#   -Z_g = (-sin g, cos g, 0). Axis-aligned results only: gantry 0, 90, 180 or 270; any other
#   angle, a couch, pitch or roll rotation, another patient position or an isocentre or snout
#   that moves within the beam is refused with a message naming the beam (docs/plan-geometry.md).

CARDINAL_GANTRY = (0.0, 90.0, 180.0, 270.0)
FRAMES = ("beam", "patient")


class GeometryError(MqiError, ValueError):
    """A beam geometry the requested frame does not handle (the message says which and why)."""


def beam_axes(frame: str, beam: BeamGeometry) -> np.ndarray:
    """3 x 3 integer matrix whose columns are the patient directions of MOQUI x, MOQUI y and depth.

    The beam frame needs nothing of the beam's geometry; the patient frame refuses what it cannot
    honour (`BeamGeometry.patient_frame_refusal`: a couch, pitch or roll other than 0, a position
    other than HFS, a placement that changes within the beam) and a gantry off 0/90/180/270."""
    if frame == "beam":
        return np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]]).T
    if frame != "patient":
        raise GeometryError(f"unknown dose frame {frame!r}; expected one of {FRAMES}")
    refusal = beam.patient_frame_refusal()
    if refusal is not None:
        raise GeometryError(refusal)
    gantry = beam.gantry
    assert gantry is not None  # patient_frame_refusal refuses a beam without one
    angle = gantry % 360.0
    if not any(abs(angle - a) < 1e-6 for a in CARDINAL_GANTRY):
        raise GeometryError(
            f"gantry angle {gantry:g} deg is not handled in the patient frame (only 0/90/180/270 "
            "give an axis-aligned RT Dose); use the beam frame"
        )
    g = np.deg2rad(angle)
    x_g = np.rint([np.cos(g), np.sin(g), 0.0])
    y_g = np.array([0.0, 0.0, 1.0])
    depth = np.rint([-np.sin(g), np.cos(g), 0.0])
    return np.column_stack([x_g, y_g, depth]).astype(int)
