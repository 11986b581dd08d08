"""Upload a folder or a file to the cluster: atomic (``.part`` + rename), verified, idempotent.

Files already identical remotely (size, then sha256) are not sent. The others stream as ONE tar
archive (zstd frames compressed in worker threads when the server has zstd) into
``[zstd -d |] tar -x`` over an exec channel (`tarstream`: no per-file round trip, no SFTP
framing), or by pipelined SFTP writes where the server has no tar. A zstd stream verifies itself
(each frame's content checksum checked by ``zstd -d``, exit statuses, remote sizes); otherwise
finished files are hashed remotely by one command while the rest streams (`hashing`) and compared
with the sha256 sent. Only verified files get their final name; the report keeps every file's
sha256 (computed here while reading). Staged files are 0600 and folders 0700 on the server
(created so explicitly, and under ``umask 077``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import stat
import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import paramiko

from mqi_communicator.errors import InputError
from mqi_communicator.files import PRIVATE_FILE, KnownDigests, sha256_of, stat_key
from mqi_communicator.remote import fastpath
from mqi_communicator.remote.commands import ask_tools, execute, home_relative, remote_tools, sh_command, use_zstd
from mqi_communicator.remote.connection import PART_SUFFIX, WRITE_REQ, Connection
from mqi_communicator.remote.errors import TransferError, VerifyError
from mqi_communicator.remote.hashing import BackgroundHasher, check_name, finish_sha256, hash_timeout, start_sha256
from mqi_communicator.remote.localtree import LocalFile, read_exactly, walk_local
from mqi_communicator.remote.tarstream import send_archive


@dataclass
class UploadReport:
    """What an upload did. ``files``: every file of the tree with its sha256 (now present remotely)."""

    local: str
    remote: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _remote_listing(sftp: paramiko.SFTPClient, base: str, dirs: Iterable[str]) -> dict[str, int | None]:
    """Size of each entry (None: not a regular file) in ``base`` and in the given subfolders."""
    found: dict[str, int | None] = {}
    for d in ["", *dirs]:
        try:
            entries = sftp.listdir_attr(posixpath.join(base, d) if d else base)
        except FileNotFoundError:
            if not d:  # no remote folder yet: nothing below it either (one round trip, not one per folder)
                return found
            continue
        for a in entries:
            rel = f"{d}/{a.filename}" if d else a.filename
            found[rel] = a.st_size if a.st_mode is not None and stat.S_ISREG(a.st_mode) else None
    return found


def _remote_stats(sftp: paramiko.SFTPClient, base: str, names: Iterable[str]) -> dict[str, int | None]:
    """Like `_remote_listing` for a few named entries (one stat each, no folder listing)."""
    found: dict[str, int | None] = {}
    for name in names:
        try:
            a = sftp.stat(posixpath.join(base, name))
        except FileNotFoundError:
            continue
        found[name] = a.st_size if a.st_mode is not None and stat.S_ISREG(a.st_mode) else None
    return found


def _identical(conn: Connection, base: str, files: list[LocalFile], listing: dict[str, int | None]) -> dict[str, str]:
    """{rel: sha256} of the files already present remotely with the same size and sha256."""
    same_size = [f for f in files if listing.get(f.rel) == f.size]
    if not same_size:
        return {}
    names = [f.rel for f in same_size]
    job = start_sha256(conn, base, names)  # hashes remotely while we hash here
    local = {f.rel: f.sha256 or sha256_of(f.path) for f in same_size}
    remote = finish_sha256(job, names, hash_timeout(conn, sum(f.size for f in same_size)))
    return {rel: h for rel, h in local.items() if remote.get(rel) == h}


def _send_sftp(
    conn: Connection, base: str, dirs: list[str], files: list[LocalFile], hasher: BackgroundHasher
) -> dict[str, str]:
    """Write each file to ``<rel>.part`` with pipelined SFTP writes; {rel: sha256 sent}."""
    mk = sh_command('mkdir -p -- "$1" && cd -- "$1" && xargs -0 -r mkdir -p --', base)
    rc, _, err = execute(conn, mk, conn.target.op_timeout, b"".join(d.encode() + b"\0" for d in dirs))
    if rc != 0:
        raise TransferError(f"mkdir -p {base} on {conn.target.where} failed: {err.decode(errors='replace').strip()}")
    sftp = conn.sftp
    sent: dict[str, str] = {}
    for f in files:
        h = None if f.sha256 else hashlib.sha256()  # recorded by its writer: not hashed again
        with open(f.path, "rb") as fin:
            f.check_unchanged(os.fstat(fin.fileno()), "listed")
            # Not closed on failure: close() would wait for every pending write answer (op_timeout
            # again on a stalled server); the handle goes with the dropped connection.
            out = sftp.open(posixpath.join(base, f.rel + PART_SUFFIX), "wb")
            out.chmod(PRIVATE_FILE)  # sftp-server creates with its own umask
            fastpath.set_request_size(out, WRITE_REQ)
            out.set_pipelined(True)  # write errors surface at close()
            for chunk in read_exactly(fin, f.size, f.path):
                if h is not None:
                    h.update(chunk)
                out.write(chunk)
            f.check_unchanged(os.fstat(fin.fileno()), "read")
            out.close()
        sent[f.rel] = h.hexdigest() if h is not None else str(f.sha256)
        hasher.add(f.rel + PART_SUFFIX, f.size)  # complete once close() has returned
    return sent


def _send_hashed(
    conn: Connection, base: str, dirs: list[str], files: list[LocalFile], use_tar: bool, nbytes: int
) -> dict[str, str]:
    """Send by plain tar or SFTP, then compare the sha256 of every ``.part`` on the server (hashed
    while the rest streams) with what was sent; {rel: sha256}."""
    hasher = BackgroundHasher(conn, base, nbytes)
    if use_tar:
        sent = send_archive(conn, base, dirs, files, hasher.add, compress=False)
    else:
        sent = _send_sftp(conn, base, dirs, files, hasher)
    got = hasher.results()
    bad = [rel + PART_SUFFIX for rel in sent if got.get(rel + PART_SUFFIX) != sent[rel]]
    if bad:  # hashed too early while tar was still writing, or really different: look again
        again = start_sha256(conn, base, bad)
        got.update(finish_sha256(again, bad, hash_timeout(conn, nbytes)))
    bad = [rel for rel in sent if got.get(rel + PART_SUFFIX) != sent[rel]]
    if bad:
        _discard(conn, base, bad)
        raise VerifyError(
            f"upload to {conn.target.where}:{base}: sha256 differs remotely for {len(bad)} file(s), "
            f"e.g. {bad[0]} (sent {sent[bad[0]]}, remote {got.get(bad[0] + PART_SUFFIX, 'missing')}); "
            f"the partial files were removed"
        )
    return sent


def _discard(conn: Connection, base: str, rels: list[str]) -> None:
    """Remove the ``.part`` files of a failed verification (those that exist)."""
    for rel in rels:
        with contextlib.suppress(OSError):
            conn.sftp.remove(posixpath.join(base, rel + PART_SUFFIX))


def _upload_once(
    conn: Connection,
    local: str,
    base: str,
    dirs: list[str],
    files: list[LocalFile],
    listing: dict[str, int | None],
    method: str,
    remote: str,
) -> UploadReport:
    t0 = time.monotonic()
    report = UploadReport(local=local, remote=remote)
    identical = _identical(conn, base, files, listing)
    todo = [f for f in files if f.rel not in identical]
    report.skipped = [f.rel for f in files if f.rel in identical]
    report.files.update(identical)
    # .part files left by an interrupted run, next to a file that is complete
    _discard(conn, base, [rel for rel in report.skipped if rel + PART_SUFFIX in listing])

    missing_dirs = [d for d in dirs if d not in listing]
    if not todo and not missing_dirs:
        if not files and not listing:  # an empty folder: still mkdir -p it
            rc, _, err = execute(conn, sh_command('mkdir -p -- "$1"', base), conn.target.op_timeout)
            if rc != 0:
                raise TransferError(
                    f"mkdir -p {base} on {conn.target.where} failed: {err.decode(errors='replace').strip()}"
                )
        return _finish_report(report, t0)
    use_tar = method == "tar" or (method == "auto" and "tar" in remote_tools(conn))
    # a tar stream carries a hard link's bytes once (`tarstream`); SFTP writes every file
    carried = {f.key[:2] if use_tar and f.key else f.rel: f.size for f in todo}
    report.bytes_sent = sum(carried.values())
    if use_tar and use_zstd(conn):  # verified by the stream itself: frame checksums, statuses, sizes
        try:
            sent = send_archive(conn, base, missing_dirs, todo, None, compress=True)
        except VerifyError:
            _discard(conn, base, [f.rel for f in todo])
            raise
    else:
        sent = _send_hashed(conn, base, missing_dirs, todo, use_tar, sum(f.size for f in todo))
    # only verified files get their final name (an atomic replace)
    fastpath.rename_all(
        conn.sftp, [(posixpath.join(base, rel + PART_SUFFIX), posixpath.join(base, rel)) for rel in sent]
    )
    report.uploaded = list(sent)
    report.files.update(sent)
    return _finish_report(report, t0)


def _finish_report(report: UploadReport, t0: float) -> UploadReport:
    report.files = dict(sorted(report.files.items()))
    report.seconds = time.monotonic() - t0
    return report


METHODS = ("auto", "tar", "sftp")


def _checked_source(path: str | os.PathLike[str], method: str, *, folder: bool) -> str:
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, not {method!r}")
    local = os.fspath(path)
    if not (os.path.isdir(local) if folder else os.path.isfile(local)):
        raise TransferError(f"{local} is not a {'directory' if folder else 'file'}")
    return local


def upload_tree(
    conn: Connection,
    local_dir: str | os.PathLike[str],
    remote_dir: str,
    *,
    method: str = "auto",
    known: KnownDigests | None = None,
    only: Collection[str] | None = None,
) -> UploadReport:
    """Upload a folder (symlinks followed) so that ``remote_dir`` holds the same files, verified.

    Files already identical remotely (size, then sha256) are not sent. The others are written as
    ``<name>.part`` (``method``: "tar" = one tar stream into ``tar -x`` over exec, zstd-compressed
    as the connection's ``compression`` allows, "sftp" = pipelined SFTP writes, "auto" = tar when
    the server has it), verified (zstd: frame checksums, exit statuses and sizes; otherwise: hashed
    remotely in one command and compared with the sha256 of what was sent), and renamed
    (posix-rename). Folders are
    created as needed (empty ones too). Remote files that do not exist locally are left alone.
    ``only``: just these entries of ``local_dir`` (e.g. two of its folders). A file that is a hard
    link of another in the tree is sent once by tar (the server gets the same link).
    The report's sha256 of a file recorded in ``known`` (by the step that wrote it, with the same
    `stat_key`) is that record's: the file is read to be sent, not hashed again.
    """
    local = _checked_source(local_dir, method, folder=True)
    remote = home_relative(remote_dir)

    def once() -> UploadReport:
        dirs, files = walk_local(local, known, only)
        asked = ask_tools(conn) if method != "sftp" else None  # answered while SFTP lists the folder
        listing = _remote_listing(conn.sftp, remote, dirs)
        if asked is not None:
            remote_tools(conn, asked)
        return _upload_once(conn, local, remote, dirs, files, listing, method, remote)

    return conn.call(once, f"upload {local} -> {remote}")


def upload_file(
    conn: Connection, local_path: str | os.PathLike[str], remote_path: str, *, method: str = "auto"
) -> UploadReport:
    """Upload one file (same guarantees as `upload_tree`); parent folders are created."""
    local = _checked_source(local_path, method, folder=False)
    remote = home_relative(remote_path)
    parent, name = posixpath.split(remote)
    check_name(name)

    def once() -> UploadReport:
        base = parent or "."
        st = os.stat(local)
        files = [LocalFile(name, local, st.st_size, stat_key(st))]
        asked = ask_tools(conn) if method != "sftp" else None  # answered while SFTP looks for the file
        listing = _remote_stats(conn.sftp, base, [name, name + PART_SUFFIX])
        if asked is not None:
            remote_tools(conn, asked)
        return _upload_once(conn, local, base, [], files, listing, method, remote)

    return conn.call(once, f"upload {local} -> {remote}")


def compare_tree(conn: Connection, local_dir: str | os.PathLike[str], remote_dir: str) -> dict[str, list[str]]:
    """Which files of a local folder are identical / different / missing remotely (nothing is sent)."""
    local, remote = os.fspath(local_dir), home_relative(remote_dir)

    def once() -> dict[str, list[str]]:
        dirs, files = walk_local(local)
        listing = _remote_listing(conn.sftp, remote, dirs)
        identical = _identical(conn, remote, files, listing)
        return {
            "identical": [f.rel for f in files if f.rel in identical],
            "different": [f.rel for f in files if f.rel not in identical and f.rel in listing],
            "missing": [f.rel for f in files if f.rel not in listing],
        }

    return conn.call(once, f"compare {local} with {remote}")
