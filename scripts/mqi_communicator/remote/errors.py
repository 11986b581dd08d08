"""What can go wrong talking to the cluster: transfer errors (transient or not) and job errors."""

from __future__ import annotations

import errno
import signal

from mqi_communicator.errors import PERMANENT, TRANSIENT, MqiError
from mqi_communicator.simulate.outcome import SimulationError


class TransferError(MqiError):
    """A transfer or remote command failed. ``transient``: a retry later may succeed."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message, kind=TRANSIENT if transient else PERMANENT)
        self.attempts = 1  #: how many times the operation was tried

    @property
    def transient(self) -> bool:
        return self.failure_kind == TRANSIENT


class HostKeyError(TransferError):
    """The server's host key is unknown or differs from known_hosts: refused, never retried."""


class AuthError(TransferError):
    """The client key is unusable or the server refused it: never retried."""


class VerifyError(TransferError):
    """A file's sha256 on the receiving side differs from the sender's (or from the expected one)."""


class CommandTimeout(TransferError):
    """A remote command did not finish within its timeout (it may still be running remotely)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EHOSTDOWN,
}
TRANSIENT_TEXT = (
    "connection dropped",
    "socket is closed",
    "error reading ssh protocol banner",
    "timeout",
    "timed out",
    "eof",
    "connection reset",
    "no existing session",
    "unable to connect",
    "key-exchange",
    "not active",
)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RemoteJobError(MqiError):
    """The beam cannot be run as asked (bad input, another controller, config): exit 4."""


class JobFailed(SimulationError):
    """The job ran (or was cancelled for max wait) and the beam failed: exit 1."""


class Stopped(MqiError):
    """A stop signal arrived (SIGTERM/SIGINT): the run was stopped, the case is not at fault."""

    failure_kind = TRANSIENT

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class WaitLimit(MqiError):
    """The job is not finished within the wall-clock limit."""

    failure_kind = TRANSIENT


class Unreachable(MqiError):
    """The cluster did not answer for longer than the unreachable limit."""

    failure_kind = TRANSIENT
