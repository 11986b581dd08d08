"""What a case's input files are, two ways: a cheap stat fingerprint that notices any touch, and a
content digest (sha256 of every file) that decides whether the case really changed."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from mqi_communicator.files import sha256_of


def case_files(case_dir: Path) -> list[Path]:
    return sorted(p for p in case_dir.rglob("*") if p.is_file())


def stat_fingerprint(case_dir: Path) -> str:
    """Names, sizes, modification and change times of the case's files. The change time (ctime)
    cannot be set back, so a file replaced with an old mtime (`cp -p`, `rsync -a`) changes it too."""
    digest = hashlib.sha256()
    for path in case_files(case_dir):
        st = path.stat()
        digest.update(f"{path.relative_to(case_dir)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return digest.hexdigest()


def content_record(case_dir: Path) -> dict[str, Any]:
    """sha256 of every file, their digest, and the stat fingerprint they were read at."""
    fingerprint = stat_fingerprint(case_dir)
    files = {str(p.relative_to(case_dir)): sha256_of(p) for p in case_files(case_dir)}
    return {"fingerprint": fingerprint, "digest": digest_of(files), "files": files}


def digest_of(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def content_digest(case_dir: Path, known: dict[str, Any] | None = None) -> str:
    """The case's content digest; `known` (a `content_record` taken earlier) is reused while no
    file was touched since, so an unchanged case is not read again."""
    if known and known.get("fingerprint") == stat_fingerprint(case_dir):
        return str(known["digest"])
    return digest_of({str(p.relative_to(case_dir)): sha256_of(p) for p in case_files(case_dir)})


def changed_files(case_dir: Path, recorded: dict[str, str]) -> list[str]:
    """Files added, removed or with other content than `recorded` (relative path -> sha256)."""
    now = {str(p.relative_to(case_dir)): p for p in case_files(case_dir)}
    changed = sorted(set(recorded) ^ set(now))
    changed += sorted(rel for rel in set(recorded) & set(now) if sha256_of(now[rel]) != recorded[rel])
    return changed


def is_ready(case_dir: Path, marker: str, quiet_seconds: float, now: float | None = None) -> bool:
    """Ready = marker present and, when asked, no file in the case changed for quiet_seconds."""
    if not (case_dir / marker).is_file():
        return False
    if quiet_seconds <= 0:
        return True
    newest = max((p.stat().st_mtime for p in case_dir.rglob("*")), default=0.0)
    return ((time.time() if now is None else now) - newest) >= quiet_seconds
