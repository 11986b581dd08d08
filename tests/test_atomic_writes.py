"""A write cut off by a full disk (here: a file size limit, RLIMIT_FSIZE) leaves neither a
truncated file under the final name nor a temporary file (issue 10, finding 7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from mqi_communicator.formats.raw_dose import PLANE_2CM
from mqi_communicator.rtdose.writer import write_rtdose
from tests import casegen

LIMIT_BYTES = 32 * 1024


def _limited(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run Python code with files limited to LIMIT_BYTES, as a disk that fills up mid-write."""
    prelude = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT_BYTES}, {LIMIT_BYTES}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


def test_cut_off_write_leaves_nothing(tmp_path: Path) -> None:
    # The wrong result: writing in place leaves a truncated file under the final name.
    naive = _limited("from pathlib import Path; Path('naive.bin').write_bytes(bytes(1 << 20))", tmp_path)
    assert naive.returncode != 0 and (tmp_path / "naive.bin").stat().st_size == LIMIT_BYTES
    # write_atomic: the error, and no file at all (final or temporary).
    atomic = _limited(
        "from pathlib import Path; from mqi_communicator.files import write_atomic; "
        "write_atomic(Path('out/atomic.bin'), bytes(1 << 20))",
        tmp_path,
    )
    assert atomic.returncode != 0 and "File too large" in atomic.stderr
    assert list((tmp_path / "out").iterdir()) == []
    # The good case beside it: a write under the limit lands whole, and no temporary is left.
    ok = _limited(
        "from pathlib import Path; from mqi_communicator.files import write_atomic; "
        "write_atomic(Path('out/small.bin'), bytes(1000))",
        tmp_path,
    )
    assert ok.returncode == 0 and [p.name for p in (tmp_path / "out").iterdir()] == ["small.bin"]


def test_report_figure_cut_off_leaves_no_png(tmp_path: Path) -> None:
    plan = tmp_path / "RP.dcm"
    casegen.write_plan(plan, casegen.standard_case())
    dose = np.zeros(PLANE_2CM.shape)
    dose[0, 180:220, 150:250] = 1.0
    rtdose = write_rtdose(
        dose, PLANE_2CM, plan, tmp_path / "RD.dcm", beam_number=2, engine_label="test", calibrated=False
    )
    command = (
        "import sys; from mqi_communicator.report import main; "
        f"sys.exit(main(['figure', '--rtdose', {str(rtdose)!r}, '--title', 't', '--output', 'report/dose.png']))"
    )
    cut = _limited(command, tmp_path)
    # A file cut off by the machine (an OSError, here EFBIG) is the machine's: transient.
    assert cut.returncode == 1 and "REPORT FAILED for figure" in cut.stderr
    assert '"kind": "transient"' in cut.stderr
    assert not (tmp_path / "report").exists() or list((tmp_path / "report").iterdir()) == []
    whole = subprocess.run(
        [sys.executable, "-c", command], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120
    )
    assert whole.returncode == 0, whole.stderr
    png = (tmp_path / "report" / "dose.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png.endswith(b"IEND\xaeB`\x82") and len(png) > LIMIT_BYTES
