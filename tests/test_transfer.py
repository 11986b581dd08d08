"""mqi_communicator.remote (connection, commands, upload, download, hashing) against a real OpenSSH server on 127.0.0.1 (no mocks).

Needs the ``sshd_server`` fixture (tests/infra/sshd_fixture.py). The "remote" side is this
machine, so the tests also check remote files directly on disk, independently of the code under test.
Fault tests crash (SIGKILL) or freeze (SIGSTOP) the real sshd / sftp-server processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paramiko
import pytest
import zstandard
from paramiko.buffered_pipe import BufferedPipe

from mqi_communicator.files import KnownDigests, write_atomic
from mqi_communicator.remote import commands, connection, download, fastpath, hashing, tarstream, upload
from mqi_communicator.remote import transfer as transfer_cli
from mqi_communicator.remote.errors import AuthError, CommandTimeout, HostKeyError, TransferError, VerifyError

if TYPE_CHECKING:
    from tests.infra.sshd_fixture import SshServer

REPO = Path(__file__).resolve().parents[1]
BIG = 200 * 1024 * 1024  # the fault tests' file
KILL_AT = 40 * 1024 * 1024  # bytes on the receiving side when the server is crashed


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def part_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.part"))


@pytest.fixture
def sshd(sshd_server: SshServer) -> Iterator[SshServer]:
    sshd_server.ensure_running()  # a previous test may have crashed or frozen it
    yield sshd_server
    sshd_server.ensure_running()


@pytest.fixture
def remote(sshd: SshServer) -> Iterator[Path]:
    """A fresh (not yet existing) remote folder; on loopback, also a local path."""
    path = sshd.remote_dir / uuid.uuid4().hex[:8]
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["private-api", "public-api"])
def paramiko_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways through paramiko: the fast paths on its private API, enabled for the pinned
    version, and the public-API fallback that any other version gets (here: an untested version
    number, exactly what a paramiko upgrade would present)."""
    if request.param == "public-api":
        monkeypatch.setattr(paramiko, "__version__", "0.0.0+untested")
    assert fastpath.enabled() is (request.param == "private-api")
    return str(request.param)


def fast(sshd: SshServer, **overrides: Any) -> dict[str, Any]:
    """connect() arguments with short timeouts and backoff, so that fault tests stay quick."""
    args: dict[str, Any] = {
        **sshd.connect_args(),
        "connect_timeout": 3,
        "banner_timeout": 3,
        "auth_timeout": 3,
        "channel_timeout": 3,
        "op_timeout": 3,
        "retries": 1,
        "backoff_s": 0.05,
    }
    args.update(overrides)
    return args


