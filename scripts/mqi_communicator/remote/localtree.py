"""The local side of an upload: the files of a folder (symlinks followed), read exactly as stat'ed,
with the sha256 their writer recorded where it still holds (`KnownDigests`)."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from mqi_communicator.files import KnownDigests, StatKey, stat_key
from mqi_communicator.remote.connection import PART_SUFFIX, WRITE_REQ
from mqi_communicator.remote.errors import TransferError
from mqi_communicator.remote.hashing import check_name

_LOCAL_CHUNK = 4 * WRITE_REQ  # read local files in multiples of the write request size


@dataclass
class LocalFile:
    rel: str
    path: str
    size: int
    #: `stat_key` when listed: a file read later must still have it
    key: StatKey | None = None
    #: its sha256 as recorded by the step that wrote it (None: hash it while reading)
    sha256: str | None = None

    def check_unchanged(self, st: os.stat_result, when: str) -> None:
        """Raise unless ``st`` (of the open file, or of its name) is still the file listed,
        unchanged (``when``: "listed" before reading, "read" after)."""
        if self.key is not None and stat_key(st) != self.key:
            what = "replaced or changed since it was listed" if when == "listed" else "changed while being uploaded"
            raise TransferError(f"{self.path} was {what}")


def walk_local(
    root: str, known: KnownDigests | None = None, only: Collection[str] | None = None
) -> tuple[list[str], list[LocalFile]]:
    """Directories and files below ``root`` (relative posix paths), symlinks followed; only the
    entries of ``root`` named in ``only`` when given (each must exist). A file's sha256 is taken
    from ``known`` when its `stat_key` is recorded there."""
    dirs: list[str] = []
    files: list[LocalFile] = []
    seen: set[tuple[int, int]] = set()

    def visit(path: str, rel: str) -> None:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            raise TransferError(f"symlink loop at {path}")
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        if only is not None and not rel:
            entries = [e for e in entries if e.name in only]
            missing = sorted(set(only) - {e.name for e in entries})
            if missing:
                raise TransferError(f"{os.path.join(root, missing[0])} does not exist")
        for e in entries:
            child_rel = f"{rel}/{e.name}" if rel else e.name
            try:
                cst = os.stat(e.path)  # follows symlinks
            except FileNotFoundError as exc:
                what = f"broken symlink {e.path} -> {os.readlink(e.path)}" if e.is_symlink() else f"{e.path} vanished"
                raise TransferError(what) from exc
            if stat.S_ISDIR(cst.st_mode):
                dirs.append(child_rel)
                visit(e.path, child_rel)
                seen.discard((cst.st_dev, cst.st_ino))
            elif stat.S_ISREG(cst.st_mode):
                check_name(child_rel)
                key = stat_key(cst)
                files.append(LocalFile(child_rel, e.path, cst.st_size, key, known.get(key) if known else None))
            else:
                raise TransferError(f"{e.path} is neither a regular file nor a directory")

    visit(root, "")
    names = {f.rel for f in files}
    clash = sorted(f.rel for f in files if f.rel + PART_SUFFIX in names)
    if clash:
        raise TransferError(
            f"{root}: {clash[0]} and {clash[0]}{PART_SUFFIX} both exist; {PART_SUFFIX} is the temporary suffix"
        )
    return dirs, files


def read_exactly(fin: Any, size: int, path: str, chunk_size: int = _LOCAL_CHUNK) -> Iterable[bytes]:
    left = size
    while left:
        chunk = fin.read(min(left, chunk_size))
        if not chunk:
            raise TransferError(f"{path} shrank while being uploaded ({size - left} of {size} bytes read)")
        left -= len(chunk)
        yield chunk
