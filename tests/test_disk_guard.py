"""The disk guard (docs/disk-guard.md) on a small filesystem made here: a 20 MB tmpfs holding the
scan folder and the working folder. Below disk_guard.min_free_gb no case starts and nothing is
written, `bin/mqi status` says why, one alert goes out (and one when space is back).

Where this process may not mount (a CI container), the same checks run on tmp_path's own
filesystem with a floor above its real free space: the real statvfs path either way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.workflow import REPO, snakemake, write_config

CASE = "case001_G2"


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """(folder, its free bytes): a 20 MB tmpfs when mounting is permitted, else tmp_path."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", str(folder)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if not mounted:
        print("mount not permitted here: the floor is set above the real free space of tmp_path instead")
    stats = os.statvfs(folder)
    try:
        yield folder, stats.f_bavail * stats.f_frsize
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def cli(module: str, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    module_args = ["-m", f"mqi_communicator.ops.{module}", "--configfile", "test-config.yaml"]
    return subprocess.run(
        [sys.executable, *module_args, "--workdir", str(workdir), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_below_the_floor_no_case_starts_status_says_why_and_one_alert_goes_out(
    small_filesystem: tuple[Path, int], webhook: ThreadingHTTPServer
) -> None:
    folder, free = small_filesystem
    scan, workdir = folder / "scan", folder / "work"
    shutil.copytree(REPO / "sample_cases" / CASE, scan / CASE)
    workdir.mkdir()
    alerts = {"webhook": {"url": f"http://127.0.0.1:{webhook.server_port}/hook"}}
    above_free_gb = (free + 5e9) / 1e9  # a floor the filesystem cannot meet
    write_config(workdir, scan, disk_guard={"min_free_gb": above_free_gb}, alerts=alerts)

    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 case(s) held back: disk guard: scan folder" in run.stderr, run.stderr[-3000:]
    assert f"below disk_guard.min_free_gb={above_free_gb:g}" in run.stderr
    # Nothing started, so nothing was written for the case (no half-written output either).
    assert not (workdir / "data").exists() and not (workdir / "logs" / CASE).exists()

    status = cli("status", workdir, "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    (case,) = shown["cases"]
    assert case["case_id"] == CASE and case["state"] == "waiting", case
    assert case["reason"].startswith("disk guard: scan folder ") and str(scan) in case["reason"]
    assert shown["disk_guard"] == case["reason"]
    table = cli("status", workdir)
    assert "no new case starts: disk guard: scan folder" in table.stdout.replace("\n", " "), table.stdout

    # Every timer run checks; only the first reports.
    for _ in range(3):
        said = cli("disk_guard", workdir, "alert")
        assert said.returncode == 0, said.stderr
    assert len(webhook.posts) == 1, webhook.posts  # type: ignore[attr-defined]
    message = webhook.posts[0][1]  # type: ignore[attr-defined]
    assert message["kind"] == "disk_low" and str(scan) in message["body"], message
    check = cli("disk_guard", workdir, "check")
    assert check.returncode == 1 and check.stdout.startswith("disk guard: scan folder")

    # Space is back (here: the floor lowered below the free space): the case is queued and planned,
    # and one "recovered" message closes the alert.
    write_config(workdir, scan, disk_guard={"min_free_gb": free / 4 / 1e9}, alerts=alerts)
    assert cli("disk_guard", workdir, "check").returncode == 0
    (case,) = json.loads(cli("status", workdir, "--json").stdout)["cases"]
    assert case["state"] == "queued", case
    plan = snakemake(workdir, "--dry-run")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "held back" not in plan.stderr and "intake" in plan.stdout + plan.stderr
    for _ in range(2):
        assert cli("disk_guard", workdir, "alert").returncode == 0
    assert [post[1]["kind"] for post in webhook.posts] == ["disk_low", "disk_recovered"]  # type: ignore[attr-defined]


def test_a_floor_of_zero_turns_the_guard_off(tmp_path: Path) -> None:
    write_config(tmp_path, tmp_path / "scan", calibrated=False, disk_guard={"min_free_gb": 0})
    (tmp_path / "scan").mkdir()
    check = cli("disk_guard", tmp_path, "check")
    assert check.returncode == 0 and check.stdout == "disk guard: enough free space\n", check.stdout
