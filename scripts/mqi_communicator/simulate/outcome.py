"""Whether an engine run succeeded (docs/design.md#moqui-engine-contract), judged the same way on the workstation and the cluster.

Success = exit 0, no failure marker in the engine log, and exactly one non-empty ``*_Dose.raw``
in the beam's OutputDir. `simulate` judges a local run with it, `remote.beam` a SLURM job's.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from mqi_communicator.errors import MqiError

FAILURE_MARKERS = ("FATAL ERROR", "ERROR:", "Segmentation fault")
SUCCESS_MARKERS = ("Total execution time:", "Time taken by MC engine:", "Simlulation finalizing..")
RAW_PATTERN = "*_Dose.raw"


class SimulationError(MqiError):
    """The engine run failed; the message says how (exit code, marker, missing output, timeout)."""


def judge_run(
    returncode: int,
    log_text: str | None,
    raws: Sequence[tuple[str, int]],
    output_dir: str,
    *,
    log_name: str = "engine log",
    error: type[SimulationError] = SimulationError,
) -> tuple[str, int, list[str]]:
    """(raw name, size, success markers seen) of a successful run; raises ``error`` saying why not.

    ``log_text``: the engine's stdout+stderr (None: the log is missing, which fails a run that
    exited 0). ``raws``: (name, size) of each ``*_Dose.raw`` in ``output_dir``.
    """
    text = log_text or ""
    failures = [m for m in FAILURE_MARKERS if m in text]
    if returncode != 0:
        raise error(f"engine exited with {returncode}" + (f" (log: {failures})" if failures else ""))
    if log_text is None:
        raise error(f"engine log {log_name} is missing")
    if failures:
        raise error(f"engine log has failure marker(s) {failures} despite exit 0")
    if len(raws) != 1:
        found = [name for name, _ in raws] or "none"
        raise error(f"expected exactly one {RAW_PATTERN} in {output_dir}, found {found}")
    name, size = raws[0]
    if size == 0:
        raise error(f"{posixpath.join(output_dir, name)} is empty")
    return name, size, [m for m in SUCCESS_MARKERS if m in text]
