"""`snakemake --lint`, minus the one lint this workflow answers on purpose.

Every rule runs the project's own Python environment (docs/development.md#software-environment):
there is no conda or container image to name, so "Specify a conda environment or container for
each rule" is expected on each rule. Any other lint fails, and so does a missing expected one
being replaced by nothing (Snakemake no longer linting).

    .venv/bin/python tests/infra/workflow_lint.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXPECTED = "Specify a conda environment or container for each rule."


def unexpected_lints(output: str) -> list[str]:
    """Each lint title in Snakemake's text report that is not the expected one, with its rule."""
    found = []
    section = ""
    for line in output.splitlines():
        if line.startswith("Lints for "):
            section = line
        title = re.match(r"\s{4}\* (.+?):?$", line)
        if title and title.group(1).rstrip(":") != EXPECTED.rstrip(":"):
            found.append(f"{section}: {title.group(1)}")
    return found


def main() -> int:
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "--lint"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    output = done.stdout + done.stderr
    unexpected = unexpected_lints(output)
    if unexpected or (done.returncode != 0 and EXPECTED not in output):
        print(output, file=sys.stderr)
        print("\n".join(["unexpected lints:", *unexpected]), file=sys.stderr)
        return 1
    print(f"snakemake --lint: clean apart from {output.count(EXPECTED)} x '{EXPECTED}' (one per rule)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
