"""tests/infra/workflow_lint.py: Snakemake's own lint report, read for lints other than the one
the project answers on purpose (no conda environment; docs/development.md#software-environment)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.infra.workflow_lint import EXPECTED, unexpected_lints
from tests.workflow import SNAKEMAKE


def lint(tmp_path: Path, rule_body: str) -> str:
    (tmp_path / "Snakefile").write_text(f'rule make:\n    output:\n        "out.txt"\n{rule_body}')
    done = subprocess.run(
        [SNAKEMAKE, "--lint", "--snakefile", "Snakefile"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    return done.stdout + done.stderr


def test_the_expected_lint_alone_passes(tmp_path: Path) -> None:
    report = lint(tmp_path, '    log:\n        "make.log"\n    shell:\n        "touch {output} 2> {log}"\n')
    assert EXPECTED in report
    assert unexpected_lints(report) == []


def test_any_other_lint_is_reported_with_its_rule(tmp_path: Path) -> None:
    report = lint(tmp_path, '    shell:\n        "touch {output}"\n')  # no log: Snakemake lints it
    found = unexpected_lints(report)
    assert found and all("rule make" in line for line in found), report
