"""The host-key policy: the server's key must already be in the given known_hosts file.

An unknown key is refused (`RejectUnknownHost`), a changed one is reported with both
fingerprints (`changed_key_error`); nothing is ever written to known_hosts.
"""

from __future__ import annotations

import base64
import hashlib
import os

import paramiko

from mqi_communicator.remote.errors import HostKeyError, describe


def fingerprint(key: paramiko.PKey) -> str:
    """``<type> SHA256:<base64>``, as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def known_hosts_name(host: str, port: int) -> str:
    """The name a host is looked up under in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


class RejectUnknownHost(paramiko.MissingHostKeyPolicy):
    """Refuse a server whose key is not in known_hosts (never add it)."""

    def __init__(self, host: str, port: int, known_hosts_path: str) -> None:
        self.host, self.port, self.known_hosts_path = host, port, known_hosts_path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"host key of {self.host}:{self.port} is unknown: no entry for {hostname} in known_hosts "
            f"{self.known_hosts_path}; refusing to connect (the server offered {fingerprint(key)}; "
            f"add it to that file only after checking it out of band)"
        )


def load_known_hosts(client: paramiko.SSHClient, host: str, port: int, known_hosts_path: str) -> None:
    """Trust exactly the keys of ``known_hosts_path`` (read only) and refuse any other server."""
    path = os.path.expanduser(known_hosts_path)
    if not os.path.isfile(path):
        raise HostKeyError(f"known_hosts file {known_hosts_path} for {host}:{port} does not exist")
    try:
        client.get_host_keys().load(path)  # never written back
    except Exception as exc:
        raise HostKeyError(f"known_hosts file {known_hosts_path} cannot be read ({describe(exc)})") from exc
    client.set_missing_host_key_policy(RejectUnknownHost(host, port, known_hosts_path))


def changed_key_error(exc: paramiko.BadHostKeyException, host: str, port: int, known_hosts_path: str) -> HostKeyError:
    return HostKeyError(
        f"host key of {host}:{port} has CHANGED: the server offered {fingerprint(exc.key)}, "
        f"known_hosts {known_hosts_path} has {fingerprint(exc.expected_key)} for {known_hosts_name(host, port)}; "
        f"refusing to connect (possible man-in-the-middle, or the host was reinstalled)"
    )
