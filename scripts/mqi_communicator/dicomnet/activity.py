"""The receiver's state file, for `bin/mqi status`: listening or not, the last association, the
objects received today and the last error (docs/dicom-network.md, Operations)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from mqi_communicator.files import read_json_object, write_json_atomic


def _today() -> str:
    return time.strftime("%Y-%m-%d")


class ReceiverActivity:
    """What the receiver did, kept in memory and rewritten (atomically) to ``path`` on each change.
    Association threads share one instance: every change holds the lock."""

    def __init__(self, path: Path, listening_on: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        previous = read_json_object(path) or {}
        self._state: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "listening": False,
            "listening_on": listening_on,
            "started": time.time(),
            "last_association": previous.get("last_association"),
            "day": previous.get("day", _today()),
            "received_today": previous.get("received_today", 0),
            "last_error": previous.get("last_error"),
        }
        self._associations: dict[int, dict[str, Any]] = {}

    def _write(self) -> None:
        # The state is a convenience: a full disk must not stop the receiver answering.
        with contextlib.suppress(OSError):
            write_json_atomic(self.path, self._state)

    def listening(self, on: bool) -> None:
        with self._lock:
            self._state["listening"] = on
            self._state["stopped" if not on else "started"] = time.time()
            self._write()

    def association_started(self, key: int, calling_ae: str, peer: str) -> None:
        with self._lock:
            record = {"calling_ae": calling_ae, "peer": peer, "started": time.time(), "stored": 0, "failed": 0}
            self._associations[key] = record
            self._state["last_association"] = record | {"outcome": "open"}
            self._write()

    def association_ended(self, key: int, outcome: str) -> None:
        with self._lock:
            record = self._associations.pop(key, None)
            if record is not None:
                self._state["last_association"] = record | {"outcome": outcome, "ended": time.time()}
                self._write()

    def stored(self, key: int) -> None:
        with self._lock:
            if self._state["day"] != _today():
                self._state["day"], self._state["received_today"] = _today(), 0
            self._state["received_today"] += 1
            record = self._associations.get(key)
            if record is not None:
                record["stored"] += 1
                self._state["last_association"] = record | {"outcome": "open"}
            self._write()

    def error(self, key: int | None, message: str) -> None:
        with self._lock:
            self._state["last_error"] = {"time": time.time(), "message": message}
            record = self._associations.get(key) if key is not None else None
            if record is not None:
                record["failed"] += 1
                self._state["last_association"] = record | {"outcome": "open"}
            self._write()


def summary(path: Path, now: float | None = None) -> str:
    """One line for `bin/mqi status`."""
    state = read_json_object(path)
    if state is None:
        return f"DICOM receiver: no state at {path} (never started here)"
    now = time.time() if now is None else now
    alive = True
    if state.get("host") == socket.gethostname():
        try:
            os.kill(int(state.get("pid", 0)), 0)
        except ProcessLookupError:
            alive = False
        except (PermissionError, ValueError):
            pass
    up = state.get("listening") and alive
    words = [f"DICOM receiver: {'listening on ' + str(state.get('listening_on')) if up else 'NOT running'}"]
    today = state.get("received_today", 0) if state.get("day") == _today() else 0
    words.append(f"{today} objects received today")
    last = state.get("last_association")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("started", now)))
        words.append(
            f"last association {when} from {last.get('calling_ae')} ({last.get('peer')}): "
            f"{last.get('stored', 0)} stored, {last.get('failed', 0)} failed, {last.get('outcome')}"
        )
    error = state.get("last_error")
    if error:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(error.get("time", now)))
        words.append(f"last error {when}: {error.get('message')}")
    return "; ".join(words)
