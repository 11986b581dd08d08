"""mqi_communicator.files: the one atomic write every step uses (private mode, no half files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mqi_communicator.files import atomic_output, sha256_of, write_atomic, write_json_atomic


def test_atomic_write_is_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a" / "plan.bin", b"name,id")
        write_json_atomic(tmp_path / "a" / "record.json", {"case": "c1"}, durable=True)
    finally:
        os.umask(previous)
    assert (tmp_path / "a" / "plan.bin").read_bytes() == b"name,id"
    assert json.loads((tmp_path / "a" / "record.json").read_text()) == {"case": "c1"}
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "a").iterdir()} == {"0o600"}


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "dose.dcm"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dose.dcm"]
    assert sha256_of(target) == "cba06b5736faf67e54b07b561eae94395e774c517a7d910a54369e1263ccfbd4"  # sha256(b"old")