def give_to_user(sshd: SshServer, path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, sshd.user, sshd.user)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "dose.raw"
    with open(path, "wb") as f:
        for _ in range(BIG // (8 << 20)):
            f.write(os.urandom(8 << 20))
    return path


def when_size_reaches(path: Path, size: int, action: Callable[[], object], timeout: float = 60) -> threading.Thread:
    """Run ``action`` (from a thread) once ``path`` has at least ``size`` bytes."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if path.stat().st_size >= size:
                    action()
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------
# normal operation


def make_tree(root: Path) -> dict[str, bytes]:
    """Nested folders, 20 files (empty, small, 1 MB, odd names) and a symlink to a file."""
    files: dict[str, bytes] = {}
    for i in range(20):
        folder = ["", "plan", "log/1G180", "log/2G90 beam", "log/2G90 beam/deep/er"][i % 5]
        name = f"{i:02d}_{100 + i:.2f}MeV.csv" if i != 7 else "odd name (1).csv"
        rel = f"{folder}/{name}" if folder else name
        data = b"" if i == 3 else (os.urandom(1_000_000) if i == 11 else os.urandom(137 * i + 1))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = data
    (root / "empty_dir").mkdir()
    outside = root.parent / f"{root.name}-outside.dcm"
    outside.write_bytes(b"DICM" + os.urandom(5000))
    (root / "plan" / "RP.dcm").symlink_to(outside)
    files["plan/RP.dcm"] = outside.read_bytes()
    return files


# the upload paths: a tar stream, zstd-compressed or not, and SFTP writes (compression unused)
UPLOAD_WAYS = [("tar", "zstd"), ("tar", "none"), ("sftp", "none")]


@pytest.mark.parametrize(("method", "compression"), UPLOAD_WAYS)
def test_upload_tree_verified_and_idempotent(
    sshd: SshServer, remote: Path, tmp_path: Path, method: str, compression: str, paramiko_api: str
) -> None:
    local = tmp_path / "case"
    local.mkdir()
    files = make_tree(local)
    with connection.connect(**fast(sshd, compression=compression)) as conn:
        report = upload.upload_tree(conn, local, str(remote), method=method)
        assert sorted(report.uploaded) == sorted(files)
        assert report.skipped == []
        assert report.bytes_sent == sum(len(d) for d in files.values())
        for rel, data in files.items():  # checked on disk, not through the code under test
            assert (remote / rel).read_bytes() == data, rel
            assert not (remote / rel).is_symlink()
            assert report.files[rel] == hashlib.sha256(data).hexdigest()
        assert (remote / "empty_dir").is_dir()
        assert part_files(remote) == []

        again = upload.upload_tree(conn, local, str(remote), method=method)
        assert again.uploaded == []
        assert again.bytes_sent == 0
        assert sorted(again.skipped) == sorted(files)
        assert again.files == report.files

        # one file changed (same size), one added: only those go
        (local / "plan" / "06_106.00MeV.csv").write_bytes(os.urandom(len(files["plan/06_106.00MeV.csv"])))
        (local / "log" / "new.csv").write_bytes(b"1,2,3,4\r\n")
        third = upload.upload_tree(conn, local, str(remote), method=method)
        assert sorted(third.uploaded) == ["log/new.csv", "plan/06_106.00MeV.csv"]
        assert (remote / "plan" / "06_106.00MeV.csv").read_bytes() == (local / "plan" / "06_106.00MeV.csv").read_bytes()
        assert set(upload.compare_tree(conn, local, str(remote))["identical"]) == set(third.files)
    assert conn.connects == 1


def recorded_case(root: Path, digest_of_first: str | None = None) -> tuple[KnownDigests, dict[str, bytes]]:
    """A P2-like folder whose files are recorded as their writer records them (`KnownDigests`),
    with a hard link of one (as a beam's logFilePath holds) and one file rewritten after it was
    recorded. ``digest_of_first``: record that (wrong) digest for log/01.csv instead of its own."""
    (root / "log").mkdir(parents=True)
    (root / "beam").mkdir()
    known = KnownDigests()
    data = {"log/01.csv": os.urandom(300_000), "log/02.csv": os.urandom(1000), "plan.dcm": os.urandom(5000)}
    for rel, content in data.items():
        (root / rel).write_bytes(content)
        known.add(root / rel, rel, hashlib.sha256(content).hexdigest())
    if digest_of_first:
        known = KnownDigests(
            [dict(e, sha256=digest_of_first) if e["path"] == "log/01.csv" else e for e in known.entries]
        )
    os.link(root / "log" / "01.csv", root / "beam" / "01.csv")
    data["beam/01.csv"] = data["log/01.csv"]
    data["log/02.csv"] = os.urandom(1001)  # rewritten since: another size, another stat key
    (root / "log" / "02.csv").write_bytes(data["log/02.csv"])
    return known, data


@pytest.mark.parametrize(("method", "compression"), UPLOAD_WAYS)
def test_upload_reports_the_writers_digests_and_hashes_the_rest(
    sshd: SshServer, remote: Path, tmp_path: Path, method: str, compression: str
) -> None:
    """Files recorded by their writer are reported with the recorded sha256 (their hard links
    too); a file rewritten since it was recorded is hashed as it is read."""
    local = tmp_path / "case"
    known, data = recorded_case(local)
    with connection.connect(**fast(sshd, compression=compression)) as conn:
        report = upload.upload_tree(conn, local, str(remote), method=method, known=known)
        assert sorted(report.uploaded) == sorted(data)
        for rel, content in data.items():
            assert (remote / rel).read_bytes() == content, rel
            assert report.files[rel] == hashlib.sha256(content).hexdigest(), rel
        again = upload.upload_tree(conn, local, str(remote), method=method, known=known)
    assert again.uploaded == [] and again.files == report.files


def test_upload_takes_a_recorded_digest_without_hashing_the_file(sshd: SshServer, remote: Path, tmp_path: Path) -> None:
    """With zstd (the stream verifies the bytes read: frame checksums) a recorded digest is not
    computed again: a record that names a wrong one shows through in the report."""
    local = tmp_path / "case"
    known, data = recorded_case(local, digest_of_first="0" * 64)
    with connection.connect(**fast(sshd, compression="zstd")) as conn:
        report = upload.upload_tree(conn, local, str(remote), method="tar", known=known)
    assert report.files["log/01.csv"] == report.files["beam/01.csv"] == "0" * 64
    assert report.files["log/02.csv"] == hashlib.sha256(data["log/02.csv"]).hexdigest()
    assert (remote / "log" / "01.csv").read_bytes() == data["log/01.csv"]


@pytest.mark.parametrize(("method", "compression"), [("tar", "none"), ("sftp", "none")])
def test_upload_without_zstd_checks_the_servers_sha256_against_the_record(
    sshd: SshServer, remote: Path, tmp_path: Path, method: str, compression: str
) -> None:
    """Without zstd the server hashes every file it received: a recorded digest that is not the
    file's fails the upload, and no file gets its final name."""
    local = tmp_path / "case"
    known, _ = recorded_case(local, digest_of_first="0" * 64)
    with (
        connection.connect(**fast(sshd, compression=compression)) as conn,
        pytest.raises(VerifyError, match="sha256 differs remotely for 2 file"),
    ):
        upload.upload_tree(conn, local, str(remote), method=method, known=known)
    assert [p for p in remote.rglob("*") if p.is_file() and p.suffix != ".part"] == []
    assert not any(p.name.startswith("01.csv") for p in part_files(remote))  # the mismatched ones are removed


# beam/01.csv carries the bytes of its hard link log/01.csv (sorted first); plan.dcm has no link
@pytest.mark.parametrize("replaced", ["beam/01.csv", "log/01.csv", "plan.dcm"])
def test_upload_refuses_a_file_replaced_after_it_was_listed(
    sshd: SshServer, remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replaced: str
) -> None:
    """A file replaced between the listing (size, stat key, recorded digest) and its reading is
    not sent under the old facts: the upload fails naming it, and nothing gets its final name."""
    local = tmp_path / "case"
    known, data = recorded_case(local)
    real_walk = upload.walk_local

    def walk_then_replace(root: str, *rest: Any) -> Any:
        listed = real_walk(root, *rest)
        write_atomic(local / replaced, os.urandom(len(data[replaced])))  # same size, new inode
        return listed

    monkeypatch.setattr(upload, "walk_local", walk_then_replace)
    with (
        connection.connect(**fast(sshd, compression="zstd")) as conn,
        pytest.raises(TransferError, match=rf"{re.escape(replaced)} was replaced or changed since it was listed"),
    ):
        upload.upload_tree(conn, local, str(remote), method="tar", known=known)
    assert [p for p in remote.rglob("*") if p.is_file() and p.suffix != ".part"] == []


@pytest.mark.parametrize(("method", "compression"), UPLOAD_WAYS)
def test_upload_sends_hard_links_once_and_only_the_folders_named(
    sshd: SshServer, remote: Path, tmp_path: Path, method: str, compression: str
) -> None:
    """Stage-in's shape: two folders of a processing folder, the second holding hard links of the
    first's files (a beam's logFilePath). A tar stream carries their bytes once and the server
    gets the same links; SFTP writes each name. Other entries of the folder stay home."""
    local = tmp_path / "intermediate"
    (local / "moqui_csv" / "log").mkdir(parents=True)
    (local / "moqui" / "B1" / "log").mkdir(parents=True)
    (local / "state").mkdir()
    (local / "state" / "private.json").write_text("{}")
    (local / "intake.json").write_text("{}")
    data = {f"{i}.csv": os.urandom(200_000 + i) for i in range(3)}
    for name, content in data.items():
        (local / "moqui_csv" / "log" / name).write_bytes(content)
        os.link(local / "moqui_csv" / "log" / name, local / "moqui" / "B1" / "log" / name)
    (local / "moqui" / "B1" / "beam.in").write_text("GPUID 0\n")
    with connection.connect(**fast(sshd, compression=compression)) as conn:
        report = upload.upload_tree(conn, local, str(remote), method=method, only=("moqui_csv", "moqui"))
        with pytest.raises(TransferError, match=r"intermediate/moqui_tps does not exist"):
            upload.upload_tree(conn, local, str(remote), method=method, only=("moqui_csv", "moqui_tps"))
    assert sorted(p.name for p in remote.iterdir()) == ["moqui", "moqui_csv"]
    assert len(report.uploaded) == 7
    payload = sum(len(c) for c in data.values())
    assert report.bytes_sent == (payload if method == "tar" else 2 * payload) + len("GPUID 0\n")
    for name, content in data.items():
        first, link = remote / "moqui_csv" / "log" / name, remote / "moqui" / "B1" / "log" / name
        assert first.read_bytes() == link.read_bytes() == content
        assert report.files[f"moqui/B1/log/{name}"] == hashlib.sha256(content).hexdigest()
        assert (first.stat().st_ino == link.stat().st_ino) is (method == "tar"), name
    assert part_files(remote) == []


def test_upload_early_remote_hash_rechecks_files_still_being_written(
    sshd: SshServer, remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain tar upload (no zstd: no frame checksums) hashes files remotely while streaming;
    hashing them too early (here: at once, tiny batches) only costs a second look, never a false
    failure."""
    monkeypatch.setattr(tarstream, "HASH_LAG", 0)
    monkeypatch.setattr(hashing, "_HASH_RUNS", 10**9)  # one hash process per file
    local = tmp_path / "case"
    for i in range(12):
        (local / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (local / f"d{i % 3}" / f"{i}.csv").write_bytes(os.urandom(3_000_000))
    with connection.connect(**fast(sshd, compression="none")) as conn:
        report = upload.upload_tree(conn, local, str(remote), method="tar")
    assert len(report.uploaded) == 12
    for rel, digest in report.files.items():
        assert sha256(remote / rel) == digest == sha256(local / rel)
    assert part_files(remote) == []


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_upload_stream_piece_edges_in_four_sessions(
    sshd: SshServer, remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    """Files ending on and beside the stream's piece (zstd frame) and tar block boundaries arrive
    whole; however many files, an upload opens three SSH sessions with zstd: the tools question,
    SFTP (listing, renames) and the tar stream (verified by zstd's frame checksums), and ONE
    remote hash command more without."""
    piece = tarstream.PIECE
    sizes = [0, 1, 511, 512, 513, piece - 512, piece - 1, piece, piece + 1, 3 * piece + 7]
    local = tmp_path / "case"
    (local / "log").mkdir(parents=True)
    data = {f"log/{i:02d}.csv": os.urandom(sizes[i % len(sizes)]) for i in range(30)}
    for rel, content in data.items():
        (local / rel).write_bytes(content)
    opened: list[str] = []
    real_open = paramiko.Transport.open_session

    def counting_open(self: paramiko.Transport, *args: Any, **kwargs: Any) -> paramiko.Channel:
        opened.append("session")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(paramiko.Transport, "open_session", counting_open)
    with connection.connect(**fast(sshd, compression=compression)) as conn:
        report = upload.upload_tree(conn, local, str(remote), method="auto")
    assert len(opened) == (3 if compression == "zstd" else 4)
    assert sorted(report.uploaded) == sorted(data)
    for rel, content in data.items():
        assert (remote / rel).read_bytes() == content, rel
        assert report.files[rel] == hashlib.sha256(content).hexdigest()
    assert part_files(remote) == []


def corrupting_compressor(monkeypatch: pytest.MonkeyPatch, frame_no: int, offset: int) -> list[bytes]:
    """Flip one byte (at ``offset``, negative from the end) of the ``frame_no``-th zstd frame the
    upload compresses, on its way to the server; returns the frames as compressed (unflipped)."""
    real = tarstream._Compressors._compress
    frames: list[bytes] = []
    lock = threading.Lock()

    def compress(self: Any, data: bytes) -> bytes:
        frame = real(self, data)
        with lock:
            frames.append(frame)
            if len(frames) != frame_no:
                return frame
        flipped = bytearray(frame)
        flipped[offset] ^= 0x40
        return bytes(flipped)

    monkeypatch.setattr(tarstream._Compressors, "_compress", compress)
    return frames


@pytest.mark.parametrize("where", ["content", "checksum"])
def test_upload_corrupted_zstd_frame_fails_and_renames_nothing(
    sshd: SshServer, remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """zstd's frame checksums verify the zstd upload (no remote sha256): one byte flipped in a
    frame's stored (incompressible) data, or in its checksum, decodes without a format error,
    and only the checksum catches it; the upload fails naming it and renames nothing."""
    local = tmp_path / "case"
    (local / "beam").mkdir(parents=True)
    # raw blocks; the server stops reading long before the end of the stream (16 MiB window)
    (local / "beam" / "big.raw").write_bytes(os.urandom(40 * tarstream.PIECE))
    (local / "plan.csv").write_bytes(b"id,x\r\n" * 100)
    frames = corrupting_compressor(monkeypatch, 3, tarstream.PIECE // 2 if where == "content" else -1)
    with connection.connect(**fast(sshd, compression="zstd")) as conn:
        with pytest.raises(VerifyError, match=r"zstd -d rejected the stream .*checksum") as exc:
            upload.upload_tree(conn, local, str(remote), method="tar")
        assert "Restored data doesn't match checksum" in str(exc.value)  # zstd's own message
        assert frames and all(zstandard.get_frame_parameters(f).has_checksum for f in frames)
        assert not (remote / "beam" / "big.raw").exists() and not (remote / "plan.csv").exists()
        assert part_files(remote) == []  # the partial files were removed

        monkeypatch.undo()  # the same upload, uncorrupted, passes on the same connection
        report = upload.upload_tree(conn, local, str(remote), method="tar")
    assert sha256(remote / "beam" / "big.raw") == report.files["beam/big.raw"] == sha256(local / "beam" / "big.raw")


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_upload_into_unwritable_folder_fails_clearly(
    sshd: SshServer, remote: Path, tmp_path: Path, compression: str
) -> None:
    """tar cannot write on the server: the upload fails with tar's status and message."""
    local = tmp_path / "case"
    local.mkdir()
    (local / "plan.csv").write_bytes(os.urandom(3000))
    remote.mkdir()
    give_to_user(sshd, remote)
    remote.chmod(0o500)
    with (
        connection.connect(**fast(sshd, compression=compression)) as conn,
        pytest.raises(TransferError, match=r"tar -x into .* failed \(rc=2\): .*Permission denied") as exc,
    ):
        upload.upload_tree(conn, local, str(remote), method="tar")
    assert not isinstance(exc.value, VerifyError) and not exc.value.transient
    assert list(remote.iterdir()) == []


def test_upload_zstd_size_mismatch_is_caught(
    sshd: SshServer, remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's .part sizes are checked against the local ones: here the archive carries
    one file a byte short (a valid stream that zstd and tar accept)."""
    local = tmp_path / "case"
    local.mkdir()
    for i in range(3):
        (local / f"{i}.csv").write_bytes(os.urandom(10_000))
    real = tarstream._archive

    def short_archive(dirs: list[str], files: list[Any], *rest: Any) -> Any:
        cut = [dataclasses.replace(f, size=f.size - 1) if f.rel == "1.csv" else f for f in files]
        return real(dirs, cut, *rest)

    monkeypatch.setattr(tarstream, "_archive", short_archive)
    with (
        connection.connect(**fast(sshd, compression="zstd")) as conn,
        pytest.raises(
            VerifyError, match=r"1 file\(s\) have the wrong size remotely, e.g. 1.csv.part \(9999 bytes, sent 10000\)"
        ),
    ):
        upload.upload_tree(conn, local, str(remote), method="tar")
    assert list(remote.iterdir()) == []


def test_upload_refuses_broken_symlinks_and_odd_names(sshd: SshServer, remote: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "dangling.csv").symlink_to(tmp_path / "nowhere.csv")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two\nlines.csv").write_text("x")
    with connection.connect(**fast(sshd)) as conn:
        with pytest.raises(TransferError, match=r"broken symlink .*dangling\.csv") as exc:
            upload.upload_tree(conn, tmp_path / "a", str(remote))
        assert not exc.value.transient
        with pytest.raises(TransferError, match="unsupported character"):
            upload.upload_tree(conn, tmp_path / "b", str(remote))
    assert not remote.exists()


def test_upload_file_creates_parents_and_skips_identical(sshd: SshServer, remote: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(os.urandom(300_000))
    with connection.connect(**fast(sshd)) as conn:
        first = upload.upload_file(conn, src, str(remote / "a" / "b" / "in.csv"))
        second = upload.upload_file(conn, src, str(remote / "a" / "b" / "in.csv"))
    assert first.uploaded == ["in.csv"] and first.bytes_sent == 300_000
    assert second.uploaded == [] and second.skipped == ["in.csv"]
    assert sha256(remote / "a" / "b" / "in.csv") == sha256(src)
    assert part_files(remote) == []


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_download_verified_atomic_idempotent(
    sshd: SshServer, remote: Path, tmp_path: Path, compression: str, paramiko_api: str
) -> None:
    remote.mkdir()
    give_to_user(sshd, remote)
    data = os.urandom(3_000_000)
    (remote / "dose.raw").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    local = tmp_path / "out" / "dose.raw"
    with connection.connect(**fast(sshd, compression=compression)) as conn:
        assert download.download_file(conn, str(remote / "dose.raw"), local, expected_sha256=want) == want
        assert local.read_bytes() == data
        assert part_files(tmp_path) == []
        inode = local.stat().st_ino
        assert download.download_file(conn, str(remote / "dose.raw"), local) == want
        assert local.stat().st_ino == inode  # identical: not downloaded again

        with pytest.raises(VerifyError, match="expected"):
            download.download_file(conn, str(remote / "dose.raw"), tmp_path / "other.raw", expected_sha256="0" * 64)
        assert not (tmp_path / "other.raw").exists()

        with pytest.raises(TransferError) as missing:
            download.download_file(conn, str(remote / "nope.raw"), tmp_path / "nope.raw")
        assert not missing.value.transient
        assert not (tmp_path / "nope.raw").exists()

        (remote / "link.raw").symlink_to(remote / "dose.raw")  # followed, as SFTP does
        assert download.download_file(conn, str(remote / "link.raw"), tmp_path / "link.raw") == want
        assert (tmp_path / "link.raw").read_bytes() == data

        (remote / "empty.raw").write_bytes(b"")
        assert download.download_file(conn, str(remote / "empty.raw"), tmp_path / "empty.raw") == sha256_bytes(b"")
        assert (tmp_path / "empty.raw").read_bytes() == b""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def session_bytes_written(sshd: SshServer) -> int:
    """Bytes the server's session processes have written (sshd's to the socket included)."""
    total = 0
    for pid in sshd.session_pids():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/io") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    return total


def dose_like(n_planes: int, seed: int = 5) -> bytes:
    """float64 planes of 400x400 mostly zero, noisy values in a central field (a dose volume)."""
    rng = np.random.default_rng(seed)
    planes = np.zeros((n_planes, 400, 400))
    planes[:, 150:250, 140:260] = rng.uniform(0.1, 1.0, (n_planes, 100, 120))
    return planes.astype("<f8").tobytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the sshd session processes' /proc/PID/io (root)")
def test_zstd_download_sends_a_dose_volume_compressed(sshd: SshServer, remote: Path, tmp_path: Path) -> None:
    remote.mkdir()
    give_to_user(sshd, remote)
    data = dose_like(50)  # 64 MB, 92.5 % zeros
    (remote / "dose.raw").write_bytes(data)
    written = {}
    for compression in ("zstd", "none"):
        local = tmp_path / compression / "dose.raw"
        with connection.connect(**fast(sshd, compression=compression)) as conn:
            before = session_bytes_written(sshd)
            digest = download.download_file(conn, str(remote / "dose.raw"), local)
            written[compression] = session_bytes_written(sshd) - before
        assert digest == sha256_bytes(data)
        assert local.read_bytes() == data
    # sshd forwarded the whole file without zstd, a fraction of it with zstd
    assert written["none"] > len(data)
    assert written["zstd"] < len(data) / 4, written


def test_public_api_fallback_takes_no_private_path(
    sshd: SshServer, remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An untested paramiko keeps paramiko's own receive buffer and request size, and renames
    file by file; a large SFTP download and a many-file SFTP upload still arrive intact."""
    monkeypatch.setattr(paramiko, "__version__", "0.0.0+untested")
    remote.mkdir()
    give_to_user(sshd, remote)
    data = os.urandom(5_000_000)
    (remote / "dose.raw").write_bytes(data)
    local = tmp_path / "case"
    for i in range(30):
        (local / f"b{i % 3}").mkdir(parents=True, exist_ok=True)
        (local / f"b{i % 3}" / f"{i:02d}.csv").write_bytes(os.urandom(20_000 + i))
    with connection.connect(**fast(sshd, compression="none")) as conn:
        assert type(conn.sftp.sock.in_buffer) is BufferedPipe  # not fastpath.MessagePipe
        digest = download.download_file(conn, str(remote / "dose.raw"), tmp_path / "dose.raw")
        report = upload.upload_tree(conn, local, str(remote / "csv"), method="sftp")
    assert digest == sha256_bytes(data) and (tmp_path / "dose.raw").read_bytes() == data
    assert len(report.uploaded) == 30
    for rel, want in report.files.items():
        assert sha256(remote / "csv" / rel) == want == sha256(local / rel)
    assert part_files(remote) == []


@pytest.mark.parametrize("method", ["tar", "sftp"])
def test_staged_and_downloaded_files_are_private(sshd: SshServer, remote: Path, tmp_path: Path, method: str) -> None:
    """Patient data: 0600 files and 0700 folders on the server (whatever sshd's umask) and
    locally (whatever this process's umask)."""
    local = tmp_path / "case"
    (local / "log" / "1G180").mkdir(parents=True)
    (local / "plan.csv").write_bytes(b"name,id,birth\r\n")
    (local / "log" / "1G180" / "01.csv").write_bytes(os.urandom(50_000))
    previous = os.umask(0o022)  # a permissive umask: the modes below must not depend on it
    try:
        with connection.connect(**fast(sshd)) as conn:
            upload.upload_tree(conn, local, str(remote / "case"), method=method)
            commands.run(conn, ["sh", "-c", 'head -c 1000 /dev/urandom > "$1"', "sh", str(remote / "dose.raw")], 10)
            download.download_file(conn, str(remote / "dose.raw"), tmp_path / "out" / "dose.raw")
        write_atomic(tmp_path / "out" / "record.json", b"{}")
    finally:
        os.umask(previous)
    staged = [remote, *sorted(remote.rglob("*"))]  # checked on disk, as the cluster would show them
    assert {str(p.relative_to(remote)): oct(p.stat().st_mode & 0o777) for p in staged} == {
        **{d: "0o700" for d in (".", "case", "case/log", "case/log/1G180")},
        **{f: "0o600" for f in ("case/plan.csv", "case/log/1G180/01.csv", "dose.raw")},
    }
    assert oct((tmp_path / "out" / "dose.raw").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "out" / "record.json").stat().st_mode & 0o777) == "0o600"


def test_zstd_wanted_by_setting_and_server_tools(sshd: SshServer) -> None:
    with connection.connect(**fast(sshd)) as conn:
        tools = commands.remote_tools(conn)  # asked of the real server
    assert tools == {"tar", "zstd"}  # start-sshd.sh installs zstd when missing
    where = "moqui@login1:22"
    assert commands.zstd_wanted("auto", tools, where) is True
    assert commands.zstd_wanted("zstd", tools, where) is True
    assert commands.zstd_wanted("none", tools, where) is False
    assert commands.zstd_wanted("auto", frozenset({"tar"}), where) is False  # falls back to plain
    with pytest.raises(TransferError, match="moqui@login1:22 has no zstd command") as exc:
        commands.zstd_wanted("zstd", frozenset({"tar"}), where)
    assert not exc.value.transient
    with pytest.raises(ValueError, match="compression must be one of"):
        connection.connect(**fast(sshd, compression="gzip"))


def test_connect_from_config(sshd: SshServer) -> None:
    hpc = {
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "ssh_key_path": str(sshd.key),
        "known_hosts_path": str(sshd.known_hosts),
        "connect_timeout_seconds": 5,
        "retries": 1,
        "op_timeout_seconds": 5,
    }
    with connection.connect_from_config(hpc) as conn:
        assert conn.target.op_timeout == 5 and conn.target.banner_timeout == 5
        assert commands.run(conn, "echo ok", timeout=10).stdout == "ok\n"
        assert conn.transport.remote_cipher == "aes128-gcm@openssh.com"


def test_run_remote_commands(sshd: SshServer) -> None:
    with connection.connect(**fast(sshd)) as conn:
        rc, out, err = commands.run(conn, "echo out; echo err >&2; exit 3", timeout=10)
        assert (rc, out, err) == (3, "out\n", "err\n")
        assert commands.run(conn, ["printf", "%s|", "a b", "$HOME", "'q'"], timeout=10).stdout == "a b|$HOME|'q'|"
        assert commands.run(conn, "wc -c", timeout=10, stdin=b"x" * 5_000_000).stdout.strip() == "5000000"
        big = commands.run(conn, "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2", timeout=10)
        assert len(big.stdout) == len(big.stderr) == 3_000_000  # both streams drained, no deadlock

        t0 = time.monotonic()
        with pytest.raises(CommandTimeout, match="did not finish within"):
            commands.run(conn, "sleep 30", timeout=0.5, idempotent=False)
        assert time.monotonic() - t0 < 5
        assert commands.run(conn, "echo again", timeout=10).stdout == "again\n"  # fresh connection


# ---------------------------------------------------------------------------------------------
# refusals: host key, authentication


def test_unknown_host_refused(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t0 = time.monotonic()
    with pytest.raises(HostKeyError) as exc:
        connection.connect(**fast(sshd, known_hosts_path=str(empty), retries=3, backoff_s=1))
    message = str(exc.value)
    assert f"127.0.0.1:{sshd.port}" in message and str(empty) in message and "unknown" in message
    assert time.monotonic() - t0 < 1  # not retried
    assert empty.read_text() == ""  # nothing added


def test_changed_host_key_refused(sshd: SshServer, tmp_path: Path) -> None:
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    with pytest.raises(HostKeyError) as exc:
        connection.connect(**fast(sshd, known_hosts_path=str(known), retries=3, backoff_s=1))
    assert f"127.0.0.1:{sshd.port}" in str(exc.value) and "CHANGED" in str(exc.value)
    assert exc.value.attempts == 1


def test_missing_known_hosts_file(sshd: SshServer, tmp_path: Path) -> None:
    with pytest.raises(HostKeyError, match="does not exist"):
        connection.connect(**fast(sshd, known_hosts_path=str(tmp_path / "nope")))


def test_bad_client_key(sshd: SshServer, tmp_path: Path) -> None:
    stranger = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    t0 = time.monotonic()
    with pytest.raises(AuthError) as exc:
        connection.connect(**fast(sshd, key_path=str(stranger), retries=3, backoff_s=1))
    assert "authentication" in str(exc.value) and str(stranger) in str(exc.value)
    assert not exc.value.transient and time.monotonic() - t0 < 1

    with pytest.raises(AuthError, match="cannot be loaded"):
        connection.connect(**fast(sshd, key_path=str(tmp_path / "absent")))
    locked = tmp_path / "id_locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    with pytest.raises(AuthError, match="passphrase"):
        connection.connect(**fast(sshd, key_path=str(locked)))


# ---------------------------------------------------------------------------------------------
# network faults


def test_connection_refused_is_retried_then_reported(sshd: SshServer) -> None:
    sshd.kill()
    t0 = time.monotonic()
    with pytest.raises(TransferError) as exc:
        connection.connect(**fast(sshd, retries=2, backoff_s=0.1))
    assert exc.value.transient and exc.value.attempts == 3
    assert time.monotonic() - t0 >= 0.3  # 0.1 + 0.2 s of backoff
    assert f"127.0.0.1:{sshd.port}" in str(exc.value)


def test_stalled_session_times_out_instead_of_hanging(sshd: SshServer, remote: Path, tmp_path: Path) -> None:
    remote.mkdir()
    give_to_user(sshd, remote)
    (remote / "f.txt").write_text("x")
    frozen: list[int] = []

    def freeze() -> None:
        for pid in sshd.session_pids():  # this connection's sshd processes and sftp-server
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)

    try:
        with connection.connect(**fast(sshd, op_timeout=1.5, retries=0)) as conn:
            conn.sftp.stat(str(remote / "f.txt"))
            freeze()
            t0 = time.monotonic()
            with pytest.raises(TransferError) as exc:
                conn.call(lambda: conn.sftp.stat(str(remote / "f.txt")), "stat")
            assert exc.value.transient and "timed out" in str(exc.value)
            assert time.monotonic() - t0 < 5

            assert commands.run(conn, "true", timeout=5).rc == 0 and conn.connects == 2  # fresh one
            freeze()
            t0 = time.monotonic()
            with pytest.raises(TransferError) as exc:  # remote command on a frozen connection
                commands.run(conn, "true", timeout=1.5)
            assert exc.value.transient and time.monotonic() - t0 < 6

            # with one retry, an operation whose session freezes completes on a fresh connection
            conn.target = dataclasses.replace(conn.target, retries=1)
            assert commands.run(conn, "true", timeout=5).rc == 0 and conn.connects == 3
            freeze()
            t0 = time.monotonic()
            digest = download.download_file(conn, str(remote / "f.txt"), tmp_path / "f.txt")
            assert digest == hashlib.sha256(b"x").hexdigest() and conn.connects == 4
            assert time.monotonic() - t0 < 8
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_stalled_server_banner_timeout(sshd: SshServer) -> None:
    os.kill(sshd.pid, signal.SIGSTOP)  # accepts TCP (kernel backlog) but never says hello
    try:
        t0 = time.monotonic()
        with pytest.raises(TransferError) as exc:
            connection.connect(**fast(sshd, banner_timeout=1, retries=0))
        assert exc.value.transient and time.monotonic() - t0 < 4
    finally:
        os.kill(sshd.pid, signal.SIGCONT)


@pytest.mark.parametrize(("method", "compression"), UPLOAD_WAYS)
def test_server_killed_mid_upload_then_rerun(
    sshd: SshServer, remote: Path, big_file: Path, method: str, compression: str
) -> None:
    target = remote / "dose.raw"
    watcher = when_size_reaches(remote / "dose.raw.part", KILL_AT, sshd.kill)
    with (
        connection.connect(**fast(sshd, retries=1, compression=compression)) as conn,
        pytest.raises(TransferError) as exc,
    ):
        upload.upload_file(conn, big_file, str(target), method=method)
    watcher.join()
    assert exc.value.transient
    assert not target.exists()  # nothing under the final name
    partial = remote / "dose.raw.part"
    assert partial.exists() and partial.stat().st_size < BIG

    sshd.ensure_running()
    with connection.connect(**fast(sshd)) as conn:
        report = upload.upload_file(conn, big_file, str(target), method=method)
    assert report.uploaded == ["dose.raw"]
    assert sha256(target) == sha256(big_file) == report.files["dose.raw"]
    assert part_files(remote) == []


@pytest.mark.parametrize(("compression", "sender"), [("zstd", "zstd"), ("none", "sftp-server")])
def test_sending_process_killed_mid_download_is_resumed(
    sshd: SshServer, remote: Path, big_file: Path, tmp_path: Path, compression: str, sender: str
) -> None:
    """The server process that reads the file (zstd or sftp-server) dies mid-way: the download
    continues on a fresh connection from what is already in the local .part file."""
    remote.mkdir()
    give_to_user(sshd, remote)
    shutil.copyfile(big_file, remote / "dose.raw")
    local = tmp_path / "dose.raw"
    killed: list[int] = []

    def kill_sender() -> None:
        for pid in sshd.command_pids(sender):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    watcher = when_size_reaches(tmp_path / "dose.raw.part", KILL_AT, kill_sender)
    with connection.connect(**fast(sshd, retries=2, compression=compression)) as conn:
        digest = download.download_file(conn, str(remote / "dose.raw"), local)
        assert conn.connects == 2  # it did break, and was resumed on a fresh connection
    watcher.join()
    assert killed
    assert digest == sha256(local) == sha256(big_file)
    assert part_files(tmp_path) == []


def test_stalled_zstd_stream_times_out_and_resumes(
    sshd: SshServer, remote: Path, big_file: Path, tmp_path: Path
) -> None:
    """The server's zstd stops sending (SIGSTOP) mid-way: after op_timeout of silence the download
    goes on over a fresh connection from the .part file instead of hanging."""
    remote.mkdir()
    give_to_user(sshd, remote)
    shutil.copyfile(big_file, remote / "dose.raw")
    local = tmp_path / "dose.raw"
    frozen: list[int] = []

    def freeze_zstd() -> None:
        for pid in sshd.command_pids("zstd"):
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)

    watcher = when_size_reaches(tmp_path / "dose.raw.part", KILL_AT, freeze_zstd)
    try:
        t0 = time.monotonic()
        with connection.connect(**fast(sshd, op_timeout=1.5, retries=1, compression="zstd")) as conn:
            digest = download.download_file(conn, str(remote / "dose.raw"), local)
            assert conn.connects == 2
        assert time.monotonic() - t0 < 20
        watcher.join()
        assert frozen
        assert digest == sha256(local) == sha256(big_file)
        assert part_files(tmp_path) == []
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_server_killed_mid_download_then_rerun(
    sshd: SshServer, remote: Path, big_file: Path, tmp_path: Path, compression: str
) -> None:
    remote.mkdir()
    give_to_user(sshd, remote)
    shutil.copyfile(big_file, remote / "dose.raw")
    local = tmp_path / "dose.raw"
    watcher = when_size_reaches(tmp_path / "dose.raw.part", KILL_AT, sshd.kill)
    with (
        connection.connect(**fast(sshd, retries=1, compression=compression)) as conn,
        pytest.raises(TransferError) as exc,
    ):
        download.download_file(conn, str(remote / "dose.raw"), local)
    watcher.join()
    assert exc.value.transient
    assert not local.exists()  # nothing under the final name
    assert 0 < (tmp_path / "dose.raw.part").stat().st_size < BIG

    sshd.ensure_running()
    with connection.connect(**fast(sshd)) as conn:
        digest = download.download_file(conn, str(remote / "dose.raw"), local)
    assert digest == sha256(local) == sha256(big_file)
    assert part_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_upload_check_download(sshd: SshServer, remote: Path, tmp_path: Path) -> None:
    local = tmp_path / "case"
    local.mkdir()
    make_tree(local)
    common = [
        "--host", sshd.host, "--port", str(sshd.port), "--user", sshd.user,
        "--key", str(sshd.key), "--known-hosts", str(sshd.known_hosts),
    ]  # fmt: skip

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
        return subprocess.run(
            [sys.executable, "-m", "mqi_communicator.remote.transfer", *args, *common],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    up = cli("upload", str(local), str(remote))
    assert up.returncode == 0, up.stderr
    assert len(json.loads(up.stdout)["uploaded"]) == 21
    check = cli("check", str(local), str(remote))
    assert check.returncode == 0 and json.loads(check.stdout)["different"] == []
    (local / "log" / "extra.csv").write_text("1\r\n")
    check = cli("check", str(local), str(remote))
    assert check.returncode == transfer_cli.EXIT_DIFFERENT and json.loads(check.stdout)["missing"] == ["log/extra.csv"]
    down = cli("download", str(remote / "plan" / "RP.dcm"), str(tmp_path / "RP.dcm"))
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["sha256"] == sha256(tmp_path / "RP.dcm") == sha256(local / "plan" / "RP.dcm")

    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    bad = subprocess.run(
        [sys.executable, "-m", "mqi_communicator.remote.transfer", "check", str(local), str(remote),
         *common[:-1], str(empty)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "scripts")}, timeout=60,
    )  # fmt: skip
    assert bad.returncode == transfer_cli.EXIT_FAILED and "unknown" in bad.stderr


@pytest.mark.parametrize("tool", ["openssl", "sha256sum"])
def test_remote_hash_scripts_with_and_without_openssl(tmp_path: Path, tool: str) -> None:
    """The server-side hash scripts (run here by sh, as sshd would), with openssl and where only
    coreutils' sha256sum exists: names with spaces, a missing one, batches ended by empty lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in {"xargs", "sha256sum", tool}:
        found = shutil.which(program)
        assert found, program
        (bin_dir / program).symlink_to(found)
    files = {"a b.csv": b"1,2\r\n", "sub/-x.csv": os.urandom(70_000), "sub/c (1).csv": b""}
    for rel, data in files.items():
        (tmp_path / "d" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / rel).write_bytes(data)
    names = [*files, "missing.csv"]
    want = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    env = {"PATH": str(bin_dir)}

    def digests(out: bytes) -> dict[str, str]:
        lines = [line.split(" *", 1) if " *" in line else line.split("  ", 1) for line in out.decode().splitlines()]
        return {name.removeprefix("./"): digest for digest, name in lines}

    listing = b"".join(f"./{n}".encode() + b"\0" for n in names)
    run = subprocess.run(
        ["/bin/sh", "-c", hashing._HASH_SCRIPT, "sh", str(tmp_path / "d"), "2"],
        input=listing,
        env=env,
        capture_output=True,
    )
    assert run.returncode == 123 and digests(run.stdout) == want
    batches = "./a b.csv\n\n./sub/-x.csv\n./missing.csv\n\n./sub/c (1).csv\n"  # the last batch ends with stdin
    run = subprocess.run(
        ["/bin/sh", "-c", hashing._BATCH_HASH_SCRIPT, "sh", str(tmp_path / "d")],
        input=batches.encode(),
        env=env,
        capture_output=True,
    )
    assert run.returncode == 123 and digests(run.stdout) == want
