"""Real DICOM processes for the network tests: our receiver started as the service starts it, and
dcmtk's storescu/echoscu as the TPS would send. Loopback only; every process is bounded in time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")


def orthanc() -> str | None:
    """The Orthanc server (Debian installs it in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("Orthanc", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))


def dcmtk(tool: str) -> str | None:
    """The path of dcmtk's `tool` (storescu, echoscu, storescp), or None. pynetdicom installs Python
    apps of the same names into the virtual environment, which ./test.sh puts first on PATH; the
    independent peer the tests want is dcmtk's, so the environment's own folders are passed over."""
    ours = {Path(sys.prefix, "bin").resolve(), (REPO / ".venv" / "bin").resolve()}
    elsewhere = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() not in ours]
    return shutil.which(tool, path=os.pathsep.join([*elsewhere, "/usr/bin", "/usr/local/bin"]))


SENDER_AET = "TPS_TEST"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@contextmanager
def running_receiver(
    workdir: Path,
    staging: Path,
    *,
    allowed: tuple[str, ...] = (SENDER_AET,),
    ae_title: str = "MQI_TEST",
    tls: dict[str, object] | None = None,
) -> Iterator[dict[str, object]]:
    """`python -m mqi_communicator.dicomnet.receiver` with a site config; yields its settings."""
    port = free_port()
    state = workdir / "receiver.json"
    site = {
        "dicom_network": {
            "receiver": {
                "enabled": True,
                "ae_title": ae_title,
                "port": port,
                "allowed_calling_ae_titles": list(allowed),
                "staging_directory": str(staging),
                "state_file": str(state),
                **({"tls": tls} if tls else {}),
            }
        }
    }
    configfile = workdir / "site.yaml"
    configfile.write_text(yaml.safe_dump(site))
    log = (workdir / "receiver.log").open("wb")
    process = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "mqi_communicator.dicomnet.receiver",
            "--configfile",
            str(configfile),
            "--workdir",
            str(workdir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )

    def listening() -> bool:
        assert process.poll() is None, (workdir / "receiver.log").read_text()
        try:
            return bool(json.loads(state.read_text()).get("listening"))
        except (OSError, ValueError):
            return False

    try:
        wait_for(listening, 30, "the receiver to listen")
        yield {"port": port, "ae_title": ae_title, "state": state, "process": process, "configfile": configfile}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def storescu(port: int, called: str, files: list[Path], *, calling: str = SENDER_AET, timeout: float = 120):
    """dcmtk's storescu: every file in one association, going on after a failed store (-nh),
    proposing the files' own SOP classes (-R: its default list has no RT Ion Plan)."""
    command = [
        str(dcmtk("storescu")),
        "-v",
        "-R",
        "-nh",
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "30",
    ]
    return subprocess.run(
        [*command, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "LC_ALL": "C"},
    )


def python_module(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@contextmanager
def running_orthanc(workdir: Path, *, allowed_ae: str = "MQI_COMMUNICATOR") -> Iterator[dict[str, object]]:
    """Orthanc (the Debian package) as a DICOM archive, with its own config and storage in
    ``workdir``: HTTP on 127.0.0.1 only, DICOM on a free port, storing only from ``allowed_ae`` at
    127.0.0.1 (Orthanc 1.10 has no DICOM bind address); stopped (SIGTERM) at the end."""
    http_port, dicom_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "mqi-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": {"mqi": [allowed_ae, "127.0.0.1", 1]},
        "Plugins": [],
        "StorageCompression": False,
        "HttpsVerifyPeers": False,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    process = subprocess.Popen([str(orthanc()), str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"

    def up() -> bool:
        assert process.poll() is None, (workdir / "orthanc.log").read_text()
        try:
            with urllib.request.urlopen(f"{base}/system", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    try:
        wait_for(up, 60, "Orthanc to answer")
        yield {"http": base, "dicom_port": dicom_port, "ae_title": "ORTHANC", "process": process}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def orthanc_get(base: str, path: str) -> bytes:
    with urllib.request.urlopen(f"{base}{path}", timeout=30) as answer:
        return bytes(answer.read())
