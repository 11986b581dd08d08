"""Reference fields for the absolute dose calibration (docs/qa.md, Calibration): per room a
uniform 100 x 100 mm single-layer field at 150 MeV, gantry 0, with its delivery logs and the
TPS dose of the independent tests/qa_gen.py exported on the water phantom. Run through the
pipeline without a calibration, then `bin/mqi calibrate REF_<room> --by ...` derives the Gy per
raw unit the shipped `config/calibration.yaml` records for the built-in engine.

    python -m tests.reference_field OUT_SCAN_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests import casegen, qa_gen

ENERGY_MEV = 150.0
HALF_WIDTH_MM = 50.0
SPOT_STEP_MM = 5.0


def reference_spec(room: str) -> casegen.CaseSpec:
    return casegen.CaseSpec(
        patient_id=f"REFERENCE_{room}",
        room=room,
        beams=[
            casegen.BeamSpec(1, "SETUP", [], [], setup=True),
            casegen.BeamSpec(2, "REF", [ENERGY_MEV], [casegen.grid_spots(HALF_WIDTH_MM, SPOT_STEP_MM)]),
        ],
    )


def write_reference_case(scan_dir: Path, room: str) -> Path:
    """The reference case `REF_<room>` (plan, logs, TPS dose) under scan_dir."""
    case = casegen.write_case(scan_dir, f"REF_{room}", reference_spec(room))
    qa_gen.write_case_tps_doses(case, room)
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the calibration reference fields (G1, G2).")
    parser.add_argument("scan_dir", type=Path)
    args = parser.parse_args(argv)
    for room in ("G1", "G2"):
        print(write_reference_case(args.scan_dir, room))
    return 0


if __name__ == "__main__":
    sys.exit(main())
