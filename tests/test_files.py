"""mqi_communicator.files: the one atomic write every step uses (private mode, no half files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_communicator.files import (
    KnownDigests,
    atomic_output,
    read_json_object,
    sha256_of,
    stat_key,
    write_atomic,
    write_json_atomic,
)


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


def test_known_digests_follow_the_file_not_the_name(tmp_path: Path) -> None:
    """A recorded digest is found by the file's stat key: under a hard link's name too, and no
    more once the file is rewritten (other size or mtime) or replaced (other inode)."""
    path = tmp_path / "01.csv"
    write_atomic(path, b"1,2,3,4\r\n")
    known = KnownDigests()
    known.add(path, "log/01.csv", sha256_of(path))
    os.link(path, tmp_path / "beam.csv")
    assert known.get(stat_key(os.stat(tmp_path / "beam.csv"))) == sha256_of(path)

    record = tmp_path / "p2_summary.json"
    record.write_text(json.dumps({"case_id": "c1", "files": known.entries}))
    loaded = KnownDigests.load(record)
    assert len(loaded) == 1 and loaded.get(stat_key(os.stat(path))) == sha256_of(path)
    record.write_text(json.dumps({"case_id": "c1"}))  # a summary from before P2 recorded files
    assert len(KnownDigests.load(record)) == 0

    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))  # rewritten in place, same size
    assert loaded.get(stat_key(os.stat(path))) is None
    write_atomic(path, b"1,2,3,4\r\n")  # the same bytes under a new inode
    assert loaded.get(stat_key(os.stat(path))) is None


@pytest.mark.parametrize(
    "text", ["[1, 2]", '{"files": {"a": 1}}', '{"files": [{"path": "a", "sha256": "x"}]}', "not json"]
)
def test_a_malformed_digest_record_is_named(tmp_path: Path, text: str) -> None:
    record = tmp_path / "p2_summary.json"
    record.write_text(text)
    with pytest.raises(ValueError, match=r"p2_summary\.json: not a record of file digests"):
        KnownDigests.load(record)


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-write (no cleanup runs) leaves its hidden temporary file; the next
    write of the same file (the step run again) removes it. A live writer's temporary, one from
    another host and another file's are left alone."""
    target = tmp_path / "RD_PLAN.dcm"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal; from mqi_communicator.files import atomic_output\n"
            f"with atomic_output({str(target)!r}) as f:\n"
            "    f.write(b'half a dose'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)",
        ],
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p.name for p in tmp_path.iterdir()]
    assert left.startswith(".RD_PLAN.dcm.") and left.endswith(".tmp")
    live = tmp_path / left.replace(left.split(".")[3], str(os.getpid()), 1)  # same host, a live pid
    other_host = tmp_path / ".RD_PLAN.dcm.1.abcd1234.00000000.tmp"
    other_file = tmp_path / f".RD_PLAN.dcm.old.{left[len('.RD_PLAN.dcm.') :]}"  # RD_PLAN.dcm.old's, same dead pid
    for path in (live, other_host, other_file):
        path.write_bytes(b"x")

    write_atomic(target, b"whole dose")
    assert target.read_bytes() == b"whole dose"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["RD_PLAN.dcm", live.name, other_host.name, other_file.name]
    )


def test_a_state_file_reads_back_as_its_object_or_none(tmp_path: Path) -> None:
    record = tmp_path / "activity.json"
    write_json_atomic(record, {"last_error": {"time": 1.5, "message": "association aborted"}})
    assert read_json_object(record) == {"last_error": {"time": 1.5, "message": "association aborted"}}
    # What a reader may meet instead: nothing yet, a file cut off by a crash, another JSON value,
    # bytes that are not text, a folder where the file should be.
    whole = record.read_bytes()
    (tmp_path / "cut.json").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe{")
    (tmp_path / "folder.json").mkdir()
    for name in ("missing.json", "cut.json", "list.json", "binary.json", "folder.json"):
        assert read_json_object(tmp_path / name) is None, name
