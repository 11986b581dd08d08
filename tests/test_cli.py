"""Every step's CLI as a person meets it: `--help` works and names the command as typed, and the
CLIs and the workflow run from another folder than the project's."""

from __future__ import annotations

import importlib.util
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mqi_communicator
from tests.workflow import REPO, SNAKEMAKE


def cli_modules() -> list[str]:
    """Modules of the package (subpackages included) that run as `python -m <module>`."""
    found = []
    for info in pkgutil.walk_packages(mqi_communicator.__path__, "mqi_communicator."):
        if info.name.endswith(".__main__"):
            continue  # its package is the command
        spec = importlib.util.find_spec(info.name)
        origin = Path(spec.origin) if spec and spec.origin else None
        main = origin.parent / "__main__.py" if info.ispkg and origin else origin
        if main and main.is_file() and 'if __name__ == "__main__":' in main.read_text():
            found.append(info.name)
    return sorted(found)


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def test_the_step_clis_are_all_found() -> None:
    # the README's "one step by hand" list; a CLI that disappears must be noticed
    steps = {
        "intake",
        "interpret",
        "moqui_input",
        "simulate.engine",
        "simulate",
        "rtdose",
        "formats.plan",
        "formats.ptn",
    }
    assert {f"mqi_communicator.{s}" for s in steps} <= set(cli_modules())


@pytest.mark.parametrize("module", cli_modules())
def test_help_exits_0_and_names_the_command_as_typed(module: str, tmp_path: Path) -> None:
    done = run([sys.executable, "-m", module, "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module} "), done.stdout[:200]
    assert done.stderr == ""
    # subcommands (e.g. `remote stage-in`) have their own help
    choices = re.search(r"\{([\w,-]+)\} \.\.\.", done.stdout.split("\n\n")[0])
    for sub in choices.group(1).split(",") if choices else []:
        sub_help = run([sys.executable, "-m", module, sub, "--help"], cwd=tmp_path)
        assert sub_help.returncode == 0, sub_help.stderr
        assert sub_help.stdout.startswith(f"usage: python -m {module} {sub} "), sub_help.stdout[:200]


def test_interpret_runs_from_another_folder_with_the_project_config(tmp_path: Path) -> None:
    """mqi_interpreter's drop-in, run elsewhere: the project's config/config.yaml, not ./config."""
    case = next(p for p in sorted((REPO / "sample_cases").iterdir()) if p.is_dir())
    done = run(
        [sys.executable, "-m", "mqi_communicator.interpret", "--logdir", str(case), "--outputdir", "p2"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "config").exists()
    assert sorted((tmp_path / "p2" / "log").rglob("*MeV.csv")), "no layer CSV written"


def test_config_option_overrides_and_a_missing_file_is_named(tmp_path: Path) -> None:
    case = next(p for p in sorted((REPO / "sample_cases").iterdir()) if p.is_dir())
    single_line = tmp_path / "site.yaml"
    single_line.write_text("interpreter:\n  csv_layout: single_line\n")
    args = [sys.executable, "-m", "mqi_communicator.interpret", "--logdir", str(case), "--outputdir", "p2"]
    done = run([*args, "--config", str(single_line)], tmp_path)
    assert done.returncode == 0, done.stderr
    first = sorted((tmp_path / "p2" / "log").rglob("*MeV.csv"))[0].read_bytes()
    assert len(first.splitlines()) == 1  # the older one-line layout: the override took effect
    missing = run([*args, "--config", "nope.yaml"], tmp_path)
    assert missing.returncode == 1
    assert f"configuration file {tmp_path / 'nope.yaml'} not found" in missing.stderr


def test_snakemake_dry_run_from_another_folder(tmp_path: Path) -> None:
    """As the README says: `snakemake -s PROJECT/Snakefile -d PROJECT --dry-run`, from anywhere.
    Run on a copy of the project's files (-d makes it the working folder: .snakemake/ goes there)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Snakefile", "rules", "config", "profiles", "report", "sample_cases"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, project / name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run([SNAKEMAKE, "-s", str(project / "Snakefile"), "-d", str(project), "--dry-run"], elsewhere, 300)
    assert done.returncode == 0, done.stderr[-3000:]
    planned = done.stdout + done.stderr
    assert "This was a dry-run" in planned
    assert all(f"data/cases/{case}/intermediate/intake.json" in planned for case in ("case001_G2", "case002_G1"))
    assert not any(elsewhere.iterdir()), "the dry run wrote into the current folder"


def test_stage_in_takes_beam_names_that_look_like_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage-in rule passes one `--beam=NAME` per beam (shell-quoted): a plan's beam may be
    named `-G90` or hold a space, and must reach stage-in as it is."""
    from mqi_communicator.remote import stage

    seen: list[list[str]] = []

    def fake_stage_in(config, case, processing, beams, report):  # the upload itself is tested elsewhere
        seen.append(beams)
        return {"upload": {"uploaded": []}, "host": "h", "remote_root": "r"}

    monkeypatch.setattr(stage, "stage_in", fake_stage_in)
    args = ["stage-in", "--case=c", "--processing", str(tmp_path), "--beam=-G90", "--beam=1G180 TX"]
    assert stage.main([*args, "--report", str(tmp_path / "r.json")]) == 0
    assert seen == [["-G90", "1G180 TX"]]
