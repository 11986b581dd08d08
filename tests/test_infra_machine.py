"""tests/infra/machine.sh and cleanup.sh: the test servers' installs wait for a busy apt instead
of failing; what they add is recorded, and cleanup.sh removes that again.

The lock is held the way apt-get holds it (an fcntl write lock, tests/infra/hold_apt_lock.py), on
a scratch file named by APT_LOCK_FILES, and apt-get is a recording stand-in on PATH: no root,
no package is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parent / "infra"
APT_LOCK = INFRA / "machine.sh"


def hold_lock(lock: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, str(INFRA / "hold_apt_lock.py"), str(seconds), str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def run_sourced(script: str, tmp_path: Path, lock: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . "{APT_LOCK}"; {script}'],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"APT_LOCK_FILES": f"{lock} {tmp_path / 'absent-lock'}", "APT_LOG_TAG": "t"} | env,
    )


@pytest.fixture
def fake_apt(tmp_path: Path) -> Path:
    """An `apt-get` on PATH that appends "<epoch seconds> <args>" to calls.log; `install nosuch` fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "apt-get"
    script.write_text(
        "#!/bin/bash\n"
        f'echo "$(date +%s.%N) $*" >>"{tmp_path / "calls.log"}"\n'
        'case " $* " in *" install "*nosuch*) echo "E: Unable to locate package nosuch"; exit 100 ;; esac\n'
        'echo "Setting up $*"\n'
    )
    script.chmod(0o755)
    return bin_dir


def test_waits_for_a_held_lock_and_says_so_once(tmp_path: Path) -> None:
    lock = tmp_path / "lock-frontend"
    lock.touch()
    holder = hold_lock(lock, 3)
    started = time.monotonic()
    done = run_sourced("wait_for_apt_locks", tmp_path, lock)
    waited = time.monotonic() - started
    holder.wait()
    assert done.returncode == 0, done.stderr
    assert waited >= 2.0, f"returned after {waited:.1f} s while the lock was held for 3 s"
    busy = [line for line in done.stderr.splitlines() if "busy" in line]
    assert len(busy) == 1, done.stderr
    assert f"pid {holder.pid} " in busy[0] and str(lock) in busy[0] and "hold_apt_lock.py" in busy[0]
    assert "free again" in done.stderr


def test_gives_up_after_the_bound_with_one_error_line(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    holder = hold_lock(lock, 30)
    try:
        started = time.monotonic()
        done = run_sourced("wait_for_apt_locks", tmp_path, lock, APT_LOCK_WAIT_S="1")
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"[t] ERROR: apt/dpkg still locked after 1 s by pid {holder.pid} (")
    assert errors[0].endswith("(set APT_LOCK_WAIT_S to wait longer)")


def test_a_free_lock_costs_no_wait(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    done = run_sourced("wait_for_apt_locks", tmp_path, lock)
    assert done.returncode == 0 and done.stderr == ""


def test_install_runs_apt_get_only_after_the_lock_is_released(tmp_path: Path, fake_apt: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    holder = hold_lock(lock, 2)
    log = tmp_path / "apt.log"
    done = run_sourced(f'apt_install "{log}" munge', tmp_path, lock, PATH=f"{fake_apt}:{os.environ['PATH']}")
    holder.wait()
    released = time.time()  # the holder has exited: an upper bound for the release time
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 1, calls
    called_at, args = calls[0].split(" ", 1)
    assert float(called_at) > released - 1.0  # not while the lock was still held (for 2 s)
    # apt itself waits too for whatever is left of the bound (another process may slip in)
    assert args.startswith("-o DPkg::Lock::Timeout=") and args.endswith("install -y -q --no-install-recommends munge")
    assert "Setting up" in log.read_text()


def test_failed_install_refreshes_lists_once_then_reports_one_line(tmp_path: Path, fake_apt: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    log = tmp_path / "apt.log"
    done = run_sourced(f'apt_install "{log}" nosuch', tmp_path, lock, PATH=f"{fake_apt}:{os.environ['PATH']}")
    assert done.returncode == 1
    verbs = [line.split()[3] for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert verbs == ["install", "update", "install"]
    assert done.stderr.splitlines() == [
        f"[t] ERROR: apt-get install nosuch failed: E: Unable to locate package nosuch (full log: {log})"
    ]


def test_cleanup_removes_only_what_was_recorded(tmp_path: Path) -> None:
    """tests/infra/cleanup.sh --dry-run: what it would remove is what machine.sh recorded."""
    record = tmp_path / "added"
    lock = tmp_path / "lock"
    lock.touch()
    env = {"MQI_TESTS_RECORD": str(record), "APT_LOCK_FILES": str(lock)}
    # names that exist nowhere: should the dry run ever act, it removes nothing
    pkg, user = "mqi-no-such-package", "mqi-no-such-user"
    script = f'. "{APT_LOCK}"; record_added package {pkg}; record_added package {pkg}; record_added user {user}'
    assert run_sourced(script, tmp_path, lock, **env).returncode == 0
    assert record.read_text().splitlines() == [f"package {pkg}", f"user {user}"]  # each once
    done = subprocess.run(
        ["bash", str(INFRA / "cleanup.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | env | {"SLURM_CI_ROOT": str(tmp_path / "no-slurm")},
    )
    assert done.returncode == 0, done.stderr
    said = done.stdout.splitlines()
    assert f"[cleanup] apt-get purge -y -q --autoremove {pkg}" in said
    assert not [line for line in said if "userdel" in line]  # a user that is gone already is left alone
    assert record.is_file()  # a dry run keeps the record
